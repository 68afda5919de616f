"""The training loop's policies: NaN/Inf steps, early stopping with the best checkpoint kept, parameter groups
with their own schedules, frozen parameters, bf16 autocast on CPU; the step time breakdown of a real run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.run import breakdown
from hpctrain.components import build_components, build_trainer
from hpctrain.config import OptimConfig, ScheduleConfig
from hpctrain.process.distributed import DistributedContext
from hpctrain.use.inspect import format_summary, summarize
from hpctrain.run.metrics import open_for_reading
from hpctrain.optim import build_parameter_groups, make_multiplier
from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.state import NONFINITE_STOP
from hpctrain.run.trainer import Trainer

from .conftest import final_weights, launch, tiny_overrides
from .test_config import compose_config


class PoisonedLoss:
    """The task's real loss, turned NaN for the given (0-based) training forward passes."""

    def __init__(self, loss, poisoned_calls: set[int]) -> None:
        self.loss, self.poisoned_calls, self.calls = loss, poisoned_calls, 0

    def __call__(self, outputs, batch):
        loss = self.loss(outputs, batch)
        if torch.is_grad_enabled():
            if self.calls in self.poisoned_calls:
                loss = loss * float("nan")
            self.calls += 1
        return loss


class NaNGradient(PoisonedLoss):
    """The task's real loss plus sqrt(0 * outputs) for the given passes: the loss stays finite, its gradient is NaN."""

    def __call__(self, outputs, batch):
        loss = self.loss(outputs, batch)
        if torch.is_grad_enabled():
            if self.calls in self.poisoned_calls:
                loss = loss + (outputs.sum() * 0.0).sqrt()
            self.calls += 1
        return loss


def poisoned_trainer(tmp_path: Path, tiny_data: Path, *overrides: str, poisoned: set[int],
                     poison: type[PoisonedLoss] = PoisonedLoss) -> Trainer:
    config = compose_config(*tiny_overrides(tiny_data, "trainer.max_steps=12",
                                            "callbacks.early_stopping.enabled=false", *overrides))
    components = build_components(config)
    components.loss = poison(components.loss, poisoned)
    tmp_path.mkdir(parents=True, exist_ok=True)
    context = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    return build_trainer(config, tmp_path, context, components)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path: Path, tiny_data: Path) -> None:
    trainer = poisoned_trainer(tmp_path, tiny_data, poisoned={4, 5})
    state = trainer.fit()
    assert state.step == 12 and state.nonfinite_steps == 2
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/nonfinite"][()].tolist() == [0] * 4 + [1, 1] + [0] * 6
        assert np.isnan(file["train/loss"][4])
    assert all(torch.isfinite(tensor).all() for tensor in final_weights(tmp_path).values())


def test_a_nan_gradient_under_a_finite_loss_is_skipped_by_the_tracked_norm(tmp_path: Path, tiny_data: Path) -> None:
    state = poisoned_trainer(tmp_path, tiny_data, "optim.clip_grad_norm=null", "optim.track_grad_norm=true",
                             poisoned={4}, poison=NaNGradient).fit()
    assert state.step == 12 and state.nonfinite_steps == 1
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/nonfinite"][()].tolist() == [0] * 4 + [1] + [0] * 7
        assert np.isfinite(file["train/loss"][()]).all() and np.isnan(file["train/grad_norm"][4])
    assert all(torch.isfinite(tensor).all() for tensor in final_weights(tmp_path).values())


def test_an_untracked_nan_gradient_stops_the_run_through_the_next_losses(tmp_path: Path, tiny_data: Path) -> None:
    """Without clipping or a tracked norm (the default), a NaN gradient under a finite loss is applied; the next
    losses are NaN, max_consecutive_nonfinite ends the run with a clear stop reason, and no checkpoint of the NaN
    weights is written (every 2 steps and at the stop: step 6's and 8's are refused), so the last good one stays
    the newest."""
    trainer = poisoned_trainer(tmp_path, tiny_data, "optim.clip_grad_norm=null", "trainer.max_consecutive_nonfinite=3",
                               "callbacks.checkpoint.every_steps=2", poisoned={4}, poison=NaNGradient)
    state = trainer.fit()
    assert state.finished and state.stop_reason.startswith(NONFINITE_STOP)
    assert "3 consecutive non-finite steps" in state.stop_reason
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/nonfinite"][()].tolist() == [0] * 5 + [1] * 3
    newest = trainer.checkpoints.newest_valid()
    assert newest is not None and newest.step == 4

def test_an_untracked_norm_is_recorded_as_nan_and_changes_no_update(tmp_path: Path, tiny_data: Path) -> None:
    for name, track in (("tracked", "true"), ("untracked", "false")):
        poisoned_trainer(tmp_path / name, tiny_data, "optim.clip_grad_norm=null", f"optim.track_grad_norm={track}",
                         poisoned=set()).fit()
    tracked, untracked = final_weights(tmp_path / "tracked"), final_weights(tmp_path / "untracked")
    assert all(torch.equal(tracked[name], untracked[name]) for name in tracked)
    with open_for_reading(tmp_path / "tracked" / "metrics.h5") as a, \
            open_for_reading(tmp_path / "untracked" / "metrics.h5") as b:
        assert np.isfinite(a["train/grad_norm"][()]).all() and np.isnan(b["train/grad_norm"][()]).all()
        assert not b["train/nonfinite"][()].any() and len(b["train/step"]) == 12
        # Where the step time went (hpctrain.run.breakdown), a row per step; on a CPU the parts add up to the step.
        times = {name: b[f"train/{name}"][()] for name in ("time_step", *breakdown.PARTS, "rss")}
    assert all(len(values) == 12 and np.isfinite(values).all() for values in times.values())
    assert (times["time_step"] > 0).all() and (times["rss"] > 0).all()
    assert np.allclose(sum(times[part] for part in breakdown.PARTS), times["time_step"])
    summary = summarize(tmp_path / "untracked")
    assert summary["breakdown"]["steps"] == 11 and set(summary["breakdown"]["shares"]) == set(breakdown.PARTS)
    assert "time       " in format_summary(summary) and "forward+backward" in format_summary(summary)


def test_nonfinite_policy_stop_ends_with_a_clear_reason_and_the_last_good_weights(tmp_path: Path,
                                                                                    tiny_data: Path) -> None:
    trainer = poisoned_trainer(tmp_path, tiny_data, "trainer.nonfinite=stop", "callbacks.checkpoint.every_steps=6",
                               poisoned={6})
    state = trainer.fit()
    assert state.finished and re.search("at step 7 .*trainer.nonfinite=stop", state.stop_reason)
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 8))
    # The stop's checkpoint (step 7) holds the weights of step 6: the failing update was not applied.
    checkpoints = {info.step: info for info in trainer.checkpoints.complete()}
    stopped, good = (CheckpointManager.load(checkpoints[step])["model"] for step in (7, 6))
    assert all(torch.equal(stopped[name], good[name]) for name in good)


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best_checkpoint(tmp_path: Path, tiny_data: Path) -> None:
    launch(tiny_overrides(tiny_data, "trainer.max_steps=200", "trainer.val_every_steps=5",
                          "callbacks.checkpoint.every_steps=5", "callbacks.early_stopping.patience=2",
                          "callbacks.early_stopping.min_delta=0.5"), run_dir=tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    # min_delta larger than any possible gain: the first evaluation is the best, two more end the run.
    assert result["step"] == 15 and result["best_step"] == 5 and result["stop_reason"].startswith("early stopping")
    kept = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*.json"))
    assert kept == [5, 10, 15]


@pytest.mark.slow
def test_parameter_groups_have_their_own_lr_schedule_and_frozen_parameters_stay(tmp_path: Path,
                                                                                  tiny_data: Path) -> None:
    groups = ("+optim.param_groups=[{name: head, params: ['head.*'], lr: 1e-4, optimizer: sgd, "
              "schedule: {name: constant}}, {name: stem, params: ['stem.*'], frozen: true}]")
    # Two DDP ranks: frozen parameters must be frozen before DDP decides which gradients to all-reduce.
    launch(tiny_overrides(tiny_data, groups, "trainer.max_steps=10", "trainer.micro_batch_size=8",
                          "launcher.num_processes=2"), run_dir=tmp_path)
    with open_for_reading(tmp_path / "metrics.h5") as file:
        lr = file["train/lr"][()]
        assert list(file["train/lr"].attrs["parameter_groups"]) == ["default", "head"]
    assert np.allclose(lr[:, 1], 1e-4)  # the head group's own constant schedule
    assert lr[0, 0] < lr[-1, 0]  # the default group is still warming up (optim.schedule.warmup=50)
    initial = build_components(compose_config(*tiny_overrides(tiny_data))).model.state_dict()
    trained = final_weights(tmp_path)
    assert torch.equal(initial["stem.0.weight"], trained["stem.0.weight"])
    assert not torch.equal(initial["head.0.weight"], trained["head.0.weight"])


def test_schedules_per_step_and_per_epoch() -> None:
    cosine = make_multiplier(ScheduleConfig(name="warmup_cosine", warmup=10, warmup_start_factor=0.1,
                                            min_factor=0.0), max_steps=110, steps_per_epoch=7)
    assert cosine(0) == pytest.approx(0.1) and cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0, abs=1e-12)
    per_epoch = make_multiplier(ScheduleConfig(name="warmup_linear", interval="epoch", warmup=0, min_factor=0.0),
                                max_steps=70, steps_per_epoch=7)
    assert [per_epoch(step) for step in (0, 6, 7, 13, 14)] == pytest.approx([1.0, 1.0, 0.9, 0.9, 0.8])
    restarts = make_multiplier(ScheduleConfig(name="cosine_restarts", warmup=0, cycle=10, min_factor=0.0),
                               max_steps=100, steps_per_epoch=7)
    assert restarts(0) == restarts(10) == restarts(20) == pytest.approx(1.0) and restarts(5) == pytest.approx(0.5)
    assert all(math.isfinite(restarts(step)) for step in range(100))


def test_learning_rates_set_from_the_step_equal_torchs_lambdalr_bitwise() -> None:
    """The trainer sets each step's LR from the step alone; the values are those torch's LambdaLR steps to."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    schedule = ScheduleConfig(name="warmup_cosine", warmup=5, warmup_start_factor=0.1, min_factor=0.01)
    [group] = build_parameter_groups(model, OptimConfig(lr=3e-3, schedule=schedule), max_steps=40, steps_per_epoch=7)
    reference = torch.optim.AdamW(torch.nn.Linear(3, 4).parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(reference, lr_lambda=group.multiplier)
    for step in range(40):
        assert group.set_learning_rates(step) == reference.param_groups[0]["lr"]
        assert group.optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        reference.step()
        scheduler.step()
    assert group.set_learning_rates(3) == 3e-3 * group.multiplier(3)  # no state: any step, in any order

@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu(tmp_path: Path, tiny_data: Path) -> None:
    launch(tiny_overrides(tiny_data, "trainer.precision=bf16", "trainer.max_steps=6"), run_dir=tmp_path)
    assert json.loads((tmp_path / "result.json").read_text())["finished"]
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values())
