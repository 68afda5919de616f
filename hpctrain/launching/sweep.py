"""Sweeps on SLURM: submit the points of a Hydra multirun as one job array, re-runnable (hpctrain.inspect
summarizes them with `point_status`).

A point's run directory is `<sweep dir>/<its overrides>`, the same every time the sweep command runs, so a
re-run finds each point's state: finished (result.json), queued or running (its recorded job is active in
SLURM), or to be (re)submitted, in which case it resumes from its own newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpctrain.config import Config, ConfigError
from hpctrain.components import check_run_inputs
from hpctrain.launching.job import RESULT_FILENAME, check_run_dir_writable
from hpctrain.run.resume_check import check_run_dir_continues
from hpctrain.launching.slurm import (ACTIVE_STATES, SUBMITIT_DIRNAME, TrainingJob, check_resources, job_state,
                            make_executor, record_job, recorded_job_id)


@dataclass(frozen=True)
class SweepPoint:
    index: int
    overrides: list[str]
    run_dir: Path
    config: Config


def point_status(run_dir: Path) -> tuple[str, str | None]:
    """(state, job id): FINISHED, the SLURM state of its job, or (never submitted to SLURM) INTERRUPTED or
    NOT_STARTED."""
    job_id = recorded_job_id(run_dir)
    if (run_dir / RESULT_FILENAME).exists():
        return "FINISHED", job_id
    if job_id is None:
        return ("INTERRUPTED" if (run_dir / "checkpoints").is_dir() else "NOT_STARTED"), None
    return job_state(job_id), job_id


def submit_sweep(points: list[SweepPoint], sweep_dir: Path) -> list[dict[str, Any]]:
    """Validate every point, then submit the unfinished, inactive ones as one job array."""
    launchers = {json.dumps(point.config.launcher.__dict__, sort_keys=True, default=str) for point in points}
    if len(launchers) > 1:
        raise ConfigError("all points of a SLURM sweep share one job array, so they must request the same "
                          "resources: do not sweep over launcher.* keys")
    check_run_dir_writable(sweep_dir)
    for point in points:
        check_run_dir_continues(point.config, check_run_inputs(point.config, prepare=True), point.run_dir)
    check_resources(points[0].config.launcher)

    outcomes: list[dict[str, Any]] = []
    to_submit: list[tuple[SweepPoint, dict[str, Any]]] = []
    for point in points:
        state, job_id = point_status(point.run_dir)
        outcome = {"run_dir": str(point.run_dir), "state": state, "job_id": job_id, "submitted": False}
        outcomes.append(outcome)
        if state != "FINISHED" and state not in ACTIVE_STATES:
            to_submit.append((point, outcome))
    if to_submit:
        executor = make_executor(sweep_dir / SUBMITIT_DIRNAME, points[0].config.launcher)
        with executor.batch():
            jobs = [executor.submit(TrainingJob(point.config, point.run_dir)) for point, _ in to_submit]
        for (point, outcome), job in zip(to_submit, jobs):
            point.run_dir.mkdir(parents=True, exist_ok=True)
            record_job(point.run_dir, job)
            outcome.update(state="SUBMITTED", job_id=job.job_id, submitted=True)
        array_id = jobs[0].job_id.split("_")[0]
        print(f"submitted job array {array_id} with {len(jobs)} of the sweep's {len(points)} points")
    skipped = [o for o in outcomes if not o["submitted"]]
    for outcome in skipped:
        print(f"  skipped ({outcome['state'].lower()}): {outcome['run_dir']}")
    print(f"  sweep directory: {sweep_dir}\n  summary:         python -m hpctrain.inspect {sweep_dir}", flush=True)
    return outcomes
