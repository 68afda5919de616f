"""metrics.h5: layout, buffered writes, readability after SIGKILL, and truncation to a checkpoint's cursor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpctrain.run.metrics import MetricsCursor, MetricsWriter, open_for_reading


def writer(path: Path, cursor: MetricsCursor | None = None) -> MetricsWriter:
    return MetricsWriter(path, parameter_groups=["default", "head"], validation_sample_index=np.arange(10, 15),
                         config_json='{"seed": 0}', task_name="toy", cursor=cursor)


def log_steps(metrics: MetricsWriter, steps: range) -> None:
    for step in steps:
        metrics.log_step(step=step, epoch=0, loss=1.0 / step, grad_norm=0.5, samples_per_second=100.0,
                         nonfinite=False, learning_rates=[1e-3, 1e-4], loss_components={"a": 0.25 / step})


def validation(loss: float, **metrics: np.ndarray) -> dict[str, np.ndarray]:
    return {"loss": np.full(5, loss, dtype=np.float32), **metrics}


def test_layout_and_dims(tmp_path: Path) -> None:
    metrics = writer(tmp_path / "metrics.h5")
    log_steps(metrics, range(1, 6))
    metrics.log_validation(step=5, per_sample=validation(0.3, epe=np.arange(5, dtype=np.float32)))
    metrics.close()
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == [1, 2, 3, 4, 5]
        assert file["train/lr"].shape == (5, 2)
        assert list(file["train/lr"].attrs["parameter_groups"]) == ["default", "head"]
        assert file["train/lr"].attrs["dim_1"] == "parameter group"
        assert file["train/loss.a"][()].tolist() == [0.25 / step for step in range(1, 6)]
        assert file["validation/per_sample/loss"].shape == (1, 5)
        assert file["validation/per_sample/epe"][()].tolist() == [[0, 1, 2, 3, 4]]
        assert file["validation/per_sample/epe"].attrs["dim_1"] == "validation sample"
        assert file["validation/epe"][()].tolist() == [2.0]
        assert np.allclose(file["validation/loss"][()], [0.3])
        assert file["validation/sample_index"][()].tolist() == [10, 11, 12, 13, 14]
        assert file["config"][()].decode() == '{"seed": 0}'
        assert file.attrs["task"] == "toy"


def test_rows_are_written_once_flush_every_s_has_passed(tmp_path: Path) -> None:
    metrics = writer(tmp_path / "metrics.h5")
    metrics.flush_every_s = 0.3
    log_steps(metrics, range(1, 4))
    metrics.flush_if_due()
    assert metrics.file["train/step"].shape == (0,)  # just opened: not due yet
    time.sleep(0.3)
    metrics.flush_if_due()
    assert metrics.file["train/step"][()].tolist() == [1, 2, 3]
    log_steps(metrics, range(4, 6))
    metrics.flush_if_due()
    assert metrics.file["train/step"].shape == (3,)  # the clock restarted at the flush
    metrics.flush_every_s = 0.0
    metrics.flush_if_due()
    assert metrics.file["train/step"][()].tolist() == [1, 2, 3, 4, 5]
    metrics.close()


def test_rows_are_buffered_until_flush(tmp_path: Path) -> None:
    metrics = writer(tmp_path / "metrics.h5")
    log_steps(metrics, range(1, 4))
    assert metrics.file["train/step"].shape == (0,)
    assert metrics.cursor() == MetricsCursor(train_rows=3, validation_rows=0)
    metrics.flush()
    assert metrics.file["train/step"].shape == (3,)
    metrics.close()


def test_resume_truncates_to_the_checkpoint_cursor(tmp_path: Path) -> None:
    metrics = writer(tmp_path / "metrics.h5")
    log_steps(metrics, range(1, 11))
    metrics.log_validation(step=5, per_sample=validation(0.3, epe=np.zeros(5, np.float32)))
    metrics.log_validation(step=10, per_sample=validation(0.2, epe=np.zeros(5, np.float32)))
    metrics.close()
    metrics = writer(tmp_path / "metrics.h5", cursor=MetricsCursor(train_rows=6, validation_rows=1))
    log_steps(metrics, range(7, 9))
    metrics.close()
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
        assert len(file["train/loss.a"]) == 8  # every per-step dataset, also the task's own
        assert file["validation/step"][()].tolist() == [5]
        assert file["validation/per_sample/epe"].shape == (1, 5) and file["validation/epe"].shape == (1,)


def test_breakdown_columns_deferred_to_the_flush_reach_the_file_and_the_listeners_and_an_older_file_resumes(
        tmp_path: Path) -> None:
    """A file written before the breakdown (no time columns), resumed by a run that records it: the old rows read
    NaN, the new ones their values; deferred columns (a GPU's event times) are asked for at the flush, once."""
    metrics = writer(tmp_path / "metrics.h5")
    log_steps(metrics, range(1, 4))
    metrics.close()
    metrics = writer(tmp_path / "metrics.h5", cursor=MetricsCursor(train_rows=3))
    received: list = []
    metrics.listeners.append(type("Listener", (), {"metrics_flushed": lambda self, rows: received.extend(rows)})())
    asked: list[int] = []
    for step in (4, 5):
        metrics.log_step(step=step, epoch=0, loss=1.0, grad_norm=0.5, samples_per_second=1.0, nonfinite=False,
                         learning_rates=[1e-3, 1e-4], extra={"time_step": 0.1 * step},
                         deferred=lambda step=step: asked.append(step) or {"time_optimizer": 0.01 * step})
    assert asked == []
    metrics.flush()
    metrics.flush()
    assert asked == [4, 5]
    metrics.close()
    with open_for_reading(tmp_path / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == [1, 2, 3, 4, 5]
        assert np.isnan(file["train/time_step"][:3]).all() and file["train/time_step"][3:].tolist() == [0.4, 0.5]
        assert np.isnan(file["train/time_optimizer"][:3]).all()
        assert file["train/time_optimizer"][3:].tolist() == [0.04, 0.05]
    assert [(row.step, row.values["time_step"], row.values["time_optimizer"]) for row in received] == [
        (4, 0.4, 0.04), (5, 0.5, 0.05)]


KILLED_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from pathlib import Path
    from hpctrain.run.metrics import MetricsWriter
    metrics = MetricsWriter(Path(sys.argv[1]), parameter_groups=["default"], validation_sample_index=np.arange(3),
                            config_json="{}", task_name="toy", cursor=None)
    for step in range(1, 1_000_000):
        metrics.log_step(step=step, epoch=0, loss=1.0, grad_norm=1.0, samples_per_second=1.0, nonfinite=False,
                         learning_rates=[0.1])
        if step % 50 == 0:
            metrics.flush()
            print(step, flush=True)
        time.sleep(0.0005)
""")


def test_file_opens_after_sigkill_and_holds_everything_up_to_the_last_flush(tmp_path: Path) -> None:
    path = tmp_path / "metrics.h5"
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    flushed = 0
    while flushed < 400:
        flushed = int(process.stdout.readline())
    time.sleep(0.013)  # land somewhere between flushes
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with h5py.File(path, "r") as file:  # a plain open, as a user would do
        steps = file["train/step"][()]
    assert len(steps) >= 400 and len(steps) % 50 == 0
    assert steps.tolist() == list(range(1, len(steps) + 1))


@pytest.mark.slow
def test_per_sample_training_losses_cover_every_sample_once_per_epoch_on_two_ranks(tmp_path: Path,
                                                                                   tiny_data: Path) -> None:
    from .conftest import launch, tiny_overrides

    # 154 training samples, global batch 16 (2 ranks x 8): 10 steps per epoch, 20 steps = 2 epochs.
    launch(tiny_overrides(tiny_data, "callbacks.metrics.per_sample_train=true", "trainer.max_steps=20",
                          "trainer.micro_batch_size=8", "launcher.num_processes=2"), run_dir=tmp_path)
    with open_for_reading(tmp_path / "metrics.h5") as file:
        steps, index, loss = (file[f"train_samples/{name}"][()] for name in ("step", "index", "loss"))
        train_loss = file["train/loss"][()]
        assert file.attrs["train_batches_per_epoch"] == 10 and file.attrs["validation_batches_per_epoch"] == 5  # 38 / 8
        assert file["train_samples/loss"].attrs["dim_0"] == "training sample row"
    for epoch in (0, 1):
        in_epoch = (steps > 10 * epoch) & (steps <= 10 * (epoch + 1))
        assert sorted(index[in_epoch].tolist()) == list(range(154))  # every sample once per epoch
    for step in (1, 10, 20):
        np.testing.assert_allclose(loss[steps == step].astype(np.float64).mean(), train_loss[step - 1], rtol=1e-5)
