"""What a signal to a SLURM job means: the stop flag its handlers set, and the classification of the signal from
SLURM's own view of the job (`scontrol show job`, `sacct`), made outside the handler.

SLURM sends the same two signals for different reasons; the job state tells them apart (see docs/signals.md):

| signal                                   | SLURM's view at signal time                       | cause              |
|------------------------------------------|---------------------------------------------------|--------------------|
| SIGTERM from `scancel JOBID`             | COMPLETING, sacct CANCELLED                       | CANCELLED          |
| SIGTERM from `scontrol requeue`, or a    | Restarts above this run's SLURM_RESTART_COUNT,    | REQUEUE_UNDER_WAY  |
|   PreemptMode=REQUEUE preemption         |   sacct REQUEUED / PENDING                        |                    |
| USR2 `--signal` before the time limit    | RUNNING, time left <= signal_delay_s (+ SLURM's   | TIME_LIMIT         |
|                                          |   up to 60 s early) and no PreemptTime            |                    |
| SIGTERM at the hard time limit           | COMPLETING, Reason=TimeLimit / sacct TIMEOUT      | TIME_LIMIT         |
| USR2/SIGTERM of a preemption (GraceTime, | RUNNING with PreemptTime set, or RUNNING with     | PREEMPTED          |
|   preempt_send_user_signal), or          |   time to spare                                   |                    |
|   `scancel --signal=TERM|USR2`           |                                                   |                    |

This module only classifies; what to do about each cause (checkpoint, requeue, count, end) is in
`hpctrain.slurm`. Nothing here imports torch, so the handlers can be installed before anything slow.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# SLURM may send the `--signal` warning up to 60 s earlier than asked (its time-limit check is periodic).
EARLY_SIGNAL_SLACK_S = 90
REQUEUE_STATES = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT"}
ENDING_STATES = {"COMPLETING", "CANCELLED", "TIMEOUT", "FAILED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "OUT_OF_MEMORY", "COMPLETED"}
SIGTERM_MODES = ("auto", "requeue", "cancel")


class Cause(str, enum.Enum):
    CANCELLED = "cancelled"  # end; nothing requeues the job
    REQUEUE_UNDER_WAY = "requeue_under_way"  # SLURM requeues the job itself: exit cleanly, no second requeue
    TIME_LIMIT = "time_limit"  # requeue, counted against launcher.max_num_timeout
    PREEMPTED = "preempted"  # requeue, not counted


# -- the flag ---------------------------------------------------------------------------------------------------
class StopFlag:
    """Set by USR2/SIGTERM; read by the trainer at step boundaries. The handler records the signal and sets a flag,
    nothing else; a helper thread (`start_classifier`) asks SLURM why, outside the handler."""

    def __init__(self) -> None:
        self._stopped = False
        self.signals: list[tuple[str, float]] = []  # (name, time.time()) in arrival order
        self.causes: list[tuple[Cause, str]] = []  # classifications made at signal time (rank 0)
        self._classifier: threading.Thread | None = None
        self._wake_fd: int | None = None  # the write end of the classifier's pipe
        self._lock = threading.Lock()  # self.causes, between the classifier and its readers; never in the handler

    def install(self) -> None:
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # A handler runs between two bytecodes of the main thread, also of another handler when a second signal
        # comes at once (SLURM's USR2 then SIGTERM), so it takes no lock: threading.Event.set() does, and a nested
        # handler waited forever for the lock of the one it interrupted. A write to a pipe wakes the classifier.
        self.signals.append((signal.Signals(signum).name, time.time()))
        self._stopped = True
        if self._wake_fd is not None:
            try:
                os.write(self._wake_fd, b"\0")
            except OSError:  # the pipe is full: the classifier has wake-ups pending anyway
                pass

    def is_set(self) -> bool:
        return self._stopped

    @property
    def signal_name(self) -> str:
        return self.signals[-1][0] if self.signals else ""

    def signal_names(self) -> list[str]:
        return [name for name, _ in self.signals]

    def start_classifier(self, classify_now: Callable[[list[str]], tuple[Cause, str]]) -> None:
        """Classify each signal when it arrives, in a daemon thread (scontrol must not run in a handler)."""
        if self._classifier is not None:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)

        def loop() -> None:
            seen = 0
            while True:
                while seen < len(self.signals):
                    seen = len(self.signals)
                    try:
                        result = classify_now(self.signal_names()[:seen])
                    except Exception as error:  # never let the helper die silently
                        log.warning("could not classify %s: %s", self.signals[seen - 1][0], error)
                        continue
                    with self._lock:
                        self.causes.append(result)
                    log.info("%s received: %s (%s)", self.signals[seen - 1][0], result[0].value, result[1])
                os.read(read_fd, 4096)  # until the handler writes: signals after the check above wake it too

        self._wake_fd = write_fd
        self._classifier = threading.Thread(target=loop, name="hpctrain-signal-classifier", daemon=True)
        self._classifier.start()

    def classified(self) -> list[tuple[Cause, str]]:
        with self._lock:
            return list(self.causes)


STOP = StopFlag()


def in_job_step() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ


# -- SLURM's view of the job ------------------------------------------------------------------------------------
def parse_duration_s(text: str) -> float | None:
    """SLURM durations: [D-]HH:MM:SS, MM:SS, UNLIMITED; None when unknown."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "INVALID", "N/A", "NONE", "UNKNOWN"):
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
    except ValueError:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts[-3:]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class JobView:
    """The fields of `scontrol show job --oneliner` that tell why a job is signalled, plus sacct's state."""

    job_state: str
    reason: str = "None"
    restarts: int = 0
    run_time_s: float | None = None
    time_limit_s: float | None = None
    preempt_time: str = "None"
    accounting_state: str = ""  # sacct's state of the allocation (CANCELLED, TIMEOUT, REQUEUED...), if asked
    fields: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def time_left_s(self) -> float | None:
        if self.run_time_s is None or self.time_limit_s is None:
            return None
        return self.time_limit_s - self.run_time_s

    @classmethod
    def parse(cls, scontrol_oneliner: str, accounting_state: str = "") -> "JobView":
        fields: dict[str, str] = {}
        for item in scontrol_oneliner.split():
            key, sep, value = item.partition("=")
            if sep and key not in fields:
                fields[key] = value
        if "JobState" not in fields:
            raise ValueError(f"not a `scontrol show job` line: {scontrol_oneliner[:200]!r}")
        return cls(job_state=fields["JobState"], reason=fields.get("Reason", "None"),
                   restarts=int(fields.get("Restarts", "0") or 0),
                   run_time_s=parse_duration_s(fields.get("RunTime", "")),
                   time_limit_s=parse_duration_s(fields.get("TimeLimit", "")),
                   preempt_time=fields.get("PreemptTime", "None"), accounting_state=accounting_state,
                   fields=fields)


def parse_sacct_state(sacct_output: str) -> str:
    """The first word of the allocation's State in `sacct --parsable2 --allocations --format JobID,State`
    ('CANCELLED by 0' -> 'CANCELLED')."""
    for line in sacct_output.splitlines():
        columns = line.split("|")
        if len(columns) >= 2 and columns[1].strip():
            return columns[1].split()[0]
    return ""


# SLURM signals every process of a job step, so a `scontrol` or `sacct` that a rank runs while the job is stopping
# (SIGTERM at a requeue or cancel, USR2 at a preemption) is signalled too: `scontrol requeue` was killed by the very
# SIGTERM its own requeue caused, before it could report success. They run with both signals ignored (an ignored
# signal stays ignored across exec); SIGKILL, KillWait after SIGTERM, still ends them.
_IGNORING_STOP_SIGNALS = ["sh", "-c", 'trap "" TERM USR2; exec "$@"', "sh"]


def _run_slurm_command(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_IGNORING_STOP_SIGNALS, *command], capture_output=True, text=True, timeout=timeout)


def _command(command: list[str], timeout: float = 30) -> str:
    result = _run_slurm_command(command, timeout)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result.stdout


def query_job(job_id: str, *, accounting_wait_s: float = 3.0) -> JobView:
    """SLURM's current view of the job. While the job is ending (COMPLETING hides why), also ask sacct, which
    may lag slurmctld by a moment: retried for up to `accounting_wait_s`."""
    view = JobView.parse(_command(["scontrol", "show", "job", "--oneliner", job_id]))
    if view.job_state not in ENDING_STATES:
        return view
    deadline = time.monotonic() + accounting_wait_s
    state = ""
    while True:
        try:
            state = parse_sacct_state(_command(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs",
                                                job_id, "--format", "JobID,State"]))
        except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError):
            state = ""
        if (state and state not in ("RUNNING", "PENDING")) or time.monotonic() >= deadline:
            break
        time.sleep(0.3)
    return JobView.parse(" ".join(f"{k}={v}" for k, v in view.fields.items()), accounting_state=state)


# -- classification ---------------------------------------------------------------------------------------------
def classify(signals: list[str], view: JobView | None, *, restart_count: int, signal_delay_s: float,
             sigterm: str = "auto") -> tuple[Cause, str]:
    """Why the job was signalled: (cause, explanation). `signals` are the names received so far ("SIGUSR2",
    "SIGTERM"), `view` SLURM's view of the job (None if SLURM could not be asked), `restart_count` this run's
    SLURM_RESTART_COUNT, `sigterm` the launcher.sigterm setting (auto: ask SLURM; requeue / cancel: what SIGTERM
    means on clusters where SLURM's view does not tell)."""
    term = "SIGTERM" in signals
    if view is None:
        if term and sigterm == "cancel":
            return Cause.CANCELLED, "SLURM could not be asked; launcher.sigterm=cancel"
        return Cause.PREEMPTED, "SLURM could not be asked: treated as a preemption (requeue, not counted)"
    state, accounting = view.job_state, view.accounting_state
    if (view.restarts > restart_count or state in REQUEUE_STATES or accounting in REQUEUE_STATES):
        return Cause.REQUEUE_UNDER_WAY, (f"SLURM is requeueing the job itself (JobState={state}, sacct "
                                         f"{accounting or '-'}, Restarts={view.restarts} > {restart_count})")
    if term and sigterm == "cancel":
        return Cause.CANCELLED, "launcher.sigterm=cancel"
    if term and sigterm == "requeue":
        return Cause.PREEMPTED, "launcher.sigterm=requeue"
    if state in ENDING_STATES:
        # The job is being ended by SLURM; COMPLETING hides why, sacct and Reason tell.
        if accounting == "TIMEOUT" or view.reason == "TimeLimit" or state == "TIMEOUT":
            return Cause.TIME_LIMIT, f"the job reached its time limit (JobState={state}, Reason={view.reason})"
        if accounting in ("PREEMPTED", "NODE_FAIL") or state in ("PREEMPTED", "NODE_FAIL"):
            return Cause.PREEMPTED, f"SLURM ends the job: {accounting or state}"
        how = f"sacct {accounting}" if accounting else f"JobState={state} and no requeue under way"
        return Cause.CANCELLED, f"the job is being cancelled ({how})"
    if view.preempt_time not in ("None", "", "Unknown"):
        return Cause.PREEMPTED, f"preempted at {view.preempt_time}"
    left = view.time_left_s
    if "SIGUSR2" in signals and left is not None and left <= signal_delay_s + EARLY_SIGNAL_SLACK_S:
        return Cause.TIME_LIMIT, f"{left:.0f} s left of the time limit (signal_delay_s={signal_delay_s:g})"
    seconds = "unknown" if left is None else f"{left:.0f} s"
    return Cause.PREEMPTED, f"{'/'.join(signals) or 'signal'} with the job RUNNING and {seconds} left: a preemption"


def combine(causes: list[Cause]) -> Cause:
    """One cause from several classifications (each signal's, and the final check): a cancel wins, then a requeue
    SLURM already does, then a time limit."""
    for cause in (Cause.CANCELLED, Cause.REQUEUE_UNDER_WAY, Cause.TIME_LIMIT):
        if cause in causes:
            return cause
    return Cause.PREEMPTED


def requeue(job_id: str, *, restart_count: int) -> tuple[bool, str]:
    """`scontrol requeue`, unless SLURM is already requeueing or ending the job. (requeued by us?, what happened)"""
    try:
        view = query_job(job_id, accounting_wait_s=0)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired, FileNotFoundError):
        view = None
    if view is not None and (view.restarts > restart_count or view.job_state in REQUEUE_STATES):
        return False, f"already being requeued by SLURM (JobState={view.job_state}, Restarts={view.restarts})"
    result = _run_slurm_command(["scontrol", "requeue", job_id], timeout=60)
    if result.returncode == 0:
        return True, "requeued"
    try:
        after = query_job(job_id, accounting_wait_s=1.0)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired, FileNotFoundError):
        after = None
    if after is not None and (after.restarts > restart_count or after.job_state in REQUEUE_STATES
                              or after.accounting_state in REQUEUE_STATES):
        return False, f"already being requeued by SLURM ({result.stderr.strip()})"
    return False, f"`scontrol requeue {job_id}` failed: {result.stderr.strip()}"
