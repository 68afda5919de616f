"""Optimizers and learning-rate schedules, one optimizer and one schedule per parameter group.

An optimizer is a shorthand (adamw, adam, sgd) or a `_target_` node of any optimizer class; a schedule is one of
the built-in multipliers or the user's own function (`schedule.name=custom`). Every schedule is a pure function
of the global optimizer step (epoch-interval schedules divide by the fixed number of steps per epoch), set before
each step from the step alone (as torch's LambdaLR computes it: base LR x multiplier), so a resumed run
reproduces the learning rates of an uninterrupted one exactly and a checkpoint needs no scheduler state.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hpctrain.config import ConfigError, OptimConfig, ScheduleConfig


@dataclass
class LRMultiplier:
    """The multiplier of a group's base LR after `step` optimizer steps."""

    name: str
    steps_per_interval: int
    warmup: int
    warmup_start_factor: float
    total: int
    min_factor: float
    cycle: int
    cycle_multiplier: float
    # schedule.name=custom: the user's f(interval index) -> multiplier.
    function: Callable[[int], float] | None = None
    # A factor of the current freeze-training phase (hpctrain.freeze), a function of the step.
    phase_factor: Callable[[int], float] | None = None

    def __call__(self, step: int) -> float:
        factor = 1.0 if self.phase_factor is None else self.phase_factor(step)
        return factor * self._schedule(step)

    def _schedule(self, step: int) -> float:
        t = step // self.steps_per_interval
        if self.function is not None:
            return float(self.function(t))
        if self.name == "constant":
            return 1.0
        if t < self.warmup:  # linear warm-up from warmup_start_factor to 1
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * t / self.warmup
        t -= self.warmup
        if self.name == "cosine_restarts":
            length = self.cycle
            while t >= length:
                t -= length
                length = max(1, round(length * self.cycle_multiplier))
            progress = t / length
        else:
            progress = min(1.0, t / max(1, self.total - self.warmup))
        if self.name == "warmup_linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_factor + (1.0 - self.min_factor) * shape


# The built-in schedules whose shape depends on their length (`total`, by default trainer.max_steps).
SCHEDULES_WITH_LENGTH = ("warmup_cosine", "warmup_linear")


def schedule_length(total: int | None, interval: str, *, max_steps: int, steps_per_epoch: int) -> int:
    """A schedule's length in its intervals: `total`, else the run's max steps (per epoch: the epochs they take)."""
    if total:
        return total
    return math.ceil(max_steps / steps_per_epoch) if interval == "epoch" else max_steps


def make_multiplier(schedule: ScheduleConfig, *, max_steps: int, steps_per_epoch: int,
                    key: str = "optim.schedule") -> LRMultiplier:
    per_epoch = schedule.interval == "epoch"
    function = None
    if schedule.function is not None:
        from hpctrain.components import build

        function = build(f"{key}.function", schedule.function)
        try:
            first = float(function(0))
        except Exception as error:
            raise ConfigError(f"{key}.function(0) failed: {type(error).__name__}: {error}") from None
        if not math.isfinite(first) or first < 0:
            raise ConfigError(f"{key}.function(0) returned {first}; a learning-rate multiplier must be >= 0")
    steps_per_interval = steps_per_epoch if per_epoch else 1
    return LRMultiplier(
        name=schedule.name,
        steps_per_interval=steps_per_interval,
        warmup=schedule.warmup,
        warmup_start_factor=schedule.warmup_start_factor,
        total=schedule_length(schedule.total, schedule.interval, max_steps=max_steps,
                              steps_per_epoch=steps_per_epoch),
        min_factor=schedule.min_factor,
        cycle=schedule.cycle,
        cycle_multiplier=schedule.cycle_multiplier,
        function=function,
    )


@dataclass
class ParameterGroup:
    name: str
    optimizer: torch.optim.Optimizer
    multiplier: LRMultiplier
    base_lrs: list[float]  # the optimizer's learning rates as configured, one per torch param group

    def set_learning_rates(self, step: int) -> float:
        """Set the learning rates of optimizer step `step` (0-based); returns the first one. Cheaper than
        LambdaLR.step(), which costs a tiny model's step ~10 us more, and stateless."""
        factor = self.multiplier(step)
        for param_group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(param_group["lr"], torch.Tensor):  # an optimizer with a tensor LR keeps its tensor
                param_group["lr"].fill_(base_lr * factor)
            else:
                param_group["lr"] = base_lr * factor
        return self.base_lrs[0] * factor


def _make_optimizer(name: Any, params: list[nn.Parameter], lr: float, weight_decay: float,
                    config: OptimConfig, *, key: str) -> torch.optim.Optimizer:
    if not isinstance(name, str):  # a `_target_` node: any optimizer class, torch's or the user's
        from hpctrain.components import build

        optimizer = build(key, name, params, lr=lr, weight_decay=weight_decay)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"{key}: {type(optimizer).__name__} is not a torch.optim.Optimizer")
        return optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=weight_decay)
    optimizer_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer_class(params, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=weight_decay)


def build_parameter_groups(model: nn.Module, config: OptimConfig, *, max_steps: int, steps_per_epoch: int,
                           phase_factor: Callable[[int], float] | None = None) -> list[ParameterGroup]:
    """Split the model's parameters by name patterns and build one optimizer + schedule per group.

    The first group, "default", holds every parameter no configured group matches.
    """
    assigned: dict[str, list[nn.Parameter]] = {"default": []}
    for group in config.param_groups:
        assigned[group.name] = []
    for parameter_name, parameter in model.named_parameters():
        owner = next((group for group in config.param_groups
                      if any(fnmatch.fnmatchcase(parameter_name, pattern) for pattern in group.params)), None)
        if owner is not None and owner.frozen:
            parameter.requires_grad_(False)
            continue
        assigned["default" if owner is None else owner.name].append(parameter)

    groups = []
    for index, group in enumerate([None, *config.param_groups]):
        name = "default" if group is None else group.name
        key = "optim" if group is None else f"optim.param_groups[{index - 1}]"
        params = assigned[name]
        if group is not None and group.frozen:
            continue
        if not params:
            if group is None:
                continue  # every parameter belongs to a named group
            raise ConfigError(f"optim.param_groups '{name}' matches no parameter of the model "
                              f"(patterns {list(group.params)}); parameter names look like "
                              f"{[n for n, _ in list(model.named_parameters())[:3]]}")
        optimizer_name = (group and group.optimizer) or config.optimizer
        lr = (group and group.lr) or config.lr
        weight_decay = config.weight_decay if group is None or group.weight_decay is None else group.weight_decay
        schedule = (group and group.schedule) or config.schedule
        optimizer_key = f"{key}.optimizer" if group is not None and group.optimizer else "optim.optimizer"
        optimizer = _make_optimizer(optimizer_name, params, lr, weight_decay, config, key=optimizer_key)
        schedule_key = f"{key}.schedule" if group is not None and group.schedule else "optim.schedule"
        multiplier = make_multiplier(schedule, max_steps=max_steps, steps_per_epoch=steps_per_epoch,
                                     key=schedule_key)
        multiplier.phase_factor = phase_factor
        base_lrs = [float(param_group["lr"]) for param_group in optimizer.param_groups]
        groups.append(ParameterGroup(name=name, optimizer=optimizer, multiplier=multiplier, base_lrs=base_lrs))
    if not groups:
        raise ConfigError("optim.param_groups freeze every parameter of the model: nothing to train")
    return groups

