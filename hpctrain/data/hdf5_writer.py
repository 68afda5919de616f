"""Write an HDF5 file of generated samples in parallel and atomically: what a task's data generator needs.

``write_in_chunks`` creates the file's layout, computes the samples chunk by chunk (in this process or a pool of
spawned processes, in order, so the contents never depend on the number of processes) and writes each chunk into
the layout's datasets. The file appears at its path only once complete and fsynced: an interrupted generation
(Ctrl-C included) leaves whatever was there before, or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

import h5py
import numpy as np
from tqdm import tqdm

# (start, stop) -> one array per dataset of the layout, each with stop - start rows.
ChunkFunction = Callable[[int, int], Sequence[np.ndarray]]


def _run_chunk(task: tuple[ChunkFunction, int, int]) -> Sequence[np.ndarray]:
    function, start, stop = task
    return function(start, stop)


def write_in_chunks(path: str | os.PathLike[str], *, num_samples: int, chunk_samples: int,
                    layout: Callable[[h5py.File], Sequence[h5py.Dataset]], chunk: ChunkFunction,
                    num_processes: int = 0, initializer: Optional[Callable[[], None]] = None,
                    in_process: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                    progress: bool = False, unit: str = "sample") -> Path:
    """Generate ``num_samples`` rows into the HDF5 file ``path`` and return its path.

    ``layout(file)`` creates the datasets (and attributes) and returns those the chunks fill, in the order of the
    arrays ``chunk(start, stop)`` returns. ``chunk`` runs in worker processes when ``num_processes`` is not 1 (0:
    every CPU), so it must be picklable (a module-level function or a ``functools.partial`` of one);
    ``initializer`` runs once in each worker, ``in_process`` is a context manager entered when generating here.
    """
    if num_processes < 0:
        raise ValueError(f"num_processes must be >= 0, got {num_processes}")
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be >= 1, got {chunk_samples}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = [(chunk, start, min(start + chunk_samples, num_samples)) for start in range(0, num_samples, chunk_samples)]
    num_processes = min(num_processes or os.cpu_count() or 1, max(1, len(tasks)))
    # Same directory, so os.replace is an atomic rename on the same file system.
    temporary_name = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with contextlib.ExitStack() as stack:
            file = stack.enter_context(h5py.File(temporary_name, "w-"))
            datasets = layout(file)
            if num_processes == 1:
                if in_process is not None:
                    stack.enter_context(in_process())
                chunks = map(_run_chunk, tasks)
            else:
                # spawn, not fork: forking a process that has initialised torch's thread pools can deadlock.
                pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(num_processes,
                                                                                     initializer=initializer))
                chunks = pool.imap(_run_chunk, tasks)
            progress_bar = stack.enter_context(tqdm(total=num_samples, desc=f"generating {path.name}", unit=unit,
                                                    disable=not progress))
            for (_, start, stop), arrays in zip(tasks, chunks):
                for dataset, array in zip(datasets, arrays, strict=True):
                    dataset[start:stop] = array
                progress_bar.update(stop - start)
        with open(temporary_name, "rb+") as written:
            os.fsync(written.fileno())  # the rename must not reach the disk before the data does
        os.replace(temporary_name, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise
    return path
