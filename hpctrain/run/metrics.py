"""`metrics.h5`: one HDF5 file of aggregated metrics per run, written by rank 0 only.

Layout (every dataset carries `dim_i` attributes naming its axes):
  /config                        JSON string: the fully resolved config of the latest (re)start
  attrs: format, format_version, task (task.name)
  /train/step          (n,)      global optimizer step, 1-based, each exactly once
  /train/epoch         (n,)      epoch the step belongs to (0-based)
  /train/loss          (n,)      mean per-sample training loss of the step, over all ranks
  /train/loss.<name>   (n,)      mean of each named loss component, when the loss returns a dict of them
  /train/grad_norm     (n,)      global gradient norm before clipping
  /train/samples_per_second (n,) global training throughput of the step
  /train/max_memory_allocated (n,) on a GPU only: the most memory (bytes) rank 0's tensors held since the previous
                                 step's row (torch.cuda.max_memory_allocated, reset at every step; the evaluation
                                 or checkpoint between two steps counts for the next); absent on a CPU
  /train/time_step, time_data, time_forward_backward, time_optimizer, time_bookkeeping (n,)  where the step's
                                 time went, in seconds; /train/rss (n,) resident bytes; /train/gpu_utilization
                                 (n,) percent, on a GPU with NVML (hpctrain.run.breakdown says what each counts).
                                 A file from before them lacks them; rows from before a restart that added them
                                 are NaN
  /train/lr            (n, g)    learning rate of each parameter group (attr `parameter_groups`)
  /train/nonfinite     (n,)      1 where the step was skipped because loss or gradient was NaN/Inf
  /validation/step     (m,)      step after which each evaluation ran
  /validation/<name>   (m,)      mean over the validation samples of `loss`, each `loss.<component>` and each
                                 metric of task.metrics, over the samples whose loss and value are finite
  /validation/per_sample/<name> (m, v)  the same, per validation sample, gathered from all ranks
  /validation/sample_index     (v,)     index in the validation dataset of each column above
  /validation/nonfinite_samples (m,)    how many validation samples had a non-finite loss or value at each
                                 evaluation; the means above leave them out (a mean is NaN only if no sample is
                                 finite). Absent in files from before it
  /train_samples/{step,index,loss} (s,)  with callbacks.metrics.per_sample_train: the loss of every training
                                 sample (one row per sample and step, its index in the training dataset)
  attrs train_batches_per_epoch, validation_batches_per_epoch (global, all ranks)

Rows are buffered in memory and written in blocks (one resize + write per dataset per flush, not one HDF5 write
per scalar per step) every `flush_every_s` seconds and the file is flushed, so after a SIGKILL it opens and holds
everything up to the last flush. A checkpoint records the row counts (the cursor); a resumed run truncates the
file to its checkpoint's cursor, so the step axis continues with no duplicate and no gap.

A full disk (or a quota) never reaches HDF5. After a write that failed, HDF5 drops the data it could not write
while the datasets' extents already count the rows (they read back as zeros, also after a later flush succeeds),
retries its failed writes at every flush and at close, and a resize and flush through the same handle afterwards
zeroed rows flushed before (measured with h5py 3.16, HDF5 2.0). So each flush first reserves the disk space its
writes can take (fallocate); if that fails nothing is written, the rows stay in memory and `flush` raises OSError.
Should HDF5 fail all the same (an I/O error; a copy-on-write file system, where reserved space does not secure
every later write), nothing more reaches the file: it keeps the rows of the flushes before, though a failed flush
that created datasets can leave metadata pointing past the file's end, which HDF5 then refuses to open for
writing. The loop's own flushes (periodic, after an evaluation) log a failure once and leave the decision to the
next checkpoint's flush, whose OSError stops the run cleanly (hpctrain.run.faults.disk_stop); the resumed run
recomputes the rows that were not written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import h5py
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.h5"
FORMAT_VERSION = 2

_TRAIN_SCALARS = {"step": np.int64, "epoch": np.int64, "loss": np.float64, "grad_norm": np.float64,
                  "samples_per_second": np.float64, "nonfinite": np.uint8}
_STEP_ROW = "training step row"

# What one flush may write besides the new chunks its rows need: HDF5's metadata (chunk index nodes, object
# headers, the link heap) of each dataset it touches, and a margin. tests/test_full_disk.py fills the disk right
# after a reservation and checks that the flush still completes.
_METADATA_BYTES = 64 << 10
_METADATA_BYTES_PER_DATASET = 8 << 10
# The reservation also covers the file's last bytes: HDF5 may have allocated space below the end of the file that
# it has not written yet (its metadata and small-data blocks), and the disk only provides it when written.
_RESERVE_BEHIND_END = 1 << 20
_FALLOC_FL_KEEP_SIZE = 1


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux's fallocate(2), which os lacks (os.posix_fallocate cannot keep the file's size)."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _libc_fallocate()


def reserve_space(fd: int, start: int, end: int) -> None:
    """Have the disk provide the bytes [start, end) of the open file `fd` now, so that writes there cannot fail for
    want of space; OSError (ENOSPC, EDQUOT) if it cannot."""
    if end <= start:
        return
    while _fallocate is not None:
        if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, start, end - start) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EINTR:
            continue
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))
        break
    if hasattr(os, "posix_fallocate"):
        # The file system cannot keep the size: the file grows past HDF5's end of allocation (glibc writes zeros
        # where the file system cannot allocate). HDF5 ignores those bytes, and cuts them off at its first flush
        # after it reopens the file.
        os.posix_fallocate(fd, start, end - start)
        return
    stat = os.fstatvfs(fd)  # neither (not Linux): at least check, though another writer may take the space
    if stat.f_bavail * stat.f_frsize < end - start:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _chunk_rows(row_shape: tuple[int, ...]) -> int:
    """Rows per chunk of a dataset with rows of this shape: chunks of about 64 Ki values."""
    return max(1, min(1024, (1 << 16) // max(1, int(np.prod(row_shape)))))


def _write_error(error: Exception, path: Path) -> OSError:
    """An HDF5 write failure as an OSError naming the file, with the errno HDF5 reported (EIO if none)."""
    code = error.errno if isinstance(error, OSError) and error.errno else None
    if code is None:
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


@dataclass(frozen=True)
class MetricsRow:
    """One row as the loggers receive it: a training step's scalars, or an evaluation's means."""

    kind: str  # "train" or "validation"
    step: int
    # train: loss, loss.<name>, grad_norm, samples_per_second, nonfinite, epoch, lr/<group>;
    # validation: the mean of loss, loss.<name>, each metric, and loss/<baseline> ratios.
    values: dict[str, float]


class MetricsListener(Protocol):
    """Receives every row once it is in metrics.h5 (hpctrain.loggers): the writer's flushes feed the loggers."""

    def metrics_flushed(self, rows: list[MetricsRow]) -> None: ...


@dataclass
class MetricsCursor:
    train_rows: int = 0
    validation_rows: int = 0
    train_sample_rows: int = 0


class MetricsWriter:
    def __init__(self, path: Path, *, parameter_groups: Sequence[str], validation_sample_index: np.ndarray,
                 config_json: str, task_name: str, cursor: MetricsCursor | None,
                 batches_per_epoch: tuple[int, int] | None = None, flush_every_s: float = 0.0) -> None:
        self.path = path
        self.flush_every_s = flush_every_s
        self.parameter_groups = list(parameter_groups)
        self._train_buffer: list[dict[str, float]] = []
        self._sample_buffer: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._lr_buffer: list[Sequence[float]] = []
        # (row in _train_buffer, callable giving more of its columns): GPU times, read at the flush (breakdown.py)
        self._deferred: list[tuple[int, Callable[[], Mapping[str, float]]]] = []
        self._validation_buffer: list[tuple[int, dict[str, np.ndarray]]] = []
        self._num_validation_samples = len(validation_sample_index)
        self._open_datasets: dict[str, h5py.Dataset] = {}
        self.listeners: list[MetricsListener] = []
        self._failure: OSError | None = None  # why the last flush failed, until one succeeds
        self._failure_logged = False
        self._abandoned: OSError | None = None  # HDF5 itself failed: nothing more is written (see the docstring)
        created = not path.exists()
        # No HDF5 file lock: forked loader workers inherit the descriptor and would keep an flock alive after a
        # crash. Rank 0 holding the run lock (hpctrain.process.distributed.run_lock) makes it the only writer.
        self.file = h5py.File(path, "a", locking=False)
        try:  # a restart on a disk still full fails here, before it could damage the rows of the earlier runs
            self._reserve(len(config_json.encode()) + 32 * _METADATA_BYTES_PER_DATASET)
        except OSError as error:
            self._abandon(error)
            if created:
                path.unlink(missing_ok=True)
            raise
        self._create_layout(validation_sample_index, task_name)
        if batches_per_epoch is not None:
            self.file.attrs["train_batches_per_epoch"], self.file.attrs["validation_batches_per_epoch"] = \
                batches_per_epoch
        self._write_config(config_json)
        self._truncate(cursor or MetricsCursor())
        self.file.flush()
        self._flushed_at = time.monotonic()

    # -- layout ----------------------------------------------------------------------------------------------
    def _dataset(self, name: str, shape: tuple[int, ...], dtype, dims: Sequence[str]) -> h5py.Dataset:
        if name in self.file:
            return self.file[name]
        dataset = self.file.create_dataset(name, shape=(0, *shape[1:]), maxshape=(None, *shape[1:]), dtype=dtype,
                                           chunks=(_chunk_rows(shape[1:]), *shape[1:]))
        for axis, dim in enumerate(dims):
            dataset.attrs[f"dim_{axis}"] = dim
        return dataset

    def _create_layout(self, validation_sample_index: np.ndarray, task_name: str) -> None:
        self.file.attrs["format"] = "hpctrain.metrics"
        self.file.attrs["format_version"] = FORMAT_VERSION
        self.file.attrs["task"] = task_name
        for name, dtype in _TRAIN_SCALARS.items():
            self._dataset(f"train/{name}", (0,), dtype, [_STEP_ROW])
        lr = self._dataset("train/lr", (0, len(self.parameter_groups)), np.float64, [_STEP_ROW, "parameter group"])
        lr.attrs["parameter_groups"] = self.parameter_groups
        self._dataset("validation/step", (0,), np.int64, ["evaluation"])
        self.file.require_group("train_samples")
        if "validation/sample_index" not in self.file:
            index = self.file.create_dataset("validation/sample_index", data=validation_sample_index.astype(np.int64))
            index.attrs["dim_0"] = "validation sample"
        elif not np.array_equal(self.file["validation/sample_index"][()], validation_sample_index):
            raise ValueError(f"{self.path}: the validation samples differ from those of the run's earlier "
                             "evaluations; use a new run directory for a different dataset split")

    def _write_config(self, config_json: str) -> None:
        if "config" in self.file:
            del self.file["config"]
        self.file.create_dataset("config", data=config_json, dtype=h5py.string_dtype())

    def _row_datasets(self, group: str) -> list[h5py.Dataset]:
        """Every dataset of /train or /validation that grows by one row per step or evaluation."""
        found: list[h5py.Dataset] = []
        self.file[group].visititems(lambda name, item: found.append(item) if isinstance(item, h5py.Dataset)
                                    and item.maxshape[0] is None else None)
        return found

    def _truncate(self, cursor: MetricsCursor) -> None:
        """Drop rows written after the checkpoint being resumed from (they will be recomputed identically)."""
        train_rows = len(self.file["train/step"])
        validation_rows = len(self.file["validation/step"])
        if train_rows < cursor.train_rows or validation_rows < cursor.validation_rows:
            log.warning("%s holds fewer rows (%d train, %d validation) than the checkpoint recorded (%d, %d); "
                        "earlier rows were lost", self.path, train_rows, validation_rows,
                        cursor.train_rows, cursor.validation_rows)
        for dataset in self._row_datasets("train"):
            dataset.resize(min(dataset.shape[0], cursor.train_rows), axis=0)
        for dataset in self._row_datasets("validation"):
            dataset.resize(min(dataset.shape[0], cursor.validation_rows), axis=0)
        for dataset in self._row_datasets("train_samples"):
            dataset.resize(min(dataset.shape[0], cursor.train_sample_rows), axis=0)

    # -- writing ---------------------------------------------------------------------------------------------
    def log_step(self, *, step: int, epoch: int, loss: float, grad_norm: float, samples_per_second: float,
                 nonfinite: bool, learning_rates: Sequence[float],
                 loss_components: dict[str, float] | None = None, max_memory_allocated: float = math.nan,
                 extra: Mapping[str, float] | None = None,
                 deferred: Callable[[], Mapping[str, float]] | None = None) -> None:
        """`extra`: more columns of the row (the step's time breakdown); `deferred`: a callable giving more columns,
        called at the flush (GPU times that are ready by then without waiting on the device now)."""
        row = {"step": step, "epoch": epoch, "loss": loss, "grad_norm": grad_norm,
               "samples_per_second": samples_per_second, "nonfinite": int(nonfinite)}
        if not math.isnan(max_memory_allocated):  # NaN: not on a GPU
            row["max_memory_allocated"] = max_memory_allocated
        row.update({f"loss.{name}": value for name, value in (loss_components or {}).items()})
        if extra:
            row.update(extra)
        if deferred is not None:
            self._deferred.append((len(self._train_buffer), deferred))
        self._train_buffer.append(row)
        self._lr_buffer.append(tuple(learning_rates))

    def log_train_samples(self, *, step: int, index: np.ndarray, loss: np.ndarray) -> None:
        """The per-sample loss of every training sample of a step (emicroml's per-sample training metrics)."""
        self._sample_buffer.append((step, index.astype(np.int64), loss.astype(np.float32)))

    def log_validation(self, *, step: int, per_sample: dict[str, np.ndarray]) -> None:
        """`per_sample`: name -> values of every validation sample (`loss` is required)."""
        for name, values in per_sample.items():
            if values.shape != (self._num_validation_samples,):
                raise ValueError(f"validation values {name!r} have shape {values.shape}, expected "
                                 f"({self._num_validation_samples},)")
        self._validation_buffer.append((step, {name: values.astype(np.float32) for name, values in
                                               per_sample.items()}))

    def _append(self, name: str, rows: np.ndarray, dims: Sequence[str], row_offset: int) -> None:
        """Append rows; a dataset first seen now (a new loss component or metric) starts at row `row_offset`
        of its axis, with NaN for the rows before (only possible if the task changed across a restart)."""
        dataset = self._open_datasets.get(name)
        if dataset is None:  # looked up once: an HDF5 lookup per column and flush costs more than the write
            dataset = self._open_datasets[name] = self._dataset(name, (0, *rows.shape[1:]), rows.dtype, dims)
        start = dataset.shape[0]
        if start < row_offset:
            dataset.resize(row_offset, axis=0)
            dataset[start:row_offset] = np.nan
            start = row_offset
        dataset.resize(start + len(rows), axis=0)
        dataset[start:] = rows

    def _pending_appends(self) -> list[tuple[str, np.ndarray, list[str], int]]:
        """The buffered rows as the appends that write them: (dataset, rows, axis names, row offset), in order."""
        appends: list[tuple[str, np.ndarray, list[str], int]] = []
        if self._train_buffer:
            offset = self.file["train/step"].shape[0]
            names = list(dict.fromkeys(name for row in self._train_buffer for name in row))
            for name in names:
                dtype = _TRAIN_SCALARS.get(name, np.float64)
                column = np.asarray([row.get(name, np.nan) for row in self._train_buffer], dtype=dtype)
                appends.append((f"train/{name}", column, [_STEP_ROW], offset))
            appends.append(("train/lr", np.asarray(self._lr_buffer, dtype=np.float64),
                            [_STEP_ROW, "parameter group"], offset))
        if self._validation_buffer:
            offset = self.file["validation/step"].shape[0]
            steps = np.asarray([step for step, _ in self._validation_buffer], dtype=np.int64)
            names = list(dict.fromkeys(name for _, values in self._validation_buffer for name in values))
            empty = np.full(self._num_validation_samples, np.nan, dtype=np.float32)
            per_sample = {name: np.stack([values.get(name, empty) for _, values in self._validation_buffer])
                          for name in names}
            means = finite_mean_rows(per_sample)
            for name in names:
                appends.append((f"validation/per_sample/{name}", per_sample[name],
                                ["evaluation", "validation sample"], offset))
                appends.append((f"validation/{name}", means[name], ["evaluation"], offset))
            appends.append(("validation/nonfinite_samples", nonfinite_count(per_sample).astype(np.float64),
                            ["evaluation"], offset))
            appends.append(("validation/step", steps, ["evaluation"], offset))
        if self._sample_buffer:
            dims = ["training sample row"]
            steps = np.concatenate([np.full(len(index), step, dtype=np.int64)
                                    for step, index, _ in self._sample_buffer])
            appends.append(("train_samples/step", steps, dims, 0))
            appends.append(("train_samples/index", np.concatenate([i for _, i, _ in self._sample_buffer]), dims, 0))
            appends.append(("train_samples/loss", np.concatenate([v for _, _, v in self._sample_buffer]), dims, 0))
        return appends

    def _bytes_needed(self, appends: list[tuple[str, np.ndarray, list[str], int]]) -> int:
        """At most what writing `appends` adds to the file: the chunks their rows begin (HDF5 allocates whole
        chunks) and the metadata of each dataset."""
        needed = _METADATA_BYTES
        for name, rows, _, offset in appends:
            dataset = self._open_datasets.get(name)
            if dataset is None and name in self.file:
                dataset = self.file[name]
            chunk_rows = _chunk_rows(rows.shape[1:]) if dataset is None else dataset.chunks[0]
            start = 0 if dataset is None else dataset.shape[0]
            end = max(start, offset) + len(rows)
            row_bytes = int(np.prod(rows.shape[1:])) * (rows.dtype if dataset is None else dataset.dtype).itemsize
            new_chunks = -(-end // chunk_rows) - -(-start // chunk_rows)
            needed += new_chunks * chunk_rows * row_bytes + _METADATA_BYTES_PER_DATASET
        return needed

    def _reserve(self, needed: int) -> None:
        """Reserve the disk space for `needed` more bytes (and any HDF5 has allocated but not written); OSError
        naming the file if the disk cannot provide it."""
        fd = self.file.id.get_vfd_handle()
        # HDF5 allocates from its end of allocation, which may lie past the end of the file; get_filesize is the
        # larger of the two as HDF5 sees them (not counting what an earlier reservation added past its end).
        end = self.file.id.get_filesize() + needed
        try:
            reserve_space(fd, max(0, min(os.fstat(fd).st_size, end) - _RESERVE_BEHIND_END), end)
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(self.path)) from None

    def flush(self) -> None:
        """Write the buffered rows and flush the file. OSError if they cannot be written (a full disk, a quota):
        the file keeps every row flushed before, and the rows stay buffered for the next flush."""
        if self._abandoned is not None:
            raise self._abandoned
        for index, deferred in self._deferred:
            self._train_buffer[index].update(deferred())
        self._deferred.clear()
        appends = self._pending_appends()
        if appends:
            try:
                self._reserve(self._bytes_needed(appends))
            except OSError as error:  # nothing written: the rows stay buffered, the file as it was
                self._failure = error
                raise
            try:
                for append in appends:
                    self._append(*append)
                self.file.flush()
            except (OSError, RuntimeError) as error:  # h5py reports a failed write as either
                raise self._abandon(error) from error
        rows = self._listener_rows() if self.listeners else []
        self._train_buffer.clear()
        self._lr_buffer.clear()
        self._validation_buffer.clear()
        self._sample_buffer.clear()
        if self._failure_logged:
            log.info("%s: written again, no row lost", self.path)
        self._failure, self._failure_logged = None, False
        self._flushed_at = time.monotonic()
        if rows:
            for listener in self.listeners:
                listener.metrics_flushed(rows)

    def try_flush(self) -> bool:
        """`flush` for the loop's own flushes (periodic, after an evaluation): a failure is logged once, not raised.
        The rows stay buffered, and these flushes leave them to the next checkpoint's `flush`, which writes them or
        stops the run (the trainer's disk stop). True if the rows are in the file."""
        if self._failure is not None:
            return False
        try:
            self.flush()
        except OSError as error:
            self._log_failure(error, "kept in memory: the next checkpoint writes them or stops the run")
            return False
        return True

    def _log_failure(self, error: OSError, outcome: str) -> None:
        if self._failure_logged:
            return
        self._failure_logged = True
        steps = [int(row["step"]) for row in self._train_buffer] + [step for step, _ in self._validation_buffer]
        log.warning("%s: writing failed (%s); its rows from step %s on are %s", self.path,
                    error.strerror or error, min(steps, default="?"), outcome)

    def _abandon(self, error: Exception) -> OSError:
        """Write nothing more to the file after HDF5 failed to write it (or could not start): HDF5 retries its
        failed writes at every flush, at close and at exit, so its descriptor is swapped for an anonymous file in
        memory, where they land harmlessly, and the handle is closed. The file keeps what the flushes before
        wrote."""
        failure = _write_error(error, self.path)
        with contextlib.suppress(Exception):
            fd = self.file.id.get_vfd_handle()
            sink = (os.memfd_create("hpctrain-metrics-abandoned") if hasattr(os, "memfd_create")
                    else os.open(os.devnull, os.O_RDWR))
            os.dup2(sink, fd)
            os.close(sink)
        with contextlib.suppress(Exception):
            self.file.close()
        self._open_datasets.clear()
        self._abandoned = self._failure = failure
        return failure

    def _listener_rows(self) -> list[MetricsRow]:
        """The buffered rows, in step order, as the listeners receive them."""
        rows = [MetricsRow("train", int(row["step"]), _train_values(row, learning_rates, self.parameter_groups))
                for row, learning_rates in zip(self._train_buffer, self._lr_buffer)]
        rows += [MetricsRow("validation", step, _validation_values(
            finite_means(per_sample)))
            for step, per_sample in self._validation_buffer]
        rows.sort(key=lambda row: (row.step, row.kind == "validation"))
        return rows

    def rows_after(self, *, train_step: int, validation_step: int) -> list[MetricsRow]:
        """The rows on disk past these steps (a logger catching up after a restart), in step order."""
        self.flush()
        rows = []
        train = self.file["train"]
        steps = train["step"][()]
        keep = np.flatnonzero(steps > train_step)
        if len(keep):
            columns = {name: train[name][keep[0]:] for name in train if name not in ("step", "lr")
                       and train[name].ndim == 1}
            lrs = train["lr"][keep[0]:]
            for offset, step in enumerate(steps[keep[0]:]):
                row = {name: column[offset] for name, column in columns.items()}
                rows.append(MetricsRow("train", int(step), _train_values(row, lrs[offset], self.parameter_groups)))
        validation = self.file["validation"]
        steps = validation["step"][()]
        keep = np.flatnonzero(steps > validation_step)
        if len(keep):
            names = [name for name in validation if name not in ("step", "sample_index", "nonfinite_samples")
                     and isinstance(validation[name], h5py.Dataset)]
            columns = {name: validation[name][keep[0]:] for name in names}
            for offset, step in enumerate(steps[keep[0]:]):
                rows.append(MetricsRow("validation", int(step), _validation_values(
                    {name: float(column[offset]) for name, column in columns.items()})))
        rows.sort(key=lambda row: (row.step, row.kind == "validation"))
        return rows

    def flush_if_due(self) -> None:
        """Flush (as `try_flush`: a failure is logged, not raised) if `flush_every_s` seconds have passed since the
        last flush."""
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.try_flush()

    def cursor(self) -> MetricsCursor:
        """Row counts including buffered rows; call `flush` before recording it in a checkpoint."""
        samples = self.file["train_samples/step"].shape[0] if "train_samples/step" in self.file else 0
        return MetricsCursor(train_rows=self.file["train/step"].shape[0] + len(self._train_buffer),
                             validation_rows=self.file["validation/step"].shape[0] + len(self._validation_buffer),
                             train_sample_rows=samples + sum(len(index) for _, index, _ in self._sample_buffer))

    def close(self) -> None:
        """Write what is buffered and close the file. A failed write is logged (unless a flush already reported
        one), not raised: the rows not written are past the newest checkpoint's cursor, so the resumed run
        recomputes them, and the run's end must still be reported."""
        if self._abandoned is not None or not self.file.id.valid:
            return
        reported = self._failure is not None
        try:
            self.flush()
        except OSError as error:
            if not reported:
                self._log_failure(error, "not written: the resumed run recomputes them")
        if self._abandoned is None:
            try:
                self.file.close()
            except (OSError, RuntimeError) as error:
                self._abandon(error)


def _train_values(row: dict[str, float], learning_rates: Sequence[float],
                  parameter_groups: Sequence[str]) -> dict[str, float]:
    values = {name: float(value) for name, value in row.items() if name != "step"}
    values.update({f"lr/{group}": float(lr) for group, lr in zip(parameter_groups, learning_rates)})
    return {name: value for name, value in values.items() if not np.isnan(value)}


def _validation_values(means: dict[str, float]) -> dict[str, float]:
    values = dict(means)
    if "loss" in means:
        values.update({f"loss/{name}": ratio for name, ratio in baseline_ratios(means["loss"], means).items()})
    return {name: value for name, value in values.items() if not np.isnan(value)}


def finite_means(per_sample: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each per-sample value's mean over the samples whose loss and value are finite (NaN where none is): a NaN
    in one sample's data leaves that sample out, it does not make the evaluation NaN."""
    return {name: float(value) for name, value in finite_mean_rows(per_sample).items()}


def finite_mean_rows(per_sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`finite_means` over the last axis, for per-sample arrays of one or several evaluations ((v,) or (m, v))."""
    loss_finite = np.isfinite(per_sample["loss"]) if "loss" in per_sample else True
    means = {}
    for name, values in per_sample.items():
        values = np.asarray(values, dtype=np.float64)
        keep = np.isfinite(values) & loss_finite
        with np.errstate(invalid="ignore", divide="ignore"):
            means[name] = np.where(keep, values, 0.0).sum(axis=-1) / keep.sum(axis=-1)
    return means


def nonfinite_count(per_sample: Mapping[str, np.ndarray]) -> np.ndarray:
    """How many samples have a non-finite loss or value (per evaluation, over the last axis)."""
    bad = np.zeros(np.shape(next(iter(per_sample.values()))), dtype=bool)
    for values in per_sample.values():
        bad |= ~np.isfinite(values)
    return bad.sum(axis=-1)


def baseline_ratios(loss: float, metrics: dict[str, float]) -> dict[str, float]:
    """The loss divided by each baseline metric (a task's `baseline_*` metrics: what a trivial predictor scores)."""
    return {name: loss / value for name, value in metrics.items()
            if name.startswith("baseline_") and value is not None and value > 0}


def validation_names(file: h5py.File) -> list[str]:
    """Names of the per-sample validation values stored in an open metrics.h5 (loss first)."""
    if "validation/per_sample" not in file:
        return []
    names = sorted(file["validation/per_sample"].keys())
    return sorted(names, key=lambda name: (name != "loss", not name.startswith("loss"), name))


def open_for_reading(path: Path) -> h5py.File:
    """Open metrics.h5 read-only, also while a run writes it (no lock is taken)."""
    return h5py.File(path, "r", locking=False)


def plot_run(run_dir: Path) -> list[Path]:
    """PNG plots of the loss curves and learning rates, from metrics.h5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open_for_reading(run_dir / METRICS_FILENAME) as file:
        steps = file["train/step"][()]
        loss = file["train/loss"][()]
        lr = file["train/lr"][()]
        groups = [str(g) for g in file["train/lr"].attrs["parameter_groups"]]
        task = str(file.attrs.get("task", ""))
        validation_steps = file["validation/step"][()]
        validation_loss = file["validation/loss"][()] if "validation/loss" in file else np.empty(0)
        metrics = {name: file[f"validation/{name}"][()] for name in validation_names(file)
                   if name != "loss" and not name.startswith("loss.")}
        baselines = {name: values for name, values in metrics.items() if name.startswith("baseline_")}
    written = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(steps, loss, lw=0.8, alpha=0.6, label="training (per step)")
    if len(loss) >= 20:
        window = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, lw=1.5, label=f"training ({window}-step mean)")
    axes.plot(validation_steps, validation_loss, "o-", lw=1.5, label="validation")
    for index, (name, values) in enumerate(baselines.items()):  # a task's reference predictors, e.g. a constant
        axes.axhline(float(np.mean(values)), ls="--", lw=1, color=f"C{index + 3}", label=f"{name} (validation)")
    axes.set(xlabel="optimizer step", ylabel="loss", yscale="log", title=f"Loss ({task})" if task else "Loss")
    axes.legend()
    figure.tight_layout()
    written.append(run_dir / "loss.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    if metrics and len(validation_steps):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name, values in metrics.items():
            axes.plot(validation_steps, values, "o-", lw=1.2, label=name)
        positive = all(np.nanmin(values) > 0 for values in metrics.values())
        axes.set(xlabel="optimizer step", ylabel="mean over validation samples", title="Validation metrics",
                 yscale="log" if positive else "linear")
        axes.legend()
        figure.tight_layout()
        written.append(run_dir / "metrics.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 3.5))
    for column, group in enumerate(groups):
        axes.plot(steps, lr[:, column], label=group)
    axes.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate per parameter group")
    axes.legend()
    figure.tight_layout()
    written.append(run_dir / "lr.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written
