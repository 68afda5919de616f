"""Augmentation on the fly: noise and litter drawn per sample, keyed on (seed, stage, epoch, sample index,
transform), so a batch is the same for any number of loader workers and ranks, and a resumed run is bit-exact."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain.config import DataConfig
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler, HDF5Dataset
from hpctrain.data.loader import make_loader
from hpctrain.transforms import AddLitter, AddNoise

from .conftest import launch, tiny_overrides
from .test_resume import RUN, inspect_json, kill_at_random_step

FIELDS = {"image": "images", "labels": "labels"}


def augmentations(litter: Path) -> list:
    return [AddNoise(field="image", std=0.05), AddNoise(field="image", kind="poisson", counts=50.0, probability=0.5),
            AddLitter(field="image", path=str(litter), dataset="images", probability=0.5, scale=0.3)]


def augmented_samples(tiny_data: Path, *, workers: int, world: int, epoch: int = 1) -> dict[int, np.ndarray]:
    """Every training sample of one epoch, augmented, by sample index, read as `world` ranks with `workers`."""
    reader = BatchReader(HDF5Dataset(tiny_data, FIELDS), transforms=augmentations(tiny_data), seed=5)
    samples: dict[int, np.ndarray] = {}
    for rank in range(world):
        sampler = DistributedBatchSampler(np.arange(150), micro_batch_size=8 // world, num_microbatches=2,
                                          rank=rank, world_size=world, seed=5)
        sampler.set_position(epoch, 0)
        loader = make_loader(reader, sampler, config=DataConfig(dataset={"_target_": "x"}, persistent_workers=False),
                             num_workers=workers, pin_memory=False)
        for batch in loader:
            for row, index in enumerate(batch["index"].tolist()):
                samples[index] = batch["image"][row].numpy()
    return samples


def test_augmented_samples_do_not_depend_on_workers_or_ranks(tiny_data: Path) -> None:
    reference = augmented_samples(tiny_data, workers=0, world=1)
    assert sorted(reference) == list(range(150))
    with h5py.File(tiny_data) as file:
        clean = file["images"][:150]
    changed = [not np.array_equal(reference[i], clean[i]) for i in range(150)]
    assert all(changed)  # the Gaussian noise touches every sample
    for workers, world in [(2, 1), (0, 2), (1, 2)]:
        other = augmented_samples(tiny_data, workers=workers, world=world)
        assert all(np.array_equal(other[i], reference[i]) for i in range(150)), (workers, world)
    next_epoch = augmented_samples(tiny_data, workers=0, world=1, epoch=2)
    assert not np.array_equal(next_epoch[0], reference[0])  # a new draw every epoch


def test_reading_batches_leaves_torchs_global_random_stream_alone(tiny_data: Path) -> None:
    """A model's own random draws (dropout) must not depend on the number of loader workers: iterating the loader,
    with or without workers, draws nothing from torch's global generator."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    for workers in (0, 1):
        torch.manual_seed(3)
        augmented_samples(tiny_data, workers=workers, world=1)
        assert torch.equal(torch.rand(4), expected), workers


def test_augmentations_apply_only_in_their_stages_and_check_their_inputs(tiny_data: Path) -> None:
    reader = BatchReader(HDF5Dataset(tiny_data, FIELDS), transforms=[AddNoise(field="image", stages=["train"])],
                         seed=0, stage="validation")
    with h5py.File(tiny_data) as file:
        assert np.array_equal(reader[np.array([4, 2])]["image"].numpy(), file["images"][()][[4, 2]])
    with pytest.raises(ValueError, match="litter file /nope.h5 does not exist"):
        AddLitter(field="image", path="/nope.h5", dataset="images")
    with pytest.raises(ValueError, match="has no non-empty HDF5 dataset 'pictures'"):
        AddLitter(field="image", path=str(tiny_data), dataset="pictures")
    with pytest.raises(ValueError, match="stages must name some of"):
        AddNoise(field="image", stages=["training"])


@pytest.mark.slow
def test_run_with_noise_and_litter_killed_and_restarted_is_bit_exact(tmp_path: Path, tiny_data: Path) -> None:
    import random

    transforms = ("data.transforms=[{_target_: hpctrain.transforms.AddNoise, field: image, std: 0.05}, "
                  "{_target_: hpctrain.transforms.AddLitter, field: image, path: '" + str(tiny_data) + "', "
                  "dataset: images, probability: 0.5, scale: 0.3}]")
    args = tiny_overrides(tiny_data, *RUN, transforms)
    launch(args, run_dir=tmp_path / "reference")
    kill_at_random_step(args, tmp_path / "resumed", random.Random())
    launch(args, run_dir=tmp_path / "resumed")
    assert inspect_json(tmp_path / "reference")["newest_checkpoint"]["model_sha256"] == \
        inspect_json(tmp_path / "resumed")["newest_checkpoint"]["model_sha256"]
    # It did augment: the run's own reader (built from the run's config, as training built it) changes the images.
    from hpctrain.run.checkpoint import CheckpointManager
    from hpctrain.components import build_components
    from hpctrain.config import from_json

    state = CheckpointManager.load(CheckpointManager(tmp_path / "reference", keep_last=2).newest_valid())
    components = build_components(from_json(state["config"]))
    reader = BatchReader(components.split.train_dataset, transforms=components.transforms, seed=0)
    with h5py.File(tiny_data) as file:
        assert not np.array_equal(reader[np.arange(8)]["image"].numpy(), file["images"][:8])
