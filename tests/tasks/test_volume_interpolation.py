"""The dwi_ml-like example device transform: trilinear interpolation of a volume at ragged coordinates."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from hpctrain.tasks.volume_interpolation import InterpolateVolume
from hpctrain.transforms import apply_device_transforms


def trilinear(volume: np.ndarray, point: tuple[float, float, float]) -> np.ndarray:
    base = [int(coordinate) for coordinate in point]
    value = np.zeros(volume.shape[0])
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([point[a] - base[a] if corner[a] else 1 - (point[a] - base[a]) for a in range(3)])
        if weight:
            value += weight * volume[(slice(None), *(base[a] + corner[a] for a in range(3)))]
    return value


def test_interpolates_trilinearly_zeroes_the_padding_and_draws_noise_per_sample(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    with h5py.File(tmp_path / "volume.h5", "w") as file:
        file["fodf"] = volume
    exact = InterpolateVolume(path=str(tmp_path / "volume.h5"), dataset="fodf")
    points = torch.tensor([[[1.5, 2.25, 3.75], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0]],
                           [[2.1, 0.3, 5.9], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    batch = {"coordinates": points, "coordinates_length": torch.tensor([2, 1]), "index": torch.tensor([7, 3])}
    features = apply_device_transforms([exact], batch, seed=0, stage="train")["features"]
    assert features.shape == (2, 3, 2)
    for sample, point in ((0, 0), (0, 1), (1, 0)):
        np.testing.assert_allclose(features[sample, point].numpy(), trilinear(volume, tuple(points[sample, point])),
                                   rtol=1e-5, atol=1e-5)
    assert not features[0, 2].any() and not features[1, 1:].any()

    noisy = InterpolateVolume(path=str(tmp_path / "volume.h5"), dataset="fodf", noise_std=0.3)
    together = apply_device_transforms([noisy], batch, seed=1, stage="train", epoch=2)["features"]
    alone = apply_device_transforms([noisy], {name: value[1:] for name, value in batch.items()}, seed=1,
                                    stage="train", epoch=2)["features"]
    assert torch.equal(together[1:], alone)  # sample 3's draw does not depend on the batch it is in
    assert not torch.equal(together[1, 0], features[1, 0])
    other_epoch = apply_device_transforms([noisy], batch, seed=1, stage="train", epoch=3)["features"]
    assert not torch.equal(other_epoch, together)
    validation = apply_device_transforms([noisy], batch, seed=1, stage="validation")["features"]
    assert torch.equal(validation, features)  # noise_stages: train only
