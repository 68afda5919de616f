"""The hang watchdog: a thread on every rank that ends the rank when training stops making progress.

The trainer calls `beat(step)` after every optimizer step and wraps evaluation and checkpointing in `paused()`
(they are not steps and have their own pace). If no beat comes for longer than the limit, the watchdog logs why,
dumps this rank's Python stacks (faulthandler, all threads) and those of its loader workers, runs the registered
hang actions (under SLURM: record the hang in the run's history and requeue the job, bounded by
launcher.max_num_hang), waits a short grace so the other ranks, stuck in the same collective, dump theirs too, and
exits with EXIT_HUNG. A stopped rank
(SIGSTOP), a deadlocked loader worker and a collective that never completes all look the same from here: the
ranks still alive stop beating within one step of each other.

The limit is `trainer.watchdog_s` when > 0; with 0 it follows the measured step time (30 x the median step, at
least 60 s and at most 300 s, well under the process group's 600 s timeout), and before enough steps are measured
(start-up: building the model, resuming, the first steps) it is STARTUP_LIMIT_S. Negative: no watchdog.

The same thread runs periodic checks (`add_periodic_check`): rank 0 checks that it still owns the run directory.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

EXIT_HUNG = 75
EXIT_CHECK_FAILED = 76
STARTUP_LIMIT_S = 300.0
AUTO_FACTOR, AUTO_MIN_S, AUTO_MAX_S = 30.0, 60.0, 300.0
MIN_MEASURED_STEPS = 3
CHECK_EVERY_S = 5.0

_hang_actions: list[Callable[[dict[str, Any]], None]] = []
_stack_dumps: list[Callable[[], None]] = []
_periodic_checks: list[Callable[[], None]] = []
_active: "Watchdog | None" = None
_fired = threading.Event()


def has_fired() -> bool:
    """This process found itself hung (its record is written; it exits after the grace)."""
    return _fired.is_set()


def add_hang_action(action: Callable[[dict[str, Any]], None]) -> None:
    """Run `action(report)` in the watchdog thread when this rank is found hung, before it exits."""
    _hang_actions.append(action)


def add_stack_dump(dump: Callable[[], None]) -> None:
    """Call `dump()` after this rank's own stacks when it is found hung: the stacks of processes it depends on
    (its loader workers, `hpctrain.loader.dump_loader_worker_stacks`), to stderr."""
    if dump not in _stack_dumps:
        _stack_dumps.append(dump)


def add_periodic_check(check: Callable[[], None]) -> None:
    """Call `check()` every few seconds; if it raises, the rank logs the error and exits (EXIT_CHECK_FAILED)."""
    _periodic_checks.append(check)


def remove_periodic_check(check: Callable[[], None]) -> None:
    if check in _periodic_checks:
        _periodic_checks.remove(check)


def clear_actions() -> None:
    _hang_actions.clear()
    _periodic_checks.clear()


class Watchdog:
    def __init__(self, *, limit_s: float, rank: int, startup_limit_s: float = STARTUP_LIMIT_S,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.fixed_limit_s = limit_s  # 0: automatic
        self.startup_limit_s = max(startup_limit_s, limit_s)
        self.rank = rank
        self._exit = exit
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

    def _run(self) -> None:
        next_check = time.monotonic() + CHECK_EVERY_S
        while not self._stop.wait(min(1.0, max(0.05, self.limit_s() / 20))):
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_EVERY_S
                for check in list(_periodic_checks):
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
        _fired.set()
        where = "before the first step" if self._last_step is None else f"after step {self._last_step}"
        report = {"rank": self.rank, "idle_s": round(idle, 1), "limit_s": round(limit, 1), "step": self._last_step,
                  "message": f"rank {self.rank} made no progress for {idle:.0f} s {where} (watchdog limit "
                             f"{limit:.0f} s)"}
        log.error("%s: a rank is stopped or stuck (a collective that never completes, a deadlocked loader "
                  "worker); Python stacks of rank %d follow on stderr", report["message"], self.rank)
        for handler in logging.getLogger().handlers:
            handler.flush()
        print(f"--- hpctrain watchdog: Python stacks of rank {self.rank} (pid {os.getpid()}) ---", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        for dump in list(_stack_dumps):
            try:
                dump()
            except Exception as error:
                log.error("rank %d: could not dump the stacks of its helper processes: %s", self.rank, error)
        for action in list(_hang_actions):
            try:
                action(report)
            except Exception as error:
                log.error("rank %d: hang action failed: %s", self.rank, error)
        # The other ranks hang in the same collective and fire within about one step: let them dump their stacks
        # before this exit makes srun (--kill-on-bad-exit) end the step.
        time.sleep(min(10.0, max(2.0, 0.25 * limit)))
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(EXIT_HUNG)


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
    """Run the watchdog for the duration of training (config: the run's Config; trainer.watchdog_s)."""
    global _active
    limit = float(getattr(config.trainer, "watchdog_s", 0.0))
    if limit < 0:
        yield None
        return
    dog = Watchdog(limit_s=limit, rank=rank).start()
    _active = dog
    try:
        yield dog
    finally:
        dog.stop()
        _active = None
