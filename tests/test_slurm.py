"""SLURM, for real: jobs on the project's two-node test cluster (slurm/cluster-up.sh), submitted the way a user
does, with `python -m hpctrain.launch launcher=slurm ...`."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.checkpoint import CheckpointManager
from hpctrain.metrics import open_for_reading
from hpctrain.slurm import ACTIVE_STATES, recorded_job_id

from .conftest import REPO, final_weights, launch, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TWO_NODES = ["launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
             "launcher.timeout_min=15", "trainer.max_steps=100", "trainer.val_every_steps=20",
             "callbacks.checkpoint.every_steps=4", "callbacks.early_stopping.enabled=false"]


def sh(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout


def accounted_jobs() -> set[str]:
    return set(sh("sacct", "--noheader", "--allocations", "--starttime", "2000-01-01", "--format", "JobID",
                  "--parsable2").split())


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


# USR2 is what submitit asks SLURM to send; some clusters send only SIGTERM. With a loader worker, the signal
# also reaches the worker process, which must leave it to the training process.
@pytest.mark.parametrize("signal_name,workers", [("USR2", 0), ("TERM", 1)])
def test_preempted_job_requeues_and_ends_bitwise_equal_to_an_uninterrupted_run(
        tmp_path: Path, tiny_data: Path, two_node_run: Path, signal_name: str, workers: int) -> None:
    run_dir = tmp_path / "preempted"
    launch(tiny_overrides(tiny_data, *TWO_NODES, f"data.num_workers={workers}"), run_dir=run_dir)
    job_id = recorded_job_id(run_dir)
    manager = CheckpointManager(run_dir, keep_last=2)
    target = random.Random().randint(4, 40)  # well before the end (step 100), or the job may finish first
    wait_until(lambda: any(info.step >= target for info in manager.complete()), timeout=300,
               what=f"a checkpoint at step >= {target}", interval=0.05)
    time.sleep(random.uniform(0.0, 0.2))
    sh("scancel", f"--signal={signal_name}", job_id)
    wait_until(lambda: queue_state(job_id) == "PENDING", timeout=120, what="the requeue")
    time.sleep(2)  # a restart in the same second as the kill is refused by slurmd
    sh("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # skip the requeue's two-minute BeginTime
    wait_until(lambda: queue_state(job_id) == "", timeout=300, what="the requeued job to end")
    assert final_state(job_id) == "COMPLETED"
    logs = "".join(p.read_text() for p in (run_dir / "submitit" / job_id).glob("*_log.*"))
    assert f"SIG{signal_name} received: checkpoint written" in logs and "this job is preempted" in logs
    assert "resumed from" in logs

    reference, resumed = final_weights(two_node_run), final_weights(run_dir)
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    with open_for_reading(run_dir / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 101))


SWEEP = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.timeout_min=10", "trainer.max_steps=12",
         "trainer.val_every_steps=6", "callbacks.checkpoint.every_steps=6"]


def test_sweep_is_one_job_array_and_a_rerun_completes_only_the_cancelled_point(tmp_path: Path,
                                                                              tiny_data: Path) -> None:
    command = ["-m", "optim.lr=1e-3,2e-3,3e-3", *tiny_overrides(tiny_data, *SWEEP), "run_name=sweep",
               f"paths.runs_dir={tmp_path}"]
    first = launch(command, timeout=120)
    assert "submitted job array" in first.stdout and "with 3 of the sweep's 3 points" in first.stdout
    points = sorted((tmp_path / "sweep").glob("*optim.lr=*"))
    assert [p.name.split("optim.lr=")[1].split(",")[0] for p in points] == ["0.001", "0.002", "0.003"]
    assert "launcher" not in points[0].name and "data.dataset.path" not in points[0].name
    job_ids = [recorded_job_id(p) for p in points]
    array_id = job_ids[0].split("_")[0]
    assert job_ids == [f"{array_id}_{i}" for i in range(3)]
    sh("scancel", job_ids[1])
    wait_until(lambda: sh("squeue", "--noheader", "--jobs", array_id) == "", timeout=300, what="the array")
    assert final_state(job_ids[0]) == final_state(job_ids[2]) == "COMPLETED"
    assert not (points[1] / "result.json").exists()  # the cancelled point did not finish

    second = launch(command, timeout=120)
    assert "with 1 of the sweep's 3 points" in second.stdout
    assert second.stdout.count("skipped (finished)") == 2
    new_id = recorded_job_id(points[1])
    assert new_id != job_ids[1] and recorded_job_id(points[0]) == job_ids[0]
    wait_until(lambda: queue_state(new_id) == "", timeout=300, what="the resubmitted point")
    summary = subprocess.run([*launch_inspect(tmp_path / "sweep")], capture_output=True, text=True, check=True)
    rows = json.loads(summary.stdout)
    assert [row["state"] for row in rows] == ["FINISHED"] * 3 and all(row["step"] == 12 for row in rows)


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
    before = accounted_jobs()
    result = launch(tiny_overrides(tiny_data, "launcher=slurm", *request_overrides), run_dir=tmp_path / "run",
                    check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    assert accounted_jobs() == before and sh("squeue", "--noheader") == ""


def test_impossible_sweep_submits_nothing(tmp_path: Path, tiny_data: Path) -> None:
    before = accounted_jobs()
    result = launch(["-m", "optim.lr=1e-3,-1", *tiny_overrides(tiny_data, "launcher=slurm"), "run_name=bad",
                     f"paths.runs_dir={tmp_path}"], check=False)
    assert result.returncode != 0 and "optim.lr must be > 0" in result.stderr, result.stderr
    assert accounted_jobs() == before


def test_plain_sbatch_template_trains_the_same_model(tmp_path: Path, tiny_data: Path, two_node_run: Path) -> None:
    training = [o for o in tiny_overrides(tiny_data, *TWO_NODES) if not o.startswith("launcher")]
    job_id = sh("sbatch", "--parsable", f"--chdir={REPO}", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
                str(REPO / "slurm" / "train.sbatch"), *training, f"paths.runs_dir={tmp_path}").strip()
    wait_until(lambda: queue_state(job_id) == "", timeout=300, what="the sbatch job")
    assert final_state(job_id) == "COMPLETED", (tmp_path / f"{job_id}.out").read_text()
    run_dir = tmp_path / f"sbatch-{job_id}"
    reference, trained = final_weights(two_node_run), final_weights(run_dir)
    assert all(torch.equal(reference[name], trained[name]) for name in reference)
