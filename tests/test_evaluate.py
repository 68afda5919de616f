"""Evaluation and the task's plot hook: per-sample values for every validation sample, baselines, plots drawn in
the background on rank 0, a failing plot that does not stop training, statistics computed on the CPU."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from hpctrain.run.metrics import open_for_reading
from . import zygote

from .conftest import PYTHON, REPO, launch, tiny_overrides

# End-to-end runs of the launcher, each a few seconds: not in the quick loop (`-m "not slow and not slurm"`).
pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FailingPlot:
    """A plot hook that always raises (the run must go on)."""

    def __call__(self, evaluation, directory: Path) -> list[Path]:
        raise RuntimeError("this plot is broken")


class ProcessRecordingPlot:
    """Writes the id of the process that draws it; dies without a word (like a crash) the first time."""

    def __call__(self, evaluation, directory: Path) -> list[Path]:
        marker = directory.parent.parent / "plot_pids.txt"
        first = not marker.exists()
        with open(marker, "a") as file:
            file.write(f"{os.getpid()} {multiprocessing.current_process().name}\n")
        if first:
            os._exit(3)
        path = directory / "drawn.png"
        path.write_bytes(PNG_SIGNATURE)
        return [path]


def test_plots_are_drawn_in_a_process_of_their_own_which_may_die(tmp_path: Path, tiny_data: Path) -> None:
    result = launch(tiny_overrides(tiny_data, "task.plot._target_=tests.test_evaluate.ProcessRecordingPlot",
                                   "callbacks.metrics.task_plot_every_evaluations=1"), run_dir=tmp_path)
    output = result.stderr + result.stdout
    assert "task.plot failed at step 10 (training goes on): the plot process died (exit code 3)" in output
    drawn_by = [line.split() for line in (tmp_path / "plot_pids.txt").read_text().splitlines()]
    # evaluations at steps 10, 20 and 30 (the final one); 20 may be skipped while 10 is still being drawn
    assert len(drawn_by) in (2, 3)
    assert {name for _, name in drawn_by} == {"hpctrain-plots"}  # not the training process (MainProcess)
    assert drawn_by[0][0] != drawn_by[1][0] == drawn_by[-1][0]  # the dead process was replaced, once
    assert (tmp_path / "plots" / "final" / "drawn.png").exists()
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 30


def test_task_plots_are_valid_pngs_and_baselines_are_reported(tmp_path: Path, tiny_data: Path) -> None:
    launch(tiny_overrides(tiny_data, "task.plot._target_=hpctrain.tasks.cbed.CBEDPlots",
                          "callbacks.metrics.task_plot_every_evaluations=2", "callbacks.metrics.plots=true"),
           run_dir=tmp_path)
    plots = tmp_path / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["final", "step_000000020"]  # evaluations 2 and the last
    for directory in plots.iterdir():
        for name in ("parameters.png", "epe_histogram.png"):
            assert (directory / name).read_bytes().startswith(PNG_SIGNATURE)
    for name in ("loss.png", "metrics.png", "lr.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    summary = json.loads(zygote.run([PYTHON, "-m", "hpctrain.inspect", str(tmp_path), "--json"], cwd=REPO,
                                    check=True).stdout)
    best = summary["best_validation"]
    with open_for_reading(tmp_path / "metrics.h5") as file:
        row = int(np.argmin(file["validation/loss"][()]))
        epe = file["validation/per_sample/loss"][row].astype(np.float64)
        no_distortion = file["validation/per_sample/baseline_no_distortion"][row].astype(np.float64)
        assert file["validation/per_sample/predicted.distortion_center_x"].shape == (3, 38)
    assert abs(best["baseline_ratios"]["baseline_no_distortion"] - epe.mean() / no_distortion.mean()) < 1e-6


def test_a_failing_plot_is_logged_and_training_goes_on(tmp_path: Path, tiny_data: Path) -> None:
    result = launch(tiny_overrides(tiny_data, "task.plot._target_=tests.test_evaluate.FailingPlot",
                                   "callbacks.metrics.task_plot_every_evaluations=1"), run_dir=tmp_path)
    assert "task.plot failed at step 10 (training goes on): RuntimeError: this plot is broken" in result.stderr + \
        result.stdout
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 30


def test_statistics_on_the_cpu_equal_those_on_the_device(tmp_path: Path, tiny_data: Path) -> None:
    launch(tiny_overrides(tiny_data, "trainer.max_steps=10"), run_dir=tmp_path / "device")
    launch(tiny_overrides(tiny_data, "trainer.max_steps=10", "task.evaluate_on_cpu=true"), run_dir=tmp_path / "cpu")
    with open_for_reading(tmp_path / "device" / "metrics.h5") as device, \
            open_for_reading(tmp_path / "cpu" / "metrics.h5") as cpu:
        for name in ("loss", "abs_error.spiral_distortion_amplitude", "baseline_label_mean"):
            np.testing.assert_array_equal(cpu[f"validation/per_sample/{name}"][()],
                                          device[f"validation/per_sample/{name}"][()])
