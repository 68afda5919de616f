"""Compressed HDF5 reads on the demo's data, read as training reads them: decoding chunks in Python against letting
HDF5 decode them, and an LRU cache of decoded chunks against HDF5's own raw-data chunk cache; and what the reader's
check of the file on every read costs.

    python benchmarks/compressed_reads.py                          # generates the demo's images first (~2 min)
    python benchmarks/compressed_reads.py --source data/cbed_64px_4096.h5   # or takes them from the demo's file
    python benchmarks/compressed_reads.py --what stat --source data/cbed_64px_4096.h5   # or: growth, all

The demo's 4096 images of 64x64 float32 are rewritten in its chunks of 64 images (1 MiB) with gzip (level 4),
gzip+shuffle and lzf. Each method reads micro-batches of 32 random images through hpctrain's loader (`make_loader`
over a `BatchReader`, as in training) with 0 and 2 workers, with a cache of 64 MiB (what fits: the whole dataset):

  own decoder + LRU   chunk bytes from an mmap of the file (located once with chunk_iter), zlib and numpy unshuffle
                      in Python, honouring each chunk's filter mask, then an LRU cache of decoded chunks (gzip and
                      gzip+shuffle only)
  HDF5 chunk cache    HDF5 decodes; its raw-data chunk cache keeps decoded chunks (rdcc_nbytes the same 64 MiB,
                      rdcc_nslots a prime ~100x the chunks that fit, rdcc_w0=0); one H5Dread per run of consecutive
                      rows, in row order (the fastest of the h5py ways tried: a fancy-index read per batch, or one
                      read of a union of hyperslabs, took 10-30x as long once the chunks were cached)
  read_direct_chunk   the stored bytes through h5py's read_direct_chunk, zlib and numpy unshuffle in Python, the
                      same LRU (gzip and gzip+shuffle only)
  RowReader           hpctrain.data.hdf5_reader.RowReader as HDF5Dataset opens it ("chunks" mode: HDF5 decodes
                      each needed chunk whole, the reader's LRU keeps it decoded; the file checked on open only)
  RAM gather          the images held in memory, `images[idx]`: no file, no decoding (for scale)

cold: every batch starts with empty caches (each method is closed and re-opened per batch, so each chunk a batch
touches is decoded once: a dataset much larger than the cache; the re-open adds about 1-2% to a cold batch);
warm: the cache holds the whole dataset and was filled by an untimed epoch (in every worker).
Methods take turns in alternating rounds (the order rotates each round); the table gives the library's (HDF5 chunk
cache) samples/s, and each other method's samples/s over it, per round, as the median (min-max) of the rounds.

--what growth: whether HDF5's chunk cache stays within rdcc_nbytes, for rdcc_w0 1, 0.75 and 0.
--what stat: RowReader's check of the file (one os.stat, compared with what it saw) around every batch, against
no check after open: the demo's uncompressed images and labels read together in random batches of 32.
"""

from __future__ import annotations

import argparse
import gc
import math
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from h5py import h5s, h5t, h5z
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's hpctrain (as benchmarks/bench.py)
from hpctrain.config import DataConfig  # noqa: E402
from hpctrain.data import hdf5_reader  # noqa: E402
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler  # noqa: E402
from hpctrain.data.hdf5_reader import RowReader, read_together  # noqa: E402
from hpctrain.data.loader import make_loader  # noqa: E402

FILTERS = {"gzip": {"compression": "gzip"}, "gzip+shuffle": {"compression": "gzip", "shuffle": True},
           "lzf": {"compression": "lzf"}}
CHUNK_IMAGES = 64  # the demo's chunks (hpctrain.tasks.cbed.generator, chunk_images)


# -- the data -----------------------------------------------------------------------------------------------------
def demo_images(source: Path | None, directory: Path) -> np.ndarray:
    """The demo's images: from `source`, or generated as the demo generates them (4096 64x64, seed 0)."""
    if source is None:
        from hpctrain.tasks.cbed.generator import CBEDGeneratorConfig, generate_dataset
        source = directory / "cbed_64px_4096.h5"
        generate_dataset(source, CBEDGeneratorConfig(num_images=4096, image_size=64), progress=False)
    with h5py.File(source, "r") as f:
        return f["images"][()]


def write_compressed(images: np.ndarray, directory: Path) -> dict[str, Path]:
    paths = {}
    for name, options in FILTERS.items():
        path = paths[name] = directory / f"images_{name.replace('+', '_')}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=images, chunks=(CHUNK_IMAGES, *images.shape[1:]), **options)
    return paths


def next_prime(n: int) -> int:
    while any(n % k == 0 for k in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


# -- the methods --------------------------------------------------------------------------------------------------
class LRU:
    """Decoded chunks by index, at most `limit` bytes, least recently used evicted first."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.items = limit, 0, OrderedDict()

    def get(self, key: int, make: Callable[[int], np.ndarray]) -> np.ndarray:
        block = self.items.get(key)
        if block is not None:
            self.items.move_to_end(key)
            return block
        block = make(key)
        self.items[key] = block
        self.used += block.nbytes
        while self.used > self.limit:
            self.used -= self.items.popitem(last=False)[1].nbytes
        return block


def undo_filters(raw: Any, pipeline: tuple[int, ...], mask: int, itemsize: int) -> Any:
    """The filter pipeline (HDF5 filter ids in write order) undone in reverse, skipping filters the chunk's mask
    says were not applied."""
    for position in reversed(range(len(pipeline))):
        if mask >> position & 1:
            continue
        if pipeline[position] == h5z.FILTER_DEFLATE:
            raw = zlib.decompress(raw)
        elif itemsize > 1:  # shuffle stored byte k of every element together
            raw = np.ascontiguousarray(np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T)
    return raw


class Method:
    """Reads rows of dataset "images" of `path`; opens lazily in each process (loader workers fork)."""

    name = ""

    def __init__(self, path: Path, cache_bytes: int) -> None:
        self.path, self.cache_bytes = path, cache_bytes
        self._pid: int | None = None

    def read(self, idx: np.ndarray) -> np.ndarray:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.open()
        return self.rows(idx)

    def close(self) -> None:
        self._pid = None  # opened again (with empty caches) by the next read

    def open(self) -> None:
        raise NotImplementedError

    def rows(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ChunkDecoder(Method):
    """Chunks decoded in Python (zlib, unshuffle) into an LRU; subclasses say where the stored bytes come from."""

    def open(self) -> None:
        with h5py.File(self.path, "r") as f:
            ds = f["images"]
            self.shape, self.dtype, self.per_chunk = ds.shape, ds.dtype, ds.chunks[0]
            dcpl = ds.id.get_create_plist()
            self.pipeline = tuple(dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters()))
            self.locate(ds)
        self.cache = LRU(self.cache_bytes)

    def locate(self, ds: h5py.Dataset) -> None:
        raise NotImplementedError

    def stored(self, chunk: int) -> tuple[int, bytes]:
        raise NotImplementedError

    def decode(self, chunk: int) -> np.ndarray:
        mask, raw = self.stored(chunk)
        raw = undo_filters(raw, self.pipeline, mask, self.dtype.itemsize)
        return np.frombuffer(raw, self.dtype).reshape(self.per_chunk, *self.shape[1:])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        per_chunk, get, decode = self.per_chunk, self.cache.get, self.decode
        for k, row in enumerate(idx.tolist()):
            chunk, within = divmod(row, per_chunk)
            out[k] = get(chunk, decode)[within]
        return out


class OwnDecoder(ChunkDecoder):
    name = "own decoder + LRU"

    def locate(self, ds: h5py.Dataset) -> None:
        n = -(-ds.shape[0] // self.per_chunk)
        self.table = np.zeros((n, 3), np.int64)  # file offset, stored size, filter mask

        def visit(info: Any) -> None:
            self.table[info.chunk_offset[0] // self.per_chunk] = info.byte_offset, info.size, info.filter_mask

        ds.id.chunk_iter(visit)
        with open(self.path, "rb") as f:
            self.data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)

    def stored(self, chunk: int) -> tuple[int, bytes]:
        offset, size, mask = self.table[chunk].tolist()
        return mask, bytes(self.data[offset:offset + size])


class DirectChunk(ChunkDecoder):
    name = "read_direct_chunk + zlib + LRU"

    def locate(self, ds: h5py.Dataset) -> None:
        self.file = h5py.File(open(self.path, "rb"), "r")  # a handle of its own (see HDF5ChunkCache.open)
        self.dsid = self.file["images"].id

    def stored(self, chunk: int) -> tuple[int, bytes]:
        return self.dsid.read_direct_chunk((chunk * self.per_chunk,) + (0,) * (len(self.shape) - 1))

    def close(self) -> None:
        if self._pid == os.getpid():
            self.file.close()
        super().close()


class HDF5ChunkCache(Method):
    name = "HDF5 chunk cache"

    def __init__(self, path: Path, cache_bytes: int) -> None:
        super().__init__(path, cache_bytes)
        with h5py.File(path, "r") as f:
            chunk_bytes = f["images"].chunks[0] * f["images"][0].nbytes
        self.slots = next_prime(100 * max(cache_bytes // chunk_bytes, 1))

    def open(self) -> None:
        # A handle on the file-object driver: HDF5 shares a file opened twice by name in one process, and with it
        # the dataset's chunk cache and the cache settings of whoever opened it first.
        self.file = h5py.File(open(self.path, "rb"), "r", rdcc_nbytes=self.cache_bytes,
                              rdcc_nslots=self.slots, rdcc_w0=0.0)
        ds = self.file["images"]
        self.dsid, self.shape, self.dtype = ds.id, ds.shape, ds.dtype
        self.file_space = self.dsid.get_space()
        self.memory_type = h5t.py_create(ds.dtype)  # given explicitly: h5py derives it per read otherwise (~20 us)
        self.memory_spaces: dict[int, Any] = {}

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        # A run: consecutive rows that also go to consecutive places of `out`.
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(order) != 1)) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(rows)]
        rest = (0,) * (len(self.shape) - 1)
        for first, last in zip(starts, ends):
            count, at = last - first, int(order[first])
            space = self.memory_spaces.get(count)
            if space is None:
                space = self.memory_spaces[count] = h5s.create_simple((count, *self.shape[1:]))
            self.file_space.select_hyperslab((int(rows[first]), *rest), (count, *self.shape[1:]))
            self.dsid.read(space, self.file_space, out[at:at + count], self.memory_type)
        return out

    def close(self) -> None:
        if self._pid == os.getpid():
            self.file.close()
        super().close()


class Reader(Method):
    name = "RowReader"

    def open(self) -> None:
        with h5py.File(self.path, "r") as f:  # as hpctrain.data.HDF5Dataset opens it
            self.reader = RowReader(f["images"], chunk_cache_bytes=self.cache_bytes, revalidate_interval_s=math.inf)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.reader.read(idx)

    def close(self) -> None:
        if self._pid == os.getpid():
            self.reader.close()  # drops its handle, mapping and cache; its next read opens the file again


class InRAM(Method):
    name = "RAM gather"

    def open(self) -> None:
        with h5py.File(self.path, "r") as f:
            self.images = f["images"][()]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.images[idx]


# -- reading them as training does --------------------------------------------------------------------------------
class MethodDataset(Dataset):
    """What BatchReader asks for a batch: the images at the indices, through `method`; `cold`: with empty caches."""

    def __init__(self, method: Method, num: int, cold: bool) -> None:
        self.method, self.num, self.cold = method, num, cold

    def __len__(self) -> int:
        return self.num

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.cold and not isinstance(self.method, InRAM):
            self.method.close()
        return {"image": torch.from_numpy(self.method.read(np.asarray(indices, dtype=np.int64)))}


def loader_rate(loader: Any, num_batches: int) -> float:
    """Samples/s of `num_batches` batches after the first of a pass (which may start workers)."""
    batches = iter(loader)
    next(batches)
    started, samples = time.perf_counter(), 0
    for _ in range(num_batches):
        samples += len(next(batches)["index"])
    return samples / (time.perf_counter() - started)


def compare(methods: list[Method], num: int, *, workers: int, cold: bool, rounds: int,
            batches: int) -> dict[str, list[float]]:
    """Samples/s per round of each method through make_loader, the methods taking turns."""
    sampler = DistributedBatchSampler(np.arange(num), micro_batch_size=32, num_microbatches=1, rank=0,
                                      world_size=1, seed=0)
    config = DataConfig(dataset={"_target_": "unused: the loader is given its dataset"}, num_workers=workers,
                        persistent_workers=True, pin_memory=False, prefetch_factor=2)
    loaders = {m.name: make_loader(BatchReader(MethodDataset(m, num, cold)), sampler, config=config,
                                   num_workers=workers, pin_memory=False) for m in methods}
    for loader in loaders.values():
        for _ in loader if not cold else [next(iter(loader))]:  # warm: an untimed epoch fills every worker's cache
            pass
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    names = list(loaders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(loader_rate(loaders[name], batches))
    del loaders
    gc.collect()  # persistent workers end with their loaders
    return rates


def check_methods(methods: list[Method], reference: np.ndarray) -> None:
    index = np.random.default_rng(1).integers(0, len(reference), 200)
    for method in methods:
        assert np.array_equal(method.read(index), reference[index]), method.name
        method.close()


def ratio_cell(values: list[float], base: list[float]) -> str:
    ratios = [a / b for a, b in zip(values, base)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def bench_filters(images: np.ndarray, paths: dict[str, Path], args: argparse.Namespace) -> None:
    cache = 64 << 20
    columns = [HDF5ChunkCache.name, OwnDecoder.name, DirectChunk.name, Reader.name, InRAM.name]
    lines = [f"| data | workers | cache | {columns[0]} (samples/s) | " + " | ".join(columns[1:]) + " |",
             "|---" * (len(columns) + 3) + "|"]
    for name, path in paths.items():
        methods: list[Method] = [HDF5ChunkCache(path, cache)]
        methods += [OwnDecoder(path, cache), DirectChunk(path, cache)] if "gzip" in name else []
        methods += [Reader(path, cache), InRAM(path, cache)]
        check_methods(methods, images)
        with h5py.File(path, "r") as f:
            label = f"{name} ({images.nbytes / f['images'].id.get_storage_size():.2f}x)"
        for cold in (True, False):
            for workers in args.workers:
                rates = compare(methods, len(images), workers=workers, cold=cold, rounds=args.rounds,
                                batches=args.cold_batches if cold else args.warm_batches)
                base = rates[columns[0]]
                cells = [f"{statistics.median(base):,.0f}"] + [
                    ratio_cell(rates[column], base) if column in rates else "-" for column in columns[1:]]
                lines.append(f"| {label} | {workers} | {'cold' if cold else 'warm'} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    print(f"\nsamples/s of {columns[0]}; every other column: its samples/s over that, per round, median (min-max)")
    print("\n".join(lines))


def bench_stat(source: Path, args: argparse.Namespace) -> None:
    """RowReader's file check around every read (one stat each, compared) against none after open."""
    with h5py.File(source, "r") as f:
        fields = [name for name in ("images", "labels") if name in f]
        checked = [RowReader(f[name]) for name in fields]
        unchecked = [RowReader(f[name], revalidate_interval_s=1e9) for name in fields]
        num = len(f[fields[0]])
    rng = np.random.default_rng(0)
    shared = hdf5_reader._SHARED_CHECK_S

    def run(readers: list[RowReader], share: float) -> Callable[[list[np.ndarray]], None]:
        def read(batches: list[np.ndarray]) -> None:
            hdf5_reader._SHARED_CHECK_S = share
            for idx in batches:
                read_together(readers, idx)
        return read

    variants = {"no check after open": run(unchecked, shared),
                # In training a step comes between batches, so the check after one batch is too old to count as
                # the check before the next: two stats per batch. Back to back (the loader's workers), one.
                "check before and after every batch (2 stats)": run(checked, 0.0),
                "check after every batch (1 stat, back to back)": run(checked, shared)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.stat_rounds):
        batches = [rng.integers(0, num, 32) for _ in range(args.stat_batches)]
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            variants[name](batches)
            times[name].append(time.perf_counter() - started)
    hdf5_reader._SHARED_CHECK_S = shared
    base = times[names[0]]
    print(f"read_together of {', '.join(fields)} ({num} rows, mode {checked[0].mode}), batches of 32 random rows, "
          f"{args.stat_batches} batches per round, {args.stat_rounds} rounds; time per batch over no check (median "
          f"(min-max) of rounds):")
    for name in names[1:]:
        print(f"  {name:<48} {ratio_cell(times[name], base)}")


# Run in a fresh interpreter per setting: the memory a process once used is not handed back reliably.
_CACHE_GROWTH = """
import sys, h5py
path, w0 = sys.argv[1], float(sys.argv[2])
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
f = h5py.File(open(path, 'rb'), 'r', rdcc_nbytes=4 << 20, rdcc_nslots=401, rdcc_w0=w0)
ds = f['images']
before = rss()
for row in range(0, len(ds), ds.chunks[0]):
    ds[row]
print(rss() - before)
"""


def bench_cache_growth(path: Path) -> None:
    """Whether HDF5's chunk cache stays within rdcc_nbytes, per rdcc_w0: one row of every chunk is read through a
    4 MiB cache (401 slots), and the process's resident memory measured before and after."""
    with h5py.File(path, "r") as f:
        ds = f["images"]
        chunks, chunk_mib = -(-len(ds) // ds.chunks[0]), ds.chunks[0] * ds[0].nbytes / 2**20
    print(f"HDF5 chunk cache of 4 MiB, one row read from each of {chunks} chunks of {chunk_mib:g} MiB ({path.name}):")
    for w0 in (1.0, 0.75, 0.0):
        grown = subprocess.run([sys.executable, "-c", _CACHE_GROWTH, str(path), str(w0)], capture_output=True,
                               text=True, check=True).stdout
        print(f"  rdcc_w0={w0}: resident memory grew by {float(grown):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["filters", "stat", "growth", "all"], default="filters",
                        help="filters: the table; stat: the file check's cost; growth: HDF5's cache size per rdcc_w0")
    parser.add_argument("--source", type=Path, help="the demo's HDF5 file (default: generate it in a temp dir)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[0, 2])
    parser.add_argument("--cold-batches", type=int, default=10, help="timed batches per method and round, cold")
    parser.add_argument("--warm-batches", type=int, default=100, help="timed batches per method and round, warm")
    parser.add_argument("--stat-rounds", type=int, default=21)
    parser.add_argument("--stat-batches", type=int, default=500, help="batches per variant and round (stat)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, h5py {h5py.__version__}, HDF5 "
          f"{h5py.version.hdf5_version}, torch {torch.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        if args.what in ("stat", "all") and args.source is None:
            parser.error("--what stat needs --source (the demo's uncompressed file)")
        if args.what in ("filters", "growth", "all"):
            images = demo_images(args.source, Path(tmp))
            paths = write_compressed(images, Path(tmp))
            if args.what != "growth":
                bench_filters(images, paths, args)
            if args.what != "filters":
                bench_cache_growth(paths["gzip"])
        if args.what in ("stat", "all"):
            bench_stat(args.source, args)


if __name__ == "__main__":
    main()
