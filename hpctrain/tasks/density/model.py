"""The density_reversion task's network: a small U-Net from an observation image to a top-down density image.

The network works in the asinh-scaled space z = asinh(density / output_scale) (where the densities of a
sample span orders of magnitude but z stays of order 1..10) and returns the density itself, in physical units
(Msun/pc^2): density = output_scale * sinh(z). The loss (objectives.ScaledDensityLoss) takes that physical
density, as IRIS's physical losses take the Reverter's prediction; with the task's default config
output_scale is the loss's normalisation, so the loss sees the network's z again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# GroupNorm splits channels into groups of at most this many.
_MAX_GROUPS = 8
# |z| is clamped here before sinh: sinh(30) * scale is ~1e13 * scale, far beyond any density, and finite in fp32.
_MAX_ABS_Z = 30.0


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, never BatchNorm: its statistics are per sample, so the result does not depend on how a global
    # batch is split across ranks and micro-batches, and a micro-batch of one trains like any other.
    return nn.GroupNorm(math.gcd(channels, _MAX_GROUPS), channels)


class _ConvBlock(nn.Sequential):
    """(3x3 conv -> GroupNorm -> SiLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False), _norm(out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False), _norm(out_channels),
            nn.SiLU(),
        )


class DensityUNet(nn.Module):
    """Observation (B, N, N) or (B, 1, N, N) -> density (B, N, N) in Msun/pc^2.

    A U-Net: ``depth`` encoder levels (a conv block, then 2x2 average pooling), a bottleneck block, and ``depth``
    decoder levels (bilinear 2x upsampling, concatenation with the encoder's features of that size, a conv
    block); level k has ``width * 2**k`` channels. A 1x1 conv gives z, and density = output_scale * sinh(z).

    Args:
        width: channels of the first level (>= 1).
        depth: downsampling levels (>= 1); N must be a multiple of 2**depth.
        output_scale: the density scale of the output head, Msun/pc^2 (> 0); the task config sets it to the
            loss's normalisation.
        image_size: N of the N x N images, checked against the data in the forward pass; null accepts any N
            divisible by 2**depth.
        input_offset, input_scale: the observation is standardised as (observation - input_offset) / input_scale on
            the way in (input_scale > 0).
    """

    def __init__(self, width: int = 16, depth: int = 2, output_scale: float = 10.0, image_size: int | None = None,
                 input_offset: float = 0.0, input_scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if not (isinstance(output_scale, (int, float)) and math.isfinite(output_scale) and output_scale > 0):
            raise ValueError(f"output_scale must be a finite number > 0 (a density, Msun/pc^2), got {output_scale!r}")
        if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
        if not (isinstance(input_offset, (int, float)) and math.isfinite(input_offset)):
            raise ValueError(f"input_offset must be a finite number, got {input_offset!r}")
        if image_size is not None:
            _check_image_size(image_size, depth, what=f"image_size={image_size}")
        self.width, self.depth, self.image_size = width, depth, image_size
        self.output_scale = float(output_scale)
        self.input_offset, self.input_scale = float(input_offset), float(input_scale)

        channels = [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            _ConvBlock(1 if level == 0 else channels[level - 1], channels[level]) for level in range(depth))
        self.bottleneck = _ConvBlock(channels[depth - 1], channels[depth])
        self.decoder = nn.ModuleList(
            _ConvBlock(channels[level + 1] + channels[level], channels[level]) for level in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)
        # A near-zero head: the first predictions are z ~ 0 (density ~ 0), and the first steps fit the level.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def scaled(self, observation: Tensor) -> Tensor:
        """The network's own output z = asinh(density / output_scale), (B, N, N), before the sinh."""
        if observation.dim() == 4 and observation.shape[1] == 1:
            observation = observation[:, 0]
        if observation.dim() != 3 or observation.shape[1] != observation.shape[2]:
            raise ValueError(f"DensityUNet takes square single-channel images (B, N, N) or (B, 1, N, N), got "
                             f"{tuple(observation.shape)}")
        size = observation.shape[-1]
        _check_image_size(size, self.depth, what=f"image size {size}")
        if self.image_size is not None and size != self.image_size:
            raise ValueError(f"model.image_size={self.image_size} but the data has {size}x{size} images; set "
                             f"model.image_size={size} (or null)")
        features = ((observation.unsqueeze(1) - self.input_offset) / self.input_scale)
        skips = []
        for block in self.encoder:
            features = block(features)
            skips.append(features)
            features = F.avg_pool2d(features, 2)
        features = self.bottleneck(features)
        for block, skip in zip(self.decoder, reversed(skips)):
            features = F.interpolate(features, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            features = block(torch.cat([features, skip], dim=1))
        return self.head(features)[:, 0]

    def forward(self, observation: Tensor) -> Tensor:
        # The sinh runs in float32 even under autocast: it spans orders of magnitude.
        z = self.scaled(observation).float().clamp(-_MAX_ABS_Z, _MAX_ABS_Z)
        return self.output_scale * torch.sinh(z)


def _check_image_size(image_size: int, depth: int, *, what: str) -> None:
    factor = 2**depth
    if image_size < factor or image_size % factor != 0:
        raise ValueError(f"{what} must be a positive multiple of 2**model.depth = {factor}: each of the {depth} "
                         f"levels halves the feature map")
