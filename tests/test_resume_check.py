"""What a config may change in a run directory with checkpoints (hpctrain.run.resume_check), as unit tests of its logic;
the launcher's refusals end to end are in tests/test_resume.py."""

from __future__ import annotations

import json

import pytest
from torch import nn

from hpctrain.config import to_json
from hpctrain.launching.app import compose_config
from hpctrain.run.resume_check import model_differences, schedule_change


def test_model_differences_name_every_kind_of_entry_load_state_dict_refuses() -> None:
    saved = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1), nn.BatchNorm1d(1)).state_dict()
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1))
    assert model_differences(saved, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1), nn.BatchNorm1d(1))) == []
    assert model_differences(saved, model) == [
        "shape changed: 0.weight (4, 3) -> (8, 3), 0.bias (4,) -> (8,), 1.weight (1, 4) -> (1, 8)",
        "not in this model: 2.weight (1,), 2.bias (1,), 2.running_mean (1,), 2.running_var (1,) and 1 more"]
    assert model_differences(model.state_dict(), nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1), nn.Linear(1, 1))) \
        == ["not in the checkpoint: 2.weight (1, 1), 2.bias (1,)"]


def saved(*overrides: str) -> dict:
    return json.loads(to_json(compose_config(list(overrides))))


@pytest.mark.parametrize("resumed,refused", [
    (["trainer.max_steps=200"], True),  # the cosine re-stretched after the warm-up
    (["trainer.max_steps=200", "optim.schedule.total=100"], False),  # the run's length, explicitly
    (["trainer.max_steps=200", "optim.schedule.total=200"], False),  # stretched, explicitly
    (["trainer.max_steps=100"], False),  # nothing changed
    (["trainer.max_steps=200", "optim.schedule.name=constant"], False),  # a schedule without a length
])
def test_a_schedule_that_follows_max_steps_is_not_re_stretched_silently(resumed: list[str], refused: bool) -> None:
    before = saved("trainer.max_steps=100", "optim.schedule.warmup=10")
    config = compose_config(["optim.schedule.warmup=10", *resumed])
    problem = schedule_change(before, config, step=100, steps_per_epoch=7)
    assert bool(problem) == refused, problem
    if refused:
        assert problem.startswith("trainer.max_steps=200: this run was trained to step 100 on a warmup_cosine")
        assert "Set optim.schedule.total=100 to continue the run's schedule" in problem


def test_a_re_stretched_schedule_is_accepted_while_the_steps_left_are_in_its_warm_up() -> None:
    # The warm-up does not depend on the length: a run still inside it continues with the same LRs.
    before = saved("trainer.max_steps=15")  # warm-up of 50 steps
    assert schedule_change(before, compose_config(["trainer.max_steps=20"]), step=15, steps_per_epoch=7) == ""
    assert schedule_change(before, compose_config(["trainer.max_steps=60"]), step=15, steps_per_epoch=7) != ""


def test_a_per_epoch_schedule_counts_its_length_in_epochs() -> None:
    epochs = ["optim.schedule.interval=epoch", "optim.schedule.warmup=1"]
    before = saved("trainer.max_steps=100", *epochs)  # 10 steps per epoch: 10 epochs
    assert schedule_change(before, compose_config([*epochs, "trainer.max_steps=95"]), step=50,
                           steps_per_epoch=10) == ""  # still 10 epochs
    problem = schedule_change(before, compose_config([*epochs, "trainer.max_steps=200"]), step=50, steps_per_epoch=10)
    assert "over 10 epochs" in problem and "stretched over 20 epochs" in problem, problem
