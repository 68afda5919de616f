"""The task contract as the core calls it (docs/your-own-model.md), and `Components`, the parts a run trains with.

A batch is a dict of named tensors (the core adds `index`, the sample indices); `outputs =
model(*[batch[name] for name in task.inputs])`; `loss(outputs, batch)` returns a per-sample tensor of shape (batch,)
or a dict of named per-sample components whose sum is the loss; each metric `metric(outputs, batch)` returns a
per-sample tensor (batch,). The composition root (hpctrain.components) builds `Components`; the loop, evaluation and
the commands receive them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from hpctrain.data.dataset import Split

Batch = dict[str, torch.Tensor]
PerSampleFunction = Callable[[Any, Batch], Any]


@dataclass
class Components:
    """Everything a rank trains with, built once from the config."""

    model: nn.Module
    loss: PerSampleFunction
    metrics: dict[str, PerSampleFunction]
    split: Split
    transforms: list[Callable[[Batch], Batch]]
    # data.test_dataset, built (and so checked) with the others; None when the config names none.
    test_dataset: Dataset | None = None
    # task.plot, the plot hook (hpctrain.run.evaluate); None when the config names none.
    plot: Callable[..., Any] | None = None
    # task.device_transforms, run on the device before the forward pass (hpctrain.transforms).
    device_transforms: list[Callable[..., Batch]] = field(default_factory=list)
    # (config key, callback) of callbacks.user and callbacks.loggers (each logger in its LoggerFeed).
    callbacks: list[tuple[str, Any]] = field(default_factory=list)


# -- the contract, checked --------------------------------------------------------------------------------------
def model_inputs(batch: Batch, inputs: list[str]) -> list[torch.Tensor]:
    return [batch[name] for name in inputs]


def per_sample_components(value: Any, batch_size: int, *, key: str) -> dict[str, torch.Tensor]:
    """A loss's or metric's result as named per-sample tensors; raises ValueError naming `key` on a bad shape."""
    items = value.items() if isinstance(value, Mapping) else [("", value)]
    components = {}
    for name, tensor in items:
        where = f"{key}[{name!r}]" if name else key
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where} returned {type(tensor).__name__}, not a per-sample tensor of shape "
                             f"({batch_size},)")
        if tuple(tensor.shape) != (batch_size,):
            raise ValueError(f"{where} returned shape {tuple(tensor.shape)}; it must return one value per sample, "
                             f"shape ({batch_size},) (reduce every other axis, e.g. .mean(dim=1))")
        components[name] = tensor
    if not components:
        raise ValueError(f"{key} returned an empty dict")
    return components


def describe(batch: Batch, names: list[str] | None = None) -> str:
    shown = names if names is not None else [name for name in batch if name != "index"]
    return ", ".join(f"{name} {tuple(batch[name].shape)} {str(batch[name].dtype).replace('torch.', '')}"
                     for name in shown if name in batch)
