"""The stop protocol of one SLURM task: one state machine from SLURM's signals and the hang watchdog to what the
task does about them. docs/signals.md has the table of every source, the state it leads to and the action.

`StopProtocol` owns, for its process: the USR2/SIGTERM handlers, the record of the signals that came, the thread
that asks SLURM why each came (rank 0; hpctrain.process.slurm_view), the state, and the actions: what rank 0 does
once the ranks stopped at a step boundary with a checkpoint (end, leave the requeue to SLURM, requeue, give up
after launcher.max_num_timeout), and what a rank does when its watchdog finds it hung (record, requeue up to
launcher.max_num_hang). The trainer only reads `stop_requested`.

Nothing installs the handlers at import: the entry point that runs a SLURM task creates the protocol, installs it
first thing (`TrainingJob`/`TuneWorker` when submitit calls them, before torch is imported; the Hydra app's `run`
inside a job step for launcher=srun) and passes it down. Nothing here imports torch.

    RUNNING --signal--> STOP_REQUESTED --SLURM asked (rank 0)--> CANCELLED | REQUEUE_UNDER_WAY | TIME_LIMIT | PREEMPTED
                           ^   another signal: the cause is open again     |
                           +-----------------------------------------------+
    STOP_REQUESTED or a cause --the ranks stopped with a checkpoint (rank 0)--> STOPPING --acted--> STOPPED
    any state before STOPPING --this rank's watchdog fired--> HUNG --recorded, requeued or not--> STOPPED
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hpctrain.process import history
from hpctrain.process.slurm_view import Cause, classify_now, combine, requeue, this_job_id

if TYPE_CHECKING:
    from hpctrain.config import LauncherConfig

log = logging.getLogger(__name__)

# What SLURM sends a job's tasks to stop them (and what loader workers must leave to the training process).
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopState(str, enum.Enum):
    RUNNING = "running"  # no stop signal yet
    STOP_REQUESTED = "stop_requested"  # a signal came, its cause is not known (yet; other ranks never ask)
    CANCELLED = "cancelled"  # scancel: checkpoint, end
    REQUEUE_UNDER_WAY = "requeue_under_way"  # scontrol requeue, PreemptMode=REQUEUE: checkpoint, SLURM requeues
    TIME_LIMIT = "time_limit"  # checkpoint, requeue counted against launcher.max_num_timeout
    PREEMPTED = "preempted"  # checkpoint, requeue not counted
    HUNG = "hung"  # this rank's watchdog found no progress: stacks, record, requeue (max_num_hang)
    STOPPING = "stopping"  # rank 0, the ranks stopped with a checkpoint: final question to SLURM, the action
    STOPPED = "stopped"  # acted; `outcome` says how. The process ends


CAUSE_STATES = {Cause.CANCELLED: StopState.CANCELLED, Cause.REQUEUE_UNDER_WAY: StopState.REQUEUE_UNDER_WAY,
                Cause.TIME_LIMIT: StopState.TIME_LIMIT, Cause.PREEMPTED: StopState.PREEMPTED}
_CLASSIFIED = tuple(CAUSE_STATES.values())
_OPENED_BY_A_SIGNAL = (StopState.RUNNING, *_CLASSIFIED)  # the states the handler moves to STOP_REQUESTED
TRANSITIONS: dict[StopState, frozenset[StopState]] = {
    StopState.RUNNING: frozenset({StopState.STOP_REQUESTED, StopState.HUNG}),
    # A later classification may change the combined cause (USR2 a time limit, then the SIGTERM of a scancel).
    **{state: frozenset({StopState.STOP_REQUESTED, *_CLASSIFIED, StopState.STOPPING, StopState.HUNG})
       for state in (StopState.STOP_REQUESTED, *_CLASSIFIED)},
    StopState.HUNG: frozenset({StopState.STOPPED}),
    StopState.STOPPING: frozenset({StopState.STOPPED}),
    StopState.STOPPED: frozenset(),
}


@dataclass(frozen=True)
class Outcome:
    """How a stop ended: `reason` is the run history's end reason (hpctrain.process.history.REASONS)."""

    reason: str
    message: str


@dataclass(frozen=True)
class _Run:
    launcher: "LauncherConfig"
    run_dir: Path


class StopProtocol:
    """The stop protocol of this process (module docstring). Thread-safety: the signal handler runs in the main
    thread between any two bytecodes, also inside another handler (SLURM's USR2, then SIGTERM at once), so it takes
    no lock and only appends, sets plain attributes and writes to a pipe; every other transition is made under
    `_lock` by the main thread, the classifier thread or the watchdog thread. So a signal at the very instant
    another thread moves the state can leave STOP_REQUESTED over that move: what decides (`finish`, `has_hung`,
    the hang's own end) reads the records (signals, causes, the hang) and moves on from STOP_REQUESTED too."""

    def __init__(self) -> None:
        self._state = StopState.RUNNING
        self._requested = False  # what the trainer reads; a plain flag, set by the handler
        self.signals: list[tuple[str, float]] = []  # (name, time.time()) in arrival order
        self.causes: list[tuple[Cause, str]] = []  # classifications made at signal time (rank 0)
        self.outcome: Outcome | None = None
        self._run: _Run | None = None  # the run this process trains now (or last did)
        self._hang_seen = False  # the watchdog fired (a record, as the signals are: the state may be overwritten)
        self._classifier: threading.Thread | None = None
        self._wake_fd: int | None = None  # the write end of the classifier's pipe
        self._lock = threading.Lock()  # the state and self.causes; never taken by the handler

    # -- the handlers -----------------------------------------------------------------------------------------
    def install(self) -> None:
        """Take USR2 and SIGTERM (from the main thread): from now on they request a stop instead of ending it."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def release(self) -> None:
        """Give USR2 and SIGTERM back to their default action (the process turned out not to be a SLURM task); a
        signal that came while the handlers held it is sent again, so the process ends as it would have."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        for name in dict.fromkeys(self.signal_names()):
            os.kill(os.getpid(), signal.Signals[name])

    def _handle(self, signum: int, frame: Any) -> None:
        # No lock (threading.Event.set() takes one, and a nested handler waited forever for the lock of the one it
        # interrupted), no logging (it locks too). The classifier's pipe wakes it; a full pipe means it is awake.
        self.signals.append((signal.Signals(signum).name, time.time()))
        self._requested = True
        if self._state in _OPENED_BY_A_SIGNAL:
            self._state = StopState.STOP_REQUESTED  # a new signal's cause is open until the classifier answers
        if self._wake_fd is not None:
            try:
                os.write(self._wake_fd, b"\0")
            except OSError:
                pass

    # -- what the others read ---------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """The trainer's question at every step boundary: has a stop signal come?"""
        return self._requested

    is_set = stop_requested  # the name the stop flag's reading had before the protocol (tests/test_signals.py)

    @property
    def state(self) -> StopState:
        return self._state

    def signal_names(self) -> list[str]:
        return [name for name, _ in self.signals]

    def classified(self) -> list[tuple[Cause, str]]:
        with self._lock:
            return list(self.causes)

    def _move(self, new: StopState) -> bool:
        """Enter `new` if TRANSITIONS allow it from the current state (never from the handler)."""
        with self._lock:
            if new not in TRANSITIONS[self._state]:
                return False
            self._state = new
            return True

    # -- the classifier (rank 0) ------------------------------------------------------------------------------
    def begin_run(self, launcher: "LauncherConfig", run_dir: Path) -> None:
        """The run this process trains from now on (a tune worker trains several, one after the other)."""
        self._run = _Run(launcher, run_dir)

    def ask_slurm(self, signal_names: list[str]) -> tuple[Cause, str]:
        """Why SLURM signalled the job, by the current run's launcher settings (signal_delay_s, sigterm)."""
        if self._run is None:
            raise RuntimeError("stop protocol: no run to classify for (begin_run first)")
        return classify_now(signal_names, self._run.launcher)

    def start_classifier(self, classify: Callable[[list[str]], tuple[Cause, str]] | None = None) -> None:
        """Classify each signal when it arrives, in a daemon thread (scontrol must not run in a handler); once per
        process. `classify` (names so far -> cause) defaults to asking SLURM."""
        if self._classifier is not None:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._wake_fd = write_fd
        self._classifier = threading.Thread(target=self._classify_loop, args=(read_fd, classify or self.ask_slurm),
                                            name="hpctrain-signal-classifier", daemon=True)
        self._classifier.start()

    def _classify_loop(self, read_fd: int, classify: Callable[[list[str]], tuple[Cause, str]]) -> None:
        seen = 0
        while True:
            while seen < len(self.signals):
                seen = len(self.signals)
                try:
                    result = classify(self.signal_names()[:seen])
                except Exception as error:  # never let the helper die silently; the state stays STOP_REQUESTED
                    log.warning("could not classify %s: %s", self.signals[seen - 1][0], error)
                    continue
                self._record_cause(result, seen)
                log.info("%s received: %s (%s)", self.signals[seen - 1][0], result[0].value, result[1])
            os.read(read_fd, 4096)  # until the handler writes: signals after the check above wake it too

    def _record_cause(self, result: tuple[Cause, str], seen: int) -> None:
        with self._lock:
            self.causes.append(result)
            # The combined cause of every signal so far, unless one came meanwhile (the loop classifies it next)
            # or the stop is past classification (STOPPING asks SLURM itself; HUNG).
            if seen == len(self.signals) and self._state in (StopState.STOP_REQUESTED, *_CLASSIFIED):
                self._state = CAUSE_STATES[combine([cause for cause, _ in self.causes])]

    # -- after the stop (rank 0) ------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Rank 0, once the ranks stopped at a step boundary and wrote a checkpoint: ask SLURM once more, combine
        with what each signal was classified as (a cancel wins, then a requeue SLURM already does, then a time
        limit), act, and return the summary with its `stop_cause`. `outcome` then says what was done."""
        if self._run is None or not self._move(StopState.STOPPING):
            raise RuntimeError(f"stop protocol: cannot stop from {self._state.value} (run: {self._run})")
        step, names = summary["step"], self.signal_names()
        final = self.ask_slurm(names)  # SLURM's view now, after the checkpoint
        known = self.classified() + [final]
        cause = combine([c for c, _ in known])
        why = next((text for c, text in known if c == cause), final[1])
        act = {Cause.CANCELLED: _end_cancelled, Cause.REQUEUE_UNDER_WAY: _leave_to_slurm,
               Cause.TIME_LIMIT: _requeue_time_limit, Cause.PREEMPTED: _requeue_preempted}[cause]
        self.outcome = act(self._run, "/".join(dict.fromkeys(names)), why, step)
        history.record_end(self._run.run_dir, self.outcome.reason, step=step, message=self.outcome.message)
        self._move(StopState.STOPPED)
        return {**summary, "stop_cause": cause.value}

    # -- a hang (the watchdog's listener, in its thread) ------------------------------------------------------
    def hang_detected(self, report: dict[str, Any]) -> None:
        """At once when the watchdog fires, before the stacks: the stop is a hang from now on."""
        self._hang_seen = True
        self._move(StopState.HUNG)

    def act_on_hang(self, report: dict[str, Any]) -> None:
        """After the stacks: record the hang in the run's history and, under launcher.max_num_hang for this job,
        requeue it (the process then exits, EXIT_HUNG)."""
        if self._run is None:
            return
        job, restart = history.job_identity()
        history.record_end(self._run.run_dir, "hung", step=report["step"] or 0, message=report["message"])
        hangs = history.count_ends(history.read(self._run.run_dir), job, "hung")
        limit = self._run.launcher.max_num_hang
        if hangs > limit:
            log.error("job %s hung %d times, more than launcher.max_num_hang=%d: not requeued; the job ends. "
                      "Look at the stacks above; the same command resumes from the last checkpoint", job, hangs,
                      limit)
            what = "not requeued (launcher.max_num_hang)"
        else:
            _, what = requeue(this_job_id(), restart_count=restart)
            log.error("job %s hung (%d of launcher.max_num_hang=%d): %s; it resumes from the last checkpoint",
                      job, hangs, limit, what)
        self.outcome = Outcome("hung", f"{report['message']}; {what}")
        self._move(StopState.HUNG)  # again, if a signal's STOP_REQUESTED came over it meanwhile
        self._move(StopState.STOPPED)

    def has_hung(self) -> bool:
        """This rank's watchdog fired: it has acted (or is acting) on the hang, and the process exits."""
        return self._hang_seen


def in_job_step() -> bool:
    """This process is a task of a SLURM job step (srun, or submitit's srun)."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ


# -- what rank 0 does for each cause: the history's end reason and message, after its log line --------------------
def _end_cancelled(run: _Run, signals: str, why: str, step: int) -> Outcome:
    job, _ = history.job_identity()
    log.warning("%s received: job %s is cancelled (%s): checkpoint written at step %d; not requeueing. The same "
                "command resumes the run", signals, job, why, step)
    return Outcome("cancelled", why)


def _leave_to_slurm(run: _Run, signals: str, why: str, step: int) -> Outcome:
    log.warning("%s received: %s; checkpoint written at step %d; exiting without a second requeue", signals, why,
                step)
    return Outcome("requeued_by_slurm", why)


def _requeue_time_limit(run: _Run, signals: str, why: str, step: int) -> Outcome:
    job, restart = history.job_identity()
    launcher = run.launcher
    used = history.count_ends(history.read(run.run_dir), job, "requeued_time_limit")
    if used >= launcher.max_num_timeout:
        message = (f"job {job} reached its time limit again after {used} time-limit requeue(s), "
                   f"launcher.max_num_timeout={launcher.max_num_timeout}: not requeued, the job ends here with "
                   f"a checkpoint at step {step}. Run the same command to continue, with a larger "
                   f"launcher.timeout_min or launcher.max_num_timeout")
        log.error("%s received: %s", signals, message)
        return Outcome("time_limit_exhausted", message)
    requeued, what = requeue(this_job_id(), restart_count=restart)
    count = f"time-limit requeue {used + 1} of launcher.max_num_timeout={launcher.max_num_timeout}"
    log.warning("%s received: time limit (%s): checkpoint written at step %d; %s (%s)", signals, why, step, what,
                count)
    # A requeue that SLURM had started already is SLURM's: not counted against max_num_timeout.
    return Outcome("requeued_time_limit", f"{why}; {count}") if requeued else Outcome("requeued_by_slurm", what)


def _requeue_preempted(run: _Run, signals: str, why: str, step: int) -> Outcome:
    _, restart = history.job_identity()
    requeued, what = requeue(this_job_id(), restart_count=restart)
    log.warning("%s received: preemption (%s): checkpoint written at step %d; %s (not counted against "
                "launcher.max_num_timeout)", signals, why, step, what)
    return Outcome("requeued_preemption", why) if requeued else Outcome("requeued_by_slurm", what)
