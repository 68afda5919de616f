"""Real data with a NaN in it: the sample is found and named (index, file, row, field), left out of the
validation means, never the best evaluation; a run stopped by it ends cleanly with a checkpoint and a strict
result.json; every command still works on the run (docs/your-own-model.md, "When data is bad")."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain.components import build_components, build_trainer
from hpctrain.launching.job import summarize as summarize_run, write_result
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.checkpoint import CheckpointManager, choose_checkpoint
from hpctrain.run.metrics import finite_means, open_for_reading
from hpctrain.use.inspect import format_summary, strict_json, summarize

from .conftest import launch, tiny_overrides
from .test_config import compose_config

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def poisoned_copy(tiny_data: Path, directory: Path, row: int) -> Path:
    """The tiny data file with one NaN pixel in image `row`."""
    path = directory / "poisoned.h5"
    shutil.copy(tiny_data, path)
    with h5py.File(path, "r+") as file:
        image = file["images"][row]
        image.flat[7] = np.nan
        file["images"][row] = image
    return path


def trainer_for(data: Path, run_dir: Path, *overrides: str):
    config = compose_config(*tiny_overrides(data, "trainer.max_steps=12", "trainer.val_every_steps=4",
                                            *overrides))
    components = build_components(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    return config, components, build_trainer(config, run_dir, CPU, components)


def test_a_nan_validation_sample_is_named_left_out_and_never_best(tmp_path: Path, tiny_data: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    config = compose_config(*tiny_overrides(tiny_data))
    row = int(build_components(config).split.val_indices[3])
    data = poisoned_copy(tiny_data, tmp_path, row)
    run_dir = tmp_path / "run"
    config, _, trainer = trainer_for(data, run_dir, "callbacks.early_stopping.enabled=false")
    with caplog.at_level(logging.WARNING):
        state = trainer.fit()
    assert f"sample {row} ({data}, row {row}): non-finite image" in caplog.text
    assert "1 sample(s) with a non-finite loss or value, left out of the means" in caplog.text
    with open_for_reading(run_dir / "metrics.h5") as file:
        losses, counts = file["validation/loss"][()], file["validation/nonfinite_samples"][()]
        steps = file["validation/step"][()]
        per_sample = file["validation/per_sample/loss"][()]
        column = int(np.flatnonzero(file["validation/sample_index"][()] == row)[0])
    assert np.isfinite(losses).all() and (counts == 1).all() and np.isnan(per_sample[:, column]).all()
    # The stored mean is the mean of the other samples.
    others = np.delete(per_sample[-1], column).astype(np.float64)
    assert losses[-1] == others.mean()
    # The best evaluation (and so early stopping and the plateau schedulers) follows the finite means.
    assert state.best_step == steps[np.argmin(losses)] and state.best_value == losses.min()
    summary = summarize_run(state, run_dir, monitor="loss")
    json.dumps(summary, allow_nan=False)
    assert summary["best_step"] == state.best_step and not summary["failed"]
    shown = summarize(run_dir)
    assert shown["latest_validation"]["nonfinite_samples"] == 1
    assert "1 sample(s) with NaN/Inf left out of the means" in format_summary(shown)
    assert choose_checkpoint(run_dir, "best").step == state.best_step


class NaNInEvaluation:
    """The task's loss, NaN for every sample outside training: no evaluation has a finite mean."""

    def __init__(self, loss) -> None:
        self.loss = loss

    def __call__(self, outputs, batch):
        loss = self.loss(outputs, batch)
        return loss if torch.is_grad_enabled() else loss * float("nan")


def test_a_run_whose_evaluations_are_all_nan_has_no_best_and_stays_usable(tmp_path: Path,
                                                                          tiny_data: Path) -> None:
    config = compose_config(*tiny_overrides(tiny_data, "trainer.max_steps=8", "trainer.val_every_steps=4",
                                            "callbacks.early_stopping.enabled=false"))
    components = build_components(config)
    components.loss = NaNInEvaluation(components.loss)
    state = build_trainer(config, tmp_path, CPU, components).fit()
    assert state.finished and state.best_step == 0
    summary = summarize_run(state, tmp_path, monitor="loss")
    assert summary["best_step"] is None and summary["best_validation_loss"] is None
    write_result(tmp_path, summary)
    assert json.loads((tmp_path / "result.json").read_text())["best_step"] is None  # strict JSON: no NaN
    # `best` falls back to the newest intact checkpoint instead of a step that has none.
    assert choose_checkpoint(tmp_path, "best").step == 8
    shown = summarize(tmp_path)
    assert "best_validation" not in shown and "best: none" in format_summary(shown)
    json.dumps(strict_json(shown), allow_nan=False)  # what `inspect --json` prints


def test_a_nan_training_sample_under_stop_ends_cleanly_naming_it(tmp_path: Path, tiny_data: Path) -> None:
    config = compose_config(*tiny_overrides(tiny_data))
    row = int(build_components(config).split.train_indices[5])
    data = poisoned_copy(tiny_data, tmp_path, row)
    run_dir = tmp_path / "run"
    _, _, trainer = trainer_for(data, run_dir, "trainer.nonfinite=stop", "trainer.max_steps=40",
                                "callbacks.checkpoint.every_steps=100")
    state = trainer.fit()  # no exception: a clean stop
    assert state.finished and state.stop_reason.startswith("non-finite loss nan")
    assert f"sample {row} ({data}, row {row}): non-finite image" in state.stop_reason
    assert "trainer.nonfinite=stop" in state.stop_reason
    # A checkpoint of the stop, holding the last good weights (the failing update was not applied).
    newest = CheckpointManager(run_dir, keep_last=2).newest_valid()
    assert newest is not None and newest.step == state.step
    weights = CheckpointManager.load(newest)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())
    summary = summarize_run(state, run_dir, monitor="loss")
    assert summary["failed"] and summary["stop_reason"] == state.stop_reason
    json.dumps(summary, allow_nan=False)


def test_finite_means_leave_out_samples_whose_loss_or_value_is_not_finite() -> None:
    per_sample = {"loss": np.array([1.0, np.nan, 3.0, 5.0], dtype=np.float32),
                  "metric": np.array([2.0, 4.0, np.inf, 6.0], dtype=np.float32)}
    assert finite_means(per_sample) == {"loss": 3.0, "metric": 4.0}
    assert np.isnan(finite_means({"loss": np.array([np.nan, np.nan])})["loss"])


def damage_chunk(path: Path, *, row: int) -> None:
    """Overwrite bytes in the middle of the gzip chunk of "images" that holds `row`: HDF5 cannot decode it."""
    with h5py.File(path, "r+") as file:
        info = file["images"].id.get_chunk_info_by_coord((row, 0, 0))
    with open(path, "r+b") as file:
        file.seek(info.byte_offset + info.size // 2)
        file.write(b"\xff" * 16)


def gzip_copy(tiny_data: Path, path: Path) -> Path:
    """The tiny data with its images in gzip chunks of 8."""
    with h5py.File(tiny_data) as source, h5py.File(path, "w") as target:
        images = source["images"][()]
        target.create_dataset("images", data=images, chunks=(8, *images.shape[1:]), compression="gzip")
        target["labels"] = source["labels"][()]
    return path


@pytest.mark.slow
def test_an_unreadable_chunk_on_one_of_two_ranks_stops_every_rank_at_the_same_step(tmp_path: Path,
                                                                                  tiny_data: Path) -> None:
    """launcher.num_processes=2, a damaged chunk only one rank reads: the other rank does not wait for it in the
    step's collectives. Every rank stops before that step, the launcher reports one line and exits 1 (no
    'local ranks failed'), a checkpoint is there; repaired, the same command ends bit for bit as an undamaged
    2-rank run."""
    good = gzip_copy(tiny_data, tmp_path / "good.h5")
    data = gzip_copy(tiny_data, tmp_path / "data.h5")
    args = ["trainer.max_steps=24", "trainer.val_every_steps=12", "callbacks.checkpoint.every_steps=100",
            "launcher.num_processes=2"]
    launch(tiny_overrides(good, *args), run_dir=tmp_path / "reference")
    damage_chunk(data, row=96)  # rows 96-103: read within the first epoch
    run_dir = tmp_path / "run"
    failed = launch(tiny_overrides(data, *args), run_dir=run_dir, check=False, timeout=180)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "local ranks failed" not in output, output[-3000:]
    reason = json.loads((run_dir / "result.json").read_text())["stop_reason"]
    assert reason.startswith("unreadable data before step") and str(data) in reason
    assert f"hpctrain: error: {reason}" in output
    stopped_at = int(reason.split("before step ")[1].split(":")[0]) - 1
    newest = CheckpointManager(run_dir, keep_last=2).newest_valid()
    assert newest is not None and newest.step == stopped_at < 24
    shutil.copy(good, data)  # repaired
    launch(tiny_overrides(data, *args), run_dir=run_dir)
    expected = CheckpointManager.load(CheckpointManager(tmp_path / "reference", keep_last=2).newest_valid())
    found = CheckpointManager.load(CheckpointManager(run_dir, keep_last=2).newest_valid())
    assert found["step"] == expected["step"] == 24
    assert all(torch.equal(found["model"][name], value) for name, value in expected["model"].items())


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_chunk_mid_run_stops_cleanly_and_resumes_bit_exactly(tmp_path: Path, tiny_data: Path,
                                                                          workers: int) -> None:
    """A damaged gzip chunk that the preflight's one batch does not touch: the run stops before the step that
    needs it, with one line naming the file, a checkpoint where it stopped and result.json's reason; once the file
    is repaired, the same run resumes and ends bit for bit where an undamaged run ends."""
    good = gzip_copy(tiny_data, tmp_path / "good.h5")
    data = gzip_copy(tiny_data, tmp_path / "data.h5")
    overrides = ("trainer.max_steps=24", f"data.num_workers={workers}", "data.persistent_workers=false",
                 "callbacks.checkpoint.every_steps=100")
    _, _, reference = trainer_for(good, tmp_path / "reference", *overrides)
    reference.fit()
    expected = CheckpointManager.load(reference.checkpoints.newest_valid())["model"]
    damage_chunk(data, row=96)  # rows 96-103: read within the first epoch
    run_dir = tmp_path / "run"
    _, _, trainer = trainer_for(data, run_dir, *overrides)
    state = trainer.fit()
    assert state.failed and state.stop_reason.startswith("unreadable data before step")
    assert str(data) in state.stop_reason and "\n" not in state.stop_reason
    newest = CheckpointManager(run_dir, keep_last=2).newest_valid()
    assert newest is not None and newest.step == state.step < 24
    summary = summarize_run(state, run_dir, monitor="loss")
    assert summary["failed"] and json.dumps(summary, allow_nan=False)
    shutil.copy(good, data)  # repaired
    _, _, resumed = trainer_for(data, run_dir, *overrides)
    assert resumed.fit().step == 24
    weights = CheckpointManager.load(resumed.checkpoints.newest_valid())["model"]
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


class _Clock:
    def data_started(self) -> None: ...

    def data_done(self) -> None: ...


def test_stand_ins_of_an_unreadable_step_and_the_rng_rewound_to_its_start() -> None:
    """MicrobatchReader on a rank of two: stand-ins from its last micro-batch (the first validation batch at a
    process's first step), sizes of zero, and torch's generator put back to the step's start by `rewind` (the
    forward pass every rank ran may have drawn from it: dropout)."""
    from hpctrain.data.dataset import DataReadError
    from hpctrain.run.faults import MicrobatchReader

    two = DistributedContext(rank=1, world_size=2, local_rank=1, local_world_size=2, device=torch.device("cpu"))

    def batches(good: int):
        for index in range(good):
            yield {"index": torch.tensor([index])}
        raise DataReadError("reading train samples [7]... failed: f.h5:/x: chunk 0 (rows 0-7) cannot be read")

    validation = [{"index": torch.tensor([100])}]
    first = MicrobatchReader(_Clock(), validation, two)
    microbatches, sizes, error = first(batches(0), [4, 4])
    assert error is not None and sizes == [0, 0] and [b["index"].item() for b in microbatches] == [100, 100]

    reader = MicrobatchReader(_Clock(), validation, two)
    stream = batches(1)
    microbatches, sizes, error = reader(stream, [4])
    assert error is None and sizes == [4] and microbatches[0]["index"].item() == 0
    torch.manual_seed(5)
    microbatches, sizes, error = reader(stream, [4])
    assert error is not None and sizes == [0] and microbatches[0]["index"].item() == 0
    expected = torch.rand(3)  # what the step's start would draw
    torch.rand(10)  # the stand-in step's forward draws
    reader.rewind()
    assert torch.equal(torch.rand(3), expected)
    one = MicrobatchReader(_Clock(), validation, CPU)  # one rank: no step to join, no stand-ins
    assert one(batches(0), [4])[:2] == ([], [])
