"""The ready-to-run recipes in launch/ (run as a user would, so they never rot)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from . import zygote

from .conftest import PYTHON, REPO, expect_slow_test, final_weights, tiny_overrides

# End-to-end runs of the launcher, each a few seconds: not in the quick loop (`-m "not slow and not slurm"`).
pytestmark = pytest.mark.slow


def recipe(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    expect_slow_test()
    result = subprocess.run(["bash", str(REPO / "launch" / name), *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"launch/{name} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_debug_recipe(tmp_path: Path, tiny_data: Path) -> None:
    recipe("debug.sh", *tiny_overrides(tiny_data), f"hydra.run.dir={tmp_path}")
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 30
    assert final_weights(tmp_path)


def test_local_ddp_recipe(tmp_path: Path, tiny_data: Path) -> None:
    result = recipe("local_ddp.sh", *tiny_overrides(tiny_data), f"hydra.run.dir={tmp_path}")
    assert "2 ranks)" in result.stdout + result.stderr
    assert json.loads((tmp_path / "result.json").read_text())["finished"]


SMALL_JOB = ["launcher.cpus_per_task=1", "launcher.timeout_min=10"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_cluster_recipe(tmp_path: Path, tiny_data: Path) -> None:
    result = recipe("cluster.sh", *tiny_overrides(tiny_data, *SMALL_JOB, "launcher.wait=true"),
                    f"hydra.run.dir={tmp_path}")
    assert "submitted SLURM job" in result.stdout
    assert json.loads((tmp_path / "result.json").read_text())["finished"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_sweep_recipe(tmp_path: Path, tiny_data: Path) -> None:
    overrides = [o for o in tiny_overrides(tiny_data, *SMALL_JOB, "trainer.max_steps=6")
                 if not o.startswith("model.width=")]  # the recipe sweeps over model.width
    result = recipe("sweep.sh", *overrides, f"paths.runs_dir={tmp_path}")
    assert "with 4 of the sweep's 4 points" in result.stdout
    sweep_dir = tmp_path / "sweep_lr_width"
    deadline = time.monotonic() + 400
    rows: list = []
    while time.monotonic() < deadline:
        summary = zygote.run([PYTHON, "-m", "hpctrain.inspect", str(sweep_dir), "--json"], check=True)
        rows = json.loads(summary.stdout)
        if all(row["state"] == "FINISHED" for row in rows):
            break
        time.sleep(2)
    assert len(rows) == 4 and all(row["state"] == "FINISHED" and row["step"] == 6 for row in rows), rows
