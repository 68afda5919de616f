"""The `cbed_distortion` task: DistopticaNet predicts normalised distortion parameters; the loss is the EPE of
the adjusted distortion field, computed after mapping the prediction back to physical units."""

from __future__ import annotations

import torch
from torch import nn

from hpctrain.config import Config, ConfigError
from hpctrain.data import DatasetInfo
from hpctrain.tasks.cbed.generator import PARAMETER_NAMES
from hpctrain.tasks.cbed.loss import denormalize, epe_of_adjusted_distortion_fields
from hpctrain.tasks.cbed.model import DistopticaNet, check_image_size


class CBEDDistortionTask:
    metric_name = "epe_of_adjusted_distortion_field"

    def __init__(self, config: Config, info: DatasetInfo) -> None:
        image_size = info.image_shape[0]
        try:
            check_image_size(config.model, image_size)
        except ValueError as error:
            raise ConfigError(f"{error} (data file {info.path})") from None
        if info.num_labels != len(PARAMETER_NAMES) or config.model.num_outputs != len(PARAMETER_NAMES):
            raise ConfigError(f"task cbed_distortion needs {len(PARAMETER_NAMES)} labels and model outputs; "
                              f"{info.path} has {info.num_labels} labels, model.num_outputs="
                              f"{config.model.num_outputs}")
        self.model_config = config.model
        self.grid_size = config.task.loss_grid_size or image_size
        self._weight = torch.from_numpy(info.normalization_weight)
        self._bias = torch.from_numpy(info.normalization_bias)

    def build_model(self) -> nn.Module:
        return DistopticaNet(self.model_config)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The closed-form flow field is evaluated in float32 even under autocast: it squares small numbers.
        weight = self._weight.to(outputs.device)
        bias = self._bias.to(outputs.device)
        predicted = denormalize(outputs.float(), weight, bias)
        return epe_of_adjusted_distortion_fields(predicted, targets.float(), self.grid_size)
