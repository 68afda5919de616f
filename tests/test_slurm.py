"""SLURM, for real: jobs on the project's two-node test cluster (slurm/cluster-up.sh), submitted the way a user
does, with `python -m hpctrain.launch launcher=slurm ...`."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.metrics import open_for_reading
from hpctrain.launching.slurm import ACTIVE_STATES, recorded_job_id

from . import zygote
from .conftest import REPO, final_weights, launch, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TWO_NODES = ["launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
             "launcher.timeout_min=15", "trainer.max_steps=100", "trainer.val_every_steps=20",
             "callbacks.checkpoint.every_steps=4", "callbacks.early_stopping.enabled=false"]


def sh(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout


def known_jobs() -> set[str]:
    """Every job the cluster knows of: slurmctld's (an ended job stays there for MinJobAge, an hour on the test
    cluster) and accounting's. slurmctld sends its records to slurmdbd in the background, so a job that has just
    left the queue may reach accounting only a moment later: a test that checks that nothing was submitted
    compares slurmctld's view too, which has every job from the moment it is submitted."""
    queued = sh("squeue", "--noheader", "--states=all", "--array", "--format=%i").split()
    accounted = sh("sacct", "--noheader", "--allocations", "--starttime", "2000-01-01", "--format", "JobID",
                   "--parsable2").split()
    return set(queued) | set(accounted)


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{sh('squeue')}")


def queue_state(job_id: str) -> str:
    return sh("squeue", "--noheader", "--jobs", job_id, "--format", "%T").strip()


def final_state(job_id: str) -> str:
    """The job's end state in accounting (which lags the queue by a moment)."""
    state = ""
    for _ in range(60):
        states = sh("sacct", "--noheader", "--allocations", "--jobs", job_id, "--format", "State",
                    "--parsable2").split()
        state = states[0] if states else ""
        if state and state not in ACTIVE_STATES:
            break
        time.sleep(0.5)
    return state


def allocations(job_id: str) -> list[str]:
    """The states of every allocation the job had (a requeue starts a new one), oldest first."""
    return [line.split()[0] for line in sh("sacct", "--noheader", "--allocations", "--duplicates", "--jobs", job_id,
                                           "--format", "State", "--parsable2").splitlines() if line.strip()]


def job_logs(run_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "submitit" / job_id).glob("*_log.*")))


def release_when_requeued(job_id: str, *, timeout: float = 120) -> None:
    """A requeued job waits two minutes for its BeginTime: start it as soon as it is PENDING (a few s later)."""
    wait_until(lambda: queue_state(job_id) == "PENDING", timeout=timeout, what=f"job {job_id} requeued")
    sh("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")


def rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of the job's training process of this rank (all nodes share this machine's /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job_id}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
                and b"submitit.core._submit" in cmdline and b"srun" not in cmdline.split(b"\0")[0]):
            return int(entry.name)
    return None


def history_reasons(run_dir: Path) -> list[str]:
    from hpctrain.process.history import attempts, read

    return [row["reason"] for row in attempts(read(run_dir))]


def assert_same_weights(reference_dir: Path, run_dir: Path) -> None:
    reference, resumed = final_weights(reference_dir), final_weights(run_dir)
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    with open_for_reading(run_dir / "metrics.h5") as file:
        steps = file["train/step"][()].tolist()
    assert steps == list(range(1, len(steps) + 1))


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm") / "two_nodes"
    result = launch(tiny_overrides(tiny_data, *TWO_NODES, "launcher.wait=true"), run_dir=run_dir, timeout=600)
    assert "submitted SLURM job" in result.stdout
    return run_dir


def test_two_node_gloo_job_trains_and_completes(two_node_run: Path) -> None:
    job_id = recorded_job_id(two_node_run)
    assert final_state(job_id) == "COMPLETED"
    nodes = sh("sacct", "--noheader", "--jobs", f"{job_id}.0", "--format", "NodeList", "--parsable2").split()
    assert nodes == ["node[1-2]"]
    logs = "".join(p.read_text() for p in (two_node_run / "submitit" / job_id).glob("*_log.out"))
    assert "hostname=node1" in logs and "hostname=node2" in logs and "global_rank=1(2)" in logs
    with open_for_reading(two_node_run / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 101))
        per_sample = file["validation/per_sample/loss"][()]
        index = file["validation/sample_index"][()]
    # 38 validation images, 19 per rank: every one has its own EPE, gathered from both ranks.
    assert per_sample.shape == (5, 38) and index.tolist() == list(range(154, 192))
    assert np.all(np.isfinite(per_sample)) and np.all(per_sample > 0)


# The loggers that write files of their own into the run directory (TensorBoard's event files, W&B's and Comet's
# offline files), in the jobs of the requeue and scancel tests; the requeue test adds MLflow (an SQLite store there).
OFFLINE_LOGGERS = ["tensorboard", "wandb", "comet"]


def loggers(*names: str) -> str:
    return f"callbacks.loggers=[{','.join(names)}]"


def waiting_for(*names: str) -> str:
    """A user callback that holds each process's second step until these loggers have opened their run, so that
    every process of the job opens them before it is stopped (tests.test_loggers.WaitForLoggers)."""
    return f"callbacks.user=[{{_target_: tests.test_loggers.WaitForLoggers, names: [{', '.join(names)}]}}]"


def unexpected_tracebacks(logs: str) -> list[str]:
    """The tracebacks in a job's logs, but W&B's when SLURM ended its service process: a scancel or a requeue by
    SLURM (SIGTERM to every process of the job step) also ends wandb-core, W&B's service process, at once, also
    while it starts; the W&B logger's next call fails ("Connection lost", or wandb-core "exited with code 128"
    while W&B waits for its port), logged once with its traceback through W&B's code; W&B's own atexit hook
    prints one too. Nothing is lost: the next start reads W&B's offline files and sends what they lack."""
    found = []
    for chunk in logs.split("Traceback (most recent call last):\n")[1:]:
        lines = chunk.splitlines()
        # The exception's line ends the traceback: `Name: message` or `Name` at the line's start. Lines of other
        # threads and of srun may come in between, also in the middle of a traceback's line, which can then start
        # at column 0 without its indentation ("raise self._exception").
        end = next((number for number, line in enumerate(lines) if re.match(r"[A-Za-z_][\w.]*(: |$)", line)
                    and not line.startswith(("srun:", "slurmstepd", "submitit "))), len(lines) - 1)
        found.append("\n".join(lines[:end + 1]))
    return [block for block in found if not ("/wandb/" in block and block.splitlines()[-1].startswith(
        ("ConnectionResetError", "BrokenPipeError", "wandb.")))]


# One job, interrupted three times at random steps, each a different way: USR2 (what submitit asks SLURM to send),
# SIGTERM (what some clusters send instead), then `scontrol requeue` (an operator, or PreemptMode=REQUEUE: SLURM
# requeues the job itself, and the job checkpoints and leaves the requeue to SLURM). A loader worker runs all along:
# each signal also reaches the worker process, which must leave it to the training process. The job also logs to
# every built-in logger: one run of each, reopened three times, each step once. Each process waits for all but W&B
# to open: SLURM's signal may end W&B's service process (wandb-core) while it starts (unexpected_tracebacks), and
# the wait would then hold the job until it gave up. Every step is in W&B once either way.
INTERRUPTIONS = ("USR2", "TERM", "requeue")


def test_preempted_job_requeues_once_per_signal_and_ends_bitwise_equal_to_an_uninterrupted_run(
        tmp_path: Path, tiny_data: Path, two_node_run: Path) -> None:
    run_dir = tmp_path / "preempted"
    launch(tiny_overrides(tiny_data, *TWO_NODES, "data.num_workers=1", loggers("mlflow", *OFFLINE_LOGGERS),
                          waiting_for("mlflow", "tensorboard", "comet")), run_dir=run_dir)
    job_id = recorded_job_id(run_dir)
    manager = CheckpointManager(run_dir, keep_last=2)
    # Each interruption a few checkpoints (every 4 steps) after the last one resumed from, all well before the end
    # (step 100), or the job may finish first; a checkpoint past the last one is the new allocation's own.
    target, requeued_at = random.Random().randint(4, 16), time.time()
    for number, action in enumerate(INTERRUPTIONS):
        wait_until(lambda: any(info.step >= target for info in manager.complete()), timeout=300,
                   what=f"a checkpoint at step >= {target} before the {action} interruption", interval=0.05)
        time.sleep(random.uniform(0.0, 0.2))
        if number == 0:
            requeued_at = time.time()
        if action == "requeue":
            sh("scontrol", "requeue", job_id)
        else:
            sh("scancel", f"--signal={action}", job_id)
        release_when_requeued(job_id)
        print(f"job {job_id}: {action} after the checkpoint at step {max(i.step for i in manager.complete())}")
        target = max(info.step for info in manager.complete()) + random.Random().randint(4, 12)
    wait_until(lambda: queue_state(job_id) == "", timeout=300, what="the requeued job to end")
    assert final_state(job_id) == "COMPLETED"
    assert allocations(job_id) == ["REQUEUED"] * len(INTERRUPTIONS) + ["COMPLETED"]  # requeued once per signal
    logs = job_logs(run_dir, job_id)
    assert not unexpected_tracebacks(logs) and "CalledProcessError" not in logs, unexpected_tracebacks(logs)
    assert "SLURM is requeueing the job itself" in logs and "without a second requeue" in logs
    for action in ("USR2", "TERM"):
        assert f"SIG{action} received: preemption" in logs
    assert "not counted" in logs
    assert history_reasons(run_dir) == ["requeued_preemption", "requeued_preemption", "requeued_by_slurm",
                                        "completed"]
    assert logs.count("resumed from") >= len(INTERRUPTIONS)
    # Rank 0's log of every attempt, appended to the run directory's hpctrain.log (not only under submitit/).
    run_log = (run_dir / "hpctrain.log").read_text()
    assert all(f"job {job_id} (restart {n})" in run_log for n in range(len(INTERRUPTIONS) + 1)), run_log[-3000:]
    assert run_log.count("resumed from") >= len(INTERRUPTIONS) and "[rank 1]" not in run_log
    assert_same_weights(two_node_run, run_dir)
    assert_one_mlflow_run_with_each_step_once(run_dir, created_before=requeued_at)
    # W&B not waited for (above): a process stopped before W&B began to open leaves no W&B directory.
    assert_offline_loggers_hold_each_step_once(run_dir, processes=len(INTERRUPTIONS) + 1,
                                               wandb_processes=range(1, len(INTERRUPTIONS) + 2))


def assert_offline_loggers_hold_each_step_once(run_dir: Path, *, processes: int,
                                               wandb_processes: int | range | None = None) -> None:
    """Each of OFFLINE_LOGGERS holds one run across the job's `processes` (rank 0's, one per allocation or
    submission; `wandb_processes` of them opened W&B, if not all), each of the 100 training steps and 5 validations
    once, with metrics.h5's values (bit-exact). A process stopped for a requeue or by scancel archives its Comet
    messages only if Comet's end fits in callbacks.logger_stop_timeout_s: between 1 and `processes` archives (the
    steps of one that did not are sent again by the next process)."""
    from .test_loggers import (assert_comet_offline_experiment_holds_each_step_once,
                               assert_tensorboard_run_holds_each_step_once,
                               assert_wandb_offline_run_holds_each_step_once)

    with open_for_reading(run_dir / "metrics.h5") as file:
        train_loss, validation_loss = file["train/loss"][()], file["validation/loss"][()]
    expected = dict(train_steps=list(range(1, 101)), validation_steps=list(range(20, 101, 20)))
    assert_tensorboard_run_holds_each_step_once(run_dir, train_loss, validation_loss, **expected, processes=processes)
    assert_wandb_offline_run_holds_each_step_once(run_dir, train_loss, validation_loss, **expected,
                                                  processes=processes if wandb_processes is None else wandb_processes)
    assert_comet_offline_experiment_holds_each_step_once(run_dir, train_loss, validation_loss, **expected,
                                                         archives=range(1, processes + 1), unarchived=True)


def assert_one_mlflow_run_with_each_step_once(run_dir: Path, *, created_before: float) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert len(runs) == 1, "one MLflow run across the requeue"
    assert runs[0].info.start_time < created_before * 1000, "made before the requeue, reopened after it"
    run_id = runs[0].info.run_id
    with open_for_reading(run_dir / "metrics.h5") as file:
        train_loss, validation_steps = file["train/loss"][()], file["validation/step"][()].tolist()
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda point: point.step)
    assert [point.step for point in history] == list(range(1, 101))  # each step once
    np.testing.assert_array_equal([point.value for point in history], train_loss)
    assert sorted(point.step for point in client.get_metric_history(run_id, "validation/loss")) == validation_steps
    assert client.get_run(run_id).info.status == "FINISHED"


# A real preemption: a job in the higher-tier partition `urgent` needs both nodes. In `debug` (PreemptMode=REQUEUE)
# SLURM requeues the job itself (SIGTERM, KillWait later SIGKILL); in `scavenger` (PreemptMode=CANCEL, GraceTime=30)
# it signals the job (USR2, submitit's --signal, thanks to preempt_send_user_signal) and would cancel it after the
# grace time: the job must checkpoint and requeue itself first. Either way: requeued once, not counted, bit-exact.
@pytest.mark.parametrize("partition", ["debug", "scavenger"])
def test_a_slurm_preemption_requeues_the_job_which_ends_bitwise_equal(
        tmp_path: Path, tiny_data: Path, two_node_run: Path, partition: str) -> None:
    run_dir = tmp_path / "preempted"
    launch(tiny_overrides(tiny_data, *TWO_NODES, f"launcher.partition={partition}"), run_dir=run_dir)
    job_id = recorded_job_id(run_dir)
    manager = CheckpointManager(run_dir, keep_last=2)
    target = random.Random().randint(4, 40)
    wait_until(lambda: any(info.step >= target for info in manager.complete()), timeout=300,
               what=f"a checkpoint at step >= {target}", interval=0.05)
    preemptor = sh("sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--exclusive", "--time=2",
                   "--output=/dev/null", "--wrap", "sleep 3").strip()
    # Released only once the preemptor has the nodes: released earlier, on a busy machine the requeued job may
    # start again before the preemptor does, and be preempted a second time.
    wait_until(lambda: queue_state(job_id) == "PENDING", timeout=120, what=f"job {job_id} requeued")
    wait_until(lambda: queue_state(preemptor) != "PENDING", timeout=120, what="the preemptor to start")
    release_when_requeued(job_id)
    wait_until(lambda: queue_state(job_id) == "", timeout=300, what="the requeued job to end")
    assert final_state(preemptor) == "COMPLETED"
    assert final_state(job_id) == "COMPLETED"
    states = allocations(job_id)
    print(f"{partition}: allocations of job {job_id}: {states}")
    assert len(states) == 2 and states[0] in ("REQUEUED", "PREEMPTED"), states  # requeued exactly once
    logs = job_logs(run_dir, job_id)
    assert "Traceback" not in logs and "CalledProcessError" not in logs
    if partition == "debug":
        assert "SLURM is requeueing the job itself" in logs
        assert history_reasons(run_dir) == ["requeued_by_slurm", "completed"]
    else:
        assert "SIGUSR2 received: preemption" in logs and "not counted" in logs
        assert history_reasons(run_dir) == ["requeued_preemption", "completed"]
    assert "resumed from" in logs
    assert_same_weights(two_node_run, run_dir)


def test_scancel_ends_the_job_cancelled_and_the_same_command_resumes_bit_exact(
        tmp_path: Path, tiny_data: Path, two_node_run: Path) -> None:
    run_dir = tmp_path / "cancelled"
    # No loader workers here: W&B is waited for too (see INTERRUPTIONS), and each of the two processes opens it.
    command = tiny_overrides(tiny_data, *TWO_NODES, loggers(*OFFLINE_LOGGERS), waiting_for(*OFFLINE_LOGGERS))
    launch(command, run_dir=run_dir)
    job_id = recorded_job_id(run_dir)
    manager = CheckpointManager(run_dir, keep_last=2)
    target = random.Random().randint(4, 40)
    wait_until(lambda: any(info.step >= target for info in manager.complete()), timeout=300,
               what=f"a checkpoint at step >= {target}", interval=0.05)
    time.sleep(random.uniform(0.0, 0.2))
    sh("scancel", job_id)
    wait_until(lambda: queue_state(job_id) == "", timeout=120, what="the cancelled job to end")
    time.sleep(5)  # a requeue (the old behaviour) would show up as PENDING by now
    assert queue_state(job_id) == "" and final_state(job_id) == "CANCELLED"
    assert allocations(job_id) == ["CANCELLED"]  # nothing requeued it
    logs = job_logs(run_dir, job_id)
    assert "is cancelled" in logs and "not requeueing" in logs and not unexpected_tracebacks(logs), logs[-3000:]
    assert manager.complete(), "no checkpoint"
    assert history_reasons(run_dir) == ["cancelled"]

    launch(command, run_dir=run_dir)  # the same command, later: resumes
    new_id = recorded_job_id(run_dir)
    assert new_id != job_id
    wait_until(lambda: queue_state(new_id) == "", timeout=300, what="the resumed job")
    assert final_state(new_id) == "COMPLETED"
    assert "resumed from" in job_logs(run_dir, new_id)
    assert history_reasons(run_dir) == ["cancelled", "completed"]
    assert_same_weights(two_node_run, run_dir)
    assert_offline_loggers_hold_each_step_once(run_dir, processes=2)
    inspect = zygote.run(launch_inspect(run_dir)[:-1], check=True).stdout
    assert f"job {job_id} (restart 0)" in inspect and "cancelled" in inspect


@pytest.mark.parametrize("moment", ["launch", "training"])
def test_a_killed_rank_ends_the_job(tmp_path: Path, tiny_data: Path, moment: str) -> None:
    """SIGKILL of rank 1 right after it starts (before the process group forms) or while training: srun
    --kill-on-bad-exit ends the step, the rendezvous timeout bounds the rest."""
    run_dir = tmp_path / "killed"
    launch(tiny_overrides(tiny_data, *TWO_NODES), run_dir=run_dir)
    job_id = recorded_job_id(run_dir)
    pid: list[int] = []

    def found() -> bool:
        pid[:] = [p for p in [rank_pid(job_id, 1)] if p]
        return bool(pid)

    wait_until(found, timeout=300, what="rank 1's process", interval=0.02)
    if moment == "training":
        manager = CheckpointManager(run_dir, keep_last=2)
        wait_until(lambda: bool(manager.complete()), timeout=300, what="a checkpoint", interval=0.05)
    os.kill(pid[0], signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: queue_state(job_id) in ("", "COMPLETING"), timeout=90, what="the job to end",
               interval=0.1)
    elapsed = time.monotonic() - killed
    print(f"job {job_id}: ended {elapsed:.1f} s after rank 1 was killed ({moment})")
    assert elapsed < (60 if moment == "launch" else 15), elapsed
    assert final_state(job_id) == "FAILED"
    assert allocations(job_id) == ["FAILED"]


def test_a_stopped_rank_is_found_by_the_watchdog_and_the_job_resumes(tmp_path: Path, tiny_data: Path,
                                                                     two_node_run: Path) -> None:
    run_dir = tmp_path / "stopped"
    launch(tiny_overrides(tiny_data, *TWO_NODES, "trainer.watchdog_s=10"), run_dir=run_dir)
    job_id = recorded_job_id(run_dir)
    manager = CheckpointManager(run_dir, keep_last=2)
    wait_until(lambda: any(info.step >= 8 for info in manager.complete()), timeout=300, what="step 8",
               interval=0.05)
    pid = rank_pid(job_id, 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: queue_state(job_id) == "PENDING", timeout=120, what="the hung job to be requeued")
    elapsed = time.monotonic() - stopped
    print(f"job {job_id}: requeued {elapsed:.1f} s after rank 1 was stopped (watchdog_s=10)")
    assert elapsed < 60, elapsed  # the watchdog's 10 s plus its grace, not the 600 s process-group timeout
    logs = job_logs(run_dir, job_id)
    assert "rank 0 made no progress" in logs and "hpctrain watchdog: Python stacks of rank 0" in logs
    stacks = logs.split("--- hpctrain watchdog: Python stacks of rank 0")[1]
    assert 'in train_step' in stacks.split("hpctrain.process.stop")[0]  # faulthandler's frames of the training thread
    sh("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")
    wait_until(lambda: queue_state(job_id) == "", timeout=300, what="the resumed job")
    assert final_state(job_id) == "COMPLETED"
    assert history_reasons(run_dir) == ["hung", "completed"]
    assert_same_weights(two_node_run, run_dir)


class SlowSteps:
    """A batch transform that only waits, so every step takes at least `seconds` however fast the machine is."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.seconds)
        return batch


# Jobs of two minutes whose training takes longer than their first allocation (240 steps of at least 0.25 s, one
# minute of waiting alone): SLURM sends USR2 60 s before the limit (up to 30 s earlier still, by its periodic
# check), i.e. 30-60 s after the start, so every job is signalled at least once before it can finish.
TIME_LIMITED_STEPS = 240
TIME_LIMITED = ["launcher=slurm", "launcher.nodes=1", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
                "launcher.timeout_min=2", "launcher.signal_delay_s=60", f"trainer.max_steps={TIME_LIMITED_STEPS}",
                "trainer.val_every_steps=120", "callbacks.checkpoint.every_steps=40", "data.num_workers=0",
                "data.transforms=[{_target_: tests.test_slurm.SlowSteps, seconds: 0.25}]",
                "callbacks.early_stopping.enabled=false", "callbacks.metrics.plots=false"]


def test_time_limit_requeues_bit_exact_and_max_num_timeout_ends_the_job_with_its_message(tmp_path: Path,
                                                                                         tiny_data: Path) -> None:
    runs = {name: tmp_path / name for name in ("reference", "limited", "exhausted")}
    launch(tiny_overrides(tiny_data, *TIME_LIMITED, "launcher.timeout_min=20"), run_dir=runs["reference"])
    launch(tiny_overrides(tiny_data, *TIME_LIMITED, "launcher.max_num_timeout=10"), run_dir=runs["limited"])
    launch(tiny_overrides(tiny_data, *TIME_LIMITED, "launcher.max_num_timeout=0"), run_dir=runs["exhausted"])
    ids = {name: recorded_job_id(run_dir) for name, run_dir in runs.items()}
    deadline = time.monotonic() + 900
    released: set[str] = set()
    while True:
        states = {name: sh("squeue", "--noheader", "--jobs", job_id, "--format", "%T %r").strip()
                  for name, job_id in ids.items()}
        if not any(states.values()):
            break
        assert time.monotonic() < deadline, states
        if states["limited"] == "PENDING BeginTime":  # requeued: start it again without the two-minute wait
            restarts = sh("squeue", "--noheader", "--jobs", ids["limited"], "--format", "%T").strip() and sh(
                "scontrol", "show", "job", "--oneliner", ids["limited"]).split("Restarts=")[1].split()[0]
            if restarts not in released:  # once per requeue: each update moves StartTime to now+2 again
                released.add(restarts)
                sh("scontrol", "update", f"JobId={ids['limited']}", "StartTime=now+2")
        time.sleep(1)

    assert final_state(ids["reference"]) == "COMPLETED" and allocations(ids["reference"]) == ["COMPLETED"]
    limited = allocations(ids["limited"])
    assert len(limited) >= 2 and limited[-1] == "COMPLETED" and set(limited[:-1]) == {"REQUEUED"}, limited
    reasons = history_reasons(runs["limited"])
    assert reasons == ["requeued_time_limit"] * (len(limited) - 1) + ["completed"], reasons
    logs = job_logs(runs["limited"], ids["limited"])
    assert "SIGUSR2 received: time limit" in logs and "time-limit requeue 1 of launcher.max_num_timeout=10" in logs
    assert "Traceback" not in logs
    assert_same_weights(runs["reference"], runs["limited"])
    with open_for_reading(runs["limited"] / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, TIME_LIMITED_STEPS + 1))

    assert allocations(ids["exhausted"]) == ["FAILED"]  # ended by itself, not requeued, not killed at the limit
    logs = job_logs(runs["exhausted"], ids["exhausted"])
    assert "launcher.max_num_timeout=0: not requeued, the job ends here" in logs and "Traceback" not in logs
    assert history_reasons(runs["exhausted"]) == ["time_limit_exhausted"]
    inspect = zygote.run(launch_inspect(runs["exhausted"])[:-1], check=True).stdout
    assert "ended: time limit, launcher.max_num_timeout used up" in inspect
    assert CheckpointManager(runs["exhausted"], keep_last=2).complete()  # it checkpointed before ending


SWEEP = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.timeout_min=10", "trainer.max_steps=60",
         "trainer.val_every_steps=30", "callbacks.checkpoint.every_steps=6", "callbacks.early_stopping.enabled=false"]


def test_sweep_is_one_job_array_and_a_cancelled_point_ends_while_the_others_go_on(tmp_path: Path,
                                                                                  tiny_data: Path) -> None:
    # A point's directory is named by its overrides; these are too long for a file name, so the names end in a
    # digest (and the overrides are in each point's .hydra/overrides.yaml).
    command = ["-m", "optim.lr=1e-3,2e-3,3e-3", *tiny_overrides(tiny_data, *SWEEP), "run_name=sweep",
               f"paths.runs_dir={tmp_path}"]
    first = launch(command, timeout=120)
    assert "submitted job array" in first.stdout and "with 3 of the sweep's 3 points" in first.stdout
    lr_of = {path.parents[1]: next(o for o in yaml.safe_load(path.read_text()) if o.startswith("optim.lr="))
             for path in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml")}
    points = sorted(lr_of, key=lr_of.get)
    assert [lr_of[p] for p in points] == ["optim.lr=0.001", "optim.lr=0.002", "optim.lr=0.003"]
    assert all(len(p.name.encode()) <= 200 and "~" in p.name for p in points)
    assert "launcher" not in points[0].name and "data.dataset.path" not in points[0].name
    job_ids = [recorded_job_id(p) for p in points]
    array_id = job_ids[0].split("_")[0]
    assert job_ids == [f"{array_id}_{i}" for i in range(3)]
    manager = CheckpointManager(points[1], keep_last=2)
    wait_until(lambda: bool(manager.complete()), timeout=300, what="a checkpoint of point 1", interval=0.05)
    sh("scancel", job_ids[1])
    wait_until(lambda: sh("squeue", "--noheader", "--jobs", array_id) == "", timeout=300, what="the array")
    assert final_state(job_ids[0]) == final_state(job_ids[2]) == "COMPLETED"
    assert final_state(job_ids[1]) == "CANCELLED" and allocations(job_ids[1]) == ["CANCELLED"]
    assert not (points[1] / "result.json").exists()  # the cancelled point did not finish
    assert manager.complete() and history_reasons(points[1]) == ["cancelled"]

    second = launch(command, timeout=120)
    assert "with 1 of the sweep's 3 points" in second.stdout
    assert second.stdout.count("skipped (finished)") == 2
    new_id = recorded_job_id(points[1])
    assert new_id != job_ids[1] and recorded_job_id(points[0]) == job_ids[0]
    wait_until(lambda: queue_state(new_id) == "", timeout=300, what="the resubmitted point")
    summary = zygote.run(launch_inspect(tmp_path / "sweep"), check=True)
    rows = json.loads(summary.stdout)
    assert [row["state"] for row in rows] == ["FINISHED"] * 3 and all(row["step"] == 60 for row in rows)
    assert history_reasons(points[1]) == ["cancelled", "completed"]
    from hpctrain.process.history import attempts, read

    assert attempts(read(points[1]))[1]["resume_step"] >= 6  # resumed from the cancelled point's checkpoint


def launch_inspect(path: Path) -> list[str]:
    from .conftest import PYTHON

    return [PYTHON, "-m", "hpctrain.inspect", str(path), "--json"]


@pytest.mark.parametrize("request_overrides,message", [
    (["launcher.nodes=5"], "launcher.nodes=5: partition debug has only 2 nodes"),
    (["launcher.timeout_min=100000"], "exceeds the MaxTime of partition debug"),
    (["launcher.partition=gpu_huge"], "launcher.partition=gpu_huge: no such partition"),
    (["launcher.cpus_per_task=64"], "= 64 CPUs"),
    (["launcher.gpus_per_node=1"], "0 GPUs"),
    (["launcher.gpus_per_node=2", "launcher.tasks_per_node=1"], "must equal launcher.gpus_per_node"),
])
def test_impossible_request_submits_nothing(tmp_path: Path, tiny_data: Path, request_overrides: list[str],
                                            message: str) -> None:
    before = known_jobs()
    result = launch(tiny_overrides(tiny_data, "launcher=slurm", *request_overrides), run_dir=tmp_path / "run",
                    check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    assert known_jobs() - before == set() and sh("squeue", "--noheader") == ""


def test_impossible_sweep_submits_nothing(tmp_path: Path, tiny_data: Path) -> None:
    before = known_jobs()
    result = launch(["-m", "optim.lr=1e-3,-1", *tiny_overrides(tiny_data, "launcher=slurm"), "run_name=bad",
                     f"paths.runs_dir={tmp_path}"], check=False)
    assert result.returncode != 0 and "optim.lr must be > 0" in result.stderr, result.stderr
    assert known_jobs() - before == set()
    assert list(tmp_path.iterdir()) == []  # no multirun.yaml, no sweep directory


def test_plain_sbatch_template_trains_the_same_model(tmp_path: Path, tiny_data: Path, two_node_run: Path) -> None:
    training = [o for o in tiny_overrides(tiny_data, *TWO_NODES) if not o.startswith("launcher")]
    from .conftest import PYTHON

    job_id = sh("sbatch", "--parsable", f"--chdir={REPO}", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
                f"--export=ALL,HPCTRAIN_PYTHON={PYTHON}",
                str(REPO / "slurm" / "train.sbatch"), *training, f"paths.runs_dir={tmp_path}").strip()
    wait_until(lambda: queue_state(job_id) == "", timeout=300, what="the sbatch job")
    assert final_state(job_id) == "COMPLETED", (tmp_path / f"{job_id}.out").read_text()
    run_dir = tmp_path / f"sbatch-{job_id}"
    reference, trained = final_weights(two_node_run), final_weights(run_dir)
    assert all(torch.equal(reference[name], trained[name]) for name in reference)
    assert history_reasons(run_dir) == ["completed"]  # the same job routine as under submitit
