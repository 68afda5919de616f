"""A full disk mid-run, on a small file system of the test's own (a tmpfs with a size limit): a checkpoint write
or a metrics flush that hits ENOSPC ends the run cleanly with one line, leaves the previous checkpoint verified and
loadable and nothing half-written, loses no metrics row already flushed; freeing space and running the same
config again resumes bit-exactly (docs/outputs.md, "A full disk")."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pytest
import torch

import hpctrain.run.metrics as metrics_module
from hpctrain.components import build_components, build_trainer
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.checkpoint import CheckpointManager, state_dict_digest
from hpctrain.run.metrics import MetricsCursor, MetricsWriter, open_for_reading
from hpctrain.run.trainer import Trainer

from .conftest import final_weights, tiny_overrides
from .test_config import compose_config

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
STEPS = 12
# A checkpoint every 2 steps, an evaluation every 4, every step's metrics row flushed at once.
RUN = (f"trainer.max_steps={STEPS}", "trainer.val_every_steps=4", "callbacks.checkpoint.every_steps=2",
       "callbacks.early_stopping.enabled=false", "callbacks.metrics.flush_every_seconds=0")
NO_SPACE = os.strerror(errno.ENOSPC)
CHECKPOINT_BYTES = 100_000  # about the size of a checkpoint of this run


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for the test (root only: skipped loudly elsewhere, failing under CI=true)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    reason = "the full-disk tests mount a tmpfs, which needs root" if os.geteuid() != 0 else ""
    if not reason:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
        reason = f"mount -t tmpfs failed: {mounted.stderr.strip()}" if mounted.returncode else ""
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"a small file system is required under CI=true: {reason}")
        pytest.skip(f"NO SMALL FILE SYSTEM, full-disk tests not run: {reason}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # lazy: a file left open cannot block it


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Take the free space of `directory`'s file system, but `leave` bytes, with a filler file."""
    filler = directory / "filler"
    stat = os.statvfs(directory)
    take = stat.f_bavail * stat.f_frsize - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        if take > 0:
            os.posix_fallocate(fd, os.fstat(fd).st_size, take)
    finally:
        os.close(fd)
    return filler


def trainer_for(tiny_data: Path, run_dir: Path, *overrides: str) -> Trainer:
    config = compose_config(*tiny_overrides(tiny_data, *RUN, *overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    return build_trainer(config, run_dir, CPU, build_components(config))


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    """An uninterrupted run on a normal directory: its final weights' digest and its training losses."""
    run_dir = tmp_path_factory.mktemp("reference")
    state = trainer_for(tiny_data, run_dir).fit()
    assert state.step == STEPS and not state.failed
    with open_for_reading(run_dir / "metrics.h5") as file:
        losses = file["train/loss"][()]
    return state_dict_digest(final_weights(run_dir)), losses


def filling_before(trainer: Trainer, method: str, step: int, directory: Path) -> None:
    """Fill `directory`'s file system when the trainer calls its checkpoint manager's `method` at `step` (after
    the checkpoint's metrics flush, before the write; an asynchronous write before it is waited for first), but
    for less than the checkpoint needs: the disk fills in the middle of its file."""
    manager = trainer.checkpoints
    original: Callable[..., Any] = getattr(manager, method)

    def filled(at_step: int, *args: Any, **kwargs: Any) -> Any:
        if at_step == step:
            manager.wait()
            fill(directory, leave=CHECKPOINT_BYTES // 3)
        return original(at_step, *args, **kwargs)

    setattr(manager, method, filled)


def filling_after(trainer: Trainer, step: int, directory: Path) -> None:
    """Fill `directory`'s file system once the checkpoint of `step` is written."""
    manager = trainer.checkpoints
    original = manager.save

    def filled(at_step: int, *args: Any, **kwargs: Any) -> Any:
        path = original(at_step, *args, **kwargs)
        if at_step == step:
            manager.wait()  # its pruning too
            fill(directory)
        return path

    manager.save = filled  # type: ignore[method-assign]


def assert_stopped_cleanly(state: Any, run_dir: Path, caplog: pytest.LogCaptureFixture, *, step: int,
                           newest: int) -> None:
    """Ended by the disk with one line naming the error and the newest intact checkpoint, which is verified and
    loadable; no temporary file, no .pt without its manifest."""
    assert state.failed and state.step == step
    assert state.stop_reason.startswith(f"writing failed at step {step} in {run_dir}: {NO_SPACE}")
    assert state.stop_reason.endswith(f"the newest intact checkpoint is step {newest}")
    lines = [record.getMessage() for record in caplog.records if "writing failed at step" in record.getMessage()]
    assert len(lines) == 1 and "Free space and run the same command to resume" in lines[0]
    manager = CheckpointManager(run_dir, keep_last=2)
    info = manager.newest_valid()
    assert info is not None and info.step == newest
    assert CheckpointManager.load(info)["train_state"]["step"] == newest
    files = sorted(path.name for path in manager.directory.iterdir())
    assert not [name for name in files if name.startswith(".")], files
    assert sorted(name for name in files if name.endswith(".pt")) == \
        sorted(name.replace(".json", ".pt") for name in files if name.endswith(".json")), files


def metrics_steps(run_dir: Path) -> np.ndarray:
    with open_for_reading(run_dir / "metrics.h5") as file:
        return file["train/step"][()]


def assert_resumes_bit_exactly(tiny_data: Path, run_dir: Path, filler: Path, reference: tuple[str, np.ndarray],
                               *overrides: str) -> None:
    """Free the space and run the same config in the same run directory: it ends as the uninterrupted run."""
    filler.unlink()
    state = trainer_for(tiny_data, run_dir, *overrides).fit()
    assert state.step == STEPS and not state.failed, state.stop_reason
    digest, losses = reference
    assert state_dict_digest(final_weights(run_dir)) == digest
    with open_for_reading(run_dir / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, STEPS + 1))
        assert np.array_equal(file["train/loss"][()], losses)


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one_and_resumes(
        small_disk: Path, tiny_data: Path, reference: tuple[str, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    run_dir = small_disk / "run"
    trainer = trainer_for(tiny_data, run_dir)
    filling_before(trainer, "save", 8, small_disk)
    with caplog.at_level(logging.INFO):
        state = trainer.fit()
    assert_stopped_cleanly(state, run_dir, caplog, step=8, newest=6)
    # The checkpoint's metrics flush came before the write: every step up to 8 is in metrics.h5.
    assert metrics_steps(run_dir).tolist() == list(range(1, 9))
    assert_resumes_bit_exactly(tiny_data, run_dir, small_disk / "filler", reference)


def test_an_asynchronous_checkpoint_write_on_a_full_disk_keeps_the_previous_one_and_resumes(
        small_disk: Path, tiny_data: Path, reference: tuple[str, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    run_dir = small_disk / "run"
    trainer = trainer_for(tiny_data, run_dir, "callbacks.checkpoint.asynchronous=true")
    filling_before(trainer, "save_async", STEPS, small_disk)  # the last one: its failure shows at the run's end
    with caplog.at_level(logging.INFO):
        state = trainer.fit()
    assert_stopped_cleanly(state, run_dir, caplog, step=STEPS, newest=10)
    assert metrics_steps(run_dir).tolist() == list(range(1, STEPS + 1))
    assert_resumes_bit_exactly(tiny_data, run_dir, small_disk / "filler", reference,
                               "callbacks.checkpoint.asynchronous=true")


def test_a_metrics_flush_on_a_full_disk_loses_no_flushed_step_and_the_run_resumes(
        small_disk: Path, tiny_data: Path, reference: tuple[str, np.ndarray], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[tuple[int, int]] = []  # (train rows, validation rows) in the file after each flush that succeeded
    flush = MetricsWriter.flush

    def recorded(self: MetricsWriter) -> None:
        flush(self)
        flushed.append((len(self.file["train/step"]), len(self.file["validation/step"])))

    monkeypatch.setattr(MetricsWriter, "flush", recorded)
    run_dir = small_disk / "run"
    trainer = trainer_for(tiny_data, run_dir)
    filling_after(trainer, 6, small_disk)
    with caplog.at_level(logging.INFO):
        state = trainer.fit()  # a flush after step 6 fails: logged, and training goes on to the next checkpoint
    # The checkpoint's metrics flush failed (before its write) and stopped the run.
    assert_stopped_cleanly(state, run_dir, caplog, step=8, newest=6)
    failed = [record.getMessage() for record in caplog.records if record.name == "hpctrain.run.metrics"]
    assert len(failed) == 1 and f"metrics.h5: writing failed ({NO_SPACE}); its rows from step" in failed[0]
    assert "kept in memory: the next checkpoint writes them or stops the run" in failed[0]
    train_rows, validation_rows = flushed[-1]
    assert train_rows >= 6  # the space metrics.h5 had reserved before may take a flush or two yet
    with open_for_reading(run_dir / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, train_rows + 1))
        assert np.array_equal(file["train/loss"][()], reference[1][:train_rows])
        assert file["validation/step"][()].tolist() == [4, 8][:validation_rows]
    monkeypatch.undo()
    assert_resumes_bit_exactly(tiny_data, run_dir, small_disk / "filler", reference)


# -- the checkpoint manager and the metrics writer on their own ---------------------------------------------------
def model_state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"model": {"weight": torch.randn(256, 256, generator=generator)}, "finished": False}  # 256 KiB


def fail_fsync_of(monkeypatch: pytest.MonkeyPatch, matches: Callable[[str], bool]) -> None:
    """os.fsync (in hpctrain.run.checkpoint) of a descriptor whose path `matches` fails with EIO."""
    import hpctrain.run.checkpoint as checkpoint_module

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if matches(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)


@pytest.mark.parametrize("failing", ["pt", "manifest", "pt fsync", "manifest fsync", "directory fsync"])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failed_checkpoint_write_leaves_nothing_and_prunes_nothing(
        small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, asynchronous: bool) -> None:
    run_dir = small_disk / "run"
    manager = CheckpointManager(run_dir, keep_last=1)
    manager.save(1, model_state(1))
    manager.wait()
    size = manager.path_of(1).stat().st_size
    if failing == "pt":
        fill(small_disk, leave=size // 2)
    elif failing == "manifest":  # exactly the .pt's pages are free: its manifest finds none
        fill(small_disk, leave=-(-size // 4096) * 4096)
    else:
        fail_fsync_of(monkeypatch, {"pt fsync": lambda path: ".step_000000002.pt.tmp" in path,
                                    "manifest fsync": lambda path: ".step_000000002.json.tmp" in path,
                                    "directory fsync": lambda path: path.endswith("checkpoints")}[failing])
    with pytest.raises(OSError) as raised:
        if asynchronous:
            manager.save_async(2, model_state(2))
            manager.wait()
        else:
            manager.save(2, model_state(2))
    assert raised.value.filename == str(manager.path_of(2))
    manager.close()
    assert sorted(path.name for path in manager.directory.iterdir()) == ["step_000000001.json",
                                                                         "step_000000001.pt"]
    info = manager.newest_valid()
    assert info is not None and info.step == 1
    assert torch.equal(CheckpointManager.load(info)["model"]["weight"], model_state(1)["model"]["weight"])


@pytest.mark.parametrize("keep_size", [True, False])
def test_a_flush_whose_space_was_reserved_completes_on_a_disk_that_fills_meanwhile(
        small_disk: Path, monkeypatch: pytest.MonkeyPatch, keep_size: bool) -> None:
    """The reservation covers what a flush writes (new chunks, new datasets, HDF5's metadata): the disk is filled
    right after each reservation, and every flush still completes, over chunk boundaries and new columns; also
    where the file system cannot reserve without growing the file (keep_size False)."""
    if not keep_size:
        monkeypatch.setattr(metrics_module, "_fallocate", None)
    path = small_disk / "metrics.h5"
    writer = MetricsWriter(path, parameter_groups=["a", "b"], validation_sample_index=np.arange(100),
                           config_json="{}", task_name="toy", cursor=None)
    reserve = MetricsWriter._reserve

    def reserve_then_fill(self: MetricsWriter, needed: int) -> None:
        reserve(self, needed)
        fill(small_disk)

    monkeypatch.setattr(MetricsWriter, "_reserve", reserve_then_fill)
    rng = np.random.default_rng(0)
    step = 0
    for flush in range(12):
        for _ in range(int(rng.integers(1, 700))):
            step += 1
            writer.log_step(step=step, epoch=0, loss=float(step), grad_norm=1.0, samples_per_second=1.0,
                            nonfinite=False, learning_rates=[0.1, 0.2], loss_components={"a": 1.0},
                            extra={"time_step": 0.1, **({"late_column": 2.0} if flush > 4 else {})})
            writer.log_train_samples(step=step, index=np.arange(8), loss=np.ones(8))
        writer.log_validation(step=step, per_sample={"loss": rng.random(100),
                                                     **({"late_metric": rng.random(100)} if flush > 6 else {})})
        writer.flush()  # raises if a write failed
        (small_disk / "filler").unlink()
    writer.close()
    with h5py.File(path, "r") as file:
        assert file["train/step"][()].tolist() == list(range(1, step + 1))
        assert file["train/loss"][()].tolist() == [float(s) for s in range(1, step + 1)]
        assert len(file["validation/step"]) == 12 and len(file["train_samples/step"]) == 8 * step


def test_a_flush_on_a_full_disk_keeps_its_rows_and_the_file(small_disk: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A flush that cannot reserve its space writes nothing: the file keeps its rows, the rows stay buffered, the
    loop's flushes log it once, and once space is free the next flush writes them all."""
    path = small_disk / "metrics.h5"
    writer = MetricsWriter(path, parameter_groups=["a"], validation_sample_index=np.arange(10), config_json="{}",
                           task_name="toy", cursor=None)

    def log_steps(steps: range) -> None:
        for step in steps:
            writer.log_step(step=step, epoch=0, loss=float(step), grad_norm=1.0, samples_per_second=1.0,
                            nonfinite=False, learning_rates=[0.1])

    log_steps(range(1, 4))
    writer.flush()
    filler = fill(small_disk)
    log_steps(range(4, 20000))  # more than the space reserved before holds
    with caplog.at_level(logging.WARNING):
        assert not writer.try_flush() and not writer.try_flush()
        writer.flush_if_due()
    assert len(caplog.records) == 1 and "its rows from step 4 on are kept in memory" in caplog.text
    with pytest.raises(OSError) as raised:
        writer.flush()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    with open_for_reading(path) as file:
        assert file["train/step"][()].tolist() == [1, 2, 3]
    assert writer.cursor().train_rows == 19999
    filler.unlink()
    writer.flush()
    writer.close()
    with open_for_reading(path) as file:
        assert file["train/step"][()].tolist() == list(range(1, 20000))


def test_a_write_that_fails_inside_hdf5_writes_nothing_more_and_keeps_the_flushed_rows(
        small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the space could not be had ahead (the reservation is switched off here), HDF5 itself hits the full
    disk (the rows past 1024 need new chunks): the writer stops writing to the file, which keeps its rows, and
    the same file takes the resumed run's rows once space is free."""
    monkeypatch.setattr(metrics_module, "reserve_space", lambda fd, start, end: None)
    path = small_disk / "metrics.h5"

    def new_writer(cursor: MetricsCursor | None) -> MetricsWriter:
        return MetricsWriter(path, parameter_groups=["a"], validation_sample_index=np.arange(10), config_json="{}",
                             task_name="toy", cursor=cursor)

    def log_steps(writer: MetricsWriter, steps: range) -> None:
        for step in steps:
            writer.log_step(step=step, epoch=0, loss=float(step), grad_norm=1.0, samples_per_second=1.0,
                            nonfinite=False, learning_rates=[0.1], extra={"time_step": 0.5})

    writer = new_writer(None)
    log_steps(writer, range(1, 1001))
    writer.flush()
    filler = fill(small_disk)
    log_steps(writer, range(1001, 1101))
    with pytest.raises(OSError) as raised:
        writer.flush()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert not writer.try_flush()
    with pytest.raises(OSError):
        writer.flush()  # nothing more is written
    writer.close()  # no error: the run's end is still reported
    with open_for_reading(path) as file:
        assert file["train/step"][:1000].tolist() == list(range(1, 1001))
        assert file["train/time_step"][:1000].tolist() == [0.5] * 1000
    filler.unlink()
    writer = new_writer(MetricsCursor(train_rows=1000))  # the resumed run cuts the file back to its checkpoint
    log_steps(writer, range(1001, 1201))
    writer.close()
    with open_for_reading(path) as file:
        assert file["train/step"][()].tolist() == list(range(1, 1201))
        assert file["train/loss"][()].tolist() == [float(step) for step in range(1, 1201)]
