"""The run's job history, `<run dir>/jobs.jsonl`: one JSON line per event, appended atomically (one `write` of a
whole line with O_APPEND, then fsync) by the rank that knows (rank 0; any rank for a hang).

Events:
  {"event": "start", "job": "123" or "123_4", "restart": SLURM_RESTART_COUNT, "host", "pid", "time",
   "resume_step": newest checkpoint's step, "last_step": furthest step the run had reached (metrics.h5)}
  {"event": "end", "job", "restart", "time", "reason": one of REASONS, "step", "message"}

An attempt that died without an end event (SIGKILL, node failure) gets one at the next start, from sacct.
`python -m hpctrain.inspect RUN_DIR` prints `format_history` of it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from hpctrain.process import slurm_view

log = logging.getLogger(__name__)

HISTORY_FILENAME = "jobs.jsonl"
REASONS = {
    "completed": "completed",
    "cancelled": "cancelled",
    "requeued_time_limit": "requeued: time limit",
    "requeued_preemption": "requeued: preemption",
    "requeued_by_slurm": "requeued by SLURM (preemption or operator)",
    "time_limit_exhausted": "ended: time limit, launcher.max_num_timeout used up",
    "failed": "failed",
    "hung": "hung",
    "lost": "ended without a record",
}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def job_identity() -> tuple[str, int]:
    """(the job as the user knows it: 123 or 123_4 for an array element, SLURM_RESTART_COUNT); ('local', 0)
    outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return "local", 0
    return slurm_view.this_job_id(), slurm_view.restart_count()


def append(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event (a single write of a whole line, so concurrent appends never interleave)."""
    line = (json.dumps({"time": _now(), **event}, sort_keys=True) + "\n").encode()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / HISTORY_FILENAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY_FILENAME
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("ignoring an unreadable line of %s: %r", path, line[:200])
    return events


def count_ends(events: list[dict[str, Any]], job: str, reason: str) -> int:
    """How many attempts of `job` ended for `reason` (one per restart, however many ranks reported it)."""
    return len({event.get("restart") for event in events
                if event.get("event") == "end" and event.get("job") == job and event.get("reason") == reason})


def _last_step_in_metrics(run_dir: Path) -> int:
    path = run_dir / "metrics.h5"
    if not path.exists():
        return 0
    try:
        import h5py

        with h5py.File(path, "r", locking=False) as file:
            steps = file["train/step"]
            return int(steps[-1]) if steps.shape[0] else 0
    except (OSError, KeyError, ValueError):
        return 0


def _sacct_state(job: str) -> str:
    try:
        result = subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job,
                                 "--format", "State"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    states = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return states[-1] if states else ""


def record_start(run_dir: Path, *, resume_step: int) -> None:
    """Rank 0, at the start of an attempt: close the previous attempt's record if it died without one, then
    record this start with the steps it will redo."""
    events = read(run_dir)
    starts = [e for e in events if e.get("event") == "start"]
    last_step = _last_step_in_metrics(run_dir)
    if starts:
        previous = starts[-1]
        ended = any(e.get("event") == "end" and e.get("job") == previous.get("job")
                    and e.get("restart") == previous.get("restart") for e in events)
        last_step = max([last_step] + [int(e.get("step", 0)) for e in events if e.get("event") == "end"])
        if not ended:
            state = _sacct_state(str(previous.get("job"))) if previous.get("job") != "local" else ""
            append(run_dir, {"event": "end", "job": previous.get("job"), "restart": previous.get("restart"),
                             "reason": "lost", "step": last_step,
                             "message": f"no end recorded (killed?); sacct: {state or 'unknown'}"})
    job, restart = job_identity()
    append(run_dir, {"event": "start", "job": job, "restart": restart, "host": socket.gethostname(),
                     "pid": os.getpid(), "resume_step": resume_step, "last_step": max(last_step, resume_step)})


def record_end(run_dir: Path, reason: str, *, step: int, message: str = "") -> None:
    assert reason in REASONS, reason
    job, restart = job_identity()
    append(run_dir, {"event": "end", "job": job, "restart": restart, "reason": reason, "step": step,
                     "message": message})


def attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attempt (start + its end): job, restart, start, end, reason, steps, steps redone."""
    rows: list[dict[str, Any]] = []
    for event in events:
        if event.get("event") == "start":
            rows.append({"job": event.get("job"), "restart": event.get("restart", 0), "host": event.get("host"),
                         "start": event.get("time"), "end": None, "reason": None, "message": "",
                         "resume_step": event.get("resume_step", 0),
                         "redone": max(0, int(event.get("last_step", 0)) - int(event.get("resume_step", 0))),
                         "step": None})
        elif event.get("event") == "end":
            for row in reversed(rows):
                if row["job"] == event.get("job") and row["restart"] == event.get("restart"):
                    if row["reason"] is None:
                        row.update(end=event.get("time"), reason=event.get("reason"), step=event.get("step"),
                                   message=event.get("message", ""))
                    break
            else:  # an end without a start (e.g. refused before training)
                rows.append({"job": event.get("job"), "restart": event.get("restart", 0), "host": None,
                             "start": None, "end": event.get("time"), "reason": event.get("reason"),
                             "message": event.get("message", ""), "resume_step": None, "redone": 0,
                             "step": event.get("step")})
    return rows


def format_history(run_dir: Path) -> list[str]:
    """Lines for `hpctrain.inspect`: one per attempt of the run."""
    rows = attempts(read(run_dir))
    if not rows:
        return []

    def clock(value: str | None) -> str:
        return value.replace("T", " ")[:19] if value else "-"

    lines = [f"jobs       {len(rows)} attempt(s) (from {HISTORY_FILENAME})"]
    for row in rows:
        reason = REASONS.get(row["reason"], row["reason"]) if row["reason"] else "running (or killed)"
        steps = f"steps {row['resume_step']}->{row['step'] if row['step'] is not None else '?'}"
        redone = f", {row['redone']} redone" if row["redone"] else ""
        message = f": {row['message']}" if row["message"] else ""
        lines.append(f"  job {row['job']} (restart {row['restart']}) {clock(row['start'])} .. {clock(row['end'])}"
                     f"  {steps}{redone}  {reason}{message}")
    return lines
