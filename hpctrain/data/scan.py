"""Scanning HDF5 data before a long run (`python -m hpctrain.prepare --scan`): every row of every field of every
file read once, in parallel, to find what the preflight's one batch cannot: non-finite values, chunks that do not
decode, and ragged offsets that do not add up, each named by file, field and row.

The preflight reads one micro-batch; a NaN in sample 3,000,017 or a damaged gzip chunk in the second of forty
files is found only when training reaches it. A scan costs one read of the data (the same bytes one epoch reads),
so it is the thing to run on new data, once, before it is queued.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

# Rows per task: about this many bytes, whole chunks where the data is chunked (a chunk is decoded once).
TASK_BYTES = 64 << 20
ROWS_NAMED = 5  # rows named per problem; the count says how many there are


@dataclass(frozen=True)
class Field:
    """One field of one file to scan: a dataset (rows along axis 0), ragged with its offsets."""

    path: Path
    name: str
    values: str
    offsets: str | None = None


@dataclass
class Problem:
    path: Path
    field: str
    what: str  # "non-finite values", "undecodable chunk", "ragged offsets"
    rows: list[int] = field(default_factory=list)  # the first few rows (samples; for values: values' rows)
    count: int = 0
    detail: str = ""

    def __str__(self) -> str:
        rows = ", ".join(map(str, self.rows)) + (", ..." if self.count > len(self.rows) else "")
        return (f"{self.path}: field {self.field!r}: {self.what} in {self.count} row(s) ({rows})"
                + (f": {self.detail}" if self.detail else ""))


def fields_of(datasets: Iterable[object]) -> list[Field]:
    """The HDF5 fields of every dataset that has them (hpctrain's HDF5Dataset: `paths` and `specs`); others
    are not scanned."""
    found: dict[tuple[Path, str], Field] = {}
    for dataset in datasets:
        for path in getattr(dataset, "paths", []):
            for spec in getattr(dataset, "specs", []):
                found.setdefault((Path(path), spec.values), Field(Path(path), spec.name, spec.values, spec.offsets))
    return list(found.values())


def tasks_of(item: Field) -> list[tuple[Field, int, int]]:
    """The field's rows in ranges of whole chunks, about TASK_BYTES each."""
    with h5py.File(item.path, "r") as file:
        dataset = file[item.values]
        rows = dataset.shape[0]
        row_bytes = max(1, dataset.dtype.itemsize * math.prod(dataset.shape[1:]))
        chunk_rows = dataset.chunks[0] if dataset.chunks else 1
    step = max(chunk_rows, (TASK_BYTES // row_bytes) // chunk_rows * chunk_rows)
    return [(item, start, min(rows, start + step)) for start in range(0, max(rows, 1), step)]


def scan_rows(item: Field, start: int, stop: int) -> tuple[list[Problem], int]:
    """Read rows [start, stop) one chunk band at a time; the problems found and the rows read."""
    problems: dict[str, Problem] = {}
    with h5py.File(item.path, "r") as file:
        dataset = file[item.values]
        band = dataset.chunks[0] if dataset.chunks else max(1, stop - start)
        for first in range(start, stop, band):
            last = min(stop, first + band)
            try:
                values = dataset[first:last]
            except (OSError, ValueError) as error:  # HDF5 could not read or decode the chunk(s) holding these rows
                problem = problems.setdefault("chunk", Problem(item.path, item.name, "undecodable chunk"))
                problem.count += last - first
                problem.rows.extend(range(first, min(last, first + ROWS_NAMED - len(problem.rows))))
                problem.detail = f"rows {first}-{last - 1}: {str(error).splitlines()[0]}"
                continue
            if values.dtype.kind == "f":
                flat = values.reshape(len(values), -1)
                bad = np.flatnonzero(~np.isfinite(flat).all(axis=1)) + first
                if len(bad):
                    problem = problems.setdefault("nonfinite", Problem(item.path, item.name, "non-finite values"))
                    problem.count += len(bad)
                    problem.rows.extend(int(row) for row in bad[:ROWS_NAMED - len(problem.rows)])
    return list(problems.values()), stop - start


def check_offsets(item: Field) -> list[Problem]:
    """A ragged field's offsets: n+1 of them, from 0, never decreasing, ending at the values' length."""
    if item.offsets is None:
        return []
    with h5py.File(item.path, "r") as file:
        offsets, length = file[item.offsets][()].astype(np.int64), file[item.values].shape[0]
    wrong = []
    if offsets[0] != 0:
        wrong.append((0, f"offsets[0]={offsets[0]}, not 0"))
    decreasing = np.flatnonzero(np.diff(offsets) < 0)
    wrong += [(int(i), f"offsets[{i}]={offsets[i]} > offsets[{i + 1}]={offsets[i + 1]}") for i in decreasing]
    if offsets[-1] != length:
        wrong.append((len(offsets) - 2, f"offsets[-1]={offsets[-1]}, but {item.values} holds {length} values"))
    if not wrong:
        return []
    return [Problem(item.path, item.name, "ragged offsets", [row for row, _ in wrong[:ROWS_NAMED]], len(wrong),
                    "; ".join(text for _, text in wrong[:ROWS_NAMED]))]


def scan(items: list[Field], *, workers: int | None = None, progress: bool = True) -> list[Problem]:
    """Scan every field in parallel (processes: decoding is CPU-bound), with a progress bar over rows."""
    from tqdm import tqdm

    problems = [problem for item in items for problem in check_offsets(item)]
    tasks = [task for item in items for task in tasks_of(item)]
    total = sum(stop - start for _, start, stop in tasks)
    workers = workers or min(len(tasks), max(1, (os.cpu_count() or 1)))
    with tqdm(total=total, unit="row", desc="scanning", disable=not progress) as bar, \
            ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(scan_rows, *task) for task in tasks]
        for future in as_completed(futures):
            found, rows = future.result()
            problems += found
            bar.update(rows)
    return [_as_samples(problem, items) for problem in _merged(problems)]


def _as_samples(problem: Problem, items: list[Field]) -> Problem:
    """A ragged field's rows are rows of its values: name the samples holding them instead."""
    item = next((i for i in items if i.path == problem.path and i.name == problem.field and i.offsets), None)
    if item is None or problem.what == "ragged offsets":
        return problem
    with h5py.File(item.path, "r") as file:
        offsets = file[item.offsets][()]
    samples = sorted({int(np.searchsorted(offsets, row, side="right")) - 1 for row in problem.rows})
    problem.rows, problem.detail = samples, (problem.detail + "; " if problem.detail else "") + "rows are samples"
    return problem


def _merged(problems: list[Problem]) -> list[Problem]:
    """One problem per (file, field, kind), its rows in order."""
    merged: dict[tuple[Path, str, str], Problem] = {}
    for problem in problems:
        key = (problem.path, problem.field, problem.what)
        if key not in merged:
            merged[key] = Problem(problem.path, problem.field, problem.what, detail=problem.detail)
        target = merged[key]
        target.count += problem.count
        target.rows = sorted(target.rows + problem.rows)[:ROWS_NAMED]
        target.detail = target.detail or problem.detail
    return sorted(merged.values(), key=lambda p: (str(p.path), p.field, p.what))
