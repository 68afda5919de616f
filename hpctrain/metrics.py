"""`metrics.h5`: one HDF5 file of aggregated metrics per run, written by rank 0 only.

Layout (every dataset carries `dim_i` attributes naming its axes):
  /config                        JSON string: the fully resolved config of the latest (re)start
  /train/step          (n,)      global optimizer step, 1-based, each exactly once
  /train/epoch         (n,)      epoch the step belongs to (0-based)
  /train/loss          (n,)      mean per-sample training loss of the step, over all ranks
  /train/grad_norm     (n,)      global gradient norm before clipping
  /train/samples_per_second (n,) global training throughput of the step
  /train/lr            (n, g)    learning rate of each parameter group (attr `parameter_groups`)
  /train/nonfinite     (n,)      1 where the step was skipped because loss or gradient was NaN/Inf
  /validation/step     (m,)      step after which each evaluation ran
  /validation/loss     (m,)      mean per-sample validation loss
  /validation/per_sample_loss (m, v)  the loss (EPE) of every validation sample, gathered from all ranks
  /validation/sample_index    (v,)    index in the data file of each column above

Rows are buffered in memory and written in blocks (one resize + write per dataset per flush, not one HDF5 write
per scalar per step) and the file is flushed, so after a SIGKILL it opens and holds everything up to the last
flush. A checkpoint records the row counts (the cursor); a resumed run truncates the file to its checkpoint's
cursor, so the step axis continues with no duplicate and no gap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.h5"

_TRAIN_SCALARS = {"step": np.int64, "epoch": np.int64, "loss": np.float64, "grad_norm": np.float64,
                  "samples_per_second": np.float64, "nonfinite": np.uint8}


@dataclass
class MetricsCursor:
    train_rows: int = 0
    validation_rows: int = 0


class MetricsWriter:
    def __init__(self, path: Path, *, parameter_groups: Sequence[str], validation_sample_index: np.ndarray,
                 config_json: str, metric_name: str, cursor: MetricsCursor | None) -> None:
        self.path = path
        self.parameter_groups = list(parameter_groups)
        self._train_buffer: list[tuple] = []
        self._validation_buffer: list[tuple[int, float, np.ndarray]] = []
        # No HDF5 file lock: forked loader workers inherit the descriptor and would keep an flock alive after a
        # crash. Rank 0 holding the run lock (hpctrain.distributed.run_lock) makes it the only writer.
        self.file = h5py.File(path, "a", locking=False)
        self._create_layout(validation_sample_index, metric_name)
        self._write_config(config_json)
        self._truncate(cursor or MetricsCursor())
        self.file.flush()

    # -- layout ----------------------------------------------------------------------------------------------
    def _dataset(self, name: str, shape: tuple[int, ...], dtype, dims: Sequence[str]) -> h5py.Dataset:
        if name in self.file:
            return self.file[name]
        chunk_rows = max(1, min(1024, (1 << 16) // max(1, int(np.prod(shape[1:])))))
        dataset = self.file.create_dataset(name, shape=(0, *shape[1:]), maxshape=(None, *shape[1:]), dtype=dtype,
                                           chunks=(chunk_rows, *shape[1:]))
        for axis, dim in enumerate(dims):
            dataset.attrs[f"dim_{axis}"] = dim
        return dataset

    def _create_layout(self, validation_sample_index: np.ndarray, metric_name: str) -> None:
        self.file.attrs["format"] = "hpctrain.metrics"
        self.file.attrs["format_version"] = 1
        for name, dtype in _TRAIN_SCALARS.items():
            self._dataset(f"train/{name}", (0,), dtype, ["training step row"])
        lr = self._dataset("train/lr", (0, len(self.parameter_groups)), np.float64,
                           ["training step row", "parameter group"])
        lr.attrs["parameter_groups"] = self.parameter_groups
        self._dataset("validation/step", (0,), np.int64, ["evaluation"])
        self._dataset("validation/loss", (0,), np.float64, ["evaluation"])
        per_sample = self._dataset("validation/per_sample_loss", (0, len(validation_sample_index)), np.float32,
                                   ["evaluation", "validation sample"])
        per_sample.attrs["metric"] = metric_name
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

    def _truncate(self, cursor: MetricsCursor) -> None:
        """Drop rows written after the checkpoint being resumed from (they will be recomputed identically)."""
        train_rows = len(self.file["train/step"])
        validation_rows = len(self.file["validation/step"])
        if train_rows < cursor.train_rows or validation_rows < cursor.validation_rows:
            log.warning("%s holds fewer rows (%d train, %d validation) than the checkpoint recorded (%d, %d); "
                        "earlier rows were lost", self.path, train_rows, validation_rows,
                        cursor.train_rows, cursor.validation_rows)
        for name in [*(f"train/{n}" for n in _TRAIN_SCALARS), "train/lr"]:
            self.file[name].resize(min(train_rows, cursor.train_rows), axis=0)
        for name in ("validation/step", "validation/loss", "validation/per_sample_loss"):
            self.file[name].resize(min(validation_rows, cursor.validation_rows), axis=0)

    # -- writing ---------------------------------------------------------------------------------------------
    def log_step(self, *, step: int, epoch: int, loss: float, grad_norm: float, samples_per_second: float,
                 nonfinite: bool, learning_rates: Sequence[float]) -> None:
        self._train_buffer.append((step, epoch, loss, grad_norm, samples_per_second, int(nonfinite),
                                   tuple(learning_rates)))

    def log_validation(self, *, step: int, loss: float, per_sample_loss: np.ndarray) -> None:
        self._validation_buffer.append((step, loss, per_sample_loss.astype(np.float32)))

    @staticmethod
    def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
        start = dataset.shape[0]
        dataset.resize(start + len(rows), axis=0)
        dataset[start:] = rows

    def flush(self) -> None:
        if self._train_buffer:
            columns = list(zip(*self._train_buffer))
            for (name, dtype), column in zip(_TRAIN_SCALARS.items(), columns):
                self._append(self.file[f"train/{name}"], np.asarray(column, dtype=dtype))
            self._append(self.file["train/lr"], np.asarray(columns[-1], dtype=np.float64))
            self._train_buffer.clear()
        if self._validation_buffer:
            steps, losses, per_sample = zip(*self._validation_buffer)
            self._append(self.file["validation/step"], np.asarray(steps, dtype=np.int64))
            self._append(self.file["validation/loss"], np.asarray(losses, dtype=np.float64))
            self._append(self.file["validation/per_sample_loss"], np.stack(per_sample))
            self._validation_buffer.clear()
        self.file.flush()

    def cursor(self) -> MetricsCursor:
        """Row counts including buffered rows; call `flush` before recording it in a checkpoint."""
        return MetricsCursor(train_rows=self.file["train/step"].shape[0] + len(self._train_buffer),
                             validation_rows=self.file["validation/step"].shape[0] + len(self._validation_buffer))

    def close(self) -> None:
        if self.file.id.valid:
            self.flush()
            self.file.close()


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
        metric = str(file["validation/per_sample_loss"].attrs.get("metric", "loss"))
        validation_steps = file["validation/step"][()]
        validation_loss = file["validation/loss"][()]
    written = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(steps, loss, lw=0.8, alpha=0.6, label="training (per step)")
    if len(loss) >= 20:
        window = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, lw=1.5, label=f"training ({window}-step mean)")
    axes.plot(validation_steps, validation_loss, "o-", lw=1.5, label="validation")
    axes.set(xlabel="optimizer step", ylabel=metric, yscale="log", title="Loss")
    axes.legend()
    figure.tight_layout()
    written.append(run_dir / "loss.png")
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
