"""SLURM: check a request against the cluster (login-node preflight), submit runs and sweeps with submitit, and
the job callable that runs on the nodes, requeueing itself on preemption or time limit.

Preemption: USR2 (sent `signal_delay_s` before the time limit, or by the scheduler on preemption) and SIGTERM
only set a flag. The trainer all-reduces the flag with its step statistics, so all ranks stop at the same step
boundary; rank 0 writes a checkpoint; then submitit's own handler is called, which pickles the fresh callable
returned by `TrainingJob.checkpoint` and requeues the job. The requeued job resumes from the run directory's
newest checkpoint: state lives on disk, never in the pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from hpctrain.config import Config, ConfigError, LauncherConfig

log = logging.getLogger(__name__)

JOB_RECORD = "slurm_job.json"
SUBMITIT_DIRNAME = "submitit"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


# -- preflight -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    name: str
    is_default: bool
    max_time_min: float  # inf when unlimited
    total_nodes: int
    node_cpus: list[int]
    node_memory_mb: list[int]
    node_gpus: list[int]


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    except FileNotFoundError:
        raise ConfigError(f"launcher.name=slurm needs SLURM's `{command[0]}` on PATH; "
                          "run this on a login node of your cluster (or use launcher=local)") from None
    except subprocess.CalledProcessError as error:
        raise ConfigError(f"`{' '.join(command)}` failed: {error.stderr.strip()}") from None


def parse_slurm_minutes(text: str) -> float:
    """SLURM time limits: UNLIMITED, minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return float("inf")
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts
    return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60


def _gpus_in_gres(gres: str) -> int:
    return sum(int(count) for count in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))


def query_partitions() -> dict[str, Partition]:
    partitions = {}
    for line in _run(["scontrol", "show", "partition", "--oneliner"]).splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "PartitionName" not in fields:
            continue
        name = fields["PartitionName"]
        nodes = [row.split("|") for row in _run(["sinfo", "--noheader", "--Node", "--partition", name,
                                                "--format", "%N|%c|%m|%G"]).splitlines() if row.strip()]
        partitions[name] = Partition(
            name=name, is_default=fields.get("Default") == "YES",
            max_time_min=parse_slurm_minutes(fields.get("MaxTime", "UNLIMITED")),
            total_nodes=int(fields.get("TotalNodes", len(nodes))),
            node_cpus=[int(row[1]) for row in nodes], node_memory_mb=[int(float(row[2])) for row in nodes],
            node_gpus=[_gpus_in_gres(row[3]) for row in nodes])
    return partitions


def check_resources(launcher: LauncherConfig, partitions: dict[str, Partition] | None = None) -> Partition:
    """Refuse a request the cluster cannot run, with the reason; return the partition it will run in."""
    partitions = query_partitions() if partitions is None else partitions
    if launcher.partition is None:
        defaults = [p for p in partitions.values() if p.is_default]
        if not defaults:
            raise ConfigError(f"launcher.partition is not set and the cluster has no default partition; "
                              f"choose one of {', '.join(sorted(partitions))}")
        partition = defaults[0]
    elif launcher.partition not in partitions:
        raise ConfigError(f"launcher.partition={launcher.partition}: no such partition "
                          f"(the cluster has {', '.join(sorted(partitions)) or 'none'})")
    else:
        partition = partitions[launcher.partition]
    where = f"partition {partition.name}"
    if launcher.nodes > partition.total_nodes:
        raise ConfigError(f"launcher.nodes={launcher.nodes}: {where} has only {partition.total_nodes} nodes")
    cpus_needed = launcher.tasks_per_node * launcher.cpus_per_task
    fitting = [i for i, cpus in enumerate(partition.node_cpus) if cpus >= cpus_needed
               and (launcher.mem_gb is None or partition.node_memory_mb[i] >= launcher.mem_gb * 1024)
               and partition.node_gpus[i] >= launcher.gpus_per_node]
    if len(fitting) < launcher.nodes:
        raise ConfigError(
            f"launcher.tasks_per_node={launcher.tasks_per_node} x launcher.cpus_per_task={launcher.cpus_per_task} "
            f"= {cpus_needed} CPUs, mem_gb={launcher.mem_gb}, gpus_per_node={launcher.gpus_per_node} per node: "
            f"only {len(fitting)} node(s) of {where} can take that (nodes have {max(partition.node_cpus, default=0)}"
            f" CPUs, {max(partition.node_memory_mb, default=0)} MB, {max(partition.node_gpus, default=0)} GPUs "
            f"at most) but launcher.nodes={launcher.nodes}")
    if launcher.timeout_min > partition.max_time_min:
        raise ConfigError(f"launcher.timeout_min={launcher.timeout_min} exceeds the MaxTime of {where} "
                          f"({partition.max_time_min:g} min)")
    return partition


# -- inside the job --------------------------------------------------------------------------------------------
class StopFlag:
    """Set by USR2/SIGTERM; read by the trainer at step boundaries (a signal handler must not do more)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def seconds_left_in_job() -> float | None:
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return None
    result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%L"], capture_output=True,
                            text=True, timeout=60)
    try:
        return parse_slurm_minutes(result.stdout.strip()) * 60
    except ValueError:
        return None


class TrainingJob(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task of the job: one DDP rank each."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir

    def __call__(self) -> dict[str, Any]:
        from hpctrain.job import configure_rank_logging, run_rank

        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        configure_rank_logging(environment.rank)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        stop = StopFlag()
        stop.install()
        summary = run_rank(self.config, self.run_dir, stop_requested=stop.is_set)
        if stop.is_set() and not summary["finished"]:
            log.warning("%s received: checkpoint written at step %d; requeueing", stop.signal_name, summary["step"])
            handler = getattr(requeue, "__self__", None)
            if handler is not None and hasattr(handler, "has_timed_out"):
                # submitit guesses "timed out" from the elapsed time (always, for limits under 10 min); ask
                # SLURM instead, so only real time limits count against max_num_timeout.
                handler.has_timed_out = lambda: self._near_time_limit()
            if callable(requeue):
                requeue(signal.SIGUSR2, None)  # rank 0: calls checkpoint(), requeues and exits; others return
        return summary

    def _near_time_limit(self) -> bool:
        left = seconds_left_in_job()
        timed_out = left is not None and left <= self.config.launcher.signal_delay_s + 60
        log.info("%s s left in the job's time limit: %s", left, "time limit" if timed_out else "preemption")
        return timed_out

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # A fresh callable: everything needed to resume is in the run directory, not in this pickle.
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.run_dir))


def run_srun_task(config: Config, run_dir: Path) -> dict[str, Any]:
    """One rank of a job step started by srun from a plain sbatch script (slurm/train.sbatch).

    The same preemption protocol as TrainingJob; rank 0 requeues the job itself with `scontrol requeue`
    (sbatch --requeue keeps the job id, so the run directory named after it stays the same).
    """
    from hpctrain.job import configure_rank_logging, run_rank

    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # submitit reads the SLURM variables srun set
    environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    configure_rank_logging(environment.rank)
    stop = StopFlag()
    stop.install()
    summary = run_rank(config, run_dir, stop_requested=stop.is_set)
    if stop.is_set() and not summary["finished"] and environment.rank == 0:
        log.warning("%s received: checkpoint written at step %d; requeueing job %s", stop.signal_name,
                    summary["step"], os.environ["SLURM_JOB_ID"])
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60)
    return summary


# -- submission ------------------------------------------------------------------------------------------------
def make_executor(folder: Path, launcher: LauncherConfig) -> submitit.AutoExecutor:
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher.name=slurm needs SLURM's `sbatch` on PATH; run this on a login node")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                     slurm_max_num_timeout=launcher.max_num_timeout)
    parameters: dict[str, Any] = {
        "name": launcher.job_name, "nodes": launcher.nodes, "tasks_per_node": launcher.tasks_per_node,
        "cpus_per_task": launcher.cpus_per_task, "timeout_min": launcher.timeout_min,
        "slurm_signal_delay_s": launcher.signal_delay_s,
        "slurm_array_parallelism": launcher.array_parallelism, "slurm_setup": list(launcher.setup),
        "slurm_additional_parameters": {"requeue": True, **dict(launcher.additional_parameters)},
    }
    if launcher.gpus_per_node:
        parameters["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb is not None:
        parameters["mem_gb"] = launcher.mem_gb
    for key in ("partition", "qos", "account", "constraint"):
        if getattr(launcher, key) is not None:
            parameters[f"slurm_{key}"] = getattr(launcher, key)
    executor.update_parameters(**parameters)
    return executor


def record_job(run_dir: Path, job: submitit.Job) -> None:
    (run_dir / JOB_RECORD).write_text(json.dumps({"job_id": job.job_id, "folder": str(job.paths.folder)}))


def recorded_job_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / JOB_RECORD).read_text())["job_id"]
    except (OSError, ValueError, KeyError):
        return None


def job_state(job_id: str) -> str:
    """The job's SLURM state (squeue while it is known there, else sacct), or UNKNOWN."""
    squeue = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"], capture_output=True,
                            text=True, timeout=60)
    states = squeue.stdout.split() if squeue.returncode == 0 else []
    if not states:
        sacct = subprocess.run(["sacct", "--noheader", "--parsable2", "--jobs", job_id, "--format", "State",
                                "--allocations"], capture_output=True, text=True, timeout=60)
        states = [line.split()[0] for line in sacct.stdout.splitlines() if line.strip()]
    return states[0] if states else "UNKNOWN"


def submit_run(config: Config, run_dir: Path) -> submitit.Job:
    executor = make_executor(run_dir / SUBMITIT_DIRNAME, config.launcher)
    job = executor.submit(TrainingJob(config, run_dir))
    record_job(run_dir, job)
    return job


def follow_instructions(job_id: str, run_dir: Path) -> str:
    return (f"submitted SLURM job {job_id}\n"
            f"  run directory: {run_dir}\n"
            f"  follow it:     squeue -j {job_id}; tail -f {run_dir / SUBMITIT_DIRNAME}/{job_id}/*_0_log.out\n"
            f"  progress:      python -m hpctrain.inspect {run_dir}")
