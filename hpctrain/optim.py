"""Optimizers and learning-rate schedules, one optimizer and one schedule per parameter group.

An optimizer is a shorthand (adamw, adam, sgd) or a `_target_` node of any optimizer class. A schedule is one of
the built-in multipliers, the user's own function (`schedule.name=custom`), or a torch scheduler
(`schedule.scheduler`). A multiplier is a pure function of the global optimizer step (epoch-interval schedules
divide by the fixed number of steps per epoch), set before each step from the step alone (as torch's LambdaLR
computes it: base LR x multiplier): the fast path, with no state to checkpoint. A torch scheduler (any
torch.optim.lr_scheduler class, compositions of them, ReduceLROnPlateau) computes its learning rates from its own
history (torch's chainable form), so its state_dict is checkpointed and restored: the resumed run continues from
exactly the saved learning rates and counters.
"""

from __future__ import annotations

import bisect
import fnmatch
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hpctrain.config import ConfigError, OptimConfig, ScheduleConfig, is_target_node
from hpctrain.instantiate import build


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
    # A factor of the current freeze-training phase (hpctrain.run.freeze), a function of the step.
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


# -- torch schedulers -----------------------------------------------------------------------------------------
class SequentialSchedule:
    """torch's SequentialLR that also takes a scheduler stepped with the monitored metric (ReduceLROnPlateau),
    e.g. a linear warm-up, then reductions on a plateau; SequentialLR refuses one.

    `schedulers[i]` is active from interval `milestones[i - 1]` on (intervals: steps or epochs, the schedule's
    `interval`). step() (once per interval) moves the count and steps the active scheduler if it is not stepped
    with the metric; step(metrics) (after every evaluation) steps the active one if it is. Each scheduler starts
    at its milestone from the base learning rates, as in SequentialLR (a warm-up hands over the full LR).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: list[Any], milestones: list[int]) -> None:
        if len(milestones) != len(schedulers) - 1 or list(milestones) != sorted(set(milestones)) or \
                (milestones and milestones[0] <= 0):
            raise ValueError(f"milestones must be {len(schedulers) - 1} increasing intervals > 0 (one fewer than "
                             f"schedulers), got {list(milestones)}")
        self.optimizer, self.schedulers, self.milestones = optimizer, list(schedulers), list(milestones)
        self.last_epoch = 0
        # The configured LRs (torch schedulers record them as initial_lr when they are built).
        self.base_lrs = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        # Building the later schedulers may have moved the learning rates: the first one's hold.
        for group, lr in zip(optimizer.param_groups, self.schedulers[0].get_last_lr()):
            group["lr"] = lr

    def _active(self) -> Any:
        return self.schedulers[bisect.bisect_right(self.milestones, self.last_epoch)]

    def step(self, metrics: float | None = None) -> None:
        if metrics is not None:
            active = self._active()
            if steps_with_metric(active):
                active.step(metrics)
            return
        self.last_epoch += 1
        active = self._active()
        starts = self.last_epoch in self.milestones
        if steps_with_metric(active):
            if starts:
                for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
                    group["lr"] = lr
        elif starts:
            active.step(0)  # the restart from the base LRs, as SequentialLR makes it
        else:
            active.step()

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = state["last_epoch"]
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)


def _step_parameters(scheduler: Any) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(scheduler.step).parameters.values())
    except (TypeError, ValueError):
        return []


def steps_with_metric(scheduler: Any) -> bool:
    """Whether step() takes the monitored metric (ReduceLROnPlateau.step(metrics)): stepped after evaluations."""
    parameters = _step_parameters(scheduler)
    return bool(parameters) and (parameters[0].name == "metrics" or parameters[0].default is inspect.Parameter.empty)


def steps_per_interval(scheduler: Any) -> bool:
    """Whether step() is called after every interval: it needs no argument."""
    parameters = _step_parameters(scheduler)
    return not parameters or parameters[0].default is not inspect.Parameter.empty


def _is_plateau_class(target: str) -> bool:
    from hydra.utils import get_class

    try:
        return issubclass(get_class(target), torch.optim.lr_scheduler.ReduceLROnPlateau)
    except Exception:  # not a class (the build reports it)
        return False


def build_scheduler(key: str, node: Any, optimizer: torch.optim.Optimizer, *, mode: str | None = None) -> Any:
    """A `_target_` scheduler node built around `optimizer` as cls(optimizer, **node); a `schedulers` list in the
    node is built the same way first, around the same optimizer, and passed as objects (SequentialLR,
    ChainedScheduler, SequentialSchedule). `mode` (the monitor's) is given to a ReduceLROnPlateau that sets none."""
    node = {name: value for name, value in node.items() if name != "_partial_"}
    children = node.pop("schedulers", None)
    if children is not None:
        if not isinstance(children, list) or not all(is_target_node(child) for child in children):
            raise ConfigError(f"{key}.schedulers must be a list of `_target_` scheduler nodes, got {children!r}")
        built = [build_scheduler(f"{key}.schedulers[{index}]", child, optimizer, mode=mode)
                 for index, child in enumerate(children)]
        scheduler = build(key, node, optimizer=optimizer, schedulers=built)
    else:
        if mode is not None and "mode" not in node and _is_plateau_class(node["_target_"]):
            node["mode"] = mode
        scheduler = build(key, node, optimizer)
    missing = [name for name in ("step", "state_dict", "load_state_dict")
               if not callable(getattr(scheduler, name, None))]
    if missing:
        raise ConfigError(f"{key}: {type(scheduler).__name__} is not a learning-rate scheduler (it has no "
                          f"{', '.join(missing)}); it is built as cls(optimizer, **node)")
    return scheduler


# -- parameter groups ------------------------------------------------------------------------------------------
@dataclass
class ParameterGroup:
    name: str
    optimizer: torch.optim.Optimizer
    multiplier: LRMultiplier | None  # None with a torch scheduler
    base_lrs: list[float]  # the optimizer's learning rates as configured, one per torch param group
    # schedule.scheduler, built around `optimizer`; it sets the learning rates itself when it is stepped.
    scheduler: Any = None
    interval: str = "step"
    monitor: str = "loss"  # the validation mean a scheduler stepped with the metric is given

    def set_learning_rates(self, step: int) -> float:
        """Set the learning rates of optimizer step `step` (0-based); returns the first one. Cheaper than
        LambdaLR.step(), which costs a tiny model's step ~10 us more, and stateless. With a torch scheduler:
        the learning rate it set when last stepped."""
        if self.multiplier is None:
            return float(self.optimizer.param_groups[0]["lr"])
        factor = self.multiplier(step)
        for param_group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(param_group["lr"], torch.Tensor):  # an optimizer with a tensor LR keeps its tensor
                param_group["lr"].fill_(base_lr * factor)
            else:
                param_group["lr"] = base_lr * factor
        return self.base_lrs[0] * factor

    def after_step(self, *, epoch_ended: bool) -> None:
        """Step the torch scheduler after an optimizer step (interval step) or an epoch's last one (epoch)."""
        if self.scheduler is not None and (self.interval == "step" or epoch_ended) \
                and steps_per_interval(self.scheduler):
            self.scheduler.step()

    def after_evaluation(self, means: dict[str, float]) -> None:
        """Step a scheduler that takes the metric with the monitored validation mean (the same on every rank)."""
        if self.scheduler is not None and steps_with_metric(self.scheduler):
            self.scheduler.step(means[self.monitor])


def _make_optimizer(name: Any, params: list[nn.Parameter], lr: float, weight_decay: float,
                    config: OptimConfig, *, key: str) -> torch.optim.Optimizer:
    if not isinstance(name, str):  # a `_target_` node: any optimizer class, torch's or the user's
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
                           phase_factor: Callable[[int], float] | None = None, monitor: str = "loss",
                           monitor_mode: str = "min") -> list[ParameterGroup]:
    """Split the model's parameters by name patterns and build one optimizer + schedule per group.

    The first group, "default", holds every parameter no configured group matches. `monitor` and `monitor_mode`
    (callbacks.monitor) are the metric a scheduler stepped with the metric follows unless its schedule names one.
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
        base_lrs = [float(param_group["lr"]) for param_group in optimizer.param_groups]
        if schedule.scheduler is not None:  # (config.py refuses freeze phases' LR factors with it)
            scheduler = build_scheduler(f"{schedule_key}.scheduler", schedule.scheduler, optimizer,
                                        mode=monitor_mode if schedule.monitor is None else None)
            groups.append(ParameterGroup(name=name, optimizer=optimizer, multiplier=None, base_lrs=base_lrs,
                                         scheduler=scheduler, interval=schedule.interval,
                                         monitor=schedule.monitor or monitor))
            continue
        multiplier = make_multiplier(schedule, max_steps=max_steps, steps_per_epoch=steps_per_epoch,
                                     key=schedule_key)
        multiplier.phase_factor = phase_factor
        groups.append(ParameterGroup(name=name, optimizer=optimizer, multiplier=multiplier, base_lrs=base_lrs))
    if not groups:
        raise ConfigError("optim.param_groups freeze every parameter of the model: nothing to train")
    return groups

