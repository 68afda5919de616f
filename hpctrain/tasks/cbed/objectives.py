"""The cbed_distortion task's loss and validation metrics, on hpctrain's public contract: each is called as
f(outputs, batch) and returns one value per sample. `outputs` are the model's min-max normalised parameters
(B, 8); `batch[labels]` holds the true parameters in physical units (see generator.PARAMETER_NAMES)."""

from __future__ import annotations

import torch
from torch import Tensor

from hpctrain.tasks.cbed.generator import PARAMETER_NAMES, REFERENCE_POINT, label_normalization
from hpctrain.tasks.cbed.loss import denormalize, epe_of_adjusted_distortion_fields


class _PhysicalParameters:
    def __init__(self, *, labels: str = "labels", image: str = "image", grid_size: int = 0) -> None:
        if grid_size < 0:
            raise ValueError(f"grid_size must be >= 0 (0: the image size), got {grid_size}")
        weight, bias = label_normalization()
        self.weight, self.bias = torch.from_numpy(weight), torch.from_numpy(bias)
        self.labels, self.image, self.grid_size = labels, image, grid_size

    def predicted(self, outputs: Tensor) -> Tensor:
        # The closed-form flow field is evaluated in float32 even under autocast: it squares small numbers.
        outputs = outputs.float()
        return denormalize(outputs, self.weight.to(outputs.device), self.bias.to(outputs.device))

    def grid(self, batch: dict[str, Tensor]) -> int:
        return self.grid_size or batch[self.image].shape[-1]


class EndPointErrorLoss(_PhysicalParameters):
    """The EPE of the adjusted distortion field (emicroml's loss), per sample, on the image's pixel grid
    (`grid_size` 0) or a grid of `grid_size` pixels per side."""

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return epe_of_adjusted_distortion_fields(self.predicted(outputs), batch[self.labels].float(),
                                                 self.grid(batch))


class NoDistortionEPE(_PhysicalParameters):
    """Baseline: the EPE of predicting "no distortion" (every amplitude 0) for the same samples; the model's EPE
    divided by this says how much of the distortion it has learned. (Metrics named baseline_* are drawn as
    reference lines on loss.png, and `inspect` prints the loss's ratio to them.)"""

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        target = batch[self.labels].float()
        identity = torch.zeros_like(target)
        identity[:, 6:] = REFERENCE_POINT  # the centre is irrelevant when every amplitude is 0
        return epe_of_adjusted_distortion_fields(identity, target, self.grid(batch))


class ParameterErrors(_PhysicalParameters):
    """The absolute error of each of the 8 distortion parameters, in physical units, named as PARAMETER_NAMES
    (its mean over the validation samples is the parameter's mean absolute error)."""

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        errors = (self.predicted(outputs) - batch[self.labels].float()).abs()
        return {name: errors[:, index] for index, name in enumerate(PARAMETER_NAMES)}


class LabelMeanEPE(_PhysicalParameters):
    """Baseline: the EPE of always predicting the mean training label (a constant predictor), for the same samples.

    The mean is taken over the training part of the file at `path`: the first samples, without the last
    `holdout_fraction` that hpctrain holds out for validation (0 when validation has a file of its own)."""

    def __init__(self, *, path: str, holdout_fraction: float = 0.0, labels: str = "labels", dataset: str = "labels",
                 image: str = "image", grid_size: int = 0) -> None:
        super().__init__(labels=labels, image=image, grid_size=grid_size)
        import h5py

        with h5py.File(path, "r") as file:
            if dataset not in file:
                raise ValueError(f"{path} has no HDF5 dataset {dataset!r}")
            values = file[dataset][()]
        num_train = len(values) - int(round(len(values) * holdout_fraction))
        if num_train < 1:
            raise ValueError(f"holdout_fraction={holdout_fraction} leaves no training label in {path}")
        self.mean = torch.from_numpy(values[:num_train].astype("float64").mean(axis=0)).float()

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        target = batch[self.labels].float()
        constant = self.mean.to(target.device).expand_as(target)
        return epe_of_adjusted_distortion_fields(constant, target, self.grid(batch))


class ParameterPredictions(_PhysicalParameters):
    """The predicted value of each of the 8 distortion parameters, in physical units (for plots and analysis)."""

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        predicted = self.predicted(outputs)
        return {name: predicted[:, index] for index, name in enumerate(PARAMETER_NAMES)}
