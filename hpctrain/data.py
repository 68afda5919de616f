"""HDF5 data for many loader workers: lazy per-process file handles, one sorted read per batch, and a
deterministic distributed batch sampler that can start in the middle of an epoch.

Order of samples: epoch e visits the training indices in the permutation drawn from (seed, e) (with
`data.shuffle=blocks`, a permutation of blocks of consecutive samples, so batches are read as a few slices). Optimizer step s
of the epoch takes the s-th slice of `global_batch_size` samples (the last slice, the epoch's tail, is shorter and
still stepped). The slice is split evenly over ranks and each rank's share over its micro-batches, so the set of
samples in an optimizer step does not depend on the number of ranks or micro-batches.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpctrain.config import ConfigError, DataConfig
from hpctrain.distributed import exit_with_parent


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about an HDF5 file, read once on the launching process."""

    path: Path
    num_samples: int
    image_shape: tuple[int, ...]
    num_labels: int
    normalization_weight: np.ndarray
    normalization_bias: np.ndarray


def read_dataset_info(path: Path, *, images_key: str, labels_key: str, config_key: str = "data.path") -> DatasetInfo:
    """Open the file and check its layout; every problem is a ConfigError naming the file and dataset."""
    if not path.is_file():
        raise ConfigError(f"{config_key}: data file {path} does not exist")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ConfigError(f"{config_key}: {path} is not a readable HDF5 file ({error})") from None
    with file:
        for key in (images_key, labels_key):
            if key not in file or not isinstance(file[key], h5py.Dataset):
                raise ConfigError(f"{config_key}: {path} has no HDF5 dataset '{key}' "
                                  f"(it has: {', '.join(sorted(file.keys())) or 'nothing'})")
        images, labels = file[images_key], file[labels_key]
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ConfigError(f"{config_key}: {path}:/{images_key} must have shape (n, N, N), got {images.shape}")
        if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
            raise ConfigError(f"{config_key}: {path}:/{labels_key} must have shape ({images.shape[0]}, k), "
                              f"got {labels.shape}")
        if images.shape[0] == 0:
            raise ConfigError(f"{config_key}: {path}:/{images_key} holds no samples")
        num_labels = labels.shape[1]
        weight = np.asarray(labels.attrs.get("normalization_weight", np.ones(num_labels)), dtype=np.float32)
        bias = np.asarray(labels.attrs.get("normalization_bias", np.zeros(num_labels)), dtype=np.float32)
        return DatasetInfo(path=path, num_samples=images.shape[0], image_shape=tuple(images.shape[1:]),
                           num_labels=num_labels, normalization_weight=weight, normalization_bias=bias)


def _read_rows(dataset: h5py.Dataset, sorted_indices: np.ndarray) -> np.ndarray:
    """Rows at sorted, unique indices: one slice read per contiguous run when the batch is made of a few runs
    (data.shuffle=blocks), else one sorted fancy-index read; never one read per sample."""
    run_starts = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    if len(run_starts) + 1 <= max(1, len(sorted_indices) // 8):
        runs = np.split(sorted_indices, run_starts)
        return np.concatenate([dataset[int(run[0]):int(run[-1]) + 1] for run in runs])
    return dataset[sorted_indices]


class HDF5BatchDataset(Dataset):
    """Indexed by an array of sample indices; returns the whole batch from one sorted HDF5 read.

    The file is opened lazily in the process that reads (each DataLoader worker has its own handle; an h5py
    handle inherited across fork returns garbage), and reopened if the process id changes.
    """

    def __init__(self, path: Path, *, images_key: str, labels_key: str) -> None:
        self.path = path
        self.images_key = images_key
        self.labels_key = labels_key
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        file = self._open()
        images, labels = file[self.images_key], file[self.labels_key]
        if len(indices) == 0:
            return {"inputs": torch.empty((0, 1, *images.shape[1:])),
                    "targets": torch.empty((0, labels.shape[1])), "index": torch.empty(0, dtype=torch.int64)}
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        image_block, label_block = _read_rows(images, sorted_indices), _read_rows(labels, sorted_indices)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {
            "inputs": torch.from_numpy(np.ascontiguousarray(image_block[inverse], dtype=np.float32)).unsqueeze(1),
            "targets": torch.from_numpy(np.ascontiguousarray(label_block[inverse], dtype=np.float32)),
            "index": torch.from_numpy(indices.astype(np.int64)),
        }

    def __getstate__(self) -> dict:
        # Never send an open handle to another process.
        return {**self.__dict__, "_file": None, "_pid": None}


class DistributedBatchSampler(Sampler[np.ndarray]):
    """Yields this rank's micro-batches (arrays of sample indices), `num_microbatches` per optimizer step.

    Keyed on (seed, epoch) and resumable at any step: `set_position(epoch, step_in_epoch)`. A micro-batch may
    be empty in the epoch's tail; empty ones come first, so a rank's last micro-batch (the one that
    all-reduces gradients) has samples whenever the rank has any in that step.
    """

    def __init__(self, indices: np.ndarray, *, micro_batch_size: int, num_microbatches: int, rank: int,
                 world_size: int, seed: int, block_size: int = 1) -> None:
        self.indices = indices
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch_size = micro_batch_size * num_microbatches * world_size
        self.steps_per_epoch = math.ceil(len(indices) / self.global_batch_size)
        self.epoch = 0
        self.step_in_epoch = 0

    def set_position(self, epoch: int, step_in_epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, step_in_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the samples; with block_size > 1, of blocks of consecutive samples."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.block_size == 1:
            return self.indices[rng.permutation(len(self.indices))]
        blocks = [self.indices[start:start + self.block_size] for start in range(0, len(self.indices),
                                                                                  self.block_size)]
        return np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])

    def samples_in_step(self, step_in_epoch: int) -> int:
        """Global number of samples in an optimizer step of the epoch (all ranks, all micro-batches)."""
        start = step_in_epoch * self.global_batch_size
        return max(0, min(self.global_batch_size, len(self.indices) - start))

    def step_microbatches(self, order: np.ndarray, step_in_epoch: int) -> list[np.ndarray]:
        start = step_in_epoch * self.global_batch_size
        step_samples = order[start:start + self.global_batch_size]
        rank_share = np.array_split(step_samples, self.world_size)[self.rank]
        # array_split puts the longer pieces first; reversed, empty pieces come first.
        return np.array_split(rank_share, self.num_microbatches)[::-1]

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.epoch_order(self.epoch)
        for step in range(self.step_in_epoch, self.steps_per_epoch):
            yield from self.step_microbatches(order, step)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.step_in_epoch) * self.num_microbatches


class ShardSampler(Sampler[np.ndarray]):
    """Validation: this rank's contiguous shard of the indices, in fixed-size batches (no padding, no repeats)."""

    def __init__(self, indices: np.ndarray, *, batch_size: int, rank: int, world_size: int) -> None:
        self.shard = np.array_split(indices, world_size)[rank]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.shard), self.batch_size):
            yield self.shard[start:start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.shard) / self.batch_size)


@dataclass(frozen=True)
class Split:
    """Where the training and validation samples are: files and index arrays."""

    train_path: Path
    train_indices: np.ndarray
    val_path: Path
    val_indices: np.ndarray


def make_split(config: DataConfig, train_info: DatasetInfo, val_info: DatasetInfo | None) -> Split:
    """Hold out the last `val_fraction` of the file (contiguous, so validation reads are plain slices), or use
    the whole of `val_path`. The split does not depend on the seed, so validation never leaks into training."""
    if val_info is not None:
        return Split(train_info.path, np.arange(train_info.num_samples), val_info.path,
                     np.arange(val_info.num_samples))
    num_val = int(round(train_info.num_samples * config.val_fraction))
    num_train = train_info.num_samples - num_val
    if num_val < 1 or num_train < 1:
        raise ConfigError(f"data.val_fraction={config.val_fraction} leaves {num_train} training and {num_val} "
                          f"validation samples of the {train_info.num_samples} in {train_info.path}")
    return Split(train_info.path, np.arange(num_train), train_info.path,
                 np.arange(num_train, train_info.num_samples))


def _init_worker(worker_id: int) -> None:
    exit_with_parent()
    # SLURM signals every process of a job step. A preemption's SIGTERM/USR2 is the training process's to handle
    # (checkpoint at the next step boundary); a worker dying of it would crash the loader first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # Loader workers only read; one thread each keeps them from fighting the training process for cores.
    torch.set_num_threads(1)


def stop_loader_workers() -> None:
    """SIGKILL this process's loader workers (its daemonic children; they only read, so nothing is lost).

    Called when training ends and at exit: the polite shutdown of an iterator abandoned mid-epoch can wait
    seconds per worker, and multiprocessing's exit handler would terminate() them with SIGTERM, which they ignore
    (see _init_worker), and then wait forever. torch's SIGCHLD handler, which reports a worker that died while a
    loader still needed it, is removed first: these workers are meant to die."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join()


def resolve_num_workers(config: DataConfig, cpus_per_rank: int) -> int:
    return max(0, cpus_per_rank - 1) if config.num_workers < 0 else config.num_workers


def make_loader(dataset: HDF5BatchDataset, sampler: Sampler, *, config: DataConfig, num_workers: int,
                pin_memory: bool) -> DataLoader:
    extra = {}
    if num_workers > 0:
        atexit.unregister(stop_loader_workers)  # registered once, and after multiprocessing's, so it runs first
        atexit.register(stop_loader_workers)
        extra = {"persistent_workers": config.persistent_workers, "prefetch_factor": config.prefetch_factor,
                 "worker_init_fn": _init_worker}
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      **extra)
