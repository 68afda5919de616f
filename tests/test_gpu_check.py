"""benchmarks/gpu_check.sh: without a CUDA device it says so and exits 0 with "skipped"; its dry run on the CPU
(`--device cpu`, small) goes through every stage of the GPU check (training in each precision, SIGKILL + resume
bit for bit, the test phase, the speed comparisons) and writes its JSON, so the script is known to work before it
meets a GPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .conftest import PYTHON, REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_without_cuda_the_gpu_check_is_skipped(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={"PYTHON": PYTHON, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "gpu_check: skipped: no CUDA device visible" in result.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["status"] == "skipped"


@pytest.mark.slow  # seven runs of the launcher, the test phase and a prediction
def test_the_dry_run_on_cpu_passes_every_stage(tmp_path: Path, tiny_data: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cbed_32px_192.h5").symlink_to(tiny_data)  # the file the dry run would generate
    # from elsewhere than the checkout, as a user may run it
    result = subprocess.run([PYTHON, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out",
                             str(tmp_path), "--steps", "8", "--speed-rounds", "1", "--speed-steps", "5"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "passed" and report["failures"] == []
    assert set(report["runs"]) == {"fp32", "fp16", "bf16_compiled"}
    assert report["runs"]["fp16"]["refused_on_cpu"]
    assert report["runs"]["fp32"]["steps"] == report["runs"]["bf16_compiled"]["steps"] == 8
    assert report["resume"]["bit_exact"] and report["resume"]["killed_after_checkpoint"] >= 2
    assert report["test_phase"]["exit_code"] == 0
    assert report["step"]["pairs"] == 2 and report["step"]["ratio_of_medians"] > 0
    assert len(report["loader"]["loader_samples_per_second"]) == 1
    for line in ("taking turns with the raw loop, 2 pairs:", "loader (0 workers) / cpu consumption"):
        assert line in result.stdout, result.stdout
