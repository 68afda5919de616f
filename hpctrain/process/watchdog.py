"""The hang watchdog: a thread on every rank that ends the rank when training stops making progress.

The trainer calls `beat(step)` after every optimizer step and wraps evaluation and checkpointing in `paused()`
(they are not steps and have their own pace). If no beat comes for longer than the limit, the watchdog logs why,
dumps this rank's Python stacks (faulthandler, all threads) and those of its helper processes (`add_stack_dump`:
the loader workers), tells its `HangListener` (under SLURM the task's stop protocol, hpctrain.process.stop:
record the hang in the run's history and requeue the job, bounded by launcher.max_num_hang), waits a short grace
so the other ranks, stuck in the same collective, dump theirs too, and exits with EXIT_HUNG. A stopped rank
(SIGSTOP), a deadlocked loader worker and a collective that never completes all look the same from here: the
ranks still alive stop beating within one step of each other.

The limit is `trainer.watchdog_s` when > 0; with 0 it follows the measured step time (30 x the median step, at
least 60 s and at most 300 s, well under the process group's 600 s timeout), and before enough steps are measured
(start-up: building the model, resuming, the first steps) it is STARTUP_LIMIT_S. Negative: no watchdog.

The same thread runs the watchdog's periodic checks: every CHECK_EVERY_S it checks that this process still owns
the run directories it locked (hpctrain.process.distributed.check_held_run_locks; rank 0 holds the run lock).

The stacks are the standard library's faulthandler's, and so is the backstop: at every tick the thread re-arms
`faulthandler.dump_traceback_later` for the limit plus BACKSTOP_MARGIN_S. If the thread stops ticking because no
Python thread can run (the training thread holds the GIL in a C call that never returns: an h5py read on a hung
file system, say), faulthandler's own thread, which needs no GIL, dumps every thread's Python stack to stderr under
a "Timeout (h:mm:ss)!" line. It does not exit (a long C call may yet return, and then this watchdog decides). What
faulthandler cannot do stays here: time steps against a limit that follows the step time, leave evaluation and
checkpoints untimed, tell the stop protocol (record, requeue) and exit with EXIT_HUNG after a grace for the other
ranks; and dump other processes (the loader workers are asked with SIGUSR1, to which a faulthandler.register'd
handler in each worker answers: hpctrain.data.loader). Inside NCCL it shows only the Python call site of the
collective (docs/signals.md: torch's flight recorder).

Everything a watchdog calls belongs to it (its listener, checks and stack dumps), not to this module. The one
module-level reference is the running watchdog (`_active`), which the trainer's `beat`/`paused`/`stepping` and
the loader's `add_stack_dump` reach; the listener of the next watchdog comes from `reporting_to`, around the
call that starts it.
"""

from __future__ import annotations

import contextlib
import contextvars
import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Protocol

log = logging.getLogger(__name__)

EXIT_HUNG = 75
EXIT_CHECK_FAILED = 76
STARTUP_LIMIT_S = 300.0
AUTO_FACTOR, AUTO_MIN_S, AUTO_MAX_S = 30.0, 60.0, 300.0
MIN_MEASURED_STEPS = 3
CHECK_EVERY_S = 5.0
BACKSTOP_MARGIN_S = 60.0  # faulthandler's dump comes this long after the limit, when the thread could not tick

_active: "Watchdog | None" = None
# faulthandler has one timer per process. A child forked while it is armed hangs at its normal exit (CPython's
# finalizer waits for the timer's thread, which the child does not have: measured on 3.11). So it is disarmed
# before every fork, under this lock, which the watchdog thread takes to arm it; it re-arms at its next tick.
_backstop_lock = threading.Lock()
_backstop_armed = False
_fork_guard_installed = False


def _disarm_before_fork() -> None:
    global _backstop_armed
    _backstop_lock.acquire()
    if _backstop_armed:
        faulthandler.cancel_dump_traceback_later()
        _backstop_armed = False


def _after_fork_in_child() -> None:
    global _backstop_lock
    _backstop_lock = threading.Lock()  # the parent's is held (by _disarm_before_fork) in this copy


def _release_after_fork_in_parent() -> None:
    _backstop_lock.release()  # the watchdog thread re-arms the timer at its next tick


def _install_fork_guard() -> None:
    global _fork_guard_installed
    if not _fork_guard_installed:
        os.register_at_fork(before=_disarm_before_fork, after_in_parent=_release_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _fork_guard_installed = True


def _arm_backstop(timeout_s: float, file: Any) -> bool:
    """(Re-)arm faulthandler's timer; False where it cannot write to `file` (no file descriptor: a test's
    captured stderr)."""
    global _backstop_armed
    with _backstop_lock:
        try:
            faulthandler.dump_traceback_later(timeout_s, repeat=False, file=file, exit=False)
        except (AttributeError, ValueError, OSError):
            return False
        _backstop_armed = True
    return True


def _disarm_backstop() -> None:
    global _backstop_armed
    with _backstop_lock:
        if _backstop_armed:
            faulthandler.cancel_dump_traceback_later()
            _backstop_armed = False


class HangListener(Protocol):
    """Who hears of this rank's hang (hpctrain.process.stop.StopProtocol), in the watchdog thread."""

    def hang_detected(self, report: dict[str, Any]) -> None:
        """At once, before the stacks are dumped."""

    def act_on_hang(self, report: dict[str, Any]) -> None:
        """After the stacks, before the grace and the exit."""


# The listener of the watchdog that `watching` starts next: set by the job routine that can act on a hang
# (hpctrain.launching.slurm.run_task) around the call that trains, since the watchdog is started inside it.
_listener: contextvars.ContextVar[HangListener | None] = contextvars.ContextVar("hpctrain_hang_listener",
                                                                               default=None)


@contextlib.contextmanager
def reporting_to(listener: HangListener) -> Iterator[None]:
    """Within this block, a watchdog started by `watching` tells `listener` of a hang."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def add_stack_dump(dump: Callable[[], None]) -> None:
    """Have the running watchdog (if any) call `dump()` after this rank's own stacks when it is found hung: the
    stacks of processes it depends on (its loader workers, `hpctrain.data.loader.dump_loader_worker_stacks`), to
    stderr."""
    if _active is not None and dump not in _active.stack_dumps:
        _active.stack_dumps.append(dump)


class Watchdog:
    def __init__(self, *, limit_s: float, rank: int, startup_limit_s: float = STARTUP_LIMIT_S,
                 exit: Callable[[int], None] = os._exit, listener: HangListener | None = None,
                 checks: list[Callable[[], None]] | None = None) -> None:
        self.fixed_limit_s = limit_s  # 0: automatic
        self.startup_limit_s = max(startup_limit_s, limit_s)
        self.rank = rank
        self._exit = exit
        self.listener = listener
        self.periodic_checks = list(checks or [])  # each may raise: the rank then exits (EXIT_CHECK_FAILED)
        self.stack_dumps: list[Callable[[], None]] = []
        self._last_beat = time.monotonic()
        self._last_step: int | None = None
        self._intervals: deque[float] = deque(maxlen=50)
        self._paused: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpctrain-watchdog", daemon=True)

    # -- called by the training thread ------------------------------------------------------------------------
    def beat(self, step: int) -> None:
        now = time.monotonic()
        if self._last_step is not None:
            self._intervals.append(now - self._last_beat)
        self._last_beat, self._last_step = now, step

    @contextlib.contextmanager
    def paused(self, phase: str) -> Iterator[None]:
        previous, self._paused = self._paused, phase  # nested (a compilation in an evaluation): the outer resumes
        try:
            yield
        finally:
            self._paused = previous
            self._last_beat = time.monotonic()

    def end_of_steps(self) -> None:
        self._last_step, self._intervals = None, deque(maxlen=50)
        self._last_beat = time.monotonic()

    # -- the thread ---------------------------------------------------------------------------------------------
    def limit_s(self) -> float:
        if self._last_step is None:
            return self.startup_limit_s
        if self.fixed_limit_s > 0:
            return self.fixed_limit_s
        if len(self._intervals) < MIN_MEASURED_STEPS:
            return self.startup_limit_s
        return min(AUTO_MAX_S, max(AUTO_MIN_S, AUTO_FACTOR * statistics.median(self._intervals)))

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        _disarm_backstop()  # the thread disarms it too when it ends, should it have re-armed it meanwhile

    def _run(self) -> None:
        _install_fork_guard()
        try:
            self._watch()
        finally:
            _disarm_backstop()

    def _watch(self) -> None:
        next_check = time.monotonic() + CHECK_EVERY_S
        backstop = True
        while not self._stop.wait(min(1.0, max(0.05, self.limit_s() / 20))):
            if backstop:
                backstop = _arm_backstop(self.limit_s() + BACKSTOP_MARGIN_S, sys.stderr)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_EVERY_S
                for check in list(self.periodic_checks):
                    try:
                        check()
                    except Exception as error:
                        log.error("rank %d: %s; exiting", self.rank, error)
                        sys.stderr.flush()
                        self._exit(EXIT_CHECK_FAILED)
                        return
            if self._paused is not None:
                continue
            idle, limit = now - self._last_beat, self.limit_s()
            if idle > limit:
                self._fire(idle, limit)
                return

    def _fire(self, idle: float, limit: float) -> None:
        where = "before the first step" if self._last_step is None else f"after step {self._last_step}"
        report = {"rank": self.rank, "idle_s": round(idle, 1), "limit_s": round(limit, 1), "step": self._last_step,
                  "message": f"rank {self.rank} made no progress for {idle:.0f} s {where} (watchdog limit "
                             f"{limit:.0f} s)"}
        _disarm_backstop()  # the stacks come now, from here
        self._tell("hang_detected", report)
        log.error("%s: a rank is stopped or stuck (a collective that never completes, a deadlocked loader "
                  "worker); Python stacks of rank %d follow on stderr", report["message"], self.rank)
        for handler in logging.getLogger().handlers:
            handler.flush()
        print(f"--- hpctrain watchdog: Python stacks of rank {self.rank} (pid {os.getpid()}) ---", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        for dump in list(self.stack_dumps):
            try:
                dump()
            except Exception as error:
                log.error("rank %d: could not dump the stacks of its helper processes: %s", self.rank, error)
        self._tell("act_on_hang", report)
        # The other ranks hang in the same collective and fire within about one step: let them dump their stacks
        # before this exit makes srun (--kill-on-bad-exit) end the step.
        time.sleep(min(10.0, max(2.0, 0.25 * limit)))
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(EXIT_HUNG)

    def _tell(self, what: str, report: dict[str, Any]) -> None:
        if self.listener is None:
            return
        try:
            getattr(self.listener, what)(report)
        except Exception as error:  # the stacks, the grace and the exit must come whatever the listener does
            log.error("rank %d: hang action failed: %s", self.rank, error)


def beat(step: int) -> None:
    """The trainer made a step (no-op without a watchdog)."""
    if _active is not None:
        _active.beat(step)


@contextlib.contextmanager
def paused(phase: str) -> Iterator[None]:
    """A phase the watchdog does not time (evaluation, checkpoint)."""
    if _active is None:
        yield
    else:
        with _active.paused(phase):
            yield


@contextlib.contextmanager
def stepping() -> Iterator[None]:
    """The training loop: the step-time limit applies inside, the start-up limit again after it (teardown: the
    final plots, the last barrier)."""
    try:
        yield
    finally:
        if _active is not None:
            _active.end_of_steps()


@contextlib.contextmanager
def watching(config: Any, rank: int) -> Iterator[Watchdog | None]:
    """Run the watchdog for the duration of training (config: the run's Config; trainer.watchdog_s), telling the
    listener of the enclosing `reporting_to` of a hang."""
    global _active
    limit = float(getattr(config.trainer, "watchdog_s", 0.0))
    if limit < 0:
        yield None
        return
    from hpctrain.process.distributed import check_held_run_locks

    dog = Watchdog(limit_s=limit, rank=rank, listener=_listener.get(), checks=[check_held_run_locks]).start()
    _active = dog
    try:
        yield dog
    finally:
        dog.stop()
        _active = None
