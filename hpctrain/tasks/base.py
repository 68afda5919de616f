"""What the trainer needs from a task: a model and a per-sample loss, built from the config and the data file."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from hpctrain.config import Config, ConfigError
from hpctrain.data import DatasetInfo


class Task(Protocol):
    # Name of the per-sample loss, recorded in metrics.h5.
    metric_name: str

    def build_model(self) -> nn.Module: ...

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of every sample of a batch, shape (batch,); the training loss is their mean."""
        ...


def build_task(config: Config, info: DatasetInfo) -> Task:
    """The task named by `task.name`, checked against the data file (raises ConfigError on a mismatch)."""
    if config.task.name == "cbed_distortion":
        from hpctrain.tasks.cbed.task import CBEDDistortionTask

        return CBEDDistortionTask(config, info)
    raise ConfigError(f"task.name: unknown task {config.task.name!r}")
