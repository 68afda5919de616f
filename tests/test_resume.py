"""Bit-exact resume of the real launcher: SIGKILL at a random step, restart, compare with an uninterrupted run."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.metrics import open_for_reading
from . import zygote

from .conftest import PYTHON, REPO, final_weights, kill_after_checkpoint, launch, tiny_overrides

# End-to-end runs of the launcher, each a few seconds: not in the quick loop (`-m "not slow and not slurm"`).
pytestmark = pytest.mark.slow

# An EMA of the weights too (hpctrain.run.averaging): resumed bit-exactly with the raw weights; validation
# evaluates it and, with evaluate_raw, the raw weights (raw.<name>).
RUN = ["trainer.max_steps=36", "trainer.val_every_steps=6", "callbacks.checkpoint.every_steps=5",
       "callbacks.metrics.flush_every_seconds=0", "callbacks.early_stopping.enabled=false", "data.num_workers=1",
       "optim.weight_averaging={kind: ema, decay: 0.9, warmup: true, start_step: 3, every_steps: 2, "
       "evaluate_raw: true}"]


def inspect_json(run_dir: Path) -> dict:
    result = zygote.run([PYTHON, "-m", "hpctrain.inspect", str(run_dir), "--json"], check=True, cwd=REPO)
    return json.loads(result.stdout)


def kill_at_random_step(args: list[str], run_dir: Path, rng: random.Random, *,
                        steps: tuple[int, int] = (5, 28)) -> None:
    """Start the run, SIGKILL it once its checkpoints pass a random step in `steps` (plus a random delay)."""
    kill_after_checkpoint(args, run_dir, rng.randint(*steps), delay=rng.uniform(0.0, 0.3))


# The tests that compare with the uninterrupted run share it (they only read it): one xdist group, so that both
# workers do not train it each.
shares_the_reference = pytest.mark.xdist_group("resume_reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The uninterrupted run of RUN: 36 steps, checkpoints every 5, evaluations every 6, epochs of 10 steps."""
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    launch(tiny_overrides(tiny_data, *RUN), run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def reference_sha(reference: Path) -> str:
    return inspect_json(reference)["newest_checkpoint"]["model_sha256"]


@shares_the_reference
def test_sigkilled_and_restarted_run_equals_uninterrupted_run(tmp_path: Path, tiny_data: Path, reference: Path,
                                                             reference_sha: str) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    print(f"kill schedule seed {seed}")
    args = tiny_overrides(tiny_data, *RUN)
    reference_dir, resumed_dir = reference, tmp_path / "resumed"

    kill_at_random_step(args, resumed_dir, rng)
    kill_at_random_step(args, resumed_dir, rng) if rng.random() < 0.5 else None
    restarted = launch(args, run_dir=resumed_dir)
    assert "resumed from" in restarted.stdout

    reference, resumed = final_weights(reference_dir), final_weights(resumed_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    assert inspect_json(resumed_dir)["newest_checkpoint"]["model_sha256"] == reference_sha

    with open_for_reading(reference_dir / "metrics.h5") as ref, open_for_reading(resumed_dir / "metrics.h5") as res:
        assert res["train/step"][()].tolist() == list(range(1, 37))  # each step exactly once
        assert res["validation/step"][()].tolist() == [6, 12, 18, 24, 30, 36]
        np.testing.assert_array_equal(res["train/loss"][()], ref["train/loss"][()])
        np.testing.assert_array_equal(res["train/lr"][()], ref["train/lr"][()])
        np.testing.assert_array_equal(res["validation/per_sample/loss"][()], ref["validation/per_sample/loss"][()])
        np.testing.assert_array_equal(res["validation/raw.loss"][()], ref["validation/raw.loss"][()])
        assert not np.array_equal(ref["validation/loss"][()], ref["validation/raw.loss"][()])  # the EMA's, evaluated
    # The EMA (and its update count) too, bit for bit; inspect's digest is of it, its raw one of the weights.
    expected, found = (CheckpointManager.load(CheckpointManager(run_dir, keep_last=2).newest_valid())
                       for run_dir in (reference_dir, resumed_dir))
    assert expected["weight_averaging"]["state"].keys() == found["weight_averaging"]["state"].keys()
    assert all(torch.equal(value, found["weight_averaging"]["state"][name])
               for name, value in expected["weight_averaging"]["state"].items())
    assert int(found["weight_averaging"]["state"]["n_averaged"]) == 17  # steps 3, 5, ..., 35
    summary = inspect_json(resumed_dir)["newest_checkpoint"]
    assert summary["weights"] == "ema" and summary["raw_sha256"] != summary["model_sha256"]


@shares_the_reference
def test_finished_run_is_not_trained_again(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    run_dir = tmp_path / "finished"
    shutil.copytree(reference, run_dir)
    before = final_weights(run_dir)
    again = launch(tiny_overrides(tiny_data, *RUN), run_dir=run_dir)
    assert "already finished at step 36" in again.stdout
    after = final_weights(run_dir)
    assert all(torch.equal(before[name], after[name]) for name in before)


@shares_the_reference
def test_corrupt_newest_checkpoint_is_skipped_on_restart(tmp_path: Path, tiny_data: Path, reference: Path) -> None:
    args = tiny_overrides(tiny_data, *RUN)
    damaged_dir = tmp_path / "damaged"
    launch([*args, "trainer.max_steps=15"], run_dir=damaged_dir)  # in the warm-up: the same LRs as the reference
    newest, previous = CheckpointManager(damaged_dir, keep_last=2).complete()[:2]
    assert newest.step == 15 and previous.step < 15
    newest_file = damaged_dir / "checkpoints" / "step_000000015.pt"
    newest_file.write_bytes(newest_file.read_bytes()[:1000])  # truncated, as by a full disk
    restarted = launch(args, run_dir=damaged_dir)
    assert "step_000000015.pt is unusable" in restarted.stdout
    assert "resumed from" in restarted.stdout and f"step_{previous.step:09d}.pt" in restarted.stdout
    reference_weights, resumed = final_weights(reference), final_weights(damaged_dir)
    assert all(torch.equal(reference_weights[name], resumed[name]) for name in reference_weights)


def test_local_sweep_runs_every_point_and_a_rerun_skips_them(tmp_path: Path, tiny_data: Path) -> None:
    command = ["-m", "optim.lr=1e-3,2e-3", *tiny_overrides(tiny_data, "trainer.max_steps=5"), "run_name=lsweep",
               f"paths.runs_dir={tmp_path}"]
    launch(command)
    rows = inspect_json(tmp_path / "lsweep")
    assert [row["point"] for row in rows] == [
        f"callbacks.metrics.plots=False,data.prepare.generate_if_missing=False,model.num_stages=2,model.width=8,"
        f"optim.lr={lr},task.plot=null,trainer.max_steps=5,trainer.num_threads=1" for lr in ("0.001", "0.002")]
    assert all(row["state"] == "FINISHED" and row["step"] == 5 for row in rows)
    again = launch(command)
    assert again.stdout.count("already finished at step 5") == 2


@shares_the_reference
def test_run_with_background_checkpoints_killed_and_restarted_is_bit_exact(tmp_path: Path, tiny_data: Path,
                                                                          reference_sha: str) -> None:
    # The reference wrote its checkpoints synchronously.
    background = [*tiny_overrides(tiny_data, *RUN), "callbacks.checkpoint.asynchronous=true"]
    kill_at_random_step(background, tmp_path / "resumed", random.Random())
    launch(background, run_dir=tmp_path / "resumed")
    assert inspect_json(tmp_path / "resumed")["newest_checkpoint"]["model_sha256"] == reference_sha
    with open_for_reading(tmp_path / "resumed" / "metrics.h5") as res:
        assert res["train/step"][()].tolist() == list(range(1, 37))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error:")]


def test_extending_a_run_continues_its_schedule_only_when_told(tmp_path: Path, tiny_data: Path) -> None:
    from hpctrain.launching.app import compose_config
    from hpctrain.optim import make_multiplier

    args = tiny_overrides(tiny_data, "optim.schedule.warmup=2", "callbacks.early_stopping.enabled=false",
                          "callbacks.checkpoint.every_steps=5", "trainer.val_every_steps=5",
                          "callbacks.metrics.plots=false")
    launch([*args, "trainer.max_steps=10"], run_dir=tmp_path)
    # A larger trainer.max_steps would re-stretch the cosine over 20 steps: refused, saying what would happen.
    refused = launch([*args, "trainer.max_steps=20"], run_dir=tmp_path, check=False)
    assert refused.returncode == 2, refused.stderr
    errors = error_lines(refused)
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "trainer.max_steps=20: this run was trained to step 10 on a warmup_cosine LR schedule over 10 " \
           "steps" in errors[0] and "the learning rate would jump from " in errors[0], errors[0]
    assert "Set optim.schedule.total=10 to continue the run's schedule, or optim.schedule.total=20" in errors[0]
    # The documented way: the old schedule's length, explicitly; the LR goes on as the old schedule has it.
    extended = [*args, "trainer.max_steps=20", "optim.schedule.total=10"]
    assert "resumed from" in launch(extended, run_dir=tmp_path).stdout
    config = compose_config(extended)
    multiplier = make_multiplier(config.optim.schedule, max_steps=20, steps_per_epoch=1)
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 21))
        lr = file["train/lr"][()][:, 0]
    np.testing.assert_allclose(lr, [config.optim.lr * multiplier(step) for step in range(20)], rtol=1e-12)
    np.testing.assert_allclose(lr[10:], config.optim.lr * config.optim.schedule.min_factor, rtol=1e-12)


def test_a_changed_model_in_a_run_directory_is_refused_before_anything_runs(tmp_path: Path,
                                                                            tiny_data: Path) -> None:
    args = tiny_overrides(tiny_data, "trainer.max_steps=5", "callbacks.checkpoint.every_steps=5",
                          "callbacks.metrics.plots=false")
    launch(args, run_dir=tmp_path)
    before = {path.name: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()}
    for launcher in ([], ["launcher=slurm"]):  # refused in preflight: nothing is queued either
        refused = launch([*args, "model.width=16", "trainer.max_steps=10", *launcher], run_dir=tmp_path,
                         check=False)
        assert refused.returncode == 2, refused.stderr
        errors = error_lines(refused)
        assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert errors[0].startswith(f"hpctrain: error: model: cannot resume {tmp_path} from step_000000005.pt: ")
        assert "shape changed: stem.0.weight (8, 1, 3, 3) -> (16, 1, 3, 3)" in errors[0], errors[0]
        assert "resumed from" not in refused.stdout + refused.stderr
    assert {path.name: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()} == before
    assert not (tmp_path / "submitit").exists()
