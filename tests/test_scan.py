"""`python -m hpctrain.prepare --scan`: every row of every field read once, and what real data holds found and
named by file, field and row before a run is queued: a NaN, a damaged gzip chunk, ragged offsets that do not add
up."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from hpctrain.data.dataset import HDF5Dataset
from hpctrain.data.scan import Field, fields_of, scan

from . import zygote
from .conftest import PYTHON, REPO, expect_slow_test, tiny_overrides


def damaged_copy(tiny_data: Path, path: Path, *, nan_row: int, broken_row: int) -> Path:
    """The tiny data in gzip chunks of 8 images, one NaN pixel in `nan_row`, the chunk holding `broken_row`
    overwritten in the middle (its gzip stream no longer inflates)."""
    with h5py.File(tiny_data) as source, h5py.File(path, "w") as target:
        images = source["images"][()]
        images[nan_row].flat[5] = np.nan
        target.create_dataset("images", data=images, chunks=(8, *images.shape[1:]), compression="gzip")
        target["labels"] = source["labels"][()]
        info = target["images"].id.get_chunk_info_by_coord((broken_row // 8 * 8, 0, 0))
    with open(path, "r+b") as file:
        file.seek(info.byte_offset + info.size // 2)
        file.write(b"\xff" * 16)
    return path


def test_the_scan_finds_a_nan_and_a_damaged_chunk_by_file_field_and_row(tiny_data: Path, tmp_path: Path) -> None:
    path = damaged_copy(tiny_data, tmp_path / "damaged.h5", nan_row=100, broken_row=165)
    dataset = HDF5Dataset(path, {"image": "images", "labels": "labels"})
    problems = {problem.what: problem for problem in scan(fields_of([dataset]), workers=2, progress=False)}
    assert set(problems) == {"non-finite values", "undecodable chunk"}
    nan, chunk = problems["non-finite values"], problems["undecodable chunk"]
    assert (nan.path, nan.field, nan.rows, nan.count) == (path, "image", [100], 1)
    assert (chunk.path, chunk.field, chunk.count) == (path, "image", 8) and chunk.rows[0] == 160
    assert "rows 160-167" in str(chunk) and f"{path}: field 'image'" in str(chunk)


def test_the_scan_checks_ragged_offsets_and_names_samples(tmp_path: Path) -> None:
    path = tmp_path / "ragged.h5"
    with h5py.File(path, "w") as file:
        values = np.arange(12, dtype=np.float32)
        values[7] = np.inf
        file["values"], file["offsets"] = values, np.array([0, 3, 6, 9, 12])
        file["bad_values"], file["bad_offsets"] = values, np.array([0, 3, 2, 9, 11])
    problems = scan([Field(path, "good", "values", "offsets"), Field(path, "bad", "bad_values", "bad_offsets")],
                    workers=1, progress=False)
    found = {(problem.field, problem.what): problem for problem in problems}
    assert found[("good", "non-finite values")].rows == [2]  # value 7 is in sample 2 (offsets 6..9)
    offsets = found[("bad", "ragged offsets")]
    assert "offsets[1]=3 > offsets[2]=2" in offsets.detail and "offsets[-1]=11, but bad_values holds 12" in \
        offsets.detail


@pytest.mark.slow
def test_prepare_scan_reports_and_fails_before_anything_is_queued(tiny_data: Path, tmp_path: Path) -> None:
    expect_slow_test()
    path = damaged_copy(tiny_data, tmp_path / "damaged.h5", nan_row=100, broken_row=185)
    result = zygote.run([PYTHON, "-m", "hpctrain.prepare", "--scan", "--workers", "2",
                         *tiny_overrides(path)], cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("scan: ")]
    assert f"scan: {path}: field 'image': non-finite values in 1 row(s) (100)" in lines
    assert any(line.startswith(f"scan: {path}: field 'image': undecodable chunk in 8 row(s) (184") for line in lines)
    assert lines[-1] == "scan: 2 field(s) of 1 file(s) read: 2 problem(s)"
