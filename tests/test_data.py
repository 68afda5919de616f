"""Data loading: the batch sampler's order, splits over ranks and micro-batches, mid-epoch resume; batch reads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from hpctrain.data import DistributedBatchSampler, HDF5BatchDataset, ShardSampler, read_dataset_info


def sampler(num_samples: int = 103, *, micro: int = 4, k: int = 2, rank: int = 0, world: int = 1,
            seed: int = 7) -> DistributedBatchSampler:
    return DistributedBatchSampler(np.arange(num_samples), micro_batch_size=micro, num_microbatches=k, rank=rank,
                                   world_size=world, seed=seed)


def steps_of(samplers: list[DistributedBatchSampler]) -> list[list[np.ndarray]]:
    """Per optimizer step, the micro-batches of every rank."""
    per_rank = [list(s) for s in samplers]
    k = samplers[0].num_microbatches
    return [[mb for rank in per_rank for mb in rank[step * k:(step + 1) * k]]
            for step in range(len(per_rank[0]) // k)]


@pytest.mark.parametrize("world,micro,k", [(1, 8, 2), (2, 4, 2), (3, 2, 3), (1, 16, 1)])
def test_each_epoch_visits_every_sample_once_and_steps_the_tail(world: int, micro: int, k: int) -> None:
    samplers = [sampler(micro=micro, k=k, rank=r, world=world) for r in range(world)]
    steps = steps_of(samplers)
    assert len(steps) == samplers[0].steps_per_epoch == int(np.ceil(103 / (micro * k * world)))
    visited = np.concatenate([mb for step in steps for mb in step])
    assert sorted(visited.tolist()) == list(range(103))  # nothing dropped, nothing repeated
    for index, step in enumerate(steps):
        assert sum(len(mb) for mb in step) == samplers[0].samples_in_step(index)


def test_the_samples_of_a_step_do_not_depend_on_ranks_or_microbatches() -> None:
    reference = [np.sort(np.concatenate(step)) for step in steps_of([sampler(micro=16, k=1)])]
    for world, micro, k in [(2, 8, 1), (1, 4, 4), (2, 2, 4), (4, 4, 1)]:
        steps = steps_of([sampler(micro=micro, k=k, rank=r, world=world) for r in range(world)])
        assert [np.sort(np.concatenate(step)).tolist() for step in steps] == [r.tolist() for r in reference]


def test_empty_microbatches_come_before_the_last_one() -> None:
    # 103 samples, global batch 16 (4 ranks x 4 micro-batches of 1): the tail step has 7 samples, shared 2, 2, 2, 1.
    tails = [sampler(micro=1, k=4, rank=r, world=4).step_microbatches(
        sampler(micro=1, k=4, rank=r, world=4).epoch_order(0), 6) for r in range(4)]
    assert [[len(mb) for mb in tail] for tail in tails] == [[0, 0, 1, 1]] * 3 + [[0, 0, 0, 1]]
    # 97 samples: a tail of 1; ranks 1-3 have no sample at all (the trainer's zero-weight pass).
    tails = [sampler(97, micro=1, k=4, rank=r, world=4).step_microbatches(
        sampler(97, micro=1, k=4, rank=r, world=4).epoch_order(0), 6) for r in range(4)]
    assert [[len(mb) for mb in tail] for tail in tails] == [[0, 0, 0, 1]] + [[0, 0, 0, 0]] * 3


def test_order_is_keyed_on_seed_and_epoch_and_resumes_mid_epoch() -> None:
    full = sampler()
    full.set_position(3, 0)
    whole_epoch = list(full)
    resumed = sampler()
    resumed.set_position(3, 5)
    assert [mb.tolist() for mb in resumed] == [mb.tolist() for mb in whole_epoch[5 * 2:]]
    other_epoch, other_seed = sampler(), sampler(seed=8)
    other_epoch.set_position(4, 0)
    other_seed.set_position(3, 0)
    assert list(other_epoch)[0].tolist() != whole_epoch[0].tolist()
    assert list(other_seed)[0].tolist() != whole_epoch[0].tolist()


def test_validation_shards_cover_the_set_in_order() -> None:
    indices = np.arange(50, 91)
    shards = [np.concatenate(list(ShardSampler(indices, batch_size=4, rank=r, world_size=3))) for r in range(3)]
    assert np.concatenate(shards).tolist() == indices.tolist()


def test_batch_read_returns_the_requested_rows_in_order(tiny_data: Path) -> None:
    dataset = HDF5BatchDataset(tiny_data, images_key="images", labels_key="labels")
    with h5py.File(tiny_data) as file:
        images, labels = file["images"][()], file["labels"][()]
    for indices in (np.array([17, 3, 150, 4, 90]), np.arange(40, 56), np.array([], dtype=np.int64)):
        batch = dataset[indices]
        assert batch["inputs"].shape == (len(indices), 1, 32, 32)
        assert np.array_equal(batch["inputs"][:, 0].numpy(), images[indices])
        assert np.array_equal(batch["targets"].numpy(), labels[indices])
        assert batch["index"].tolist() == indices.tolist()


def test_batch_read_is_one_hdf5_read_per_dataset(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    original = h5py.Dataset.__getitem__

    def counting(self, key, *args, **kwargs):
        reads.append(self.name)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    HDF5BatchDataset(tiny_data, images_key="images", labels_key="labels")[np.array([90, 3, 17, 120, 5, 61])]
    assert sorted(reads) == ["/images", "/labels"]


def test_dataset_handle_is_not_pickled_and_reopens_per_process(tiny_data: Path) -> None:
    import pickle

    dataset = HDF5BatchDataset(tiny_data, images_key="images", labels_key="labels")
    dataset[np.array([1])]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._file is None
    assert clone[np.array([1])]["inputs"].shape == (1, 1, 32, 32)


def test_dataset_info_reads_layout_and_normalization(tiny_data: Path) -> None:
    info = read_dataset_info(tiny_data, images_key="images", labels_key="labels")
    assert info.num_samples == 192 and info.image_shape == (32, 32) and info.num_labels == 8
    assert info.normalization_weight.shape == (8,) and np.all(info.normalization_weight > 0)


def test_block_shuffle_visits_every_sample_once_in_contiguous_runs() -> None:
    blocky = DistributedBatchSampler(np.arange(200), micro_batch_size=16, num_microbatches=1, rank=0, world_size=1,
                                     seed=3, block_size=16)
    batches = list(blocky)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    # Blocks are permuted whole: a batch is at most two runs of consecutive samples (two slice reads).
    assert all(np.count_nonzero(np.diff(batch) != 1) <= 1 for batch in batches)
    blocky.set_position(1, 0)
    assert [b.tolist() for b in blocky] != [b.tolist() for b in batches]  # a new block order every epoch


def test_a_batch_of_a_few_runs_is_read_with_one_slice_per_run(tiny_data: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    original = h5py.Dataset.__getitem__

    def counting(self, key, *args, **kwargs):
        reads.append((self.name, key))
        return original(self, key, *args, **kwargs)

    indices = np.concatenate([np.arange(64, 80), np.arange(0, 16)])
    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    batch = HDF5BatchDataset(tiny_data, images_key="images", labels_key="labels")[indices]
    monkeypatch.undo()
    assert sorted(reads, key=str) == sorted([("/images", slice(0, 16)), ("/images", slice(64, 80)),
                                             ("/labels", slice(0, 16)), ("/labels", slice(64, 80))], key=str)
    with h5py.File(tiny_data) as file:
        assert np.array_equal(batch["inputs"][:, 0].numpy(), file["images"][()][indices])
