"""Data loading: the batch sampler's order, splits over ranks and micro-batches, mid-epoch resume; the built-in
HDF5 dataset (named fields, ragged fields, several files) and the batch reader for any dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from hpctrain.data.dataset import BatchReader, DistributedBatchSampler, HDF5Dataset, ShardSampler

CBED_FIELDS = {"image": "images", "labels": "labels"}


def sampler(num_samples: int = 103, *, micro: int = 4, k: int = 2, rank: int = 0, world: int = 1,
            seed: int = 7) -> DistributedBatchSampler:
    return DistributedBatchSampler(np.arange(num_samples), micro_batch_size=micro, num_microbatches=k, rank=rank,
                                   world_size=world, seed=seed)


def steps_of(samplers: list[DistributedBatchSampler]) -> list[list[np.ndarray]]:
    """Per optimizer step, the real (not stand-in) micro-batches of every rank."""
    steps: list[list[np.ndarray]] = [[] for _ in range(samplers[0].steps_per_epoch)]
    for s in samplers:
        batches = (request.indices for request in s)
        for step in range(s.steps_per_epoch):
            for size in s.microbatch_sizes(step):
                batch = next(batches)
                assert len(batch) == max(size, 1)
                if size:
                    steps[step].append(batch)
        assert next(batches, None) is None and len(s) == sum(len(s.microbatch_sizes(t)) for t in range(len(steps)))
    return steps


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


def test_tail_steps_leave_out_empty_microbatches_and_give_a_rank_without_samples_a_stand_in() -> None:
    # 103 samples, global batch 16 (4 ranks x 4 micro-batches of 1): the tail step has 7 samples, shared 2, 2, 2, 1.
    samplers = [sampler(micro=1, k=4, rank=r, world=4) for r in range(4)]
    tails = [s.step_microbatches(s.epoch_order(0), 6) for s in samplers]
    assert [[len(mb) for mb in tail] for tail in tails] == [[1, 1]] * 3 + [[1]]
    assert [s.microbatch_sizes(6) for s in samplers] == [[1, 1]] * 3 + [[1]]
    assert [s.microbatch_sizes(0) for s in samplers] == [[1, 1, 1, 1]] * 4
    # 97 samples: a tail of 1; ranks 1-3 have no sample at all: one stand-in (the step's first sample, weighted
    # zero by the trainer) so they still join the gradient all-reduce.
    samplers = [sampler(97, micro=1, k=4, rank=r, world=4) for r in range(4)]
    order = samplers[0].epoch_order(0)
    tails = [s.step_microbatches(order, 6) for s in samplers]
    assert [mb.tolist() for tail in tails for mb in tail] == [[order[96]]] * 4
    assert [s.microbatch_sizes(6) for s in samplers] == [[1], [0], [0], [0]]


def test_microbatch_sizes_are_the_lengths_of_the_microbatches_for_every_layout() -> None:
    for num_samples in range(1, 40):
        for world in range(1, 5):
            for micro, k in ((1, 1), (3, 1), (2, 3), (5, 2)):
                for rank in range(world):
                    s = sampler(num_samples, micro=micro, k=k, rank=rank, world=world)
                    order = s.epoch_order(0)
                    for step in range(s.steps_per_epoch):
                        lengths = [len(piece) for piece in s._split(order[step * s.global_batch_size:][
                            :s.global_batch_size])]
                        assert s.microbatch_sizes(step) == (lengths or [0]), (num_samples, world, micro, k, rank)


def test_order_is_keyed_on_seed_and_epoch_and_resumes_mid_epoch() -> None:
    full = sampler()
    full.set_position(3, 0)
    whole_epoch = [request.indices for request in full]
    resumed = sampler()
    resumed.set_position(3, 5)
    assert all(request.epoch == 3 for request in resumed)
    assert [r.indices.tolist() for r in resumed] == [mb.tolist() for mb in whole_epoch[5 * 2:]]  # 2 per full step
    other_epoch, other_seed = sampler(), sampler(seed=8)
    other_epoch.set_position(4, 0)
    other_seed.set_position(3, 0)
    assert list(other_epoch)[0].indices.tolist() != whole_epoch[0].tolist()
    assert list(other_seed)[0].indices.tolist() != whole_epoch[0].tolist()


def test_validation_shards_cover_the_set_in_order() -> None:
    indices = np.arange(50, 91)
    shards = [np.concatenate(list(ShardSampler(indices, batch_size=4, rank=r, world_size=3))) for r in range(3)]
    assert np.concatenate(shards).tolist() == indices.tolist()


def test_batch_read_returns_the_requested_rows_in_order(tiny_data: Path) -> None:
    dataset = HDF5Dataset(tiny_data, CBED_FIELDS)
    with h5py.File(tiny_data) as file:
        images, labels = file["images"][()], file["labels"][()]
    assert len(dataset) == 192
    for indices in (np.array([17, 3, 150, 4, 90]), np.arange(40, 56), np.array([5, 5, 2]),
                    np.array([], dtype=np.int64)):
        batch = BatchReader(dataset)[indices]
        assert batch["image"].shape == (len(indices), 32, 32) and batch["image"].dtype == torch.float32
        assert np.array_equal(batch["image"].numpy(), images[indices])
        assert np.array_equal(batch["labels"].numpy(), labels[indices])
        assert batch["index"].tolist() == indices.tolist()


def test_uncompressed_fields_are_gathered_from_a_memory_map_without_hdf5_reads(
        tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = HDF5Dataset(tiny_data, CBED_FIELDS)
    dataset.__getitems__([0])  # opens the readers (which check a few rows against HDF5)
    assert dataset.read_modes() == [{"image": "memmap", "labels": "memmap"}]
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, *a, **k: reads.append(self.name) or original(
        self, *a, **k))
    batch = dataset.__getitems__([90, 3, 17, 120, 5, 61, 3])
    monkeypatch.undo()
    assert reads == []
    with h5py.File(tiny_data) as file:
        assert np.array_equal(batch["image"].numpy(), file["images"][()][[90, 3, 17, 120, 5, 61, 3]])


def test_compressed_fields_read_the_same_values(tmp_path: Path, tiny_data: Path) -> None:
    compressed = tmp_path / "gzip.h5"
    with h5py.File(tiny_data) as source, h5py.File(compressed, "w") as target:
        target.create_dataset("images", data=source["images"][()], chunks=(16, 32, 32), compression="gzip")
        target.create_dataset("labels", data=source["labels"][()], compression="lzf")
        images, labels = source["images"][()], source["labels"][()]
    dataset = HDF5Dataset(compressed, CBED_FIELDS, chunk_cache_mb=0.1)
    indices = np.random.default_rng(0).permutation(192)[:40]
    batch = dataset.__getitems__(indices)
    assert np.array_equal(batch["image"].numpy(), images[indices])
    assert np.array_equal(batch["labels"].numpy(), labels[indices])
    assert dataset.read_modes()[0]["image"] == "chunks"


def test_files_are_checked_when_readers_open_not_per_batch(tmp_path: Path, tiny_data: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches stat no file (hpctrain.data.hdf5_reader checks around every read by default); a file replaced by
    rename is read by readers opened afterwards (a new process: here a pickled copy), while readers already open
    keep reading the old file, whole and unchanged."""
    import os
    import pickle
    import shutil

    from hpctrain.data import hdf5_reader

    path = tmp_path / "data.h5"
    shutil.copy(tiny_data, path)
    dataset = HDF5Dataset(path, CBED_FIELDS)
    first = dataset.__getitems__([7, 2])
    stats: list[Any] = []
    real_stat = os.stat
    monkeypatch.setattr(hdf5_reader.os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    for _ in range(3):
        dataset.__getitems__([5, 1, 9])
    assert stats == []
    monkeypatch.undo()
    replacement = tmp_path / "new.h5"
    with h5py.File(path) as source, h5py.File(replacement, "w") as target:
        target["images"], target["labels"] = source["images"][()] + 1, source["labels"][()]
    os.replace(replacement, path)
    assert torch.equal(dataset.__getitems__([7, 2])["image"], first["image"])
    assert torch.equal(pickle.loads(pickle.dumps(dataset)).__getitems__([7, 2])["image"], first["image"] + 1)


def test_dataset_handle_is_not_pickled_and_reopens_per_process(tiny_data: Path) -> None:
    import pickle

    dataset = HDF5Dataset(tiny_data, CBED_FIELDS)
    dataset.__getitems__([1])
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._readers is None
    assert clone[1]["image"].shape == (32, 32)


def ragged_file(path: Path, counts: list[int], *, first: int = 0) -> tuple[Path, list[np.ndarray]]:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    values = (np.arange(offsets[-1] * 3, dtype=np.float64).reshape(-1, 3) + 1000 * first)
    with h5py.File(path, "w") as file:
        file["atoms/xyz"] = values
        file["atoms/offsets"] = offsets
        file["energy"] = np.arange(first, first + len(counts), dtype=np.int32)
    return path, [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_ragged_fields_arrive_padded_with_their_lengths_from_several_files(tmp_path: Path) -> None:
    path_a, samples_a = ragged_file(tmp_path / "a.h5", [2, 0, 3, 1])
    path_b, samples_b = ragged_file(tmp_path / "b.h5", [4, 1], first=4)
    dataset = HDF5Dataset([str(path_a), str(path_b)],
                          {"atoms": {"values": "atoms/xyz", "offsets": "atoms/offsets"}, "energy": "energy"})
    samples = samples_a + samples_b
    assert len(dataset) == 6
    indices = np.array([4, 1, 2, 0, 5, 2])
    batch = BatchReader(dataset)[indices]
    assert batch["atoms"].shape == (6, 4, 3) and batch["atoms"].dtype == torch.float64
    assert batch["atoms_length"].tolist() == [len(samples[i]) for i in indices]
    assert batch["energy"].tolist() == indices.tolist() and batch["energy"].dtype == torch.int32
    for row, index in enumerate(indices):
        length = len(samples[index])
        assert np.array_equal(batch["atoms"][row, :length].numpy(), samples[index])
        assert not batch["atoms"][row, length:].any()  # zero padding


@pytest.mark.parametrize("offsets,message", [
    ([0, 2, 2, 5, 4, 6], "decreases at sample 3: offsets\\[3\\]=5 > offsets\\[4\\]=4"),  # across a block edge
    ([0, 2, 1, 5, 5, 6], "decreases at sample 1: offsets\\[1\\]=2 > offsets\\[2\\]=1"),  # inside the first
    ([1, 2, 3, 4, 5, 6], "starts at 1, not 0"),
    ([0, 1, 2, 3, 4, 5], "ends at 5, but the values dataset holds 6 rows"),
])
def test_bad_ragged_offsets_are_refused_whole_when_the_dataset_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offsets: list[int], message: str) -> None:
    import hpctrain.data.dataset

    monkeypatch.setattr(hpctrain.data.dataset, "OFFSETS_CHECK_BLOCK", 4)  # several reads: the check spans their edges
    path, _ = ragged_file(tmp_path / "bad.h5", [1, 1, 1, 1, 2])  # 6 values
    with h5py.File(path, "r+") as file:
        file["atoms/offsets"][...] = offsets
    with pytest.raises(ValueError, match=f"field 'atoms': {path}:/atoms/offsets {message}"):
        HDF5Dataset(path, {"atoms": {"values": "atoms/xyz", "offsets": "atoms/offsets"}, "energy": "energy"})


@pytest.mark.parametrize("fields,message", [
    ({"image": "pictures"}, "field 'image': .* has no HDF5 dataset 'pictures' \\(it has: images, labels\\)"),
    ({"index": "images"}, "reserved"),
    ({"image": {"values": "images"}}, "fields.image must be"),
])
def test_bad_fields_are_refused_with_the_field_named(tiny_data: Path, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HDF5Dataset(tiny_data, fields)


def test_any_map_style_dataset_is_read_through_the_same_reader() -> None:
    class PerSample(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"x": torch.full((2,), float(index)), "y": torch.tensor(index * 2)}

    batch = BatchReader(PerSample(), transforms=[lambda b: {**b, "x": b["x"] * 10}])[np.array([3, 1])]
    assert batch["x"].tolist() == [[30.0, 30.0], [10.0, 10.0]] and batch["y"].tolist() == [6, 2]
    assert batch["index"].tolist() == [3, 1]


def test_block_shuffle_visits_every_sample_once_in_contiguous_runs() -> None:
    blocky = DistributedBatchSampler(np.arange(200), micro_batch_size=16, num_microbatches=1, rank=0, world_size=1,
                                     seed=3, block_size=16)
    batches = [request.indices for request in blocky]
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    # Blocks are permuted whole: a batch is at most two runs of consecutive samples (two slice reads).
    assert all(np.count_nonzero(np.diff(batch) != 1) <= 1 for batch in batches)
    blocky.set_position(1, 0)
    assert [r.indices.tolist() for r in blocky] != [b.tolist() for b in batches]  # a new block order every epoch


def test_built_in_transforms_apply_to_their_field_in_the_reader(tiny_data: Path) -> None:
    from hpctrain.transforms import Cast, Normalize

    reader = BatchReader(HDF5Dataset(tiny_data, CBED_FIELDS),
                         transforms=[Normalize(field="image", mean=0.5, std=0.25), Cast(field="labels", dtype="float64")])
    batch = reader[np.array([3, 7])]
    with h5py.File(tiny_data) as file:
        expected = (file["images"][[3, 7]] - 0.5) / 0.25
    np.testing.assert_allclose(batch["image"].numpy(), expected, rtol=1e-6)
    assert batch["labels"].dtype == torch.float64
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(field="image", std=0.0)
