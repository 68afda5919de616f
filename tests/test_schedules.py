"""Learning-rate schedules by torch scheduler (`optim.schedule.scheduler`), ReduceLROnPlateau on a monitored
metric, the monitor (`callbacks.monitor`, min or max) and on-device batch transforms (`task.device_transforms`).

Unit tests drive optim directly; the end-to-end runs use the real launcher on the tiny CBED data with the test
plug-ins of tests/device_plugins.py: a device transform drawing per-sample noise, and a validation metric that
stalls (it never changes between evaluations), which ReduceLROnPlateau watches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.config import OptimConfig, ScheduleConfig
from hpctrain.run.metrics import open_for_reading
from hpctrain.optim import build_parameter_groups
from . import zygote

from .conftest import PYTHON, REPO, final_weights, kill_after_checkpoint, launch, tiny_overrides
from .device_plugins import expected_draws
from .test_ddp import assert_weights_close

LR_SCHEDULER = "torch.optim.lr_scheduler"


def run_group(scheduler: dict, *, steps: int, steps_per_epoch: int = 10, interval: str = "step",
              lr: float = 0.1) -> list[float]:
    """The LR each of `steps` optimizer steps uses, with the scheduler node stepped as the trainer steps it."""
    model = nn.Linear(3, 2)
    config = OptimConfig(optimizer="sgd", lr=lr, schedule=ScheduleConfig(scheduler=scheduler, interval=interval))
    [group] = build_parameter_groups(model, config, max_steps=steps, steps_per_epoch=steps_per_epoch)
    used = []
    for step in range(steps):
        used.append(group.set_learning_rates(step))
        group.optimizer.step()
        group.after_step(epoch_ended=(step + 1) % steps_per_epoch == 0)
    return used


def test_sequential_warmup_then_cosine_equals_the_builtin_warmup_cosine() -> None:
    steps, warmup, start, minimum, lr = 200, 20, 0.01, 0.02, 0.1
    torch_lrs = run_group({"_target_": f"{LR_SCHEDULER}.SequentialLR", "milestones": [warmup], "schedulers": [
        {"_target_": f"{LR_SCHEDULER}.LinearLR", "start_factor": start, "total_iters": warmup},
        {"_target_": f"{LR_SCHEDULER}.CosineAnnealingLR", "T_max": steps - warmup, "eta_min": lr * minimum}]},
        steps=steps, lr=lr)
    [builtin] = build_parameter_groups(nn.Linear(3, 2), OptimConfig(lr=lr, schedule=ScheduleConfig(
        name="warmup_cosine", warmup=warmup, warmup_start_factor=start, min_factor=minimum)),
        max_steps=steps, steps_per_epoch=10)
    np.testing.assert_allclose(torch_lrs, [builtin.set_learning_rates(step) for step in range(steps)],
                               rtol=1e-9, atol=1e-12)


def test_one_cycle_per_step_and_step_lr_per_epoch_follow_torch() -> None:
    reference = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.1, total_steps=50)
    expected = []
    for _ in range(50):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        one_cycle.step()
    got = run_group({"_target_": f"{LR_SCHEDULER}.OneCycleLR", "max_lr": 0.1, "total_steps": 50}, steps=50)
    assert got == expected and max(got) > 10 * got[0]
    per_epoch = run_group({"_target_": f"{LR_SCHEDULER}.StepLR", "step_size": 1, "gamma": 0.5}, steps=30,
                          interval="epoch")
    assert per_epoch == [0.1] * 10 + [0.05] * 10 + [0.025] * 10


def test_warmup_then_plateau_composition_hands_over_the_full_lr_and_reduces_on_a_stall() -> None:
    model = nn.Linear(3, 2)
    node = {"_target_": "hpctrain.optim.SequentialSchedule", "milestones": [4], "schedulers": [
        {"_target_": f"{LR_SCHEDULER}.LinearLR", "start_factor": 0.25, "total_iters": 4},
        {"_target_": f"{LR_SCHEDULER}.ReduceLROnPlateau", "patience": 0, "factor": 0.5}]}
    config = OptimConfig(optimizer="sgd", lr=0.1, schedule=ScheduleConfig(scheduler=node, monitor="accuracy"))
    [group] = build_parameter_groups(model, config, max_steps=12, steps_per_epoch=100, monitor_mode="max")
    plateau = group.scheduler.schedulers[1]
    assert plateau.mode == "min"  # a schedule that names its own monitor gets no mode from callbacks.monitor
    used = []
    for step in range(12):
        used.append(group.set_learning_rates(step))
        group.optimizer.step()
        group.after_step(epoch_ended=False)
        if step % 2 == 1:  # an evaluation every 2 steps; the metric stalls
            group.after_evaluation({"loss": 1.0, "accuracy": 0.5})
    # warm-up, the full LR handed over at step 4; the plateau's first evaluation (after step 3) sets its best, each
    # later one halves the LR (patience 0)
    np.testing.assert_allclose(used, [0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125,
                                      0.0125])
    [default] = build_parameter_groups(nn.Linear(3, 2), OptimConfig(schedule=ScheduleConfig(scheduler={
        "_target_": f"{LR_SCHEDULER}.ReduceLROnPlateau"})), max_steps=1, steps_per_epoch=1, monitor_mode="max")
    assert default.scheduler.mode == "max" and default.monitor == "loss"  # callbacks.monitor's


# -- end to end: ReduceLROnPlateau on a stalled metric, a device transform with randomness ----------------------
# 154 training samples, global batch 16; evaluations at 4, 8, 12, 16. The monitored metric stalls, so with
# patience 1 the LR halves after the third evaluation: steps 13-16 use 0.025.
PLATEAU = ["optim.optimizer=sgd", "optim.lr=0.05", "trainer.max_steps=16", "trainer.val_every_steps=4",
           "callbacks.checkpoint.every_steps=4", "callbacks.early_stopping.enabled=false",
           "callbacks.metrics.flush_every_seconds=0",
           "task.device_transforms=[{_target_: tests.device_plugins.DeviceNoise, std: 0.05}]",
           "+task.metrics.device_draw={_target_: tests.device_plugins.device_draw, _partial_: true}",
           f"optim.schedule.scheduler={{_target_: {LR_SCHEDULER}.ReduceLROnPlateau, patience: 1, factor: 0.5}}",
           "optim.schedule.monitor=device_draw"]
EXPECTED_LR = [0.05] * 12 + [0.025] * 4


def plateau_run(tiny_data: Path, *extra: str) -> list[str]:
    return tiny_overrides(tiny_data, *PLATEAU, f"+data.test_dataset={{path: {tiny_data}}}", *extra)


def check_run(run_dir: Path) -> None:
    """The LR drop at the expected evaluation, and the validation draws keyed on (seed, stage, epoch, sample)."""
    with open_for_reading(run_dir / "metrics.h5") as file:
        np.testing.assert_allclose(file["train/lr"][:, 0], EXPECTED_LR)
        assert file["validation/step"][()].tolist() == [4, 8, 12, 16]
        index = file["validation/sample_index"][()]
        draws = file["validation/per_sample/device_draw"][()]
    expected = np.abs(expected_draws(index.tolist(), (1, 32, 32), seed=0, stage="validation"))
    for row in draws:
        np.testing.assert_array_equal(row, expected.astype(np.float32))


# The tests that read the one-rank plateau run share it: one xdist group, so that each worker does not train it.
shares_the_plateau_run = pytest.mark.xdist_group("plateau_one_rank")


@pytest.fixture(scope="module")
def plateau_reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("plateau_one_rank")
    launch(plateau_run(tiny_data), run_dir=run_dir)
    return run_dir


@pytest.mark.slow
@shares_the_plateau_run
def test_plateau_drops_the_lr_at_the_expected_evaluation_on_one_and_two_ranks(
        plateau_reference: Path, tiny_data: Path, tmp_path: Path) -> None:
    check_run(plateau_reference)
    launch(plateau_run(tiny_data, "trainer.micro_batch_size=8", "launcher.num_processes=2"), run_dir=tmp_path)
    check_run(tmp_path)  # the same drop: every rank saw the same validation means
    assert_weights_close(final_weights(plateau_reference), final_weights(tmp_path))


@pytest.mark.slow
@shares_the_plateau_run
def test_killed_right_after_the_lr_drop_and_resumed_with_loader_workers_is_bit_exact(
        plateau_reference: Path, tiny_data: Path, tmp_path: Path) -> None:
    """SIGKILL once the checkpoint after the drop (step 12) is written; the restart runs with 2 loader workers,
    so equality with the 0-worker reference also shows the device draws do not depend on the workers."""
    args = plateau_run(tiny_data, "data.num_workers=2")
    assert kill_after_checkpoint(args, tmp_path, 12, timeout=300) == 12, "kill right after step 12's checkpoint missed"
    newest = CheckpointManager(tmp_path, keep_last=2).newest_valid()
    state = CheckpointManager.load(newest)
    [plateau] = state["schedulers"]
    assert plateau["num_bad_epochs"] == 0 and plateau["_last_lr"] == [0.025]  # the drop is in the checkpoint

    restarted = launch(args, run_dir=tmp_path)
    assert "resumed from" in restarted.stdout
    reference, resumed = final_weights(plateau_reference), final_weights(tmp_path)
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    check_run(tmp_path)
    with open_for_reading(plateau_reference / "metrics.h5") as ref, open_for_reading(tmp_path / "metrics.h5") as res:
        np.testing.assert_array_equal(res["train/loss"][()], ref["train/loss"][()])


@pytest.mark.slow
@shares_the_plateau_run
def test_the_device_transform_runs_in_the_test_phase_with_the_test_keys(plateau_reference: Path) -> None:
    result = zygote.run([PYTHON, "-m", "hpctrain.test", str(plateau_reference), "--checkpoint", "latest",
                         "--seed", "3"], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    [test_file] = (plateau_reference / "test").glob("*.h5")
    with open_for_reading(test_file) as file:
        index = file["test/sample_index"][()]
        draws = file["test/per_sample/device_draw"][()]
    assert len(index) == 192
    expected = np.abs(expected_draws(index.tolist(), (1, 32, 32), seed=3, stage="test"))
    np.testing.assert_array_equal(draws, expected.astype(np.float32))


@pytest.mark.slow
def test_early_stopping_and_the_best_checkpoint_follow_a_max_metric(tiny_data: Path, tmp_path: Path) -> None:
    """Monitoring -loss with mode max must pick the evaluation of the lowest loss (mode ignored, it would pick the
    highest), stop `patience` evaluations after it, and keep its checkpoint."""
    launch(tiny_overrides(tiny_data, "trainer.max_steps=40", "trainer.val_every_steps=2", "optim.lr=0.02",
                          "callbacks.checkpoint.every_steps=100", "callbacks.early_stopping.patience=2",
                          "callbacks.checkpoint.keep_last=2",
                          "+task.metrics.negative_epe={_target_: tests.device_plugins.NegativeEPE}",
                          "callbacks.monitor.metric=negative_epe", "callbacks.monitor.mode=max"), run_dir=tmp_path)
    with open_for_reading(tmp_path / "metrics.h5") as file:
        steps = file["validation/step"][()]
        monitored = file["validation/negative_epe"][()]
    best = int(np.argmax(monitored))
    assert len(set(monitored.tolist())) > 1  # a min taken for a max would pick another evaluation
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["best_step"] == steps[best] and result["best_metric"] == "negative_epe"
    assert math.isclose(result["best_value"], float(monitored[best]), rel_tol=1e-6)
    # Stopped `patience` evaluations after the best one.
    assert result["stop_reason"].startswith("early stopping") and "best negative_epe" in result["stop_reason"]
    assert len(steps) - 1 - best == 2 and result["step"] == steps[-1] < 40
    assert any(info.step == steps[best] for info in CheckpointManager(tmp_path, keep_last=2).complete())
    summary = json.loads(zygote.run([PYTHON, "-m", "hpctrain.inspect", str(tmp_path), "--json"], cwd=REPO,
                                    check=True).stdout)
    assert summary["best_validation"]["step"] == steps[best]
    assert summary["best_validation"]["monitor"] == {"metric": "negative_epe", "mode": "max",
                                                     "value": float(monitored[best])}


def test_a_checkpoint_from_before_the_monitor_and_schedulers_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """Old checkpoints have no train_state.best_value and no schedulers: they load, as monitoring the loss."""
    from hpctrain.components import build_components, build_trainer
    from hpctrain.process.distributed import DistributedContext

    from .test_config import compose_config

    config = compose_config(*tiny_overrides(tiny_data, "trainer.max_steps=4", "trainer.val_every_steps=2",
                                            "callbacks.checkpoint.every_steps=2"))
    context = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    build_trainer(config, tmp_path, context, build_components(config)).fit()
    manager = CheckpointManager(tmp_path, keep_last=2)
    newest = manager.newest_valid()
    assert newest is not None
    state = CheckpointManager.load(newest)
    assert state["schedulers"] == [None] and not math.isnan(state["train_state"]["best_value"])
    del state["schedulers"], state["train_state"]["best_value"]
    manager.save(newest.step, state)
    resumed = build_trainer(config, tmp_path, context, build_components(config))
    resumed.resume()
    assert resumed.state.best_value == resumed.state.best_loss == state["train_state"]["best_loss"]
    manager.close()
