"""Benchmark RowReader against plain h5py reads and a gather from RAM (random batches, warm page cache).

    python benchmarks/reader.py                 # makes its files in a temp dir: 4096x64x64 float32 images in
                                                # chunks of 64 (uncompressed, gzip-1, lzf), 65536x16 float32
                                                # labels in gzip-1 chunks of 256 rows, a ragged dataset
    python benchmarks/reader.py --path F.h5     # every dataset with rows in F.h5

Methods are timed in alternating rounds (the order rotates each round, every method gets the same batches in a
round), each for about --seconds per round; the table gives samples/s as median and min-max over rounds and the
ratio of the median to the median of the RAM gather (`arr[idx]` on the whole dataset in memory).
Compressed datasets are also timed against a hand-written read+decompress of the same chunks (gzip:
`read_direct_chunk` + zlib; other filters: an h5py slice per chunk), and RowReader with its chunk cache off,
which has HDF5 decode every needed chunk on every batch, as the hand-written reader decodes it.
The decoded-chunk cache against HDF5's own chunk cache, read through the loader: benchmarks/compressed_reads.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpctrain.data.hdf5_reader import RowReader  # noqa: E402

Method = Callable[[np.ndarray], np.ndarray]


def make_files(directory: Path, num: int = 4096, size: int = 64, chunk: int = 64) -> list[Path]:
    """Detector-like images: a few smooth blobs plus quantised noise (compressible, not trivially)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((num, size, size), dtype=np.float32)
    for i in range(num):
        cy, cx = rng.random(2)
        images[i] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * 30) + rng.random((size, size), dtype=np.float32) * 0.05
    images = np.round(images * 256) / 256
    paths = []
    for name, options in [("uncompressed", {}), ("gzip1", {"compression": "gzip", "compression_opts": 1}),
                          ("lzf", {"compression": "lzf"})]:
        path = directory / f"images_{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=images, chunks=(chunk, size, size), **options)
        paths.append(path)
    # Small chunks (16 KiB: 256 rows of 16 float32 labels), where per-chunk overhead rather than decompression
    # dominates.
    path = directory / "labels_gzip1.h5"
    with h5py.File(path, "w") as f:
        labels = np.round(rng.random((65536, 16), dtype=np.float32), 3)
        f.create_dataset("labels", data=labels, chunks=(256, 16), compression="gzip", compression_opts=1)
    paths.append(path)
    return paths


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def hand_decoder(ds: h5py.Dataset) -> Method | None:
    """Reads and decompresses each needed chunk once per batch, written directly against the chunk API."""
    if ds.chunks is None or ds.compression is None or tuple(ds.chunks[1:]) != ds.shape[1:]:
        return None
    rows, row_shape, dtype = ds.chunks[0], ds.shape[1:], ds.dtype
    zeros = (0,) * (ds.ndim - 1)
    gzip_only = ds.compression == "gzip" and not ds.shuffle and not ds.fletcher32 and not ds.scaleoffset

    def chunk(c: int) -> np.ndarray:
        start = c * rows
        if gzip_only:
            mask, raw = ds.id.read_direct_chunk((start, *zeros))
            assert mask == 0
            block = np.frombuffer(zlib.decompress(raw), dtype=dtype).reshape(rows, *row_shape)
            return block[:min(rows, ds.shape[0] - start)]
        return ds[start:start + rows]

    def read(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *row_shape), dtype=dtype)
        which = idx // rows
        for c in np.unique(which):
            sel = np.flatnonzero(which == c)
            out[sel] = chunk(int(c))[idx[sel] - c * rows]
        return out

    return read


def sorted_fancy(ds: h5py.Dataset) -> Method:
    def read(idx: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(idx, return_inverse=True)
        return ds[unique][inverse]
    return read


def per_row(ds: h5py.Dataset) -> Method:
    return lambda idx: np.stack([ds[int(i)] for i in idx])


def run_rounds(methods: dict[str, Method], num_rows: int, *, rounds: int, batch_size: int, seconds: float,
               seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    results: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        batches = [rng.integers(0, num_rows, batch_size) for _ in range(100_000 // batch_size)]
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no method always goes first
        for name in order:
            method = methods[name]
            done, start = 0, time.perf_counter()
            while True:
                method(batches[done % len(batches)])
                done += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds and done >= 3:
                    break
            results[name].append(done * batch_size / elapsed)
    return results


def report(title: str, results: dict[str, list[float]], ceiling: str) -> None:
    base = statistics.median(results[ceiling])
    print(f"\n{title}")
    print(f"  {'method':<34} {'samples/s median':>17} {'min - max':>23} {'vs RAM':>7}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"  {name:<34} {med:>17,.0f} {min(values):>11,.0f} - {max(values):<11,.0f} {med / base:>6.2f}x")


def bench_dataset(ds: h5py.Dataset, args: argparse.Namespace) -> None:
    # The RAM ceiling needs the rows in memory: a dataset larger than --max-ram-gib is benchmarked on the
    # leading rows that fit (the same rows for every method).
    row_bytes = max(ds.dtype.itemsize * int(np.prod(ds.shape[1:])), 1)
    num_rows = min(len(ds), int(args.max_ram_gib * 2**30) // row_bytes)
    whole = ds[:num_rows]
    reader = RowReader(ds)
    methods: dict[str, Method] = {f"RowReader ({reader.mode})": reader.read}
    if reader.mode == "chunks":
        uncached = RowReader(ds, chunk_cache_bytes=0)
        methods["RowReader (chunks, cache off)"] = uncached.read
        hand = hand_decoder(ds)
        if hand is not None:
            how = "read_direct_chunk+zlib" if ds.compression == "gzip" and not ds.shuffle else "h5py slice per chunk"
            methods[f"hand-written ({how})"] = hand
    methods["h5py sorted fancy read"] = sorted_fancy(ds)
    methods["h5py per-row loop"] = per_row(ds)
    methods["RAM gather (arr[idx])"] = lambda idx: whole[idx]

    check = np.random.default_rng(1).integers(0, num_rows, args.batch_size)
    for name, method in methods.items():  # every method must return the same rows (and is warmed up here)
        assert np.array_equal(method(check), whole[check]), name
    results = run_rounds(methods, num_rows, rounds=args.rounds, batch_size=args.batch_size, seconds=args.seconds,
                         seed=args.seed)
    size = os.path.getsize(ds.file.filename)
    subset = "" if num_rows == len(ds) else f", indices drawn from the first {num_rows} rows"
    title = (f"{ds.file.filename}:{ds.name} {ds.shape}{subset} {ds.dtype} chunks={ds.chunks} "
             f"compression={ds.compression} ({whole.nbytes / max(ds.id.get_storage_size(), 1):.2f}x, "
             f"file {size / 2**20:.1f} MiB); mode {reader.mode}: {reader.reason}")
    report(title, results, "RAM gather (arr[idx])")
    for name in methods:
        if name.startswith("hand-written"):
            ratio = statistics.median(results["RowReader (chunks, cache off)"]) / statistics.median(results[name])
            print(f"  RowReader with the cache off / {name}: {ratio:.2f}x")


def bench_ragged(directory: Path, args: argparse.Namespace) -> None:
    """Ragged field (flat values + offsets): read_ranges for 32 random items vs h5py slices vs RAM slices."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 200, 4096)
    offsets = np.r_[0, np.cumsum(lengths)]
    path = directory / "ragged.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=rng.random(offsets[-1], dtype=np.float32), chunks=(4096,))
    warm_page_cache(path)
    with h5py.File(path, "r") as f:
        ds = f["values"]
        values = ds[()]
        reader = RowReader(ds)

        def items(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return offsets[idx], offsets[idx + 1]

        methods: dict[str, Method] = {
            f"RowReader.read_ranges ({reader.mode})": lambda idx: reader.read_ranges(*items(idx)),
            "h5py slice per item": lambda idx: np.concatenate([ds[offsets[i]:offsets[i + 1]] for i in idx]),
            "RAM slices (concatenate)": lambda idx: np.concatenate([values[offsets[i]:offsets[i + 1]] for i in idx]),
        }
        check = rng.integers(0, 4096, args.batch_size)
        for name, method in methods.items():
            assert np.array_equal(method(check), methods["RAM slices (concatenate)"](check)), name
        results = run_rounds(methods, 4096, rounds=args.rounds, batch_size=args.batch_size, seconds=args.seconds,
                             seed=args.seed)
    report(f"ragged: {offsets[-1]} float32 values, 4096 items of 0-199 values, chunks of 4096 values "
           f"(samples = items)", results, "RAM slices (concatenate)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, help="an HDF5 file to read (default: make test files in a temp dir)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=0.4, help="time per method per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-ram-gib", type=float, default=4.0,
                        help="rows held in RAM for the ceiling (larger datasets: the leading rows that fit)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, h5py {h5py.__version__}, "
          f"HDF5 {h5py.version.hdf5_version}, {os.cpu_count()} CPUs; batches of {args.batch_size} random indices, "
          f"{args.rounds} alternating rounds of ~{args.seconds}s per method")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [args.path] if args.path else make_files(Path(tmp))
        for path in paths:
            warm_page_cache(path)
            with h5py.File(path, "r") as f:
                datasets: list[h5py.Dataset] = []
                f.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset)
                             and obj.ndim >= 1 and len(obj) > 0 and not obj.dtype.hasobject else None)
                for ds in datasets:
                    bench_dataset(ds, args)
        if not args.path:
            bench_ragged(Path(tmp), args)


if __name__ == "__main__":
    main()
