"""Fast random-access reads of rows (axis 0) of one HDF5 dataset: `RowReader` (of several at once: `read_together`).

This module owns *how bytes of one dataset get from the file into a numpy array*; it knows nothing about
samples, fields or training (the named-field dataset calls it). It imports only numpy, h5py and the standard
library.

Modes, chosen once per dataset (``reader.mode``, with the why in ``reader.reason``, logged once at
DEBUG level, "h5py" at WARNING):

* ``"memmap"``: uncompressed data, contiguous or chunked with chunks that hold whole rows. Every chunk is
  located once (``chunk_iter`` / ``get_chunk_info``; HDF5 addresses are absolute file offsets, a user block
  included) into a per-chunk table of file offsets, and a batch is one vectorised numpy gather from a read-only
  ``mmap`` of the file (a "sliding window" view whose element k is the ``row_bytes`` bytes at file offset k).
  Chunks never written read as the dataset's fill value. About the speed of a gather from RAM once pages are
  cached.
* ``"chunks"``: filtered (gzip, lzf, shuffle, ...) chunked data, or uncompressed chunks that split rows. A read
  finds the distinct row bands of chunks it needs and has HDF5 read and decode each band whole, once; decoded
  bands are kept in an LRU cache bounded by ``chunk_cache_bytes`` (0 disables it). HDF5 does all decoding (its
  filters, each chunk's filter mask, unwritten chunks); its own raw-data chunk cache is off on the reader's handle,
  since the LRU already holds what it would. Why an LRU of our own and not HDF5's chunk cache: with the chunks
  cached, a random batch of 32 demo images came 2.1-2.4x faster from the LRU (a row copy) than through HDF5's
  cache (an H5Dread per row) in the training process; decoding in Python (zlib, unshuffle) ran at 0.8-1.1 of
  HDF5's speed, so HDF5 decodes (docs/benchmarks.md, "Compressed HDF5 reads").
* ``"h5py"``: everything else (variable-length, string or object dtypes, types h5py converts, compact, virtual
  or external storage, in-memory or multi-file drivers, a file this process has open for writing, SWMR):
  one sorted, de-duplicated h5py read per call, then a gather.

Files on network file systems (Lustre, GPFS, NFS): nothing assumes the file is local. memmap reads go through
the kernel page cache like ``read()`` does: the first touch of a page pays the file-system read (a round trip
per page-fault read-ahead window on Lustre/NFS), later touches are memory-speed while the pages stay cached;
the cache is per node and shared by all processes reading the file, and the kernel may evict it under memory
pressure. Mapping a file takes address space, not memory. "chunks" mode reads whole chunks through HDF5, so it
benefits from the same page cache for the compressed bytes and from its own cache for decoded ones.

The file may change under a reader (a writer appends, rewrites, or replaces it). Before and after every call
the reader compares ``os.stat`` of the path (device, inode, size, mtime and ctime in ns) with what it saw when
it located the data (a check after one read that found the file unchanged counts as the check before the next
read of that file, by any reader of this process, if it starts within 1 ms; ``read_together`` reads several
datasets with one check of their file before and one after all of them: the fields of a batch take one stat
per file); on a change it closes everything, re-opens the file and locates the data again (logged at
INFO; a new mode at WARNING) and repeats the read, so results are never stale or mixed. Limits: a change that
keeps size and both timestamps within the file system's timestamp granularity (a few ms on ext4) is
invisible, and a file truncated *while* a read touches its pages raises SIGBUS (an mmap property): replace
files by writing a new one and renaming it over the old (the reader keeps the old inode mapped and then
switches), not by re-creating them in place. ``revalidate_interval_s`` > 0 trades this for fewer stats (one
``stat`` is an MDS round trip on Lustre) by checking at most that often, and ``math.inf`` checks only when the
reader opens (in each process; hpctrain.data.HDF5Dataset does this: checks around every batch made its demo
batch reads 1.06-1.18x slower). The reader does not read through the
caller's ``h5py.File``: HDF5 shares one metadata cache between all handles of a file in a process (another
process's appends stay invisible to them), so it locates data through its own handle on h5py's file-object
driver, which HDF5 never shares. Exceptions ("h5py" mode through the caller's handle, without checks or
caching): a file this process has open for writing (only that handle sees unflushed data), SWMR, and files
that are not one file on disk.

Processes: a reader can be created in a parent and used in a forked DataLoader worker (on first use in a new
process id it drops inherited h5py handles and re-opens by (file path, dataset name); the mmap stays valid
across fork) or pickled to a spawned one (``__getstate__`` keeps the path, dataset name, options and the
located chunk table, never handles or cached data; the new process re-checks the file before trusting them).
Calls are serialised by a lock per reader (``read_together`` holds those of all its readers), so threads may
share readers.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Sequence, TypeVar

import h5py
import numpy as np
from h5py import h5d, h5t

log = logging.getLogger(__name__)

MODES = ("memmap", "chunks", "h5py")
# A chunk row band (rows [k*chunk_rows, (k+1)*chunk_rows) over all chunks they touch) is the unit "chunks" mode
# reads; bigger bands would make one random row cost a huge read, so such datasets go to "h5py" mode.
MAX_BAND_BYTES = 256 << 20
# How often a read is retried when the file changes while it runs, before giving up with an error.
_MAX_ATTEMPTS = 3
_MEMMAP_DRIVERS = (None, "sec2", "stdio", "direct")
# Datasets with up to this many rows get a per-row file-offset table (8 bytes a row) in memmap mode; longer
# ones compute offsets from the per-chunk table on each read.
_ROW_TABLE_MAX_ROWS = 1 << 21

_T = TypeVar("_T")
_Signature = tuple[int, int, int, int, int]

# The check after one read serves as the check before the next read of the same file that starts within this
# time (batches are read back to back): one stat() per read instead of two (read_together: per file and batch).
# Per process: path -> the signature a check found unchanged, and when.
_SHARED_CHECK_S = 1e-3
_seen_unchanged: dict[str, tuple[_Signature, float]] = {}


def _file_signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Layout:
    """Where one dataset's rows are, as found by one look at the file (`signature`)."""

    mode: str
    reason: str
    shape: tuple[int, ...]
    dtype: np.dtype
    signature: _Signature | None
    # Rows are grouped in bands of `chunk_rows` (contiguous storage: one band holding all rows).
    chunk_rows: int = 1
    # memmap: file byte offset of each band, -1 where never written (rows read as `fill_row`).
    chunk_offsets: np.ndarray | None = None
    fill_row: np.ndarray | None = None

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.row_shape)


def _plain_numpy_type(ds: h5py.Dataset) -> str | None:
    """Why the on-disk bytes are not exactly the numpy array h5py would return, or None if they are."""
    dtype = ds.dtype
    if dtype.hasobject or h5py.check_vlen_dtype(dtype) is not None or dtype.kind in "OSUT":
        return f"dtype {dtype} is a string, variable-length or object type"
    if dtype.subdtype is not None:
        return f"dtype {dtype} is an HDF5 array type"
    file_type = ds.id.get_type()
    try:
        memory_type = h5t.py_create(dtype)
    except (TypeError, ValueError) as error:
        return f"dtype {dtype} has no plain HDF5 equivalent ({error})"
    if type(file_type) is not type(memory_type) or not file_type.equal(memory_type):
        return f"the on-disk type differs from numpy dtype {dtype}, so h5py converts it"
    return None


def _fill_row(ds: h5py.Dataset, row_shape: tuple[int, ...]) -> np.ndarray | str:
    """The row unwritten storage reads as, or why it is undefined."""
    dcpl = ds.id.get_create_plist()
    if dcpl.fill_value_defined() == h5d.FILL_VALUE_UNDEFINED or dcpl.get_fill_time() == h5d.FILL_TIME_NEVER:
        return "unwritten storage has no defined fill value"
    fill = np.zeros((), dtype=ds.dtype)
    dcpl.get_fill_value(fill)
    return np.ascontiguousarray(np.broadcast_to(fill, row_shape))


def _locate(ds: h5py.Dataset, signature: _Signature, file_size: int) -> _Layout:
    """Choose the mode for `ds` and, where rows come from the mapped file, locate its chunks. Reads no raw data."""
    shape, dtype = tuple(ds.shape), ds.dtype
    base = dict(shape=shape, dtype=dtype, signature=signature)
    row_shape = shape[1:]
    row_bytes = dtype.itemsize * math.prod(row_shape)
    why_not_plain = _plain_numpy_type(ds)
    if why_not_plain:
        return _Layout("h5py", why_not_plain, **base)
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5d.COMPACT:
        return _Layout("h5py", "compact layout (data stored in the object header)", **base)
    if layout == h5d.VIRTUAL:
        return _Layout("h5py", "virtual dataset (rows live in other datasets)", **base)
    if dcpl.get_external_count() > 0:
        return _Layout("h5py", "external storage (rows live in other files)", **base)
    if row_bytes == 0:
        return _Layout("h5py", "rows hold no bytes", **base)

    if layout == h5d.CONTIGUOUS:
        result = _contiguous_layout(ds, row_bytes, file_size, base)
    elif tuple(ds.chunks[1:]) != row_shape or dcpl.get_nfilters():
        return _filtered_layout(ds, dcpl, row_bytes, base)
    else:
        result = _whole_row_chunks_layout(ds, row_bytes, file_size, base)
    if result.mode == "h5py":
        return result
    assert result.chunk_offsets is not None
    if (result.chunk_offsets < 0).any():
        fill = _fill_row(ds, row_shape)
        if isinstance(fill, str):
            return _Layout("h5py", f"some chunks were never written and {fill}", **base)
        result.fill_row = fill
    return result


def _contiguous_layout(ds: h5py.Dataset, row_bytes: int, file_size: int, base: dict[str, Any]) -> _Layout:
    offset, n = ds.id.get_offset(), ds.shape[0]
    table = np.array([-1 if offset is None else offset], dtype=np.int64)
    if offset is not None and offset + n * row_bytes > file_size:
        return _Layout("h5py", f"contiguous storage ends past the end of the file ({file_size} bytes)", **base)
    where = "never written (reads as the fill value)" if offset is None else f"at byte {offset}"
    return _Layout("memmap", f"uncompressed contiguous dataset {where}", chunk_rows=max(n, 1), chunk_offsets=table,
                   **base)


def _filtered_layout(ds: h5py.Dataset, dcpl: Any, row_bytes: int, base: dict[str, Any]) -> _Layout:
    """Compressed/filtered chunks, or chunks that do not hold whole rows: read through HDF5 in bands of chunks."""
    chunks, row_shape = ds.chunks, tuple(ds.shape[1:])
    chunk_rows = chunks[0]
    names = [dcpl.get_filter(i)[3].decode(errors="replace") for i in range(dcpl.get_nfilters())]
    why = (f"compressed/filtered chunks ({', '.join(names)})" if names else
           f"uncompressed chunks {chunks} that do not hold whole rows of shape {row_shape}")
    band_bytes = chunk_rows * row_bytes
    if band_bytes > MAX_BAND_BYTES:
        return _Layout("h5py", f"{why}; a band of chunks holding {chunk_rows} rows is {band_bytes} bytes, "
                               f"over {MAX_BAND_BYTES}", **base)
    return _Layout("chunks", f"{why}: each needed band of chunks is read and decoded by HDF5 once per read, "
                             f"decoded bands are cached", chunk_rows=chunk_rows, **base)


def _whole_row_chunks_layout(ds: h5py.Dataset, row_bytes: int, file_size: int, base: dict[str, Any]) -> _Layout:
    """Uncompressed chunks of whole rows: each located in the file, to be read from the mapped file."""
    chunk_rows = ds.chunks[0]
    table = _chunk_table(ds, chunk_rows, file_size)
    chunk_bytes = chunk_rows * row_bytes  # edge chunks are stored full-size too
    if not isinstance(table, str):
        odd = np.flatnonzero((table[0] >= 0) & ((table[1] != chunk_bytes) | (table[2] != 0)))
        if odd.size:
            k = int(odd[0])
            table = f"chunk {k} has {table[1][k]} bytes, filter mask {table[2][k]} (expected {chunk_bytes})"
    if isinstance(table, str):
        return _Layout("h5py", f"unexpected chunk storage: {table}", **base)
    written = int((table[0] >= 0).sum())
    reason = (f"uncompressed chunked dataset: {written} of {table[0].size} chunks of {chunk_rows} rows "
              f"located" + ("" if written == table[0].size else "; the others read as the fill value"))
    return _Layout("memmap", reason, chunk_rows=chunk_rows, chunk_offsets=table[0], **base)


def _chunk_table(ds: h5py.Dataset, chunk_rows: int,
                 file_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """For uncompressed chunks holding whole rows: file offset (-1: never written), stored size and filter mask of
    each chunk along axis 0, or why they cannot be used."""
    num_chunks = -(-ds.shape[0] // chunk_rows)
    offsets = np.full(num_chunks, -1, dtype=np.int64)
    sizes = np.zeros(num_chunks, dtype=np.int64)
    masks = np.zeros(num_chunks, dtype=np.int64)
    problems: list[str] = []

    def visit(info: Any) -> None:
        k = info.chunk_offset[0] // chunk_rows
        if k >= num_chunks:  # left over from a larger extent; HDF5 never reads it
            return
        if info.byte_offset + info.size > file_size:
            problems.append(f"chunk {info.chunk_offset} ends past the end of the file ({file_size} bytes)")
        offsets[k], sizes[k], masks[k] = info.byte_offset, info.size, info.filter_mask

    if hasattr(ds.id, "chunk_iter"):
        ds.id.chunk_iter(visit)  # one pass over the chunk index (get_chunk_info(i) is O(i) each)
    else:
        for i in range(ds.id.get_num_chunks()):
            visit(ds.id.get_chunk_info(i))
    return problems[0] if problems else (offsets, sizes, masks)


def _close_handle(h5file: h5py.File, fileobj: BinaryIO) -> None:
    """Close an h5py file opened on a Python file object, then the object. Run by a weakref.finalize, so also at
    interpreter exit: HDF5 would otherwise close the file from its C exit handler, after Python is gone, and
    h5py's file-object driver would call into Python there (a segfault)."""
    try:
        h5file.close()
    except Exception:  # an already broken handle must not mask the problem being handled
        pass
    fileobj.close()


def read_together(readers: Sequence[RowReader], indices: Any) -> list[np.ndarray]:
    """``[reader.read(indices) for reader in readers]``, with each file checked for changes once before and once
    after all the reads instead of around each: for the fields of a batch, which are datasets of one file."""
    index = np.asarray(indices)
    if index.dtype.kind not in "iu":
        if index.size:
            raise TypeError(f"RowReader.read needs integer indices, got dtype {index.dtype}")
        index = index.astype(np.int64)
    return _run_together(readers, lambda reader, layout: reader._read_index(layout, index))


def _run_together(readers: Sequence[RowReader], op: Callable[[RowReader, _Layout], _T]) -> list[_T]:
    """`op(reader, layout)` for each reader, against layouts their files still match before and after all the
    calls (else located again and repeated). Holds every reader's lock meanwhile (taken in one global order)."""
    pid = os.getpid()
    for reader in readers:
        if reader._pid != pid:
            reader._enter_process()
    taken = []
    try:
        for lock in [reader._lock for reader in (sorted(readers, key=id) if len(readers) > 1 else readers)]:
            lock.acquire()
            taken.append(lock)
        for _ in range(_MAX_ATTEMPTS):
            layouts = [reader._checked_layout() for reader in readers]
            try:
                results = [op(reader, layout) for reader, layout in zip(readers, layouts)]
            except (OSError, IndexError):
                # A chunk that does not decode may just have been rewritten, an index past the end may be in rows
                # just appended (the check before this read may have been another read's): retry if the file
                # changed.
                if all(layout.signature is None or _file_signature(os.stat(reader.path)) == layout.signature
                       for reader, layout in zip(readers, layouts)):
                    raise
                for reader in readers:
                    reader._last_check = -math.inf  # re-locate now, whatever revalidate_interval_s says
                continue
            if not _changed_after(readers, layouts):
                return results
        names = ", ".join(sorted({f"{reader.path}:{reader.name}" for reader in readers}))
        raise OSError(f"{names}: the file kept changing during reads; no consistent result")
    finally:
        for lock in reversed(taken):
            lock.release()


def _changed_after(readers: Sequence[RowReader], layouts: list[_Layout]) -> bool:
    """The checks after reads: one per file (and check interval), as the reads of one file all ended before it."""
    checked: dict[tuple[_Signature | None, float], bool] = {}
    for reader, layout in zip(readers, layouts):
        key = (layout.signature, reader.revalidate_interval_s)
        changed = checked.get(key)
        if changed is None:
            changed = checked[key] = reader._file_changed(layout, after=True)
        if changed:
            return True
    return False


class RowReader:
    """Reads rows (along axis 0) of one HDF5 dataset at arbitrary indices, fast.

    ``read(indices)`` equals ``dataset[()][indices]`` (any integer array: unsorted, duplicated, negative,
    multi-dimensional, empty), ``read_range(start, stop)`` equals ``dataset[start:stop]``, ``read_ranges``
    concatenates ``dataset[starts[k]:stops[k]]``. Results are new, writable arrays of ``dtype``. See the module
    docstring for modes, file changes and processes.

    ``chunk_cache_bytes`` bounds the decoded-chunk cache of "chunks" mode per process (each DataLoader worker
    has its own). ``revalidate_interval_s`` (default 0: before and after every call) is the least time between
    two checks of the file for changes. ``stats`` counts chunk reads, cache hits and re-locations.
    """

    def __init__(self, dataset: h5py.Dataset, *, chunk_cache_bytes: int = 64 << 20,
                 revalidate_interval_s: float = 0.0) -> None:
        if not isinstance(dataset, h5py.Dataset):
            raise TypeError(f"RowReader needs an h5py.Dataset, got {type(dataset).__name__}")
        if dataset.shape is None or dataset.ndim == 0:
            raise ValueError(f"RowReader needs a dataset with rows, {dataset.name} has shape {dataset.shape}")
        if chunk_cache_bytes < 0 or revalidate_interval_s < 0:
            raise ValueError("chunk_cache_bytes and revalidate_interval_s must be >= 0")
        file = dataset.file
        self.path: str = os.path.abspath(file.filename)
        self.name: str = dataset.name or ""
        self.chunk_cache_bytes = chunk_cache_bytes
        self.revalidate_interval_s = revalidate_interval_s
        # Counters for monitoring and tests: chunk band reads, chunk-cache hits, re-locations after file changes.
        self.stats: dict[str, int] = {"chunk_reads": 0, "cache_hits": 0, "relocations": 0}
        self._init_process_state()
        self._layout: _Layout | None = None
        self._caller_dataset: h5py.Dataset | None = None

        why_caller = self._needs_caller_handle(dataset)
        if why_caller is None:
            try:
                self._setup()
            except (OSError, KeyError) as error:
                why_caller = f"the file could not be opened independently ({error})"
        if why_caller is not None:
            # Only this handle sees the data as the caller does; reads go through it, with no checks or caching.
            self._caller_dataset = dataset
            self._layout = _Layout("h5py", why_caller, tuple(dataset.shape), dataset.dtype, None)
        self._log_mode()

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._current_layout().mode

    @property
    def reason(self) -> str:
        return self._current_layout().reason

    @property
    def shape(self) -> tuple[int, ...]:
        return self._current_layout().shape

    @property
    def dtype(self) -> np.dtype:
        return self._current_layout().dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        layout = self._layout
        what = f"mode={layout.mode!r}, shape={layout.shape}, dtype={layout.dtype}" if layout else "not open"
        return f"RowReader({self.path}:{self.name}, {what})"

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices`, shaped ``indices.shape + row_shape``; out of range -> IndexError naming the data."""
        return read_together((self,), indices)[0]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """``dataset[start:stop]``, with Python slice semantics (negative values count from the end, clipped)."""
        def op(_reader: RowReader, layout: _Layout) -> np.ndarray:
            lo, hi, _ = slice(start, stop).indices(layout.shape[0])
            hi = max(lo, hi)
            return self._spans(layout, np.array([lo], np.int64), np.array([hi], np.int64))

        return _run_together((self,), op)[0]

    def read_ranges(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Concatenation of ``dataset[starts[k]:stops[k]]`` (ragged data: a flat values dataset plus offsets).

        Needs 0 <= starts[k] <= stops[k] <= len; a violation is an IndexError naming the dataset.
        """
        lo, hi = np.asarray(starts).reshape(-1), np.asarray(stops).reshape(-1)
        if any(bound.size and bound.dtype.kind not in "iu" for bound in (lo, hi)):
            raise TypeError(f"RowReader.read_ranges needs integer bounds, got {lo.dtype} and {hi.dtype}")
        lo, hi = lo.astype(np.int64, copy=False), hi.astype(np.int64, copy=False)
        if lo.shape != hi.shape:
            raise ValueError(f"read_ranges: {lo.size} starts but {hi.size} stops")

        def op(_reader: RowReader, layout: _Layout) -> np.ndarray:
            n = layout.shape[0]
            if lo.size and (lo.min() < 0 or hi.max() > n or (hi < lo).any()):
                k = int(np.flatnonzero((lo < 0) | (hi < lo) | (hi > n))[0])
                raise IndexError(f"range [{lo[k]}, {hi[k]}) is not within the {layout.shape[0]} rows of "
                                 f"{self.path}:{self.name}")
            return self._spans(layout, lo, hi)

        return _run_together((self,), op)[0]

    def close(self) -> None:
        """Drop the mmap, handles and cached chunks; a later call re-opens what it needs."""
        self._enter_process()
        with self._lock:
            self._release()

    # -- pickling and processes -------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self._caller_dataset is not None and not os.path.isfile(self.path):
            raise TypeError(f"cannot pickle a RowReader of {self.path}:{self.name}: it is not a file on disk")
        state = {key: self.__dict__[key] for key in
                 ("path", "name", "chunk_cache_bytes", "revalidate_interval_s", "stats")}
        # A layout found through the caller's handle is re-done from the file in the new process.
        state["_layout"] = None if self._caller_dataset is not None else self._layout
        state["_logged"] = self._logged
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        logged = state.pop("_logged")
        self.__dict__.update(state)
        self._caller_dataset = None
        self._init_process_state()
        self._pid = -1  # re-checked (file signature) on first use
        self._logged = logged

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._mm: mmap.mmap | None = None
        self._rows: np.ndarray | None = None
        self._bytes: np.ndarray | None = None
        self._row_offsets: np.ndarray | None = None
        # Closes this process's own h5py handle and its file object (see _close_handle).
        self._close_handle: weakref.finalize | None = None
        self._dataset: h5py.Dataset | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._last_check = 0.0
        self._logged: tuple[str, str] | None = getattr(self, "_logged", None)

    def _enter_process(self) -> None:
        """First use in a new process (fork or unpickle): forget inherited h5py handles and locks, which must
        not be used here; a memmap mapping stays valid across fork and is kept."""
        if self._pid == os.getpid():
            return
        if self._close_handle is not None:
            self._close_handle()  # read-only handle: closing the inherited copy writes nothing
        mapping = (self._mm, self._rows, self._bytes, self._row_offsets)
        self._init_process_state()
        self._mm, self._rows, self._bytes, self._row_offsets = mapping
        self._last_check = -math.inf
        if self._caller_dataset is not None:
            self._caller_dataset = None  # the parent's handle (possibly writable) must not be used here
            self._layout = None

    # -- opening, checking, re-locating -----------------------------------------------------------------------

    @staticmethod
    def _needs_caller_handle(dataset: h5py.Dataset) -> str | None:
        file = dataset.file
        if not dataset.name:
            return "anonymous dataset (no name to re-open it by)"
        if file.driver not in _MEMMAP_DRIVERS or not os.path.isfile(file.filename):
            return f"file driver {file.driver!r}: the data is not one file on disk at HDF5's addresses"
        if file.mode != "r":
            return "the file is open for writing in this process (HDF5 may hold unflushed data)"
        if getattr(file, "swmr_mode", False):
            return "SWMR read mode: HDF5 handles the concurrent writer"
        return None

    def _setup(self, reuse: _Layout | None = None) -> None:
        """Open the file afresh and locate the data (or take `reuse`, the layout of a parent process or an
        earlier open, if the file still has the same signature); retried while the file changes underneath."""
        self._release()
        for _ in range(_MAX_ATTEMPTS):
            fileobj = open(self.path, "rb")
            h5file: h5py.File | None = None
            try:
                before = _file_signature(os.fstat(fileobj.fileno()))
                if reuse is not None and reuse.signature == before:
                    layout = reuse
                    if layout.mode != "memmap":
                        h5file, dataset = self._open_dataset(fileobj)
                else:
                    h5file, dataset = self._open_dataset(fileobj)
                    layout = _locate(dataset, before, before[2])
                mapped = None
                if layout.mode == "memmap":
                    mapped = mmap.mmap(fileobj.fileno(), 0, access=mmap.ACCESS_READ)
                    problem = None if layout is reuse else self._self_check(layout, mapped, dataset)
                    if problem:
                        layout = _Layout("h5py", f"memmap self-check failed ({problem})", layout.shape,
                                         layout.dtype, before)
                        mapped = None
                unchanged = _file_signature(os.stat(self.path)) == before
            except BaseException:
                if h5file is not None:
                    h5file.close()
                fileobj.close()
                raise
            if unchanged and mapped is not None:
                if h5file is not None:
                    h5file.close()
                fileobj.close()  # the mapping holds its own reference to the file
                self._map(mapped, layout)
            elif unchanged:
                self._dataset = dataset
                self._close_handle = weakref.finalize(self, _close_handle, h5file, fileobj)
            else:
                if h5file is not None:
                    h5file.close()
                fileobj.close()
                continue
            self._layout = layout
            self._last_check = time.monotonic()
            return
        raise OSError(f"{self.path} kept changing while {self.name} was being located")

    def _open_dataset(self, fileobj: BinaryIO) -> tuple[h5py.File, h5py.Dataset]:
        # The file-object driver gives a handle of its own: a plain h5py.File(path) would share the metadata
        # cache of any other open handle of this file in the process, which can be stale. HDF5's raw-data chunk
        # cache is off: "chunks" mode reads each band of chunks whole, once, and keeps it decoded in the LRU, so
        # HDF5's cache would only hold the same chunks a second time.
        h5file = h5py.File(fileobj, "r", rdcc_nbytes=0)
        dataset = h5file.get(self.name)
        if not isinstance(dataset, h5py.Dataset) or dataset.shape is None or dataset.ndim == 0:
            h5file.close()
            raise KeyError(f"{self.path} has no dataset {self.name} with rows")
        return h5file, dataset

    def _map(self, mapped: mmap.mmap, layout: _Layout) -> None:
        self._mm = mapped
        self._bytes = np.frombuffer(mapped, dtype=np.uint8)
        width = layout.row_bytes
        # Element k of this view is the `width` bytes at file offset k: one fancy index gathers any rows.
        self._rows = np.ndarray((max(len(mapped) - width + 1, 0),), dtype=np.dtype((np.void, width)),
                                buffer=mapped, strides=(1,))
        n = layout.shape[0]
        if n <= _ROW_TABLE_MAX_ROWS:
            # File offset of every row: a batch's offsets are then one lookup (which also checks bounds).
            assert layout.chunk_offsets is not None
            band, within = np.divmod(np.arange(n, dtype=np.int64), layout.chunk_rows)
            band_offsets = layout.chunk_offsets[band]
            self._row_offsets = np.where(band_offsets < 0, -1, band_offsets + within * width)

    @staticmethod
    def _self_check(layout: _Layout, mapped: mmap.mmap, dataset: h5py.Dataset) -> str | None:
        """Compare a few rows read via the mapping with HDF5's own reads (cheap insurance against a wrong
        chunk table)."""
        n = layout.shape[0]
        if n == 0:
            return None
        assert layout.chunk_offsets is not None
        probe = {0, n - 1, n // 2}
        holes = np.flatnonzero(layout.chunk_offsets < 0)
        if holes.size:
            probe.add(int(holes[0]) * layout.chunk_rows)
        data = np.frombuffer(mapped, dtype=np.uint8)
        width = layout.row_bytes
        for row in sorted(probe):
            band, within = divmod(row, layout.chunk_rows)
            offset = int(layout.chunk_offsets[band])
            try:
                if offset < 0:
                    mine = layout.fill_row
                else:
                    mine = data[offset + within * width:offset + (within + 1) * width].view(layout.dtype)
            except ValueError as error:
                return f"row {row}: {error}"
            if np.ascontiguousarray(mine).tobytes() != np.ascontiguousarray(dataset[row], layout.dtype).tobytes():
                return f"row {row} differs from HDF5's"
        return None

    def _release(self) -> None:
        self._mm = self._rows = self._bytes = self._row_offsets = None  # unmapped once no view is left
        self._cache.clear()
        self._cached_bytes = 0
        self._dataset = None
        if self._close_handle is not None:
            self._close_handle()
            self._close_handle = None

    def _current_layout(self) -> _Layout:
        self._enter_process()
        with self._lock:
            if self._layout is None:
                self._open()
            assert self._layout is not None
            if self._caller_dataset is not None:  # the caller may resize it through its (writable) handle
                self._layout.shape = tuple(self._caller_dataset.shape)
            return self._layout

    def _is_open(self) -> bool:
        if self._layout is None:
            return False
        if self._layout.mode == "memmap":
            return self._bytes is not None
        return self._dataset is not None or self._caller_dataset is not None

    def _open(self) -> None:
        """(Re)open for reading, keeping the known layout if the file has not changed since it was found."""
        old = self._layout
        self._setup(reuse=old)
        if old is None:
            self._log_mode()
        elif self._layout is not old:
            self._note_relocation(old)

    def _file_changed(self, layout: _Layout, *, after: bool) -> bool:
        if layout.signature is None:  # reads go through the caller's handle
            return False
        now = time.monotonic()
        if self.revalidate_interval_s > 0 and (after or now - self._last_check < self.revalidate_interval_s):
            return False
        if not after and self._last_check != -math.inf:  # (-inf: a check is due whatever was seen)
            seen = _seen_unchanged.get(self.path)
            if seen is not None and seen[0] == layout.signature and now - seen[1] < _SHARED_CHECK_S:
                return False
        self._last_check = now
        try:
            signature = _file_signature(os.stat(self.path))
        except FileNotFoundError:
            signature = None
        if signature != layout.signature:
            _seen_unchanged.pop(self.path, None)
            return True
        _seen_unchanged[self.path] = (signature, now)
        return False

    def _note_relocation(self, old: _Layout) -> None:
        new = self._layout
        assert new is not None
        self.stats["relocations"] += 1
        log.info("%s:%s: the file changed; data located again (shape %s -> %s)", self.path, self.name,
                 old.shape, new.shape)
        if (new.mode, new.dtype, new.row_shape) != (old.mode, old.dtype, old.row_shape):
            log.warning("%s:%s: after the file changed: mode %s -> %s, dtype %s -> %s, row shape %s -> %s (%s)",
                        self.path, self.name, old.mode, new.mode, old.dtype, new.dtype, old.row_shape,
                        new.row_shape, new.reason)
        self._logged = (new.mode, new.reason)

    def _checked_layout(self) -> _Layout:
        """The layout to read with, once the check before a read is done: (re)opened, or located again if the
        file changed. Called with the lock held."""
        if not self._is_open():
            self._open()
        elif self._file_changed(self._layout, after=False):
            old = self._layout
            self._setup()
            self._note_relocation(old)
        layout = self._layout
        assert layout is not None
        if self._caller_dataset is not None:  # the caller may resize it through its (writable) handle
            layout.shape = tuple(self._caller_dataset.shape)
        return layout

    def _log_mode(self) -> None:
        layout = self._layout
        assert layout is not None
        if self._logged == (layout.mode, layout.reason):
            return  # the same decision as in the process this reader came from: said already
        # A detail for each dataset (a caller sums its datasets up at INFO); only the slow path is worth a warning.
        level = logging.WARNING if layout.mode == "h5py" else logging.DEBUG
        log.log(level, "%s:%s %s, %s: mode %s (%s)", self.path, self.name, layout.shape, layout.dtype,
                layout.mode, layout.reason)
        self._logged = (layout.mode, layout.reason)

    # -- reading ----------------------------------------------------------------------------------------------

    def _checked(self, flat: np.ndarray, n: int) -> np.ndarray:
        """`flat` with negative indices counted from the end; out of range -> IndexError naming the data."""
        if flat.size == 0:
            return flat
        low, high = int(flat.min()), int(flat.max())
        if low < -n or high >= n:
            bad = low if low < -n else high
            raise IndexError(f"index {bad} is out of range for the {n} rows of {self.path}:{self.name}")
        return np.where(flat < 0, flat + n, flat) if low < 0 else flat

    def _read_index(self, layout: _Layout, index: np.ndarray) -> np.ndarray:
        """Rows at an integer index array of any shape."""
        if index.ndim == 1:
            return self._read_rows(layout, index.astype(np.int64, copy=False))
        flat = index.reshape(-1).astype(np.int64, copy=False)
        return self._read_rows(layout, flat).reshape(index.shape + layout.row_shape)

    def _read_rows(self, layout: _Layout, flat: np.ndarray) -> np.ndarray:
        """Rows at unchecked indices `flat`."""
        if flat.size and self._row_offsets is not None and layout.mode == "memmap":
            try:  # the lookup checks bounds and counts negative indices from the end, as numpy does
                offsets = self._row_offsets[flat]
            except IndexError:
                self._checked(flat, layout.shape[0])  # raises with the dataset's name
                raise
            return self._gather_offsets(layout, offsets)
        return self._gather(layout, self._checked(flat, layout.shape[0]))

    def _gather(self, layout: _Layout, flat: np.ndarray) -> np.ndarray:
        """Rows at valid, non-negative indices `flat`."""
        if flat.size == 0 or layout.row_bytes == 0:
            return np.empty((flat.size, *layout.row_shape), dtype=layout.dtype)
        if layout.mode == "memmap":
            if self._row_offsets is not None:
                return self._gather_offsets(layout, self._row_offsets[flat])
            assert layout.chunk_offsets is not None
            band, within = np.divmod(flat, layout.chunk_rows)
            band_offsets = layout.chunk_offsets[band]
            offsets = band_offsets + within * layout.row_bytes
            if layout.fill_row is not None:
                offsets[band_offsets < 0] = -1
            return self._gather_offsets(layout, offsets)
        if layout.mode == "chunks":
            return self._gather_chunks(layout, flat)
        unique, inverse = np.unique(flat, return_inverse=True)
        return self._h5py_sorted(unique)[inverse]

    def _gather_offsets(self, layout: _Layout, offsets: np.ndarray) -> np.ndarray:
        """Rows starting at file byte `offsets` (-1: a never-written row, read as the fill value)."""
        assert self._rows is not None
        holes = None
        if layout.fill_row is not None:
            holes = offsets < 0
            offsets = np.where(holes, 0, offsets)
        out = self._rows[offsets].view(layout.dtype).reshape((offsets.size, *layout.row_shape))
        if holes is not None:
            out[holes] = layout.fill_row
        return out

    def _band(self, layout: _Layout, band: int) -> np.ndarray:
        """Decoded rows of chunk band `band`, from the LRU cache or read and decoded by HDF5 now."""
        cached = self._cache.get(band)
        if cached is not None:
            self._cache.move_to_end(band)
            self.stats["cache_hits"] += 1
            return cached
        assert self._dataset is not None
        start = band * layout.chunk_rows
        try:
            block = self._dataset[start:min(start + layout.chunk_rows, layout.shape[0])]
        except OSError as error:  # HDF5's message names neither the file nor the chunk
            raise OSError(f"{self.path}:{self.name}: chunk {band} (rows {start}-{start + layout.chunk_rows - 1}) "
                          f"cannot be read ({error})") from None
        self.stats["chunk_reads"] += 1
        if 0 < block.nbytes <= self.chunk_cache_bytes:
            self._cache[band] = block
            self._cached_bytes += block.nbytes
            while self._cached_bytes > self.chunk_cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
        return block

    def _gather_chunks(self, layout: _Layout, flat: np.ndarray) -> np.ndarray:
        """Group the rows by chunk band, get each band once, copy its rows out."""
        per_band = layout.chunk_rows
        bands = flat // per_band
        order = np.argsort(bands, kind="stable")
        sorted_bands = bands[order]
        within = flat[order] - sorted_bands * per_band
        edges = np.flatnonzero(np.diff(sorted_bands)) + 1
        out = np.empty((flat.size, *layout.row_shape), dtype=layout.dtype)
        order_list, within_list, band_list = order.tolist(), within.tolist(), sorted_bands.tolist()
        bounds = [0, *edges.tolist(), flat.size]
        for first, last in zip(bounds[:-1], bounds[1:]):
            block = self._band(layout, band_list[first])
            if last - first <= 4:
                # A few rows (random batches): plain row copies beat numpy's per-call cost of fancy indexing.
                for k in range(first, last):
                    out[order_list[k]] = block[within_list[k]]
            else:
                out[order[first:last]] = block[within[first:last]]
        return out

    def _h5py_dataset(self) -> h5py.Dataset:
        dataset = self._caller_dataset if self._caller_dataset is not None else self._dataset
        assert dataset is not None
        return dataset

    def _h5py_sorted(self, unique: np.ndarray) -> np.ndarray:
        """Rows at sorted unique indices in as few h5py reads as the pattern allows: one slice when they are
        dense, one slice per run when there are few runs, else one fancy-index read."""
        dataset = self._h5py_dataset()
        first, last = int(unique[0]), int(unique[-1]) + 1
        if last - first <= 4 * unique.size:
            return dataset[first:last][unique - first]
        run_starts = np.flatnonzero(np.diff(unique) != 1) + 1
        if run_starts.size + 1 <= max(1, unique.size // 8):
            return np.concatenate([dataset[int(run[0]):int(run[-1]) + 1] for run in np.split(unique, run_starts)])
        return dataset[unique]

    def _spans(self, layout: _Layout, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Concatenated rows [lo[k], hi[k]) (already checked to be in range)."""
        lengths = hi - lo
        total = int(lengths.sum())
        if total == 0 or layout.row_bytes == 0:
            return np.empty((total, *layout.row_shape), dtype=layout.dtype)
        if layout.mode == "memmap" and total >= 8 * lo.size:
            return self._copy_spans_memmap(layout, lo, hi, total)  # long spans: one copy per span and chunk
        if layout.mode == "h5py" and lo.size == 1:
            return self._h5py_dataset()[int(lo[0]):int(hi[0])]
        # Many short spans: one vectorised gather of all their rows.
        starts_in_out = np.cumsum(lengths) - lengths
        rows = np.arange(total, dtype=np.int64) + np.repeat(lo - starts_in_out, lengths)
        return self._gather(layout, rows)

    def _copy_spans_memmap(self, layout: _Layout, lo: np.ndarray, hi: np.ndarray, total: int) -> np.ndarray:
        """Spans cut at chunk boundaries into pieces that are contiguous in the file, computed vectorised, then
        one concatenation of the pieces' bytes."""
        assert layout.chunk_offsets is not None and self._bytes is not None
        per_band, width = layout.chunk_rows, layout.row_bytes
        band = lo // per_band
        if (band == (hi - 1) // per_band).all():  # every span within one chunk (always so when contiguous)
            piece_lo, piece_hi = lo, hi
        else:
            keep = hi > lo
            lo, hi = lo[keep], hi[keep]
            first, last = lo // per_band, (hi - 1) // per_band
            count = last - first + 1
            span = np.repeat(np.arange(lo.size), count)
            band = first[span] + np.arange(span.size) - np.repeat(np.cumsum(count) - count, count)
            piece_lo = np.maximum(lo[span], band * per_band)
            piece_hi = np.minimum(hi[span], (band + 1) * per_band)
        band_offsets = layout.chunk_offsets[band]
        source = band_offsets + (piece_lo - band * per_band) * width
        end = source + (piece_hi - piece_lo) * width
        data = self._bytes
        if layout.fill_row is None:
            pieces = [data[a:b] for a, b in zip(source.tolist(), end.tolist())]
        else:
            fill = layout.fill_row.reshape(-1).view(np.uint8)
            pieces = [data[a:b] if o >= 0 else np.tile(fill, (b - a) // width)
                      for a, b, o in zip(source.tolist(), end.tolist(), band_offsets.tolist())]
        return np.concatenate(pieces).view(layout.dtype).reshape((total, *layout.row_shape))
