"""One optimizer step (`TrainStep`) and what it produced (`StepResult`, read by the loop and by every observer).

The step reads top to bottom in `TrainStep.__call__`: micro-batches (gradients all-reduced by the last one only),
forward and per-sample loss under autocast, backward, unscale, clip, one small all-reduce of the loss sums and the
stop flag, optimizer step, zero. What the loop does around it (evaluation, checkpoints, freeze phases) is in
hpctrain.run.trainer.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from hpctrain.data.dataset import nonfinite_fields
from hpctrain.optim import ParameterGroup
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.breakdown import StepClock
from hpctrain.run.contract import Batch, PerSampleFunction, model_inputs, per_sample_components
from hpctrain.run.evaluate import autocast_for
from hpctrain.transforms import apply_device_transforms


@dataclass
class StepResult:
    loss: float
    # Mean of each named per-sample loss component (empty when the loss returns one tensor).
    loss_components: dict[str, float] = field(default_factory=dict)
    # With callbacks.metrics.per_sample_train, on rank 0: the step's sample indices and their losses (all ranks).
    sample_index: np.ndarray | None = None
    sample_loss: np.ndarray | None = None
    grad_norm: float = 0.0
    num_samples: int = 0
    nonfinite: bool = False
    # On a non-finite step: (sample index, fields holding a NaN/Inf) of every sample, on all ranks, whose loss is
    # not finite (empty when only a gradient is).
    nonfinite_samples: list[tuple[int, list[str]]] = field(default_factory=list)
    stop_requested: bool = False
    # A rank could not read its batches (it stepped on zero-weighted stand-ins): no rank applied the step.
    unreadable: bool = False


# The unreadable flag's weight in the step's all-reduced flags (the stop flag counts 1 per rank: far fewer ranks).
_UNREADABLE = float(2 ** 20)


class TrainStep:
    """One optimizer step over this rank's micro-batches, the same on every rank.

    Each micro-batch's loss is its per-sample loss sum divided by the step's sample count on all ranks (times the
    world size, which DDP's gradient averaging divides out again), so the update equals that of one big batch,
    also for the shorter last step of an epoch. The trainer hands it the model to run (`use`) at each freeze phase.
    """

    def __init__(self, *, loss: PerSampleFunction, inputs: Sequence[str], groups: list[ParameterGroup],
                 dist: DistributedContext, clock: StepClock, precision: str, clip_grad_norm: float | None,
                 track_grad_norm: bool, device_transforms: Sequence[Callable[..., Batch]] = (), seed: int = 0,
                 record_samples: bool = False, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.loss, self.inputs, self.groups, self.dist, self.clock = loss, list(inputs), groups, dist, clock
        self.device = dist.device
        self.autocast: Callable[[], AbstractContextManager[Any]] = autocast_for(self.device, precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.clip_grad_norm, self.track_grad_norm = clip_grad_norm, track_grad_norm
        self.device_transforms, self.seed = list(device_transforms), seed
        self.record_samples = record_samples
        # Polled once per step and all-reduced with the step's loss sums (the stop protocol's flag).
        self.stop_requested = stop_requested
        self.model: nn.Module | None = None
        self.parameters: list[torch.Tensor] = []
        self._output_gradients: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    def use(self, model: nn.Module, trainable_parameters: list[torch.Tensor]) -> None:
        """The module forward passes call (DDP's wrapper on several ranks) and the parameters it updates."""
        self.model, self.parameters = model, trainable_parameters

    @property
    def checks_gradients(self) -> bool:
        """Whether each update's gradient is checked for NaN/Inf (a clipped or tracked norm, or fp16's scaler)."""
        return self.clip_grad_norm is not None or self.track_grad_norm or self.scaler.is_enabled()

    def __call__(self, microbatches: list[Batch], sizes: list[int], *, num_samples: int,
                 epoch: int, unreadable: bool = False) -> StepResult:
        """`sizes` are the micro-batches' sample counts (0: a stand-in that only joins the all-reduce).
        `unreadable`: this rank could not read its batches and steps on stand-ins; the flag travels with the
        step's all-reduce, and no rank applies the step (StepResult.unreadable on every rank)."""
        self.clock.step_started()
        loss_scale = self.dist.world_size / num_samples
        sums: dict[str, torch.Tensor] = {}
        recorded: list[tuple[np.ndarray, np.ndarray]] = []
        seen: list[tuple[Batch, torch.Tensor]] = []
        for index, (batch, size) in enumerate(zip(microbatches, sizes)):
            with self._gradient_sync(last=index == len(microbatches) - 1):
                batch = self._on_device(batch, epoch)
                with self.autocast():
                    outputs = self.model(*model_inputs(batch, self.inputs))
                    components = per_sample_components(self.loss(outputs, batch), len(batch["index"]),
                                                       key="task.loss")
                per_sample, batch_sum = _summed(components)
                # A stand-in micro-batch is weighted by zero: exactly no gradient, but the all-reduce happens.
                self._backward(batch_sum, loss_scale if size else 0.0)
            _accumulate(sums, components, batch_sum, counted=bool(size))
            if size:  # kept to name the culprits of a non-finite step (references only: no copy, no sync)
                seen.append((batch, per_sample))
            if self.record_samples and size:
                recorded.append((batch["index"].cpu().numpy(), per_sample.detach().float().cpu().numpy()))
        self.clock.backward_done()

        if self.scaler.is_enabled():
            for group in self.groups:
                self.scaler.unscale_(group.optimizer)
        norm_terms = self._clip_or_measure()
        means, norms, stop, unreadable = self._reduce(sums, norm_terms, num_samples, unreadable)
        grad_norm = math.hypot(*norms) if norm_terms else math.nan
        loss = sum(means.values())
        nonfinite = not (math.isfinite(loss) and (not norm_terms or math.isfinite(grad_norm)
                                                  or self.scaler.is_enabled()))
        if not nonfinite and not unreadable:
            self._optimizer_step()
        for group in self.groups:
            group.optimizer.zero_grad(set_to_none=True)
        self.clock.step_done()
        if unreadable:  # the same on every rank: the run stops where this step started
            return StepResult(loss=math.nan, num_samples=0, stop_requested=stop, unreadable=True)
        result = StepResult(loss=loss, loss_components={name: value for name, value in means.items() if name},
                            grad_norm=grad_norm, num_samples=num_samples, nonfinite=nonfinite, stop_requested=stop)
        if self.record_samples:
            result.sample_index, result.sample_loss = self._gather(recorded)
        if nonfinite:  # the same on every rank (all-reduced values): every rank joins the gather
            result.nonfinite_samples = self._nonfinite_samples(seen)
        return result

    # -- the step's parts, in the order it calls them -------------------------------------------------------------
    def _gradient_sync(self, *, last: bool) -> AbstractContextManager[Any]:
        """DDP all-reduces the gradients in the last micro-batch's backward only; the others run under no_sync."""
        return nullcontext() if last or not self.dist.is_distributed else self.model.no_sync()

    def _on_device(self, batch: Batch, epoch: int) -> Batch:
        if self.device.type != "cpu":
            batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
        if self.device_transforms:  # the steps of an epoch never span two: its batches are this epoch's
            batch = apply_device_transforms(self.device_transforms, batch, seed=self.seed, stage="train",
                                            epoch=epoch)
        return batch

    def _backward(self, batch_sum: torch.Tensor, scale: float) -> None:
        """Back-propagate `scale * batch_sum`."""
        if self.scaler.is_enabled():
            self.scaler.scale(batch_sum * scale).backward()
            return
        # Speed: the scale as the output's gradient gives the same gradients, bit for bit, without the product, its
        # backward node and backward's tensor of ones (microseconds each on a tiny model). At most three scales (a
        # full step, an epoch's last, a stand-in's 0), made once.
        gradient = self._output_gradients.get((scale, batch_sum.dtype))
        if gradient is None:
            gradient = torch.tensor(scale, dtype=batch_sum.dtype, device=batch_sum.device)
            self._output_gradients[(scale, batch_sum.dtype)] = gradient
        batch_sum.backward(gradient)

    def _clip_or_measure(self) -> list[torch.Tensor]:
        """Clip to optim.clip_grad_norm (its total norm), or each gradient's norm for optim.track_grad_norm (combined
        on the host; torch's total norm costs ~3x more, ~0.1 ms of a tiny model's step on a CPU), or nothing. The
        gradients are all-reduced already, so the norm is the same on every rank."""
        if self.clip_grad_norm is not None:
            return [torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_grad_norm)]
        if self.track_grad_norm:
            return list(torch._foreach_norm([parameter.grad for parameter in self.parameters
                                             if parameter.grad is not None]))
        return []

    def _reduce(self, sums: dict[str, torch.Tensor], norm_terms: list[torch.Tensor], num_samples: int,
                unreadable: bool) -> tuple[dict[str, float], list[float], bool, bool]:
        """The step's mean loss components over all ranks, the gradient norm's terms and the rank-agreed stop and
        unreadable flags, with one host sync (and, on several ranks, one small all-reduce)."""
        names = sorted(sums)
        stop = self.stop_requested()
        if self.dist.is_distributed:
            flags = float(stop) + _UNREADABLE * float(unreadable)  # summed over the ranks: both survive
            stats = torch.stack([*(sums[name] for name in names), torch.tensor(flags, device=self.device)])
            self.dist.all_reduce_sum(stats)
            *totals, flags = stats.tolist()
            stop, unreadable = flags % _UNREADABLE > 0, flags >= _UNREADABLE
            norms = torch.stack(norm_terms).tolist() if norm_terms else []
        else:
            values = torch.stack([*(sums[name] for name in names), *norm_terms]).tolist()
            totals, norms = values[:len(names)], values[len(names):]
        return {name: total / num_samples for name, total in zip(names, totals)}, norms, stop, unreadable

    def _optimizer_step(self) -> None:
        for group in self.groups:
            if self.scaler.is_enabled():
                self.scaler.step(group.optimizer)  # skips the update itself if fp16 gradients overflowed
            else:
                group.optimizer.step()
        if self.scaler.is_enabled():
            self.scaler.update()

    def _nonfinite_samples(self, seen: list[tuple[Batch, torch.Tensor]]) -> list[tuple[int, list[str]]]:
        """The step's samples with a non-finite loss, on all ranks, in index order."""
        mine = _nonfinite_in(seen)
        return sorted(sample for rank_samples in self.dist.all_gather_object(mine) for sample in rank_samples)

    def _gather(self, recorded: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        gathered = [pair for rank_pairs in self.dist.all_gather_object(recorded) for pair in rank_pairs]
        return (np.concatenate([index for index, _ in gathered]),
                np.concatenate([values for _, values in gathered]))


def _nonfinite_in(seen: list[tuple[Batch, torch.Tensor]]) -> list[tuple[int, list[str]]]:
    found = []
    for batch, per_sample in seen:
        for row in torch.nonzero(~torch.isfinite(per_sample.detach())).flatten().tolist():
            found.append((int(batch["index"][row]), nonfinite_fields(batch, row)))
    return found


def _summed(components: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loss (the sum of its components) and its sum over the micro-batch, at least in float32 (a
    half-precision sum would lose the loss's digits)."""
    per_sample = sum(components.values()) if len(components) > 1 else next(iter(components.values()))
    return per_sample, per_sample.sum(dtype=torch.promote_types(per_sample.dtype, torch.float32))


def _accumulate(sums: dict[str, torch.Tensor], components: dict[str, torch.Tensor], batch_sum: torch.Tensor, *,
                counted: bool) -> None:
    """Add a micro-batch's per-component sums to the step's (a stand-in's count as zero)."""
    for name, value in components.items():
        contribution = batch_sum.detach() if len(components) == 1 else value.detach().sum(dtype=batch_sum.dtype)
        if not counted:
            contribution = contribution * 0.0
        sums[name] = sums[name] + contribution if name in sums else contribution
