"""Freeze-training schedules (VirtuaLearn3D): which parameters are frozen, and the LR factor, in each phase of a
run, as a pure function of the step (or epoch), so every rank agrees and a resumed run is in the same phase.

Strategies: `explicit` (phases starting at given steps/epochs, each freezing the parameters its patterns match),
`round_robin` (the layer groups take turns being trainable, `num_trainable` at a time, changing every `every`
intervals), `random` (every `every` intervals, `num_trainable` layer groups drawn with a seed are trainable).
Parameters in no layer group are always trainable. Permanently frozen parameter groups (optim.param_groups with
`frozen: true`) stay frozen whatever the schedule.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
from torch import nn

from hpctrain.config import FreezeScheduleConfig


@dataclass(frozen=True)
class Phase:
    index: int  # phases are numbered from 0 in the order they occur
    frozen_patterns: tuple[str, ...]
    lr_factor: float


class FreezeSchedule:
    def __init__(self, config: FreezeScheduleConfig, *, steps_per_epoch: int) -> None:
        self.config = config
        self.steps_per_interval = steps_per_epoch if config.interval == "epoch" else 1

    @property
    def enabled(self) -> bool:
        return self.config.strategy != "none"

    def phase(self, step: int) -> Phase:
        """The phase the optimizer step `step` (0-based: the step about to be taken) belongs to."""
        config = self.config
        t = step // self.steps_per_interval
        if config.strategy == "explicit":
            started = [i for i, phase in enumerate(config.phases) if phase.start <= t]
            if not started:
                return Phase(index=0, frozen_patterns=(), lr_factor=1.0)
            current = config.phases[started[-1]]
            return Phase(index=started[-1] + 1, frozen_patterns=tuple(current.freeze),
                         lr_factor=1.0 if current.lr_factor is None else current.lr_factor)
        if config.strategy in ("round_robin", "random"):
            number = t // config.every
            groups = config.layer_groups
            if config.strategy == "round_robin":
                trainable = {(number * config.num_trainable + j) % len(groups) for j in range(config.num_trainable)}
            else:
                trainable = set(np.random.default_rng([config.seed, number]).choice(
                    len(groups), size=config.num_trainable, replace=False).tolist())
            frozen = tuple(pattern for index, group in enumerate(groups) if index not in trainable for pattern in group)
            return Phase(index=number, frozen_patterns=frozen, lr_factor=1.0)
        return Phase(index=0, frozen_patterns=(), lr_factor=1.0)

    def lr_factor(self, step: int) -> float:
        return self.phase(step).lr_factor


def apply_phase(model: nn.Module, phase: Phase, *, always_frozen: set[str]) -> list[str]:
    """Set requires_grad for a phase; returns the names of the parameters it freezes."""
    frozen = []
    for name, parameter in model.named_parameters():
        is_frozen = name in always_frozen or any(fnmatch.fnmatchcase(name, p) for p in phase.frozen_patterns)
        parameter.requires_grad_(not is_frozen)
        if is_frozen and name not in always_frozen:
            frozen.append(name)
    return frozen


def check_schedule(model: nn.Module, config: FreezeScheduleConfig) -> None:
    """Refuse patterns that match no parameter and phases that would freeze every parameter."""
    from hpctrain.config import ConfigError

    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    pattern_lists = [(f"optim.freeze.phases[{i}].freeze", phase.freeze) for i, phase in enumerate(config.phases)] \
        if config.strategy == "explicit" else [(f"optim.freeze.layer_groups[{i}]", group)
                                               for i, group in enumerate(config.layer_groups)] \
        if config.strategy in ("round_robin", "random") else []
    for key, patterns in pattern_lists:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ConfigError(f"{key}: pattern {pattern!r} matches no trainable parameter of the model; "
                                  f"parameter names look like {names[:3]}")
        if config.strategy == "explicit" and all(any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names):
            raise ConfigError(f"{key} freezes every trainable parameter: nothing would train in that phase")
