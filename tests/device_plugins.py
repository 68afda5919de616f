"""Test plug-ins (a user's own, importable as `tests.device_plugins` from the repository): a device transform
with per-sample randomness, and metrics to watch it and the monitor with."""

from __future__ import annotations

import torch

from hpctrain.tasks.cbed import EndPointErrorLoss
from hpctrain.transforms import DeviceTransformContext


class DeviceNoise:
    """Adds noise drawn from each sample's own generator to the image, and records the sample's first draw as the
    field `device_draw` (a metric shows it per sample)."""

    def __init__(self, *, std: float) -> None:
        self.std = std

    def __call__(self, batch: dict[str, torch.Tensor], context: DeviceTransformContext) -> dict[str, torch.Tensor]:
        image = batch["image"]
        noise = torch.stack([torch.randn(image.shape[1:], generator=generator, device=context.device)
                             for generator in context.generators()])
        return {**batch, "image": image + self.std * noise.to(image.dtype), "device_draw": noise.flatten(1)[:, 0]}


def expected_draws(indices: list[int], shape: tuple[int, ...], *, seed: int, stage: str,
                   epoch: int = 0) -> list[float]:
    """What DeviceNoise at position 0 draws first for each sample of an image `shape`: a function of (seed,
    stage, epoch, index) only."""
    context = DeviceTransformContext(seed=seed, stage=stage, epoch=epoch, indices=indices, position=0,
                                     device=torch.device("cpu"))
    return [torch.randn(shape, generator=generator).flatten()[0].item() for generator in context.generators()]


def device_draw(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """|first draw|: constant from one evaluation to the next (validation draws are keyed on epoch 0), a stalled
    metric (positive: ReduceLROnPlateau's relative threshold takes a negative best for an improvement)."""
    return batch["device_draw"].abs()


class NegativeEPE(EndPointErrorLoss):
    """-loss: better when higher (callbacks.monitor.mode=max)."""

    def __call__(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return -super().__call__(outputs, batch)
