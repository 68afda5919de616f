"""SLURM: check a request against the cluster (login-node preflight), submit runs and sweeps with submitit, and
the job routine that runs on the nodes (`run_task`, the same under submitit and under srun).

Signals (the full table is in docs/signals.md): USR2 and SIGTERM only set a flag; rank 0 asks SLURM why
(hpctrain.signals). The trainer all-reduces the flag with its step statistics, so all ranks stop at the same step
boundary; rank 0 writes a checkpoint and then acts on the cause: a user's `scancel` ends the job, a time limit
requeues it (counted against launcher.max_num_timeout), a preemption requeues it (not counted), and a requeue
SLURM already does is left to SLURM. The requeued job resumes from the run directory's newest checkpoint: state
lives on disk, never in the pickle. A hung rank is found by hpctrain.watchdog; a dead one ends the job step
(srun --kill-on-bad-exit).
"""

from __future__ import annotations

# Before anything slow (submitit, torch): a USR2 that SLURM sends early must find a handler, never the default
# action (which kills the process). Only inside a job step that runs hpctrain (a submitit job or launcher=srun).
import os
import sys

from hpctrain.process.signals import STOP, in_job_step

if in_job_step() and ("SUBMITIT_FOLDER" in os.environ or "launcher=srun" in sys.argv):
    STOP.install()

import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import submitit  # noqa: E402

from hpctrain.process import history  # noqa: E402

from hpctrain.process import watchdog
from hpctrain.config import Config, ConfigError, LauncherConfig  # noqa: E402
from hpctrain.process.distributed import RunDirectoryTakenOver  # noqa: E402
from hpctrain.process.exit import skip_final_collection  # noqa: E402
from hpctrain.process.signals import Cause, classify, combine, query_job, requeue  # noqa: E402

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


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def classify_now(signal_names: list[str], launcher: LauncherConfig) -> tuple[Cause, str]:
    """Ask SLURM why this job was signalled (rank 0, outside any signal handler)."""
    job_id = os.environ["SLURM_JOB_ID"]
    try:
        view = query_job(job_id)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as error:
        log.warning("cannot ask SLURM about job %s: %s", job_id, error)
        view = None
    return classify(signal_names, view, restart_count=_restart_count(), signal_delay_s=launcher.signal_delay_s,
                    sigterm=launcher.sigterm)


def _newest_checkpoint_step(run_dir: Path) -> int:
    from hpctrain.run.checkpoint import CheckpointManager

    complete = CheckpointManager(run_dir, keep_last=2).complete()
    return complete[0].step if complete else 0


def _hang_action(config: Config, run_dir: Path) -> Any:
    """Under SLURM, a rank that finds the job hung records it and requeues the job (bounded by max_num_hang)."""

    def act(report: dict[str, Any]) -> None:
        job, restart = history.job_identity()
        history.record_end(run_dir, "hung", step=report["step"] or 0, message=report["message"])
        hangs = history.count_ends(history.read(run_dir), job, "hung")
        limit = config.launcher.max_num_hang
        if hangs > limit:
            log.error("job %s hung %d times, more than launcher.max_num_hang=%d: not requeued; the job ends. "
                      "Look at the stacks above; the same command resumes from the last checkpoint", job, hangs,
                      limit)
            return
        requeued, what = requeue(os.environ["SLURM_JOB_ID"], restart_count=restart)
        log.error("job %s hung (%d of launcher.max_num_hang=%d): %s; it resumes from the last checkpoint", job,
                  hangs, limit, what)

    return act


def run_task(config: Config, run_dir: Path, *, evaluation_stop: Any = None) -> dict[str, Any]:
    """One rank of a SLURM job, under submitit (TrainingJob) or srun (slurm/train.sbatch): one protocol.

    USR2/SIGTERM only set the stop flag; rank 0 asks SLURM why in a helper thread. The ranks stop together at the
    next step boundary (the flag travels with the step's all-reduce) and write a checkpoint. Then rank 0 acts on
    the cause (docs/signals.md): cancelled -> end; SLURM already requeueing -> end, no second requeue; time limit
    -> requeue, counted against launcher.max_num_timeout (then end with EXIT_TIME_LIMIT and a message);
    preemption -> requeue. Every attempt's start and end go to the run's history (jobs.jsonl)."""
    from hpctrain.launching.job import configure_rank_logging, run_rank

    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # submitit reads the SLURM variables srun set
    STOP.install()  # again: submitit replaced the early handlers with its own
    skip_final_collection()
    # overwrite: a tune worker (hpctrain.tune_worker) trains several trials in one process, each exporting the same.
    environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                        overwrite=True)
    rank = environment.rank
    configure_rank_logging(rank)
    job, restart = history.job_identity()
    launcher = config.launcher
    if rank == 0:
        log.info("job %s (restart %d), hpctrain from %s", job, restart, str(Path(__file__).resolve().parents[1]))
        STOP.start_classifier(lambda names: classify_now(names, launcher))
        history.record_start(run_dir, resume_step=_newest_checkpoint_step(run_dir))
    watchdog.add_hang_action(_hang_action(config, run_dir))
    try:
        summary = run_rank(config, run_dir, stop_requested=STOP.is_set, evaluation_stop=evaluation_stop)
    except BaseException as error:
        if rank == 0 and not isinstance(error, RunDirectoryTakenOver):  # a taken-over run is not ours to record
            history.record_end(run_dir, "failed", step=0, message=f"{type(error).__name__}: {error}"[:500])
        raise
    finally:
        watchdog.clear_actions()
    if summary["finished"]:
        if rank == 0:
            history.record_end(run_dir, "completed", step=summary["step"], message=summary.get("stop_reason", ""))
        return summary
    if rank != 0 or not STOP.is_set() or watchdog.has_fired():  # a hung rank has acted already
        return summary
    return _after_stop(config, run_dir, summary)


def _after_stop(config: Config, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after the checkpoint of a signalled run: act on why SLURM signalled the job."""
    job, restart = history.job_identity()
    step, names = summary["step"], STOP.signal_names()
    final = classify_now(names, config.launcher)  # SLURM's view now, after the checkpoint
    causes = [cause for cause, _ in STOP.classified()] + [final[0]]
    cause = combine(causes)
    why = next((text for c, text in STOP.classified() + [final] if c == cause), final[1])
    summary = {**summary, "stop_cause": cause.value}
    signals = "/".join(dict.fromkeys(names))
    if cause is Cause.CANCELLED:
        log.warning("%s received: job %s is cancelled (%s): checkpoint written at step %d; not requeueing. The same "
                    "command resumes the run", signals, job, why, step)
        history.record_end(run_dir, "cancelled", step=step, message=why)
        return summary
    if cause is Cause.REQUEUE_UNDER_WAY:
        log.warning("%s received: %s; checkpoint written at step %d; exiting without a second requeue", signals,
                    why, step)
        history.record_end(run_dir, "requeued_by_slurm", step=step, message=why)
        return summary
    launcher = config.launcher
    if cause is Cause.TIME_LIMIT:
        used = history.count_ends(history.read(run_dir), job, "requeued_time_limit")
        if used >= launcher.max_num_timeout:
            message = (f"job {job} reached its time limit again after {used} time-limit requeue(s), "
                       f"launcher.max_num_timeout={launcher.max_num_timeout}: not requeued, the job ends here with "
                       f"a checkpoint at step {step}. Run the same command to continue, with a larger "
                       f"launcher.timeout_min or launcher.max_num_timeout")
            log.error("%s received: %s", signals, message)
            history.record_end(run_dir, "time_limit_exhausted", step=step, message=message)
            _record_submitit_error(message)
            logging.shutdown()
            sys.exit(EXIT_TIME_LIMIT)
        requeued, what = requeue(os.environ["SLURM_JOB_ID"], restart_count=restart)
        count = f"time-limit requeue {used + 1} of launcher.max_num_timeout={launcher.max_num_timeout}"
        log.warning("%s received: time limit (%s): checkpoint written at step %d; %s (%s)", signals, why, step,
                    what, count)
        history.record_end(run_dir, "requeued_time_limit" if requeued else "requeued_by_slurm", step=step,
                           message=f"{why}; {count}" if requeued else what)
        return summary
    requeued, what = requeue(os.environ["SLURM_JOB_ID"], restart_count=restart)
    log.warning("%s received: preemption (%s): checkpoint written at step %d; %s (not counted against "
                "launcher.max_num_timeout)", signals, why, step, what)
    history.record_end(run_dir, "requeued_preemption" if requeued else "requeued_by_slurm", step=step,
                       message=why if requeued else what)
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
        return run_task(self.config, self.run_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Only reached if a signal arrives in the instant between submitit installing its handler and run_task
        # installing ours. A fresh callable: everything needed to resume is in the run directory.
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.run_dir))


def run_srun_task(config: Config, run_dir: Path) -> dict[str, Any]:
    """One rank of a job step started by srun from a plain sbatch script (slurm/train.sbatch): the same protocol
    as TrainingJob (sbatch --requeue keeps the job id, so the run directory named after it stays the same)."""
    return run_task(config, run_dir)


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
