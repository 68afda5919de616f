"""SLURM's view of a signalled job and what the signal means from it: `scontrol show job` and `sacct` (`query_job`),
the classification of a signal into a `Cause` (`classify`, `combine`), and `scontrol requeue` (`requeue`). The stop
protocol (hpctrain.process.stop) asks this module why a signal came and acts on the answer.

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

Nothing here imports torch.
"""

from __future__ import annotations

import enum
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpctrain.config import LauncherConfig

log = logging.getLogger(__name__)

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


def this_job_id() -> str:
    """This job as SLURM's commands must name it: `123_4` for an element of a job array, else SLURM_JOB_ID. An array
    element's SLURM_JOB_ID can be the array's id itself (one element has it), which `scontrol show job`, `sacct` and
    `scontrol requeue` take as every element of the array."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def restart_count() -> int:
    """This attempt's SLURM_RESTART_COUNT (0 before the first requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def classify_now(signal_names: list[str], launcher: "LauncherConfig") -> tuple[Cause, str]:
    """Ask SLURM why this job was signalled and classify the answer (never in a signal handler: it runs scontrol)."""
    job = this_job_id()
    try:
        view = query_job(job)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as error:
        log.warning("cannot ask SLURM about job %s: %s", job, error)
        view = None
    return classify(signal_names, view, restart_count=restart_count(), signal_delay_s=launcher.signal_delay_s,
                    sigterm=launcher.sigterm)
