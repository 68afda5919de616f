"""SLURM: check a request against the cluster (login-node preflight), submit runs and sweeps with submitit, and
the job routine that runs on the nodes (`run_task`, the same under submitit and under srun).

Signals, hangs (the states and the full table are in docs/signals.md): the entry point of a task creates its stop
protocol (hpctrain.process.stop.StopProtocol) and installs its USR2/SIGTERM handlers first thing: `TrainingJob`
when submitit calls it (this module imports no torch, so unpickling the job does not either), the Hydra app's `run`
for launcher=srun (slurm/train.sbatch). `run_task` hands the protocol down: the trainer reads its stop flag (all
ranks stop at the same step boundary: the flag travels with the step's all-reduce), the watchdog tells it of a
hang, and rank 0 has it act once the checkpoint is written: a user's `scancel` ends the job, a time limit requeues
it (counted against launcher.max_num_timeout), a preemption requeues it (not counted), and a requeue SLURM already
does is left to SLURM. The requeued job resumes from the run directory's newest checkpoint: state lives on disk,
never in the pickle. A dead rank ends the job step (srun --kill-on-bad-exit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from hpctrain.config import Config, ConfigError, LauncherConfig
from hpctrain.process import history, watchdog
from hpctrain.process.exit import skip_final_collection
from hpctrain.process.stop import StopProtocol

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
EXIT_TIME_LIMIT = 77  # the time limit came back after launcher.max_num_timeout requeues


def _newest_checkpoint_step(run_dir: Path) -> int:
    from hpctrain.run.checkpoint import CheckpointManager

    complete = CheckpointManager(run_dir, keep_last=2).complete()
    return complete[0].step if complete else 0


def run_task(config: Config, run_dir: Path, *, stop: StopProtocol, evaluation_stop: Any = None,
             store: Any = None) -> dict[str, Any]:
    """One rank of a SLURM job, under submitit (TrainingJob, TuneWorker) or srun (slurm/train.sbatch): one
    protocol. `stop` is the task's stop protocol, its handlers installed by the entry point; `store`: the store
    the process group forms on (a multi-rank tune worker's trial: hpctrain.tuning.ranks), None: its own.

    USR2/SIGTERM only set the stop flag; rank 0 asks SLURM why in a helper thread. The ranks stop together at the
    next step boundary and write a checkpoint; then rank 0 has the protocol act on the cause (`StopProtocol.finish`,
    docs/signals.md). A hang is the watchdog's to find and the protocol's to act on. Every attempt's start and end
    go to the run's history (jobs.jsonl)."""
    from hpctrain.launching.job import configure_rank_logging, run_rank
    from hpctrain.process.distributed import RunDirectoryTakenOver

    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # submitit reads the SLURM variables srun set
    skip_final_collection()
    # overwrite: a tune worker (hpctrain.tuning.worker) trains several trials in one process, each exporting the same.
    environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                        overwrite=True)
    rank = environment.rank
    configure_rank_logging(rank, run_dir)  # rank 0 appends to the run directory's hpctrain.log
    job, restart = history.job_identity()
    stop.begin_run(config.launcher, run_dir)
    if rank == 0:
        log.info("job %s (restart %d), hpctrain from %s", job, restart, str(Path(__file__).resolve().parents[1]))
        stop.start_classifier()
        history.record_start(run_dir, resume_step=_newest_checkpoint_step(run_dir))
    try:
        with watchdog.reporting_to(stop):
            summary = run_rank(config, run_dir, stop_requested=stop.stop_requested, evaluation_stop=evaluation_stop,
                               store=store)
    except BaseException as error:
        if rank == 0 and not isinstance(error, RunDirectoryTakenOver):  # a taken-over run is not ours to record
            history.record_end(run_dir, "failed", step=0, message=f"{type(error).__name__}: {error}"[:500])
        raise
    if summary["finished"]:
        if rank == 0:  # a run stopped by bad numbers, bad data or a failed write is not requeued: it failed
            history.record_end(run_dir, "failed" if summary.get("failed") else "completed", step=summary["step"],
                               message=summary.get("stop_reason", ""))
        return summary
    if rank != 0 or not stop.stop_requested() or stop.has_hung():  # a hung rank has acted already
        return summary
    summary = stop.finish(summary)
    if stop.outcome is not None and stop.outcome.reason == "time_limit_exhausted":
        _record_submitit_error(stop.outcome.message)
        logging.shutdown()
        sys.exit(EXIT_TIME_LIMIT)
    return summary


def _record_submitit_error(message: str) -> None:
    """Under submitit, leave the job's result as this error (what `job.results()` raises on the login node)."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return
    try:
        paths = submitit.JobEnvironment().paths
        with submitit.core.utils.temporary_save_path(paths.result_pickle) as temporary:
            submitit.core.utils.cloudpickle_dump(("error", message), temporary)
    except Exception as error:  # the history and the log have the message anyway
        log.warning("could not record the job's result for submitit: %s", error)


class TrainingJob(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task of the job: one DDP rank each (see `run_task`)."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir

    def __call__(self) -> dict[str, Any]:
        # First: a USR2 that SLURM sends early must find the protocol's handler (it replaces submitit's), not one
        # that requeues without a checkpoint, and never the default action while torch is imported.
        stop = StopProtocol()
        stop.install()
        return run_task(self.config, self.run_dir, stop=stop)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Only reached if a USR2 arrives between submitit installing its handler and `__call__` installing the
        # protocol's. A fresh callable: everything needed to resume is in the run directory.
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.run_dir))


def run_srun_task(config: Config, run_dir: Path, *, stop: StopProtocol | None = None) -> dict[str, Any]:
    """One rank of a job step started by srun from a plain sbatch script (slurm/train.sbatch): the same protocol
    as TrainingJob (sbatch --requeue keeps the job id, so the run directory named after it stays the same). `stop`:
    the protocol the entry point installed early (hpctrain.launching.app.run); installed here if none."""
    if stop is None:
        stop = StopProtocol()
        stop.install()
    return run_task(config, run_dir, stop=stop)


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
        # A task that dies (also before the process group forms) ends the job step at once.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
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
    """The job's SLURM state, or UNKNOWN: slurmctld's (squeue --states=all) while it knows the job, also for a while
    after its end (MinJobAge), else accounting's (sacct), which can lag an end by a moment: asked first, sacct
    could still say REQUEUED or RUNNING of a job that has just been cancelled."""
    squeue = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format", "%T"],
                            capture_output=True, text=True, timeout=60)
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
