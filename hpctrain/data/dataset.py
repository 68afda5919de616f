"""Data: the built-in HDF5 dataset (named fields of any shape and dtype, ragged fields, several files; lazy
per-process file handles, one read per batch and field), the reader that turns any map-style dataset into batches
of named tensors, and a deterministic distributed batch sampler that can start in the middle of an epoch. How the
batches reach the loop (in process, or from loader workers) is `hpctrain.data.loader`.

Order of samples: epoch e visits the training indices in the permutation drawn from (seed, e) (with
`data.shuffle=blocks`, a permutation of blocks of consecutive samples, so batches are read as a few slices).
Optimizer step s of the epoch takes the s-th slice of `global_batch_size` samples (the last slice, the epoch's
tail, is shorter and still stepped). The slice is split evenly over ranks and each rank's share over its
micro-batches, so the set of samples in an optimizer step does not depend on the number of ranks or
micro-batches.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from collections.abc import Mapping  # not typing's: its isinstance is several times slower, per batch
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from hpctrain.config import ConfigError
from hpctrain.data.hdf5_reader import RowReader, read_together
from hpctrain.transforms import TransformContext, takes_context

log = logging.getLogger(__name__)


# The dataset summaries this process has logged (HDF5Dataset._log_summary).
_summaries_logged: set[str] = set()


class FieldSpec(NamedTuple):
    """Where a batch field lives in each file: one dataset (rows along axis 0), or, for a ragged field, a flat
    `values` dataset and an (n+1,) `offsets` dataset (sample i is values[offsets[i]:offsets[i+1]])."""

    name: str
    values: str
    offsets: str | None = None


def _field_specs(fields: Mapping[str, Any]) -> list[FieldSpec]:
    specs = []
    if not fields:
        raise ValueError("fields must map at least one batch field name to an HDF5 dataset")
    for name, where in fields.items():
        if name == "index" or name.endswith("_length"):
            raise ValueError(f"fields.{name}: 'index' and names ending in '_length' are reserved for the sample "
                             f"index and the lengths of ragged fields")
        if isinstance(where, str):
            specs.append(FieldSpec(str(name), where))
        elif isinstance(where, Mapping) and set(where) == {"values", "offsets"}:
            specs.append(FieldSpec(str(name), str(where["values"]), str(where["offsets"])))
        else:
            raise ValueError(f"fields.{name} must be an HDF5 dataset path, or {{values: PATH, offsets: PATH}} for a "
                             f"ragged field; got {where!r}")
    return specs


def _as_paths(path: Any) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    paths = [Path(p) for p in path]
    if not paths:
        raise ValueError("path must name at least one HDF5 file")
    return paths


class _FileReaders(NamedTuple):
    """One process's readers of one file of an HDF5Dataset."""

    plain: list[RowReader]  # the fields that are not ragged, in the dataset's field order
    ragged: dict[str, tuple[RowReader, np.ndarray]]  # field -> (values, offsets in memory)


class HDF5Dataset(Dataset):
    """Named fields of one or several HDF5 files (samples concatenated in file order), read a batch at a time.

    `fields` maps each batch field to an HDF5 dataset path inside the files, e.g. {image: images, label: labels},
    or, for a ragged field, to {values: PATH, offsets: PATH}; a ragged field arrives zero-padded to the longest
    sample of the batch, with its lengths in `<name>_length`. Fields keep their stored dtype.

    The files are checked when the dataset is built (on the launching machine, before anything is queued) and
    opened lazily in the process that reads (each DataLoader worker has its own handles; an h5py handle inherited
    across fork returns garbage). Rows are read by hpctrain.data.hdf5_reader.RowReader: uncompressed data is gathered
    straight from a memory map of the file (random order at about the speed of RAM), compressed data one chunk at a
    time, decoded by HDF5 into an LRU cache of `chunk_cache_mb` per field and worker, anything else with one sorted
    h5py read per batch; never one read per sample. Each process's readers check the file when they open, not per
    batch: replace a file only between runs.
    """

    def __init__(self, path: Any, fields: Mapping[str, Any], *, chunk_cache_mb: float = 64.0) -> None:
        if chunk_cache_mb < 0:
            raise ValueError(f"chunk_cache_mb must be >= 0, got {chunk_cache_mb}")
        self.paths = _as_paths(path)
        self.specs = _field_specs(fields)
        self.row_shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        lengths = [self._check_file(file_path) for file_path in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self.chunk_cache_bytes = int(chunk_cache_mb * (1 << 20))
        self._plain_names = [spec.name for spec in self.specs if spec.offsets is None]
        self._readers: list[_FileReaders] | None = None
        self._pid: int | None = None
        self._summary_logged = False  # pickled with the dataset: loader workers do not say it again

    def _check_file(self, path: Path) -> int:
        """The file's sample count; every problem is a ValueError naming the file and the field."""
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        try:
            file = h5py.File(path, "r")
        except OSError as error:
            raise ValueError(f"{path} is not a readable HDF5 file ({error})") from None
        with file:
            num_samples = None
            for spec in self.specs:
                for where in filter(None, (spec.values, spec.offsets)):
                    if not isinstance(file.get(where), h5py.Dataset):
                        raise ValueError(f"field {spec.name!r}: {path} has no HDF5 dataset {where!r} (it has: "
                                         f"{', '.join(_dataset_names(file)) or 'nothing'})")
                values = file[spec.values]
                if values.ndim == 0 or values.dtype.kind not in "biuf":
                    raise ValueError(f"field {spec.name!r}: {path}:/{spec.values} holds {values.dtype} "
                                     f"{'scalars' if values.ndim == 0 else 'rows'}; a field must be an array of "
                                     f"numbers with the samples (or, ragged, the values) along axis 0")
                if spec.offsets is None:
                    rows = values.shape[0]
                else:
                    offsets = file[spec.offsets]
                    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or offsets.shape[0] < 1:
                        raise ValueError(f"field {spec.name!r}: {path}:/{spec.offsets} must be a 1-D integer dataset "
                                         f"of n+1 offsets, got {offsets.shape} {offsets.dtype}")
                    rows = offsets.shape[0] - 1
                    problem = _offsets_problem(offsets, values.shape[0])
                    if problem:
                        raise ValueError(f"field {spec.name!r}: {path}:/{spec.offsets} {problem} (sample i is "
                                         f"{spec.values}[offsets[i]:offsets[i+1]]: offsets start at 0, never "
                                         f"decrease and end at the number of values)")
                shape = tuple(values.shape[1:])
                if spec.name in self.row_shapes and (self.row_shapes[spec.name], self.dtypes[spec.name]) != (
                        shape, values.dtype):
                    raise ValueError(f"field {spec.name!r}: {path}:/{spec.values} has rows {shape} {values.dtype}, "
                                     f"{self.paths[0]} has {self.row_shapes[spec.name]} {self.dtypes[spec.name]}")
                self.row_shapes[spec.name], self.dtypes[spec.name] = shape, values.dtype
                if num_samples is not None and rows != num_samples:
                    raise ValueError(f"field {spec.name!r}: {path} holds {rows} samples of it but {num_samples} "
                                     f"of field {self.specs[0].name!r}")
                num_samples = rows
        assert num_samples is not None
        return num_samples

    def __len__(self) -> int:
        return self.num_samples

    def _open(self) -> list[_FileReaders]:
        """Per file: fast row readers (hpctrain.data.hdf5_reader) of its plain fields, and of its ragged fields with
        their offsets."""
        if self._readers is None or self._pid != os.getpid():
            self._readers = []
            for path in self.paths:
                with h5py.File(path, "r") as file:  # the readers hold handles of their own
                    def reader(where: str) -> RowReader:
                        # The file is checked for changes here, when the readers open (in each process), not around
                        # every batch: checks around every batch made a demo batch read 1.06-1.18x slower
                        # (docs/benchmarks.md, "Compressed HDF5 reads"), and the sample count, shapes and ragged
                        # offsets this dataset took when it was built assume an unchanged file anyway.
                        return RowReader(file[where], chunk_cache_bytes=self.chunk_cache_bytes,
                                         revalidate_interval_s=math.inf)
                    self._readers.append(_FileReaders(
                        [reader(spec.values) for spec in self.specs if spec.offsets is None],
                        # Offsets are small (n+1 integers): kept in memory, no offset read per batch.
                        {spec.name: (reader(spec.values), file[spec.offsets][()].astype(np.int64))
                         for spec in self.specs if spec.offsets is not None}))
            self._pid = os.getpid()
            if not self._summary_logged:
                self._log_summary()
        return self._readers

    def read_modes(self) -> list[dict[str, str]]:
        """Per file, each field's read path in this process (hpctrain.data.hdf5_reader: memmap, chunks or h5py)."""
        modes = []
        for file in self._open():
            by_field = {**dict(zip(self._plain_names, (reader.mode for reader in file.plain))),
                        **{name: reader.mode for name, (reader, _) in file.ragged.items()}}
            modes.append({spec.name: by_field[spec.name] for spec in self.specs})
        return modes

    def _log_summary(self) -> None:
        """One line for the whole dataset; each field's layout and why its mode was chosen is logged by
        hpctrain.data.hdf5_reader at DEBUG level (`hydra.verbose=hpctrain.data.hdf5_reader` shows it)."""
        self._summary_logged = True
        fields_by_mode: dict[str, list[str]] = {}
        ragged = {spec.name for spec in self.specs if spec.offsets is not None}
        for file_modes in self.read_modes():
            for name, mode in file_modes.items():
                shown = f"{name} (ragged)" if name in ragged else name
                if shown not in fields_by_mode.setdefault(mode, []):
                    fields_by_mode[mode].append(shown)
        files = str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} files ({self.paths[0]}, ...)"
        summary = f"{files}: {self.num_samples} samples; read mode " + "; ".join(
            f"{mode} for {', '.join(names)}" for mode, names in fields_by_mode.items())
        if summary not in _summaries_logged:  # the launcher's checks and the run build the dataset again
            _summaries_logged.add(summary)
            log.info("%s", summary)

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The samples at `indices` (any order, repeats allowed), each field stacked along a new first axis."""
        readers = self._open()
        array = isinstance(indices, np.ndarray)
        listed = indices.tolist() if array else list(indices)
        # Python's min/max: numpy's cost more than the read itself for a batch of a few dozen samples.
        if listed and (min(listed) < 0 or max(listed) >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples}) in {self.paths[0]}")
        indices = np.asarray(indices if array else listed, dtype=np.int64)
        if len(self.paths) == 1 and not readers[0].ragged:
            # The common case: one file, no ragged field; the rows come in the asked order, checked as one read.
            return {name: torch.from_numpy(rows)
                    for name, rows in zip(self._plain_names, read_together(readers[0].plain, indices))}
        if len(self.paths) == 1:
            groups = [(0, slice(None), indices)]
        else:
            file_of = np.searchsorted(self.offsets, indices, side="right") - 1
            groups = []
            for file_index in np.unique(file_of):
                positions = np.flatnonzero(file_of == file_index)
                groups.append((int(file_index), positions, indices[positions] - self.offsets[file_index]))
        parts: dict[str, list[tuple[Any, Any]]] = {spec.name: [] for spec in self.specs}
        for file_index, positions, local in groups:
            file_readers = readers[file_index]
            for name, rows in zip(self._plain_names, read_together(file_readers.plain, local)):
                parts[name].append((positions, rows))
            for name, (reader, offsets) in file_readers.ragged.items():
                starts, stops = offsets[local], offsets[local + 1]
                values = reader.read_ranges(starts, stops)
                parts[name].append((positions, np.split(values, np.cumsum(stops - starts)[:-1])))
        batch: dict[str, np.ndarray] = {}
        for spec in self.specs:
            if spec.offsets is None and len(parts[spec.name]) == 1:
                batch[spec.name] = parts[spec.name][0][1]  # already in the asked order: no second copy
            elif spec.offsets is None:
                out = np.empty((len(indices), *self.row_shapes[spec.name]), dtype=self.dtypes[spec.name])
                for positions, rows in parts[spec.name]:
                    out[positions] = rows
                batch[spec.name] = out
            else:
                samples: list[np.ndarray] = [np.empty(0)] * len(indices)
                for positions, rows in parts[spec.name]:
                    for position, row in zip(np.arange(len(indices))[positions], rows):
                        samples[position] = row
                batch[spec.name], batch[f"{spec.name}_length"] = _pad(samples, self.row_shapes[spec.name],
                                                                      self.dtypes[spec.name])
        return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in batch.items()}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {name: value[0] for name, value in batch.items()}

    def locate(self, index: int) -> tuple[Path, int]:
        """The file holding sample `index` and its row there."""
        file = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.paths[file], int(index - self.offsets[file])

    def __getstate__(self) -> dict:
        # Never send an open handle to another process: each process makes its own readers.
        return {**self.__dict__, "_readers": None, "_pid": None}


# Offsets checked per read: 32 MB of int64, so a file of millions of samples is checked in a few vectorised passes.
OFFSETS_CHECK_BLOCK = 1 << 22


def _offsets_problem(offsets: h5py.Dataset, num_values: int) -> str:
    """'' if a ragged field's offsets are whole: first 0, non-decreasing, last `num_values`; else what is wrong,
    naming the first bad sample. Checked once when the dataset is built, so a bad file is refused before a run
    starts, not at the step that first draws the bad sample."""
    previous = None
    for start in range(0, offsets.shape[0], OFFSETS_CHECK_BLOCK):
        block = offsets[start:start + OFFSETS_CHECK_BLOCK].astype(np.int64)
        if previous is None and block[0] != 0:
            return f"starts at {block[0]}, not 0"
        with_previous = block if previous is None else np.concatenate([[previous], block])
        decreasing = np.flatnonzero(np.diff(with_previous) < 0)
        if decreasing.size:
            sample = start + int(decreasing[0]) - (previous is not None)  # offsets[sample + 1] < offsets[sample]
            first, stop = with_previous[decreasing[0]], with_previous[decreasing[0] + 1]
            return f"decreases at sample {sample}: offsets[{sample}]={first} > offsets[{sample + 1}]={stop}"
        previous = block[-1]
    if previous != num_values:
        return f"ends at {previous}, but the values dataset holds {num_values} rows"
    return ""


def _dataset_names(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return sorted(names)


def _pad(samples: list[np.ndarray], row_shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(sample) for sample in samples], dtype=np.int64)
    padded = np.zeros((len(samples), int(lengths.max(initial=0)), *row_shape), dtype=dtype)
    for position, sample in enumerate(samples):
        padded[position, :len(sample)] = sample
    return padded, lengths


def where_is(dataset: Dataset, index: int, fields: Sequence[str] = ()) -> str:
    """A sample named for a person: its index, its file and row (for a dataset that can say: `locate`), and the
    fields holding a non-finite value, if given."""
    text = f"sample {index}"
    locate = getattr(dataset, "locate", None)
    if callable(locate):
        path, row = locate(index)
        text += f" ({path}, row {row})"
    if fields:
        text += f": non-finite {', '.join(fields)}"
    return text


def nonfinite_fields(batch: Mapping[str, torch.Tensor], row: int) -> list[str]:
    """The floating-point fields of one sample of a batch that hold a NaN or an infinity."""
    return [name for name, value in batch.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0
            and not bool(torch.isfinite(value[row]).all())]


class DataReadError(OSError):
    """A batch could not be read from its files (a damaged chunk, a file gone): the message names the samples, and
    the reader's error names the file, dataset and chunk. Raised in a loader worker, it reaches the training process
    with the worker's traceback around that message (torch re-raises it by type): `reason` is the message alone."""

    @property
    def reason(self) -> str:
        lines = [line.strip() for line in str(self).splitlines() if line.strip()]
        last = lines[-1] if lines else type(self).__name__
        return last.split(f"{type(self).__name__}: ", 1)[-1]


class BatchRequest(NamedTuple):
    """What the training sampler yields: the sample indices of a micro-batch and the epoch they belong to (random
    transforms are keyed on it)."""

    epoch: int
    indices: np.ndarray


class BatchReader(Dataset):
    """What the DataLoader indexes: a BatchRequest (or a plain index array, epoch 0) -> one batch, a dict of named
    tensors with the sample indices in `index`, after the configured transforms (run in the loader worker that read
    it; random ones draw from generators keyed on (seed, stage, epoch, sample index, transform)).

    A dataset with `__getitems__` is asked for the whole batch at once (it may return the batch as a dict of
    stacked tensors, or a list of samples); otherwise samples are read one by one and collated.
    """

    def __init__(self, dataset: Dataset, *, transforms: Sequence[Callable] = (), seed: int = 0,
                 stage: str = "train") -> None:
        self.dataset = dataset
        self.transforms = [(transform, takes_context(transform)) for transform in transforms]
        self.seed, self.stage = seed, stage
        # HDF5Dataset's own __getitems__ takes the index array as it is and returns a new dict of tensors.
        self._hdf5 = getattr(type(dataset), "__getitems__", None) is HDF5Dataset.__getitems__

    def __getitem__(self, request: BatchRequest | np.ndarray) -> dict[str, torch.Tensor]:
        epoch, indices = request if isinstance(request, BatchRequest) else (0, request)
        indices = np.asarray(indices)
        try:
            batch = self.dataset.__getitems__(indices) if self._hdf5 else self._read(indices)
        except OSError as error:  # the file system or HDF5 failed (an unreadable chunk, a file gone): a data fault
            raise DataReadError(f"reading {self.stage} samples {indices[:4].tolist()}"
                                f"{'...' if len(indices) > 4 else ''} failed: {error}") from None
        batch["index"] = torch.from_numpy(indices.astype(np.int64, copy=False))
        for position, (transform, with_context) in enumerate(self.transforms):
            if with_context:
                batch = transform(batch, TransformContext(seed=self.seed, stage=self.stage, epoch=epoch,
                                                          indices=indices, position=position))
            else:
                batch = transform(batch)
        return batch

    def _read(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of any other dataset, as a new dict of tensors."""
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            samples = getitems(indices.tolist())  # torch's protocol: a list
        else:
            samples = [self.dataset[i] for i in indices.tolist()]
        batch = samples if isinstance(samples, Mapping) else default_collate(list(samples))
        if not isinstance(batch, Mapping):
            raise TypeError(f"{type(self.dataset).__name__} must return dicts of named fields, got "
                            f"{type(batch).__name__}")
        return {name: torch.as_tensor(value) for name, value in batch.items()}


def _piece_sizes(total: int, count: int) -> list[int]:
    """The lengths of `np.array_split` of `total` items into `count` pieces: the first total % count one longer."""
    size, longer = divmod(total, count)
    return [size + (piece < longer) for piece in range(count)]


def _even_pieces(array: np.ndarray, count: int) -> list[np.ndarray]:
    """`np.array_split(array, count)` as plain slices: this runs for every micro-batch, and array_split costs more
    than reading a small batch."""
    if count == 1:
        return [array]
    bounds = list(accumulate(_piece_sizes(len(array), count), initial=0))
    return [array[bounds[piece]:bounds[piece + 1]] for piece in range(count)]


class DistributedBatchSampler(Sampler[BatchRequest]):
    """Yields this rank's micro-batches (requests for sample indices), up to `num_microbatches` per optimizer step.

    Keyed on (seed, epoch) and resumable at any step: `set_position(epoch, step_in_epoch)`. In the epoch's
    tail a rank's share may not fill every micro-batch: empty micro-batches are left out, and a rank with no
    sample at all in the step gets one stand-in micro-batch (the step's first sample) that the trainer weights
    by zero, so the rank still takes part in the gradient all-reduce. `microbatch_sizes` tells the trainer the
    layout (0 marks the stand-in) without reading the order.
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
        self._layouts: dict[int, list[int]] = {}  # samples in a step -> microbatch_sizes (at most two)

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

    def _split(self, step_samples: np.ndarray) -> list[np.ndarray]:
        rank_share = _even_pieces(step_samples, self.world_size)[self.rank]
        return [piece for piece in _even_pieces(rank_share, self.num_microbatches) if len(piece)]

    def step_microbatches(self, order: np.ndarray, step_in_epoch: int) -> list[np.ndarray]:
        start = step_in_epoch * self.global_batch_size
        step_samples = order[start:start + self.global_batch_size]
        return self._split(step_samples) or [step_samples[:1]]

    def microbatch_sizes(self, step_in_epoch: int) -> list[int]:
        """Sizes of this rank's micro-batches in a step; [0] when it only has the zero-weighted stand-in. The
        list is shared: do not change it."""
        samples = self.samples_in_step(step_in_epoch)
        sizes = self._layouts.get(samples)
        if sizes is None:  # _split's layout without building the arrays; a full step's, and the last step's
            share = _piece_sizes(samples, self.world_size)[self.rank]
            sizes = [size for size in _piece_sizes(share, self.num_microbatches) if size] or [0]
            self._layouts[samples] = sizes
        return sizes

    def __iter__(self) -> Iterator[BatchRequest]:
        order = self.epoch_order(self.epoch)
        for step in range(self.step_in_epoch, self.steps_per_epoch):
            for indices in self.step_microbatches(order, step):
                yield BatchRequest(self.epoch, indices)

    def __len__(self) -> int:
        return sum(len(self.microbatch_sizes(step)) for step in range(self.step_in_epoch, self.steps_per_epoch))


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
    """Where the training and validation samples are: datasets and index arrays."""

    train_dataset: Dataset
    train_indices: np.ndarray
    val_dataset: Dataset
    val_indices: np.ndarray


def make_split(train: Dataset, val: Dataset | None, *, val_fraction: float) -> Split:
    """Hold out the last `val_fraction` of the training dataset (contiguous, so validation reads are plain
    slices), or use the whole of a separate validation dataset. The split does not depend on the seed, so
    validation never leaks into training."""
    num_samples = len(train)
    if val is not None:
        return Split(train, np.arange(num_samples), val, np.arange(len(val)))
    num_val = int(round(num_samples * val_fraction))
    num_train = num_samples - num_val
    if num_val < 1 or num_train < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} leaves {num_train} training and {num_val} validation "
                          f"samples of the {num_samples} in data.dataset")
    return Split(train, np.arange(num_train), train, np.arange(num_train, num_samples))
