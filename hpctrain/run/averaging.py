"""Weight averaging (optim.weight_averaging): an average of the weights kept beside them, built on torch's
`torch.optim.swa_utils` (AveragedModel, get_ema_multi_avg_fn, SWALR, update_bn), not written by hand.

- `ema`: an exponential moving average, updated after every `every_steps`-th applied optimizer step from
  `start_step` on (the decay optionally warmed up: min(decay, (1 + n) / (10 + n)) after n updates, as timm's and
  TensorFlow's EMA do, so that the first updates are not dominated by the initial weights). Parameters and buffers
  (BatchNorm statistics) are averaged.
- `swa`: the equal average of the weights from `start_step` on; the buffers follow the current model's, and at the
  end of training (trainer.max_steps) the BatchNorm statistics of the average are recomputed with `update_bn` over
  one pass of the training data. With `swa_lr`, every parameter group's learning rate is handed from its schedule
  to `SWALR` at `start_step` (annealed over `anneal_steps`), which the checkpoint carries as the group's scheduler.

An update comes after an optimizer step that was applied (a skipped, non-finite step changes no weight and is not
averaged); every rank makes the same updates on the same weights (DDP keeps them identical), so the average is
identical on every rank without a collective. What uses it:

- validation evaluates the average once it holds an update (before, the raw weights), so the monitored value, the
  best checkpoint, early stopping and plateau schedulers follow the evaluated model; `evaluate_raw` also records
  the raw weights' values as `raw.<name>` beside them;
- every checkpoint carries it (`weight_averaging`: the kind and AveragedModel's state dict, its update count
  included), so a resumed run continues it bit-exactly;
- `weights_of(state)` is the one place that says which weights of a checkpoint a consumer takes: load_model,
  predict, test, export, inspect's digest and fine-tuning's init_from take the average when the checkpoint holds
  one, or the raw weights when asked to (`raw=True`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from hpctrain.config import WeightAveragingConfig
from hpctrain.optim import ParameterGroup
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.contract import Batch, model_inputs
from hpctrain.run.evaluate import Evaluation

log = logging.getLogger(__name__)

STATE_KEY = "weight_averaging"  # the checkpoint's entry: {"kind": ..., "state": AveragedModel.state_dict()}
_PREFIX = "module."  # AveragedModel's state dict: the averaged module's under this prefix, and n_averaged


def weights_of(state: dict[str, Any], *, raw: bool = False) -> dict[str, torch.Tensor]:
    """The weights a consumer of checkpoint `state` takes: the average when it holds one (and `raw` is false),
    else the raw weights."""
    averaged = averaged_weights(state)
    return state["model"] if raw or averaged is None else averaged


def weights_kind(state: dict[str, Any], *, raw: bool = False) -> str:
    """Which weights `weights_of` takes: 'raw', or the average's kind ('ema', 'swa')."""
    entry = state.get(STATE_KEY)
    return "raw" if raw or averaged_weights(state) is None else str(entry["kind"])


def averaged_weights(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The checkpoint's averaged weights as the model's own state dict, or None (no averaging, or no update yet)."""
    entry = state.get(STATE_KEY)
    if not entry or int(entry["state"]["n_averaged"]) == 0:
        return None
    return {name[len(_PREFIX):]: value for name, value in entry["state"].items() if name.startswith(_PREFIX)}


class _Unpacked(nn.Module):
    """The model called with a batch's input list, for `update_bn`, which calls model(input) with one input."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: list[torch.Tensor]) -> Any:
        return self.module(*inputs)


class WeightAveraging:
    """The run's weight average (None inside when optim.weight_averaging.kind is null: every call is a no-op)."""

    def __init__(self, config: WeightAveragingConfig, model: nn.Module, groups: list[ParameterGroup], *,
                 dist: DistributedContext, inputs: list[str],
                 training_batches: Callable[[], Iterable[Batch]] | None = None) -> None:
        self.config, self.model, self.groups, self.dist, self.inputs = config, model, groups, dist, inputs
        self.training_batches = training_batches  # one pass over this rank's training data (SWA's update_bn)
        self.averaged: AveragedModel | None = None
        self._swa_lr_entered = False
        if config.kind == "ema":
            self.averaged = AveragedModel(model, multi_avg_fn=self._ema_update, use_buffers=True)
        elif config.kind == "swa":
            self.averaged = AveragedModel(model, use_buffers=False)
        if self.averaged is not None:
            self.averaged.requires_grad_(False)
        self._enter_swa_lr(0)

    @property
    def enabled(self) -> bool:
        return self.averaged is not None

    @property
    def holds_average(self) -> bool:
        """Whether the average has had an update (before, it is only a copy of the initial weights)."""
        return self.averaged is not None and int(self.averaged.n_averaged) > 0

    def _ema_update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        decay = self.config.decay
        if self.config.warmup:  # n updates made so far (the first, a copy, is not one of these calls)
            count = float(updates)
            decay = min(decay, (1.0 + count) / (10.0 + count))
        get_ema_multi_avg_fn(decay)(averaged, current, updates)

    # -- the loop's calls -----------------------------------------------------------------------------------------
    def after_step(self, step: int, *, applied: bool, last: bool) -> None:
        """After optimizer step `step` (1-based count of steps made): average if due; SWA's learning rate and, at
        the last step, its BatchNorm statistics."""
        if self.averaged is None:
            return
        start, every = self.config.start_step, self.config.every_steps
        if applied and step >= start and (step - start) % every == 0:
            self.averaged.update_parameters(self.model)
            if self.config.kind == "swa":  # the buffers follow the current model until update_bn recomputes them
                for averaged, current in zip(self.averaged.module.buffers(), self.model.buffers()):
                    averaged.copy_(current)
        self._enter_swa_lr(step)
        if last and self.config.kind == "swa" and self.holds_average:
            self.recompute_batch_norm()

    def sets_learning_rates(self, step: int) -> bool:
        """Whether SWALR sets the groups' learning rates after optimizer step `step`."""
        return self.config.kind == "swa" and self.config.swa_lr is not None and step >= self.config.start_step

    def _enter_swa_lr(self, step: int) -> None:
        """From `start_step` on, SWALR sets each group's learning rate (the group's scheduler from then on, so the
        checkpoint carries its state and the loop steps it after each step)."""
        if self._swa_lr_entered or not self.sets_learning_rates(step):
            return
        for group in self.groups:
            group.multiplier, group.interval = None, "step"
            group.scheduler = SWALR(group.optimizer, swa_lr=self.config.swa_lr,
                                    anneal_epochs=self.config.anneal_steps,
                                    anneal_strategy=self.config.anneal_strategy)
        self._swa_lr_entered = True

    def recompute_batch_norm(self) -> None:
        """SWA's BatchNorm statistics over one pass of this rank's training data (torch's update_bn), then the
        mean over the ranks (computed alike on every rank from all ranks' values: bitwise the same everywhere)."""
        assert self.averaged is not None and self.training_batches is not None
        module = self.averaged.module
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            return
        device = next(module.parameters()).device
        update_bn(self._inputs(self.training_batches(), device), _Unpacked(module))
        if self.dist.is_distributed:
            buffers = [b for b in module.buffers() if b.is_floating_point()]
            gathered = self.dist.all_gather_object([b.detach().cpu() for b in buffers])
            for index, buffer in enumerate(buffers):
                buffer.copy_(torch.stack([rank[index] for rank in gathered]).mean(dim=0))
        log.info("SWA: BatchNorm statistics of the averaged weights recomputed over the training data")

    def _inputs(self, batches: Iterable[Batch], device: torch.device) -> Iterator[tuple[list[torch.Tensor]]]:
        for batch in batches:  # a 1-tuple: update_bn takes a list/tuple's first element as the model's input
            yield ([tensor.to(device) for tensor in model_inputs(batch, self.inputs)],)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, evaluator: Callable[..., Evaluation], model: nn.Module, loader: Iterable[Batch], *,
                 step: int) -> Evaluation:
        """The evaluation of the average once it holds an update (else of `model`), with the raw weights' values
        as `raw.<name>` beside them when evaluate_raw asks."""
        if not self.holds_average:
            evaluation = evaluator(model, loader, step=step)
            raw = evaluation.per_sample
        else:
            assert self.averaged is not None
            evaluation = evaluator(self.averaged.module, loader, step=step)
            raw = evaluator(model, loader, step=step).per_sample if self.config.evaluate_raw else {}
        if self.config.evaluate_raw:
            evaluation.per_sample.update({f"raw.{name}": values for name, values in list(raw.items())})
        return evaluation

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        if self.averaged is None:
            return None
        return {"kind": self.config.kind, "state": self.averaged.state_dict()}

    def load_state_dict(self, entry: dict[str, Any] | None, *, step: int) -> None:
        """Restore the average of a checkpoint at `step`; before the optimizers and schedulers are restored (SWALR
        is the groups' scheduler from start_step on, and its state is the checkpoint's)."""
        if self.averaged is None:
            return
        if entry is None:  # a checkpoint from before the averaging was configured: it starts afresh (its first
            # update copies the weights then: n_averaged is still 0)
            log.warning("the checkpoint holds no weight average: optim.weight_averaging starts after this step")
        else:
            self.averaged.load_state_dict(entry["state"])
        self._enter_swa_lr(step)
