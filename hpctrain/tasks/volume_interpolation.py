"""An example device transform (`task.device_transforms`), after dwi_ml's DWIMLTrainerOneInput: the input volume
is interpolated at each streamline's coordinates on the GPU, after the batch is on the device and outside the
DataLoader ("interpolation of data is faster through GPU"), with the coordinates jittered by Gaussian noise in
training. A plug-in on the public contract (docs/your-own-model.md#device-transforms); the core never imports it.
"""

from __future__ import annotations

from typing import Sequence

import h5py
import torch
import torch.nn.functional as F

from hpctrain.transforms import DeviceTransformContext

Batch = dict[str, torch.Tensor]


class InterpolateVolume:
    """Trilinear interpolation of a volume field at ragged coordinates.

    The volume (C, D, H, W) is read once from `path`:`dataset` and kept on the batch's device. `coordinates` is a
    ragged field (batch, max_points, 3) of voxel coordinates (d, h, w), padded per batch, with its lengths in
    `<coordinates>_length`; `output` becomes (batch, max_points, C) of the interpolated values (zero at the padding).
    In the `noise_stages`, each sample's coordinates get noise of std `noise_std` voxels, drawn from its own
    generator (keyed on seed, stage, epoch and sample index: the same for any number of ranks and workers).
    """

    def __init__(self, *, path: str, dataset: str, coordinates: str = "coordinates", output: str = "features",
                 noise_std: float = 0.0, noise_stages: Sequence[str] = ("train",)) -> None:
        with h5py.File(path, "r") as file:
            volume = torch.as_tensor(file[dataset][()], dtype=torch.float32)
        if volume.ndim == 3:
            volume = volume.unsqueeze(0)
        if volume.ndim != 4:
            raise ValueError(f"{path}:{dataset} must be a volume (D, H, W) or (C, D, H, W), got {tuple(volume.shape)}")
        self.volume = volume
        self.coordinates, self.output = coordinates, output
        self.noise_std, self.noise_stages = noise_std, tuple(noise_stages)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _volume(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:  # moved once per device, not per batch
            self._on_device[device] = self.volume.to(device).unsqueeze(0)  # (1, C, D, H, W)
        return self._on_device[device]

    def __call__(self, batch: Batch, context: DeviceTransformContext) -> Batch:
        points = batch[self.coordinates].float()  # (B, P, 3) voxel coordinates (d, h, w)
        if self.noise_std and context.stage in self.noise_stages:
            noise = torch.stack([torch.randn(points.shape[1:], generator=generator, device=points.device)
                                 for generator in context.generators()])
            points = points + self.noise_std * noise
        volume = self._volume(points.device)
        sizes = torch.tensor(volume.shape[2:], dtype=points.dtype, device=points.device)  # (D, H, W)
        # grid_sample's grid is (x, y, z) = (w, h, d) in [-1, 1], corners on the voxel centres (align_corners).
        grid = (2 * points / (sizes - 1) - 1).flip(-1)
        batch_size, num_points = points.shape[:2]
        sampled = F.grid_sample(volume, grid.reshape(1, batch_size * num_points, 1, 1, 3), mode="bilinear",
                                padding_mode="border", align_corners=True)  # 5-D "bilinear" is trilinear
        values = sampled.reshape(volume.shape[1], batch_size, num_points).permute(1, 2, 0)
        lengths = batch[f"{self.coordinates}_length"].to(points.device)
        inside = torch.arange(num_points, device=points.device)[None, :] < lengths[:, None]
        return {**batch, self.output: values * inside[..., None]}
