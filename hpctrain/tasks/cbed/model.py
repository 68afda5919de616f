"""The CBED task's network: a small residual CNN from one distorted image to 8 normalised parameters.

This module owns ``CBEDModelConfig`` (the Hydra node ``model``), ``DistopticaNet`` (a scaled-down
emicroml DistopticaNet) and ``check_image_size``, which tells a user early that the data and the model
disagree about the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

_NORMS = ("group", "batch", "none")
_HEADS = ("pool", "spatial")
# GroupNorm splits channels into groups of this many at most.
_MAX_GROUPS = 8
# Contrast enhancement exponent (emicroml's): lifts faint disk edges against the bright central disk.
_CONTRAST_EXPONENT = 0.3


@dataclass
class CBEDModelConfig:
    """Shape of a ``DistopticaNet`` (the Hydra node ``model``).

    Attributes:
        image_size: N of the N x N input images, checked against the data in the forward pass; null accepts
            any size divisible by 2**num_stages.
        width: channels of the stem and the first stage; each later stage doubles them.
        num_stages: residual stages, each starting with a stride-2 block, so the total downsampling
            is 2**num_stages.
        blocks_per_stage: basic residual blocks per stage.
        norm: "group", "batch" or "none", the normalisation after each convolution.
        contrast_enhancement: rescale each image to [0, 1] and raise it to the power 0.3 on the way in.
        coord_channels: append two channels holding each pixel's x and y (CoordConv), so the filters can tell
            where in the image a feature is: the distortion centre is a position.
        head: "pool" averages the last feature map over space (emicroml's DistopticaNet); "spatial" reduces it
            to ``head_channels`` by a 1x1 convolution and flattens it, keeping where the features are.
        head_channels: channels of the "spatial" head's reduced map.
        hidden: units of the head's hidden layer; null takes the channels of the last stage.
        num_outputs: outputs of the last layer (the 8 distortion parameters).
    """

    image_size: Optional[int] = None
    width: int = 16
    num_stages: int = 3
    blocks_per_stage: int = 1
    # GroupNorm by default: its statistics are per sample, so the result does not depend on how a global
    # batch is split across ranks and micro-batches, and a micro-batch of one is fine (BatchNorm is neither).
    norm: str = "group"
    contrast_enhancement: bool = True
    coord_channels: bool = False
    head: str = "pool"
    head_channels: int = 16
    hidden: Optional[int] = None
    num_outputs: int = 8

    def __post_init__(self) -> None:
        for field in ("width", "num_stages", "blocks_per_stage", "head_channels", "num_outputs"):
            if getattr(self, field) < 1:
                raise ValueError(f"model.{field} must be >= 1, got {getattr(self, field)!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"model.hidden must be >= 1 or null, got {self.hidden!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"model.norm must be one of {', '.join(_NORMS)}, got {self.norm!r}")
        if self.head not in _HEADS:
            raise ValueError(f"model.head must be one of {', '.join(_HEADS)}, got {self.head!r}")
        if self.head == "spatial" and self.image_size is None:
            raise ValueError("model.head=spatial needs model.image_size: the head's input size depends on it")
        if self.image_size is not None:
            _check_divisible(self.image_size, self.num_stages, what=f"model.image_size={self.image_size}")


def _check_divisible(image_size: int, num_stages: int, *, what: str) -> None:
    factor = 2**num_stages
    if image_size < factor or image_size % factor != 0:
        raise ValueError(
            f"{what} must be a positive multiple of 2**model.num_stages = {factor}: each of the {num_stages} "
            f"stages halves the feature map, which must stay a whole number of pixels, at least 1"
        )


def check_image_size(config: CBEDModelConfig, image_size: int) -> None:
    """Raise ValueError unless images of ``image_size`` x ``image_size`` fit the model ``config`` describes."""
    _check_divisible(image_size, config.num_stages, what=f"image size {image_size}")
    if config.image_size is not None and image_size != config.image_size:
        raise ValueError(
            f"model.image_size={config.image_size} but the data has {image_size}x{image_size} images; "
            f"set model.image_size={image_size} or regenerate the data"
        )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, _MAX_GROUPS), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: a normalisation follows (and with norm="none" the residual sum carries an offset anyway).
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus a shortcut, then ReLU (ResNet's basic block)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                _norm(norm, out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DistopticaNet(nn.Module):
    """Distorted CBED image (B, N, N) or (B, 1, N, N) -> min-max normalised distortion parameters (B, 8).

    contrast enhancement -> [x/y coordinate channels] -> 3x3 conv stem -> ``num_stages`` residual stages
    (stride 2 at the start of each) -> head: global average pool ("pool") or a 1x1 convolution flattened with
    its positions ("spatial") -> FC -> ReLU -> FC. emicroml's head normalises with BatchNorm1d between the two
    FC layers; it is left out here because a micro-batch of one must train.
    """

    def __init__(self, config: CBEDModelConfig | None = None, **kwargs: Any) -> None:
        """Built from a CBEDModelConfig or from its fields as keyword arguments (the Hydra node `model`)."""
        super().__init__()
        config = config if config is not None else CBEDModelConfig(**kwargs)
        self.config = config
        width = config.width
        in_channels = 3 if config.coord_channels else 1
        self.stem = nn.Sequential(_conv3x3(in_channels, width), _norm(config.norm, width), nn.ReLU())
        blocks: list[nn.Module] = []
        in_channels = width
        for stage in range(config.num_stages):
            out_channels = width * 2**stage
            for block in range(config.blocks_per_stage):
                blocks.append(_BasicBlock(in_channels, out_channels, 2 if block == 0 else 1, config.norm))
                in_channels = out_channels
        self.stages = nn.Sequential(*blocks)
        features = in_channels
        self.reduce: nn.Module = nn.Identity()
        if config.head == "spatial":
            assert config.image_size is not None  # checked by CBEDModelConfig
            side = config.image_size // 2**config.num_stages
            self.reduce = nn.Sequential(nn.Conv2d(in_channels, config.head_channels, kernel_size=1, bias=False),
                                        _norm(config.norm, config.head_channels), nn.ReLU())
            features = config.head_channels * side * side
        hidden = config.hidden if config.hidden is not None else in_channels
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, config.num_outputs))
        if config.coord_channels:
            # x and y of each pixel centre in [-1, 1], y up like distoptica's grid; rebuilt, not checkpointed.
            size = config.image_size
            self.register_buffer("coordinates", None if size is None else _coordinate_channels(size),
                                 persistent=False)
        self._initialize()

    def _initialize(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for block in self.stages:
            # Zero the last norm's scale so every residual block starts as the identity: a deep stack then
            # trains from the first step without warm-up tricks (Goyal et al. 2017).
            if isinstance(block.norm2, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.zeros_(block.norm2.weight)
        # Start every prediction at the middle of its range, 0.5, which is also the mean of each label's
        # distribution, so the first steps refine an average guess instead of undoing a random one.
        output_layer = self.head[-1]
        nn.init.normal_(output_layer.weight, std=1e-3)
        nn.init.constant_(output_layer.bias, 0.5)

    @staticmethod
    def enhance_contrast(images: Tensor) -> Tensor:
        """Min-max scale each image of (B, 1, N, N) to [0, 1], then raise it to the power 0.3."""
        low = images.amin(dim=(2, 3), keepdim=True)
        high = images.amax(dim=(2, 3), keepdim=True)
        scaled = (images - low) / (high - low).clamp_min(torch.finfo(images.dtype).tiny)
        return scaled.clamp_min(0).pow(_CONTRAST_EXPONENT)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"DistopticaNet takes square single-channel images (B, N, N) or (B, 1, N, N), got "
                             f"{tuple(images.shape)}")
        check_image_size(self.config, images.shape[-1])
        if self.config.contrast_enhancement:
            images = self.enhance_contrast(images)
        if self.config.coord_channels:
            coordinates = self.coordinates
            if coordinates is None or coordinates.shape[-1] != images.shape[-1]:
                coordinates = _coordinate_channels(images.shape[-1]).to(images.device)
            coordinates = coordinates.to(images.dtype).expand(images.shape[0], -1, -1, -1)
            images = torch.cat([images, coordinates], dim=1)
        features = self.reduce(self.stages(self.stem(images)))
        features = features.flatten(1) if self.config.head == "spatial" else features.mean(dim=(2, 3))
        # No output activation: the labels fill [0, 1], and a sigmoid would flatten the gradient exactly
        # for the labels near the ends of their ranges; the EPE loss is finite for any output.
        return self.head(features)


def _coordinate_channels(image_size: int) -> Tensor:
    """(1, 2, N, N): the x and the y of each pixel centre in [-1, 1], x to the right, y up (row 0 at the top)."""
    centres = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1
    x = centres[None, :].expand(image_size, -1)
    y = -centres[:, None].expand(-1, image_size)
    return torch.stack([x, y])[None].contiguous()
