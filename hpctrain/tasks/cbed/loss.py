"""The CBED task's loss: end-point error (EPE) of the adjusted distortion fields, in closed form.

This module owns the differentiable map from the 8 standard distortion parameters
[A, S, E1, E2, P1, P2, cx, cy] (distoptica's fractional coordinates, see ``generator.PARAMETER_NAMES``)
to distoptica's flow field, and the per-sample EPE built on it. It is pure torch: CPU or GPU,
float32 or float64, and differentiable in the parameters (distoptica itself is not).

Coordinates: pixel centres with y pointing up, u_x = (j + 1/2)/N for column j and u_y = 1 - (i + 1/2)/N
for row i, exactly distoptica's sampling grid. The flow maps an undistorted point u to the distorted
point q = u + flow(u).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pixel_centre_coordinates(grid_size: int, *, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Return (u_x of each column, u_y of each row), each of shape (grid_size,)."""
    pixel_centres = (torch.arange(grid_size, device=device, dtype=dtype) + 0.5) / grid_size
    return pixel_centres, 1.0 - pixel_centres


def flow_field(params: Tensor, grid_size: int) -> tuple[Tensor, Tensor]:
    """Return distoptica's flow field (flow_x, flow_y) of the standard coordinate transform, each (B, N, N).

    ``params`` is (B, 8) in physical (unnormalised) units, ordered [A, S, E1, E2, P1, P2, cx, cy].
    Index [b, i, j] is row i (y decreasing downward), column j, like distoptica's
    ``get_flow_field_of_coord_transform``.
    """
    if params.dim() != 2 or params.shape[1] != 8:
        raise ValueError(f"params must have shape (batch, 8), got {tuple(params.shape)}")
    # The grid is N floats: building it per call costs less than any cache bookkeeping.
    u_x, u_y = _pixel_centre_coordinates(grid_size, device=params.device, dtype=params.dtype)
    quadratic, spiral, elliptical_x, elliptical_y, parabolic_x, parabolic_y, center_x, center_y = (
        params[:, k, None, None] for k in range(8)
    )
    dx = u_x[None, None, :] - center_x  # (B, 1, N): varies along columns
    dy = u_y[None, :, None] - center_y  # (B, N, 1): varies along rows
    radius_squared = dx * dx + dy * dy
    cosine_term = dx * dx - dy * dy  # r^2 cos(2 theta)
    sine_term = 2.0 * dx * dy  # r^2 sin(2 theta)
    flow_x = (
        radius_squared * (quadratic * dx - spiral * dy)
        + ((2.0 * radius_squared + cosine_term) * parabolic_x + sine_term * parabolic_y) / 3.0
        + elliptical_x * dx
        + elliptical_y * dy
    )
    flow_y = (
        radius_squared * (quadratic * dy + spiral * dx)
        + ((2.0 * radius_squared - cosine_term) * parabolic_y + sine_term * parabolic_x) / 3.0
        - elliptical_x * dy
        + elliptical_y * dx
    )
    return flow_x, flow_y


def _safe_norm(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean norm sqrt(x^2 + y^2) whose gradient is 0, not NaN, where the norm is 0.

    d sqrt(s)/ds is infinite at s = 0, and inf * 0 gives NaN, so an exact prediction would poison the
    gradients. The double ``where`` keeps sqrt away from 0 in both passes and leaves the value exact
    (a plain sqrt(s + eps) would make the loss of a perfect prediction sqrt(eps) instead of 0). It tests
    s == 0, not s > 0: a NaN prediction must give a NaN loss (the trainer's non-finite check), not 0.
    """
    squared = x * x + y * y
    is_zero = squared == 0
    safe_squared = torch.where(is_zero, torch.ones_like(squared), squared)
    return torch.where(is_zero, torch.zeros_like(squared), torch.sqrt(safe_squared))


def epe_of_adjusted_distortion_fields(predicted: Tensor, target: Tensor, grid_size: int) -> Tensor:
    """Per-sample EPE (B,) between the adjusted distortion fields of two (B, 8) parameter batches.

    The adjusted field is q - mean(q) with q = u + flow(u): removing the spatial mean makes a global
    shift of the pattern free. The undistorted grid u is common to both, so the difference of adjusted
    fields is the difference of flows minus its spatial mean. The EPE is the mean over pixels of the
    Euclidean norm of that difference, in fractional units of the image width. Inputs are physical
    (unnormalised) parameters; see ``denormalize``.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    predicted_x, predicted_y = flow_field(predicted, grid_size)
    target_x, target_y = flow_field(target, grid_size)
    difference_x = target_x - predicted_x
    difference_y = target_y - predicted_y
    difference_x = difference_x - difference_x.mean(dim=(1, 2), keepdim=True)
    difference_y = difference_y - difference_y.mean(dim=(1, 2), keepdim=True)
    return _safe_norm(difference_x, difference_y).mean(dim=(1, 2))


def denormalize(normalized: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Map min-max normalised parameters back to physical units: x = (x_norm - b) / w."""
    return (normalized - bias) / weight
