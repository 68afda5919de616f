"""W&B offline: the steps a W&B offline run's own files hold, read from W&B's private transaction log.

Why a private format: offline, W&B ignores `resume=` (each process writes a directory of its own,
`wandb/offline-run-<time>-<id>/`, all with the run's id) and no public API reads an offline run, so only these files
tell which steps a killed process kept (docs/watching.md). Online, nothing here is used: W&B's documented resume by
id and `Api().run(path).lastHistoryStep` do it (hpctrain/loggers/wandb.py).

Format: `run-<id>.wandb`, LevelDB's log format (a 7-byte header: `:W&B`, magic 0xBEE1, version 0; then 32 KiB blocks
of CRC-32-checked chunks) around `wandb.proto.wandb_internal_pb2.Record` protobufs, whose history records
(`run.log`) hold `_step`. Tested: wandb>=0.17,<0.32 (`FORMAT`; the `wandb` extra pins the same range, and
tests/test_loggers.py reads runs the installed version wrote).

Outside that range, or when a file does not parse (another header, a corrupt chunk, a record that is not a `Record`,
a history row without `_step`), one warning names the installed version, the range and the loss, and
`stored_history` returns None. The feed then trusts hpctrain's own record of what it handed to W&B
(loggers/wandb.json): nothing is sent twice (but for a kill between a hand-over and that record's write), and steps
a SIGKILLed process handed to W&B before W&B wrote them are missing from the synced run.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

from hpctrain.loggers.pinned import FormatChanged, PinnedFormat

FORMAT = PinnedFormat(
    package="wandb", lowest="0.17", below="0.32", extra="wandb", tracker="W&B offline",
    reader="W&B's offline transaction log (wandb/offline-run-*/run-<id>.wandb)",
    lost="steps that a process killed by SIGKILL handed to W&B before W&B wrote them are missing from the synced "
         "run (hpctrain trusts its own record, loggers/wandb.json, and resends no step it recorded as sent)")

# LevelDB's log format as W&B writes it: the file header, then blocks of chunks, each with a header of CRC-32 (of its
# type and data), length and type (full, first, middle, last).
_FILE_HEADER = struct.Struct("<4sHB")
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32768
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def stored_history(root: Path, run_id: str) -> list[dict[str, Any]] | None:
    """`read_history`, or None (after the one warning) under an untested version or when the files do not parse."""
    return FORMAT.read(read_history, root, run_id)


def offline_directories(root: Path, run_id: str) -> list[Path]:
    """The offline directories of one run, in the order of their process's start (`wandb sync` them so)."""
    return sorted((Path(root) / "wandb").glob(f"offline-run-*-{run_id}"))


def read_history(root: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row (`run.log`) of one run's offline directories, in order: {key: value, "_step": step}.
    Raises FormatChanged where they do not parse."""
    rows = []
    for record in read_records(root, run_id):
        try:
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        except (AttributeError, ValueError) as error:  # a renamed field, a value that is no longer JSON
            raise FormatChanged(f"a history record of run {run_id}: {error}") from error
        if not isinstance(row.get("_step"), int):
            raise FormatChanged(f"a history record of run {run_id} has no integer _step: {sorted(row)[:8]}")
        rows.append(row)
    return rows


def read_records(root: Path, run_id: str) -> Iterator[Any]:
    """The records (wandb's protobuf `Record`s) of one run's offline directories, in order. Raises FormatChanged."""
    try:
        from google.protobuf.message import DecodeError
        from wandb.proto import wandb_internal_pb2
    except ImportError as error:
        raise FormatChanged(f"wandb's protobuf definitions cannot be imported: {error}") from error
    for directory in offline_directories(root, run_id):
        path = directory / f"run-{run_id}.wandb"
        for data in _transaction_log(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(data)
            except DecodeError as error:
                raise FormatChanged(f"{path}: a record that is not a wandb Record ({error})") from error
            yield record


def _transaction_log(path: Path) -> Iterator[bytes]:
    """The records of a `.wandb` file. A chunk cut short is where a killed writer stopped: the log ends there. A file
    too short for its header is one a killed process had not started. Raises FormatChanged for another header or
    a corrupt chunk."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if len(data) < _FILE_HEADER.size:
        return
    header = _FILE_HEADER.unpack_from(data)
    if header != (_IDENT, _MAGIC, _VERSION):
        raise FormatChanged(f"{path}: header {header}, not {(_IDENT, _MAGIC, _VERSION)}")
    position, record = _FILE_HEADER.size, b""
    while position + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # the block's zero padding
            position += left_in_block
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:
            position += left_in_block
            continue
        chunk = data[position + _CHUNK_HEADER.size:position + _CHUNK_HEADER.size + length]
        if len(chunk) < length:
            return
        if zlib.crc32(bytes([kind]) + chunk) != checksum or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            raise FormatChanged(f"{path}: a corrupt chunk at byte {position}")
        position += _CHUNK_HEADER.size + length
        record = chunk if kind in (_FULL, _FIRST) else record + chunk
        if kind in (_FULL, _LAST):
            yield record
