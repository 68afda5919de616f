"""The density_reversion task's loss and validation metrics (after IRIS's Reverter training), on hpctrain's
contract: each is called as f(outputs, batch) and returns one value per sample, shape (B,).

`outputs` is the predicted top-down density (B, N, N) (or (B, 1, N, N)) in physical units, Msun/pc^2;
`batch[density]` the true one, same units. `normalization` is IRIS's `density_normalization`: a density (same
units) by which both are divided, so the loss is units-invariant and comparable between datasets whose densities
are in different units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normed_residual(pred: Tensor, true: Tensor, normalization: float) -> Tensor:
    """IRIS's units-normalised residual, elementwise: (pred - true) / normalization (dimensionless)."""
    return (pred - true) / normalization


def _images(tensor: Tensor) -> Tensor:
    """(B, N, N) or (B, 1, N, N) -> (B, N*N) in float32 (autocast's half precision cannot hold the dynamic range)."""
    if tensor.dim() == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    return tensor.float().flatten(1)


class _DensityObjective:
    def __init__(self, *, normalization: float, density: str = "density") -> None:
        if isinstance(normalization, bool) or not isinstance(normalization, (int, float)) \
                or not math.isfinite(normalization) or normalization <= 0:
            raise ValueError(f"normalization must be a finite density > 0 (in the data's density units), "
                             f"got {normalization!r}")
        self.normalization = float(normalization)
        self.density = density

    def pair(self, outputs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pred, true = _images(outputs), _images(batch[self.density])
        if pred.shape != true.shape:
            raise ValueError(f"the predicted densities {tuple(outputs.shape)} and the batch's {self.density!r} "
                             f"{tuple(batch[self.density].shape)} differ in shape")
        return pred, true


class ScaledDensityLoss(_DensityObjective):
    """IRIS's ScaledDensityLoss, per sample: the mean over pixels of
    (asinh(pred / s) - asinh(true / s))**2, with s = `normalization`.

    The asinh is linear below s and logarithmic above it, so a faint filament and a dense core both count, where a
    plain MSE would see only the densest pixels.
    """

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        pred, true = self.pair(outputs, batch)
        s = self.normalization
        return (torch.asinh(pred / s) - torch.asinh(true / s)).square().mean(dim=1)


class NormedResidual(_DensityObjective):
    """A per-sample summary of IRIS's units-normalised residual r = (pred - true) / s over the pixels:
    `reduction` "mean_abs" (default): mean |r|, the typical error in units of s; "mean": mean r, the bias (> 0: the
    model over-predicts the total density)."""

    def __init__(self, *, normalization: float, density: str = "density", reduction: str = "mean_abs") -> None:
        super().__init__(normalization=normalization, density=density)
        if reduction not in ("mean_abs", "mean"):
            raise ValueError(f"reduction must be mean_abs or mean, got {reduction!r}")
        self.reduction = reduction

    def __call__(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        pred, true = self.pair(outputs, batch)
        residual = normed_residual(pred, true, self.normalization)
        return (residual.abs() if self.reduction == "mean_abs" else residual).mean(dim=1)
