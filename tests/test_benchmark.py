"""The benchmark suite (benchmarks/bench.py) runs end to end on a small file and prints every comparison it
promises (the numbers themselves are measured on purpose-run machines and reported in docs/benchmarks.md, never
asserted)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO, tiny_overrides

RATIO = r"\s+(\d+\.\d+)x \((\d+\.\d+)-(\d+\.\d+)\)"


@pytest.mark.slow
def test_every_comparison_is_printed_with_a_ratio(tiny_data: Path) -> None:
    command = [PYTHON, str(REPO / "benchmarks" / "bench.py"), "all", *tiny_overrides(tiny_data), "--rounds", "2",
               "--batches", "3", "--workers", "0,1", "--steps", "5", "--tiny-steps", "6", "--checkpoint-mb", "2",
               "--profile-steps", "5"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("shuffle=samples, 0 workers", "shuffle=samples, 1 workers", "shuffle=blocks, 1 workers",
                  "step, DistopticaNet, raw loop batches in RAM", "step, DistopticaNet, raw loop reading the file",
                  "step, tiny model, raw loop reading the file", "step with the breakdown, DistopticaNet",
                  "step with the breakdown, tiny model", "checkpoint stall (synchronous), disk",
                  "checkpoint stall (asynchronous=true), disk", "checkpoint stall (synchronous), tmpfs",
                  "checkpoint stall (asynchronous=true), tmpfs",
                  "step with an EMA of the weights, DistopticaNet, vs without"):
        match = re.search(re.escape(label) + RATIO, out)
        assert match, f"no ratio line for {label!r} in:\n{out}"
        median, low, high = map(float, match.groups())
        assert 0 < low <= median <= high
    assert re.search(r"one torch.save \+ fsync on disk .*: \d+\.\d+-\d+\.\d+ ms over 2 rounds", out), out
    assert re.search(r"the EMA update alone: \d+\.\d+ us", out), out
    pairs = re.findall(r"taking turns step by step with the raw loop reading the file, (\d+) pairs: (\d+\.\d+)x", out)
    assert [int(count) for count, _ in pairs] == [2 * 5 - 3, 2 * 6 - 3]  # rounds x steps, less the warm-up steps
    assert all(float(ratio) > 0 for _, ratio in pairs)
    profiled = re.findall(r"^  (data\+bookkeeping|forward\+backward|optimizer|step) +(\d+\.\d+) ms +(\d+\.\d+) ms", out,
                          re.MULTILINE)
    assert [part for part, _, _ in profiled] == ["data+bookkeeping", "forward+backward", "optimizer", "step"], out
    assert all(float(ours) > 0 and float(theirs) > 0 for _, ours, theirs in profiled)
