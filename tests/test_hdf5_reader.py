"""RowReader against plain h5py on real HDF5 files: every layout and dtype, every index pattern, ragged ranges,
DataLoader workers (fork and spawn), files changed by another process, and the fallbacks."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hpctrain.data import hdf5_reader
from hpctrain.data.hdf5_reader import RowReader

N = 203  # not a multiple of any chunk size below: every chunked case has a partial last chunk


def _values(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == bool:
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(np.dtype(dtype))
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    return (rng.standard_normal(shape) * 100).astype(dtype)


# name -> (writer of dataset "x", expected mode)
Writer = Callable[[h5py.File], None]
CASES: dict[str, tuple[Writer, str]] = {
    "contiguous-3d-rows-f4": (lambda f: f.create_dataset("x", data=_values((N, 3, 4, 5), "f4")), "memmap"),
    "contiguous-1d-f8": (lambda f: f.create_dataset("x", data=_values((N,), "f8")), "memmap"),
    "chunked-partial-last-f4": (lambda f: f.create_dataset("x", data=_values((N, 6, 7), "f4"), chunks=(16, 6, 7)),
                                "memmap"),
    "chunked-1d-int16": (lambda f: f.create_dataset("x", data=_values((N,), "i2"), chunks=(10,)), "memmap"),
    "chunked-uint8": (lambda f: f.create_dataset("x", data=_values((N, 5), "u1"), chunks=(32, 5)), "memmap"),
    "chunked-bool": (lambda f: f.create_dataset("x", data=_values((N, 3), "?"), chunks=(8, 3)), "memmap"),
    "contiguous-bool": (lambda f: f.create_dataset("x", data=_values((N,), "?")), "memmap"),
    "chunked-float64": (lambda f: f.create_dataset("x", data=_values((N, 2, 2), "f8"), chunks=(50, 2, 2)),
                        "memmap"),
    "big-endian-f4": (lambda f: f.create_dataset("x", data=_values((N, 4), ">f4"), chunks=(16, 4)), "memmap"),
    "big-endian-contiguous-i4": (lambda f: f.create_dataset("x", data=_values((N, 4), ">i4")), "memmap"),
    "compound": (lambda f: f.create_dataset(
        "x", data=np.array([(i, i / 3, -(i % 100)) for i in range(N)], dtype=[("a", "<i4"), ("b", "<f8"), ("c", "i1")]),
        chunks=(16,)), "memmap"),
    "resizable-libver-latest": (lambda f: f.create_dataset("x", data=_values((N, 3), "f4"), chunks=(16, 3),
                                                           maxshape=(None, 3)), "memmap"),
    "gzip": (lambda f: f.create_dataset("x", data=_values((N, 6, 7), "f4"), chunks=(16, 6, 7),
                                        compression="gzip"), "chunks"),
    "gzip-resizable-libver-latest": (lambda f: f.create_dataset("x", data=_values((N, 4), "i4"), chunks=(16, 4),
                                                                maxshape=(None, 4), compression="gzip"), "chunks"),
    "lzf-1d": (lambda f: f.create_dataset("x", data=_values((N,), "i4"), chunks=(32,), compression="lzf"),
               "chunks"),
    "shuffle-gzip-u1": (lambda f: f.create_dataset("x", data=_values((N, 9), "u1"), chunks=(16, 9), shuffle=True,
                                                   compression="gzip", compression_opts=1), "chunks"),
    "shuffle-gzip-f8": (lambda f: f.create_dataset("x", data=_values((N, 2, 3), "f8"), chunks=(16, 2, 3),
                                                   shuffle=True, compression="gzip"), "chunks"),
    "gzip-split-rows": (lambda f: f.create_dataset("x", data=_values((N, 6), "i8"), chunks=(16, 4),
                                                   compression="gzip"), "chunks"),
    "fletcher32": (lambda f: f.create_dataset("x", data=_values((N, 3), "f8"), chunks=(16, 3), fletcher32=True),
                   "chunks"),
    "chunks-split-rows": (lambda f: f.create_dataset("x", data=_values((N, 6, 7), "f4"), chunks=(16, 3, 7)),
                          "chunks"),
    "chunks-wider-than-rows": (lambda f: f.create_dataset("x", data=_values((N, 5), "f4"), chunks=(16, 8),
                                                          maxshape=(None, None)), "chunks"),
    "compact": (lambda f: f.create_dataset("x", data=_values((N,), "i2"),
                                           dcpl=_compact_dcpl()), "h5py"),
    "fixed-string": (lambda f: f.create_dataset("x", data=np.array([f"s{i}".encode() for i in range(N)])), "h5py"),
}


def _compact_dcpl() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    return dcpl


def _unallocated(f: h5py.File) -> None:
    # Chunks 0, 3 and the partial last one are written; the others never are and read as the fill value.
    ds = f.create_dataset("x", shape=(N, 3), dtype="i4", chunks=(16, 3), fillvalue=-7)
    ds[0:16] = 1
    ds[50:60] = 2
    ds[200:203] = 3


CASES["unallocated-chunks"] = (_unallocated, "memmap")
CASES["unallocated-contiguous"] = (lambda f: f.create_dataset("x", shape=(N, 2), dtype="f4", fillvalue=1.5),
                                   "memmap")
CASES["unallocated-gzip"] = (lambda f: _unallocated_gzip(f), "chunks")


def _external(f: h5py.File) -> None:
    f.create_dataset("x", data=_values((N, 2), "i4"), external=[(f.filename + ".raw", 0, h5py.h5f.UNLIMITED)])


def _virtual(f: h5py.File) -> None:
    f["a"], f["b"] = _values((100, 3), "f4", seed=1), _values((N - 100, 3), "f4", seed=2)
    layout = h5py.VirtualLayout(shape=(N, 3), dtype="f4")
    layout[:100] = h5py.VirtualSource(f["a"])
    layout[100:] = h5py.VirtualSource(f["b"])
    f.create_virtual_dataset("x", layout)


CASES["external"] = (_external, "h5py")
CASES["virtual"] = (_virtual, "h5py")


def _unallocated_gzip(f: h5py.File) -> None:
    ds = f.create_dataset("x", shape=(N,), dtype="f8", chunks=(20,), fillvalue=np.nan, compression="gzip")
    ds[25:70] = 4.0


def _make(tmp_path: Path, writer: Writer, name: str = "data.h5", **file_kwargs: Any) -> Path:
    path = tmp_path / name
    with h5py.File(path, "w", **file_kwargs) as f:
        writer(f)
    return path


def _index_sets(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "random": rng.integers(0, n, 64),
        "sorted": np.sort(rng.choice(n, 40, replace=False)),
        "duplicated": np.array([5, 5, n - 1, 0, 5, n - 1, 17, 17]),
        "empty": np.array([], dtype=np.int64),
        "negative": np.array([-1, -n, 3, -2]),
        "all": np.arange(n),
        "2d": rng.integers(0, n, (4, 6)),
        "single-row-first-and-last-chunk": np.array([0, n - 1]),
    }


def _same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    # Bytes, not values: NaN fill values and -0.0 must be reproduced exactly too.
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(expected).tobytes()


@pytest.mark.parametrize(("case", "row_table"), [(case, True) for case in sorted(CASES)] + [
    pytest.param(case, False, id=f"{case}-no-row-table") for case in sorted(CASES) if CASES[case][1] == "memmap"])
def test_read_equals_h5py(tmp_path: Path, case: str, row_table: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, expected_mode = CASES[case]
    if not row_table:
        # memmap datasets longer than this compute row offsets from the per-chunk table on each read.
        monkeypatch.setattr(hdf5_reader, "_ROW_TABLE_MAX_ROWS", 0)
    path = _make(tmp_path, writer, libver="latest" if "latest" in case else "earliest")
    with h5py.File(path, "r") as f:
        ds = f["x"]
        whole = ds[()]
        reader = RowReader(ds)
        assert reader.mode == expected_mode, reader.reason
        assert reader.reason
        if expected_mode == "memmap":
            assert (reader._row_offsets is not None) == row_table
        assert reader.shape == ds.shape and reader.dtype == ds.dtype
        for label, index in _index_sets(len(ds)).items():
            got = reader.read(index)
            _same(got, whole[index])
            assert got.flags.writeable, label  # never a read-only view of the mapping
        for start, stop in [(0, N), (3, 40), (15, 17), (N - 5, N), (7, 7), (-10, None), (100, 10_000), (50, 20)]:
            _same(reader.read_range(start, stop), ds[start:stop])
        if expected_mode == "chunks":
            assert reader.stats["chunk_reads"] > 0
        index = np.array([3, 1, 2])
        _same(reader.read(list(index)), whole[index])  # plain lists are fine too
        _same(reader.read(np.int64(9)), whole[9:10].reshape(whole.shape[1:]))  # a scalar index: one row


def test_out_of_range_and_bad_indices_name_the_dataset(tmp_path: Path) -> None:
    path = _make(tmp_path, CASES["chunked-partial-last-f4"][0])
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
        for bad in ([N], [0, -N - 1], [10**12]):
            with pytest.raises(IndexError, match=f"{path}:/x"):
                reader.read(np.array(bad))
        with pytest.raises(TypeError):
            reader.read(np.array([0.5]))
        with pytest.raises(IndexError, match="/x"):
            reader.read_ranges(np.array([0, 5]), np.array([3, N + 1]))
        with pytest.raises(IndexError, match="/x"):
            reader.read_ranges(np.array([4]), np.array([3]))


@pytest.mark.parametrize("case", ["chunked-1d-int16", "contiguous-1d-f8", "lzf-1d", "chunked-partial-last-f4",
                                  "compact", "unallocated-chunks", "unallocated-contiguous", "unallocated-gzip"])
def test_read_ranges_ragged(tmp_path: Path, case: str) -> None:
    """Ragged field: flat values plus (n+1,) offsets; short ranges, empty ones, long ones, unsorted."""
    path = _make(tmp_path, CASES[case][0])
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 4, 60)
    lengths[[3, 10, 11]] = 0
    offsets = np.r_[0, np.cumsum(lengths)]
    assert offsets[-1] <= N
    with h5py.File(path, "r") as f:
        ds = f["x"]
        reader = RowReader(ds)
        items = rng.permutation(len(lengths))[:40]
        starts, stops = offsets[items], offsets[items + 1]
        expected = np.concatenate([ds[int(a):int(b)] for a, b in zip(starts, stops)])
        _same(reader.read_ranges(starts, stops), expected)
        # Few long ranges take the copy-per-range path.
        starts, stops = np.array([0, 100, 60, 5]), np.array([90, N, 60, 5])
        _same(reader.read_ranges(starts, stops), np.concatenate([ds[a:b] for a, b in zip(starts, stops)]))
        # All empty, and no ranges at all.
        _same(reader.read_ranges(np.array([4, 9]), np.array([4, 9])), ds[0:0])
        _same(reader.read_ranges(np.array([], int), np.array([], int)), ds[0:0])


def test_unallocated_chunks_read_as_fill_value(tmp_path: Path) -> None:
    path = _make(tmp_path, _unallocated)
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
        assert reader.mode == "memmap" and "fill value" in reader.reason
        got = reader.read(np.array([20, 0, 55, 202, 100]))
    assert got[:, 0].tolist() == [-7, 1, 2, 3, -7]


def test_user_block_offsets_are_absolute(tmp_path: Path) -> None:
    path = _make(tmp_path, CASES["chunked-partial-last-f4"][0], userblock_size=1024)
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 1024
        reader = RowReader(f["x"])
        assert reader.mode == "memmap"
        index = np.array([0, 100, N - 1, 7])
        _same(reader.read(index), f["x"][()][index])


def test_vlen_falls_back_to_h5py(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    values = [np.arange(i % 5, dtype="i4") for i in range(N)]
    path = tmp_path / "vlen.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.array(values + [None], dtype=object)[:-1], dtype=h5py.vlen_dtype("i4"))
        f.create_dataset("s", data=[f"string {i}" for i in range(N)], dtype=h5py.string_dtype())
    with h5py.File(path, "r") as f, caplog.at_level(logging.WARNING, logger="hpctrain.data.hdf5_reader"):
        reader = RowReader(f["x"])
        strings = RowReader(f["s"])
        assert reader.mode == "h5py" and "variable-length" in reader.reason
        assert strings.mode == "h5py"
        index = np.array([7, 3, 3, 200, 0])
        for got, k in zip(reader.read(index), index):
            assert np.array_equal(got, values[k]) and got.dtype == np.int32
        assert list(strings.read(index)) == list(f["s"][()][index])
        assert reader.read(np.array([], int)).shape == (0,)
    assert any("mode h5py" in r.getMessage() and "/x" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["gzip", "shuffle-gzip-f8", "shuffle-gzip-u1", "unallocated-gzip", "lzf-1d",
                                  "fletcher32", "gzip-split-rows", "chunks-split-rows"])
def test_hdf5_decodes_every_chunks_dataset(tmp_path: Path, case: str) -> None:
    """HDF5 reads and decodes the chunks (any filter) through the reader's own handle, with its own chunk cache off:
    decoded bands are kept in the reader's LRU instead (docs/benchmarks.md, "Compressed HDF5 reads")."""
    path = _make(tmp_path, CASES[case][0])
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
    assert reader.mode == "chunks"
    assert "decoded by HDF5" in reader.reason, reader.reason
    assert reader._dataset is not None and reader._mm is None  # an h5py handle of its own; no mapping of the file
    assert reader._dataset.id.get_access_plist().get_chunk_cache()[1] == 0  # rdcc_nbytes


def test_chunk_with_a_skipped_filter(tmp_path: Path) -> None:
    """A chunk written with deflate skipped (filter mask bit 1) holds shuffled but uncompressed bytes."""
    values = _values((48, 3), "f4")
    path = tmp_path / "mask.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", data=values, chunks=(16, 3), shuffle=True, compression="gzip")
        shuffled = values[16:32].reshape(-1).view(np.uint8).reshape(-1, 4).T.tobytes()
        ds.id.write_direct_chunk((16, 0), shuffled, filter_mask=0b10)
    with h5py.File(path, "r") as f:
        assert f["x"].id.read_direct_chunk((16, 0))[0] == 0b10
        whole = f["x"][()]
        reader = RowReader(f["x"])
    np.testing.assert_array_equal(whole, values)
    assert reader.mode == "chunks"
    _same(reader.read(np.arange(48)[::-1]), values[::-1])


def test_corrupt_chunk_is_an_error_naming_the_dataset(tmp_path: Path) -> None:
    path = _make(tmp_path, CASES["gzip"][0])
    with h5py.File(path, "r+") as f:
        f["x"].id.write_direct_chunk((48, 0, 0), b"not deflate data")  # chunk 3, rows 48-63
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
        assert reader.mode == "chunks"
        _same(reader.read(np.array([5, 200])), f["x"][[5, 200]])
        with pytest.raises(OSError, match=f"{path}:/x: chunk 3 \\(rows 48-63\\) cannot be read"):
            reader.read(np.array([50]))


def test_corrupt_first_chunk_fails_only_the_reads_that_need_it(tmp_path: Path) -> None:
    """Opening decodes no chunk: the reader of a file whose chunk 0 is damaged opens and reads the other chunks; a
    read that needs chunk 0 fails, as HDF5's own read does, with HDF5's reason and the dataset and chunk named."""
    path = _make(tmp_path, CASES["gzip"][0])
    with h5py.File(path, "r+") as f:
        f["x"].id.write_direct_chunk((0, 0, 0), b"not deflate data")
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
        assert reader.mode == "chunks"
        _same(reader.read(np.array([100, 20])), f["x"][[20, 100]][::-1])
        with pytest.raises(OSError) as hdf5_error:
            f["x"][3]
        with pytest.raises(OSError, match=f"{path}:/x: chunk 0 \\(rows 0-15\\)") as error:
            reader.read(np.array([100, 3]))
        assert str(hdf5_error.value) in str(error.value)


def test_chunk_bands_too_large_for_chunks_mode_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hdf5_reader, "MAX_BAND_BYTES", 1000)  # a gzip chunk here holds 16*6*7*4 = 2688 bytes
    path = _make(tmp_path, CASES["gzip"][0])
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
        assert reader.mode == "h5py" and "2688 bytes" in reader.reason
        index = np.array([200, 3, 3, 90])
        _same(reader.read(index), f["x"][()][index])


def test_empty_dataset_then_rows_appended(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=(0, 2), dtype="u2", chunks=(4, 2), maxshape=(None, 2))
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"], revalidate_interval_s=0.05)
    assert reader.mode == "memmap" and reader.shape == (0, 2)
    assert reader.read(np.array([], int)).shape == (0, 2) and reader.read_range(0, 5).shape == (0, 2)
    with pytest.raises(IndexError):
        reader.read(np.array([0]))
    _run_writer(path, "d = f['x']; d.resize((10, 2)); d[:] = np.arange(20).reshape(10, 2)")
    time.sleep(0.1)  # checks at most every 0.05 s
    _same(reader.read(np.array([9, 0])), np.array([[18, 19], [0, 1]], dtype="u2"))


def test_writable_handle_reads_through_it(tmp_path: Path) -> None:
    """A file this process has open for writing may hold unflushed data only its handle sees."""
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", data=np.zeros((40, 2), "f4"), chunks=(8, 2), maxshape=(None, 2))
        reader = RowReader(ds)
        assert reader.mode == "h5py" and "writing" in reader.reason
        ds[5] = 3.0
        ds.resize((50, 2))
        ds[45] = 4.0
        assert reader.read(np.array([5, 45]))[:, 0].tolist() == [3.0, 4.0]


def test_chunk_cache_is_bounded_and_reads_each_chunk_once(tmp_path: Path) -> None:
    path = _make(tmp_path, CASES["gzip"][0])  # chunks of 16 rows of 6x7 float32: 2688 bytes each
    chunk_bytes = 16 * 6 * 7 * 4
    with h5py.File(path, "r") as f:
        whole = f["x"][()]
        uncached = RowReader(f["x"], chunk_cache_bytes=0)
        index = np.array([0, 1, 15, 16, 40, 2, 33, 17])  # chunks 0, 1, 2
        _same(uncached.read(index), whole[index])
        assert uncached.stats["chunk_reads"] == 3
        _same(uncached.read(index), whole[index])
        assert uncached.stats == {"chunk_reads": 6, "cache_hits": 0, "relocations": 0}

        small = RowReader(f["x"], chunk_cache_bytes=2 * chunk_bytes)
        rng = np.random.default_rng(3)
        for _ in range(20):
            index = rng.integers(0, N, 10)
            _same(small.read(index), whole[index])
            assert small._cached_bytes <= 2 * chunk_bytes
        cached = RowReader(f["x"])
        _same(cached.read(np.arange(N)), whole)
        reads = cached.stats["chunk_reads"]
        index = rng.integers(0, N, 50)
        _same(cached.read(index), whole[index])
        assert cached.stats["chunk_reads"] == reads  # everything was served from the cache


def test_pickle_round_trip_reuses_the_located_layout(tmp_path: Path) -> None:
    path = _make(tmp_path, CASES["unallocated-chunks"][0])
    with h5py.File(path, "r") as f:
        whole = f["x"][()]
        reader = RowReader(f["x"])
    clone = pickle.loads(pickle.dumps(reader))  # the caller's file is closed by now: the reader never needed it
    assert clone.mode == "memmap"
    index = np.array([3, 150, 60, 3])
    _same(clone.read(index), whole[index])
    _same(reader.read(index), whole[index])
    assert clone.stats["relocations"] == 0


# -- DataLoader workers ------------------------------------------------------------------------------------------

class ReaderDataset(Dataset):
    """Each item is a batch: the rows of every reader at one index array."""

    def __init__(self, readers: dict[str, RowReader], batches: list[np.ndarray]) -> None:
        self.readers = readers
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = self.batches[item]
        return {"pid": os.getpid(), **{name: r.read(index) for name, r in self.readers.items()}}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(tmp_path: Path, context: str) -> None:
    def writer(f: h5py.File) -> None:
        CASES["chunked-partial-last-f4"][0](f)
        f["g"] = f["x"][()] * 2
        f.create_dataset("z", data=f["x"][()] + 1, chunks=(16, 6, 7), compression="gzip")  # decoded by HDF5
        f.create_dataset("l", data=f["x"][()] - 1, chunks=(16, 6, 7), compression="lzf")
        f.create_dataset("v", data=[f"s{i}".encode() for i in range(N)], dtype=h5py.string_dtype("ascii"))

    path = _make(tmp_path, writer)
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, N, 8) for _ in range(12)]
    with h5py.File(path, "r") as f:
        readers = {name: RowReader(f[name]) for name in ("x", "g", "z", "l", "v")}
        assert [r.mode for r in readers.values()] == ["memmap", "memmap", "chunks", "chunks", "h5py"]
        whole = {name: f[name][()] for name in readers}
        for reader in readers.values():  # used in the parent first: workers inherit open mappings and handles
            reader.read(batches[0])
        loader = DataLoader(ReaderDataset(readers, batches), batch_size=None, num_workers=2,
                            multiprocessing_context=context)
        pids = set()
        for item, batch in enumerate(loader):
            pids.add(batch["pid"])
            for name in readers:
                got = batch[name]
                got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
                expected = whole[name][batches[item]]
                if name == "v":
                    assert list(got) == list(expected)
                else:
                    _same(got, expected)
    assert len(pids) == 2 and os.getpid() not in pids


# -- files that change under the reader --------------------------------------------------------------------------

def _run_writer(path: Path, code: str) -> None:
    """Another process modifies the file (no HDF5 file locking: the test keeps its own read handle open)."""
    script = f"import h5py, numpy as np\nwith h5py.File({str(path)!r}, 'a', locking=False) as f:\n" + "".join(
        f"    {line}\n" for line in code.strip().splitlines())
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_file_appended_by_another_process(tmp_path: Path, compression: str | None,
                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "grow.h5"
    first = np.arange(100 * 3, dtype="f4").reshape(100, 3)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=first, chunks=(16, 3), maxshape=(None, 3), compression=compression)
    with h5py.File(path, "r") as f, caplog.at_level(logging.INFO, logger="hpctrain.data.hdf5_reader"):
        reader = RowReader(f["x"])
        assert reader.mode == ("chunks" if compression else "memmap")
        _same(reader.read(np.array([99, 0, 50])), first[[99, 0, 50]])
        # Appends rows, and rewrites rows 0-19 (the cached/located chunk 0 must not be served stale).
        _run_writer(path, """
d = f['x']; d.resize((300, 3)); d[100:] = -np.arange(200 * 3, dtype='f4').reshape(200, 3); d[0:20] = 7
""")
        assert f["x"].shape == (100, 3)  # the caller's own handle still sees the old file (shared HDF5 cache)
        expected = np.concatenate([np.full((20, 3), 7, "f4"), first[20:],
                                   -np.arange(200 * 3, dtype="f4").reshape(200, 3)])
        index = np.array([299, 0, 150, 99, 19, 20])
        _same(reader.read(index), expected[index])
        assert reader.shape == (300, 3)
        _same(reader.read_range(90, 110), expected[90:110])
        _same(reader.read_ranges(np.array([295, 0]), np.array([300, 2])), expected[[295, 296, 297, 298, 299, 0, 1]])
        assert reader.stats["relocations"] == 1
    assert any("file changed" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def _two_fields(tmp_path: Path) -> tuple[Path, RowReader, RowReader]:
    """A file with two growable chunked fields x and y of 20 rows (row k = [2k, 2k+1]), and a reader of each."""
    path = tmp_path / "fields.h5"
    with h5py.File(path, "w") as f:
        for name in ("x", "y"):
            f.create_dataset(name, data=np.arange(40, dtype="f4").reshape(20, 2), chunks=(4, 2), maxshape=(None, 2))
    with h5py.File(path, "r") as f:
        return path, RowReader(f["x"]), RowReader(f["y"])


def _count_stats(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The paths the reader stat()s from now on."""
    stats: list[Any] = []
    real_stat = os.stat
    monkeypatch.setattr(hdf5_reader.os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    return stats


def test_one_check_serves_a_batch_of_fields_and_misses_no_change(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The check after reading one field is the check before reading the next (here: whatever the time between
    them); rows appended to the second field in between are still read, through the check after its read."""
    path, x, y = _two_fields(tmp_path)
    for reader in (x, y):
        reader.read(np.array([0]))  # located
    monkeypatch.setattr(hdf5_reader, "_SHARED_CHECK_S", 3600.0)
    stats = _count_stats(monkeypatch)
    _same(x.read(np.array([3, 1])), np.array([[6, 7], [2, 3]], "f4"))
    _same(y.read(np.array([19])), np.array([[38, 39]], "f4"))
    assert len(stats) == 2  # each read's check after it; the check before is the previous read's check after
    x.read(np.array([0]))
    _run_writer(path, "d = f['y']; d.resize((30, 2)); d[20:] = -1")
    _same(y.read(np.array([25, 0])), np.array([[-1, -1], [0, 1]], "f4"))  # past the end of what y had located
    assert y.shape == (30, 2) and y.stats["relocations"] == 1


def test_fields_read_together_take_one_check_after_all_and_miss_no_change(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """read_together equals one read per reader, checks the file once after all the reads, and a change made
    while the first field was read is caught by that check: both fields are read again."""
    path, x, y = _two_fields(tmp_path)
    index = np.array([19, 3, 3, 0])
    for got, reader in zip(hdf5_reader.read_together([x, y], index), (x, y)):
        _same(got, reader.read(index))
    monkeypatch.setattr(hdf5_reader, "_SHARED_CHECK_S", 3600.0)
    stats = _count_stats(monkeypatch)
    hdf5_reader.read_together([x, y], index)
    assert len(stats) == 1
    real_read = RowReader._read_index
    writes = []

    def read_then_write(reader: RowReader, layout: Any, index: np.ndarray) -> np.ndarray:
        rows = real_read(reader, layout, index)
        if reader is x and not writes:  # another process rewrites both fields after x was read
            writes.append(1)
            _run_writer(path, "for n in ('x', 'y'): d = f[n]; d.resize((21, 2)); d[19] = -1; d[20] = -2")
        return rows

    monkeypatch.setattr(RowReader, "_read_index", read_then_write)
    got_x, got_y = hdf5_reader.read_together([x, y], np.array([19, 0]))
    _same(got_x, np.array([[-1, -1], [0, 1]], "f4"))
    _same(got_y, np.array([[-1, -1], [0, 1]], "f4"))
    assert writes and x.stats["relocations"] == y.stats["relocations"] == 1


def test_file_replaced_by_rename(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A new file renamed over the old one (possibly with another layout) is picked up, mode change logged."""
    path = _make(tmp_path, CASES["chunked-partial-last-f4"][0])
    with h5py.File(path, "r") as f:
        reader = RowReader(f["x"])
    reader.read(np.array([1, 2]))
    replacement = _make(tmp_path, lambda f: f.create_dataset("x", data=np.arange(50, dtype="i8"),
                                                             compression="lzf", chunks=(8,)), "new.h5")
    os.replace(replacement, path)
    with caplog.at_level(logging.INFO, logger="hpctrain.data.hdf5_reader"):
        _same(reader.read(np.array([49, 0])), np.array([49, 0], dtype="i8"))
    assert reader.mode == "chunks" and reader.shape == (50,)
    assert any(r.levelno == logging.WARNING and "memmap -> chunks" in r.getMessage() for r in caplog.records)


def test_file_changed_between_pickle_and_use(tmp_path: Path) -> None:
    path = tmp_path / "grow.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros((40, 2), "i4"), chunks=(8, 2), maxshape=(None, 2))
    with h5py.File(path, "r") as f:
        blob = pickle.dumps(RowReader(f["x"]))
    _run_writer(path, "d = f['x']; d.resize((64, 2)); d[40:] = 9")
    clone = pickle.loads(blob)
    assert clone.read(np.array([63, 0]))[:, 0].tolist() == [9, 0]
    assert clone.stats["relocations"] == 1


def test_process_exit_with_a_reader_still_open(tmp_path: Path) -> None:
    """A reader alive at interpreter exit closes its own HDF5 handle while Python still runs (HDF5 closing it
    from its C exit handler called into the finalized interpreter: a segfault, seen in DataLoader workers)."""
    path = _make(tmp_path, CASES["lzf-1d"][0])  # decoded through HDF5: the reader keeps an h5py handle
    script = f"""
import ctypes, h5py, numpy as np
from hpctrain.data import hdf5_reader
from hpctrain.data.hdf5_reader import RowReader
with h5py.File({str(path)!r}, "r") as f:
    reader = RowReader(f["x"])
assert reader.mode == "chunks"
reader.read(np.arange(5))
ctypes.pythonapi.Py_IncRef(ctypes.py_object(reader))  # never freed, so never closed by garbage collection
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
