"""Freeze-training schedules (VirtuaLearn3D): explicit phases, round-robin and random layer groups; frozen
parameters stay unchanged in their phase, also on 2 DDP ranks (the wrapper is rebuilt at each phase change), and a
run resumed inside a phase is bit-exact."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.config import ConfigError, FreezeScheduleConfig
from hpctrain.run.freeze import FreezeSchedule
from hpctrain.run.metrics import open_for_reading

from .conftest import final_weights, launch, tiny_overrides
from .test_config import compose_config
from .test_resume import inspect_json, kill_at_random_step

# Steps 0-5: the stem is frozen; from step 6 the head is frozen and the LR halved; from step 14 nothing is frozen.
EXPLICIT = ("optim.freeze={strategy: explicit, phases: [{start: 0, freeze: ['stem.*']}, "
            "{start: 6, freeze: ['head.*'], lr_factor: 0.5}, {start: 14, freeze: []}]}")
RUN = ["optim.optimizer=sgd", "optim.lr=0.05", "optim.schedule.name=constant", "trainer.max_steps=20",
       "callbacks.early_stopping.enabled=false", "trainer.val_every_steps=10", "callbacks.checkpoint.every_steps=2",
       "callbacks.checkpoint.keep_steps=[6,14]", "callbacks.metrics.flush_every_seconds=0", EXPLICIT]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """RUN on one rank, uninterrupted: what two ranks and a resumed run are compared with."""
    run_dir = tmp_path_factory.mktemp("freeze") / "one"
    launch(tiny_overrides(tiny_data, *RUN, "trainer.micro_batch_size=16"), run_dir=run_dir)
    return run_dir


# The tests that compare with the one-rank run share it: one xdist group, so that both workers do not train it each.
shares_the_one_rank_run = pytest.mark.xdist_group("freeze_one_rank")


def weights_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    info = next(info for info in CheckpointManager(run_dir, keep_last=2).complete() if info.step == step)
    return CheckpointManager.load(info)["model"]


def test_round_robin_and_random_schedules_are_deterministic_functions_of_the_step() -> None:
    groups = [["stem.*"], ["stages.0.*"], ["stages.1.*"], ["head.*"]]
    robin = FreezeSchedule(FreezeScheduleConfig(strategy="round_robin", layer_groups=groups, every=3,
                                                num_trainable=1), steps_per_epoch=10)
    trainable = [sorted(set(p for g in groups for p in g) - set(robin.phase(step).frozen_patterns))
                 for step in (0, 2, 3, 6, 9, 12)]
    assert trainable == [["stem.*"], ["stem.*"], ["stages.0.*"], ["stages.1.*"], ["head.*"], ["stem.*"]]
    config = FreezeScheduleConfig(strategy="random", layer_groups=groups, every=2, num_trainable=2, seed=4,
                                  interval="epoch")
    first, again = FreezeSchedule(config, steps_per_epoch=5), FreezeSchedule(config, steps_per_epoch=5)
    draws = [first.phase(step).frozen_patterns for step in range(0, 60, 10)]
    assert draws == [again.phase(step).frozen_patterns for step in range(0, 60, 10)]
    assert all(len(frozen) == 2 for frozen in draws) and len(set(draws)) > 1
    assert first.phase(0) == first.phase(9) and first.phase(9).index != first.phase(10).index  # every 2 epochs


@pytest.mark.slow
@shares_the_one_rank_run
def test_frozen_parameters_stay_in_their_phase_on_two_ranks_and_match_one_rank(tmp_path: Path, tiny_data: Path,
                                                                              one_rank: Path) -> None:
    launch(tiny_overrides(tiny_data, *RUN, "trainer.micro_batch_size=8", "launcher.num_processes=2"),
           run_dir=tmp_path / "two")
    from hpctrain.components import build_components

    initial = build_components(compose_config(*tiny_overrides(tiny_data))).model.state_dict()
    two = tmp_path / "two"
    at_6, at_14, final = weights_at(two, 6), weights_at(two, 14), final_weights(two)
    stem = [name for name in initial if name.startswith("stem.")]
    head = [name for name in initial if name.startswith("head.")]
    assert stem and head
    assert all(torch.equal(initial[n], at_6[n]) for n in stem)  # frozen during phase 1 (steps 0-5)
    assert not all(torch.equal(initial[n], at_6[n]) for n in head)
    assert all(torch.equal(at_6[n], at_14[n]) for n in head)  # frozen during phase 2 (steps 6-13)
    assert not all(torch.equal(at_6[n], at_14[n]) for n in stem)
    assert not all(torch.equal(at_14[n], final[n]) for n in head)  # phase 3: everything trains
    one = final_weights(one_rank)
    for name in one:
        torch.testing.assert_close(final[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    with open_for_reading(two / "metrics.h5") as file:
        lr = file["train/lr"][()][:, 0]
    np.testing.assert_allclose(lr[[0, 5, 6, 13, 14]], [0.05, 0.05, 0.025, 0.025, 0.05])


@pytest.mark.slow
@shares_the_one_rank_run
def test_a_run_resumed_inside_a_phase_is_bit_exact(tmp_path: Path, tiny_data: Path, one_rank: Path) -> None:
    args = tiny_overrides(tiny_data, *RUN, "trainer.micro_batch_size=16")
    # Checkpoints every 2 steps: killed after one of steps 4-14, it resumes inside the first or second phase or at
    # the start of the third (and crosses the phase changes still ahead of it).
    kill_at_random_step(args, tmp_path / "resumed", random.Random(), steps=(3, 14))
    launch(args, run_dir=tmp_path / "resumed")
    assert inspect_json(one_rank)["newest_checkpoint"]["model_sha256"] == \
        inspect_json(tmp_path / "resumed")["newest_checkpoint"]["model_sha256"]


@pytest.mark.parametrize("schedule,message", [
    ("{strategy: explicit, phases: [{start: 0, freeze: ['trunk.*']}]}", "pattern 'trunk.*' matches no trainable"),
    ("{strategy: explicit, phases: [{start: 0, freeze: ['*']}]}", "freezes every trainable parameter"),
    ("{strategy: explicit, phases: [{start: 5}, {start: 2}]}", "increasing, distinct starts"),
    ("{strategy: round_robin, layer_groups: [['stem.*']]}", "at least two groups"),
])
def test_bad_schedules_are_refused(tiny_data: Path, schedule: str, message: str) -> None:
    from hpctrain.components import check_run_inputs

    with pytest.raises(ConfigError, match=message):
        check_run_inputs(compose_config(*tiny_overrides(tiny_data, f"optim.freeze={schedule}")), prepare=False)
