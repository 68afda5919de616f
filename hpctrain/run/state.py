"""The loop's state (`TrainState`) and what a checkpoint holds of a run: `checkpoint_state` assembles it,
`restore` checks that it fits this run and takes it back, bit for bit (every rank's RNG state, the model, the
optimizers, the schedulers, the grad scaler, the loop's position and the metrics cursor).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpctrain.config import Config, ConfigError, TrainerConfig, to_json
from hpctrain.optim import ParameterGroup
from hpctrain.process.distributed import DistributedContext
from hpctrain.process.seeding import restore_rng_state
from hpctrain.run.averaging import STATE_KEY as AVERAGING_KEY, WeightAveraging
from hpctrain.run.metrics import MetricsCursor
from hpctrain.run.resume_check import check_checkpoint_fits

log = logging.getLogger(__name__)

# How a run stopped by a non-finite loss (trainer.nonfinite=stop, or trainer.max_consecutive_nonfinite) begins its
# stop reason: the launcher reports it as an error (hpctrain.launching.job.summarize).
NONFINITE_STOP = "non-finite loss"
# How a run stopped by a batch it could not read (a damaged chunk, a file gone) begins its stop reason.
DATA_FAULT_STOP = "unreadable data"
# How a run stopped by a checkpoint or metrics write that failed (a full disk, a quota) begins its stop reason.
DISK_STOP = "writing failed"


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # steps done in `epoch`
    best_loss: float = math.inf  # the validation loss at best_step
    best_step: int = 0
    # The best validation mean of callbacks.monitor so far (NaN: none yet; checkpoints from before it have none).
    best_value: float = math.nan
    evaluations_without_improvement: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    finished: bool = False
    stop_reason: str = ""

    def advance(self, *, steps_per_epoch: int, nonfinite: bool) -> bool:
        """Count one optimizer step (a skipped, non-finite one too: its data was consumed); True if it ended an
        epoch."""
        self.step += 1
        self.step_in_epoch += 1
        self.nonfinite_steps += nonfinite
        self.consecutive_nonfinite_steps = self.consecutive_nonfinite_steps + 1 if nonfinite else 0
        if self.step_in_epoch < steps_per_epoch:
            return False
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return True

    def record_evaluation(self, value: float, loss: float, *, mode: str, min_delta: float) -> bool:
        """Record an evaluation's monitored mean (callbacks.monitor) and loss; True if it is the best so far."""
        best = self.best_value
        better = value < best - min_delta if mode == "min" else value > best + min_delta
        improved = math.isfinite(value) and (math.isnan(best) or better)  # NaN/Inf is never the best
        if improved:
            self.best_value, self.best_step, self.best_loss = value, self.step, loss
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        return improved

    @property
    def failed(self) -> bool:
        """Stopped by bad numbers, bad data or a failed write: the launcher reports the stop reason as an error."""
        return self.finished and self.stop_reason.startswith((NONFINITE_STOP, DATA_FAULT_STOP, DISK_STOP))

    def done(self, trainer: TrainerConfig) -> bool:
        """A finished run that the same command must not train further: it reached a limit, stopped early or was
        pruned (a run stopped by a signal or a non-finite loss goes on)."""
        return self.finished and (self.stop_reason.startswith(("early stopping", "pruned"))
                                  or bool(self.limit_reached(trainer)))

    def limit_reached(self, trainer: TrainerConfig) -> str:
        """Why the loop must end now (trainer.max_steps or max_epochs reached), or ""."""
        if self.step >= trainer.max_steps:
            return f"reached trainer.max_steps={trainer.max_steps}"
        if trainer.max_epochs is not None and self.epoch >= trainer.max_epochs:
            return f"reached trainer.max_epochs={trainer.max_epochs}"
        return ""


@dataclass
class Resumable:
    """The trainer's parts whose state a checkpoint carries."""

    model: nn.Module
    groups: list[ParameterGroup]
    scaler: torch.amp.GradScaler
    dist: DistributedContext
    global_batch_size: int
    steps_per_epoch: int
    averaging: WeightAveraging


def weights_finite(model: nn.Module) -> bool:
    finite = [parameter.detach().isfinite().all() for parameter in model.parameters() if parameter.is_floating_point()]
    return not finite or bool(torch.stack(finite).all())


def checkpoint_state(train_state: TrainState, parts: Resumable, *, rng_states: list[Any],
                     metrics_cursor: MetricsCursor, config: Config) -> dict[str, Any]:
    """A checkpoint's contents: plain containers and tensors (loadable with `weights_only=True`)."""
    return {
        "format_version": 1,
        "step": train_state.step,
        "finished": train_state.finished,
        "train_state": asdict(train_state),
        "model": parts.model.state_dict(),
        AVERAGING_KEY: parts.averaging.state_dict(),  # None without optim.weight_averaging
        "optimizers": [group.optimizer.state_dict() for group in parts.groups],
        # Each group's torch scheduler (schedule.scheduler), None for a built-in schedule (a function of step).
        "schedulers": [None if group.scheduler is None else group.scheduler.state_dict() for group in parts.groups],
        "parameter_groups": [group.name for group in parts.groups],
        "grad_scaler": parts.scaler.state_dict(),
        "rng": rng_states,
        "metrics_cursor": asdict(metrics_cursor),
        "world_size": parts.dist.world_size,
        "global_batch_size": parts.global_batch_size,
        "seed": config.seed,
        "config": to_json(config),
    }


def restore(state: dict[str, Any], parts: Resumable, *, config: Config, run_dir: Path,
            checkpoint: Path) -> TrainState:
    """Check that a checkpoint fits this run (one ConfigError saying what changed), load it into the parts and
    this rank's RNG state, and return the loop's state."""
    _check_layout(state, parts, config=config, run_dir=run_dir)
    check_checkpoint_fits(state, config, parts.model, run_dir=run_dir, checkpoint=checkpoint,
                          steps_per_epoch=parts.steps_per_epoch)
    # Before the optimizers and schedulers: from SWA's start_step on, SWALR is the groups' scheduler.
    parts.averaging.load_state_dict(state.get(AVERAGING_KEY), step=state["step"])
    parts.model.load_state_dict(state["model"])
    for group, optimizer_state in zip(parts.groups, state["optimizers"]):
        group.optimizer.load_state_dict(optimizer_state)
    for group, scheduler_state in zip(parts.groups, state.get("schedulers", [None] * len(parts.groups))):
        if group.scheduler is not None:
            group.scheduler.load_state_dict(scheduler_state)
    parts.scaler.load_state_dict(state["grad_scaler"])
    train_state = TrainState(**state["train_state"])
    monitor = config.callbacks.monitor
    if "best_value" not in state["train_state"] and (monitor.metric, monitor.mode) == ("loss", "min"):
        train_state.best_value = train_state.best_loss  # a checkpoint from before callbacks.monitor
    if state["world_size"] != parts.dist.world_size:
        log.warning("resuming a %d-rank run on %d ranks: same samples per step, but per-rank random streams "
                    "differ, so the result is not bitwise that of the original layout",
                    state["world_size"], parts.dist.world_size)
    restore_rng_state(state["rng"][parts.dist.rank % len(state["rng"])], parts.dist.device)
    return train_state


def _check_layout(state: dict[str, Any], parts: Resumable, *, config: Config, run_dir: Path) -> None:
    if state["global_batch_size"] != parts.global_batch_size or state["seed"] != config.seed:
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoints were made with seed {state['seed']} and global "
            f"batch size {state['global_batch_size']}, this config has seed {config.seed} and global "
            f"batch size {parts.global_batch_size} (micro_batch_size x num_microbatches x ranks); "
            f"use a new run directory")
    names = [group.name for group in parts.groups]
    if state["parameter_groups"] != names:
        raise ConfigError(f"cannot resume {run_dir}: parameter groups {state['parameter_groups']} became {names}; "
                          f"use a new run directory")
    kind, wanted = (state.get(AVERAGING_KEY) or {}).get("kind"), parts.averaging.config.kind
    if kind is not None and kind != wanted:
        raise ConfigError(f"cannot resume {run_dir}: its checkpoints hold a weight average of kind {kind!r}, this "
                          f"config has optim.weight_averaging.kind={wanted}; use a new run directory")
    swa_lr = parts.averaging.sets_learning_rates(state["step"])
    for group, scheduler_state in zip(parts.groups, state.get("schedulers", [None] * len(parts.groups))):
        if (group.scheduler is None and not swa_lr) != (scheduler_state is None):
            raise ConfigError(f"cannot resume {run_dir}: parameter group {group.name!r}'s schedule changed "
                              f"between a torch scheduler (schedule.scheduler) and a built-in one; use a new "
                              f"run directory")
