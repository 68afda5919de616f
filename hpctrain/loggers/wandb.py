"""Weights & Biases: one W&B run per run directory, offline by default (`mode="offline"`: nothing leaves the
machine; `wandb sync` uploads it later from a login node). Its files are in `RUN_DIR/wandb/`.

The run id is stored in `RUN_DIR/loggers/wandb.json` and every start reopens it (`id=..., resume="allow"`). Offline,
each process writes a directory of its own, `wandb/offline-run-<time>-<id>/`, all with the same id: `wandb sync`
of them in time order (`wandb sync RUN_DIR/wandb/offline-run-*-<id>`) makes one run. On reopening, the feed reads
those directories' transaction logs (`read_history`) for the last step of each kind they hold, and sends only
later ones (from metrics.h5, then live), so each step is in one of them once: also after a kill that lost what
W&B had not written yet, whose rows are sent again. Online (`mode="online"`), W&B's server drops any step below
the run's current one.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from hpctrain.callbacks import EndView, RunView
from hpctrain.loggers import KINDS, Logger, display_name, run_tags, short_tags
from hpctrain.run.metrics import MetricsRow

# The framing of W&B's transaction log (`.wandb`, LevelDB's log format): a 7-byte file header, then 32 KiB blocks
# of chunks, each with a header of CRC-32 (of its type and data), length and type (full, first, middle, last).
_FILE_HEADER = 7
_BLOCK = 32768
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbLogger(Logger):
    name = "wandb"
    packages = ("wandb",)
    extra = "wandb"

    def __init__(self, *, mode: str = "offline", project: str | None = None, entity: str | None = None,
                 dir: str | None = None, group: str | None = None, run_name: str | None = None,
                 tags: Sequence[str] = ()) -> None:
        self.mode, self.project, self.entity, self.dir = mode, project, entity, dir
        self.group, self.run_name, self.tags = group, run_name, tuple(tags)
        self.run: Any = None
        self.run_id = ""
        self.root = Path()

    def open(self, run: RunView, state: dict[str, Any], *, rewind_to: int | None) -> dict[str, Any]:
        if self.mode == "offline":  # nothing leaves the machine: not even W&B's error reports (Sentry)
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        self.run_id = state.get("run_id") or uuid.uuid4().hex[:16]  # W&B's ids: lowercase letters and digits
        self.root = Path(state.get("dir") or self.dir or run.run_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        tags = run_tags(run)
        settings = wandb.Settings(mode=self.mode, silent=True, console="off", x_disable_stats=True,
                                  x_disable_meta=True, disable_git=True, save_code=False, x_save_requirements=False)
        self.run = wandb.init(
            id=self.run_id, resume="allow", dir=str(self.root), settings=settings,
            project=self.project or str(run.config.get("task", {}).get("name", "hpctrain")), entity=self.entity,
            group=self.group or tags.get("hpctrain.sweep") or run.run_name,
            job_type="train" if run.phase == "train" else "test", name=display_name(run, self.run_name),
            tags=[*self.tags, *short_tags(tags)],
            # Every process sends the config (the same): a killed one may have written nothing of its run.
            config={**dict(run.config), **tags, "hpctrain.run_dir": str(run.run_dir)})
        return {"run_id": self.run_id, "dir": str(self.root), "mode": self.mode}

    def stored_steps(self, run: RunView, state: dict[str, Any]) -> dict[str, int] | None:
        if self.mode != "offline" or not state.get("run_id"):
            return None  # online the server ignores a step below the run's current one
        steps = {kind: 0 for kind in KINDS}
        root = Path(state.get("dir") or self.dir or run.run_dir)
        if not offline_directories(root, state["run_id"]):
            return steps
        for row in read_history(root, state["run_id"]):
            for kind in KINDS:
                if f"{kind}/loss" in row:
                    steps[kind] = max(steps[kind], int(row["_step"]))
        return steps

    def log_rows(self, rows: list[MetricsRow]) -> None:
        # One W&B step holds every kind's values of a step (W&B's steps only increase).
        by_step: dict[int, dict[str, float]] = {}
        for row in rows:
            by_step.setdefault(row.step, {}).update({f"{row.kind}/{name}": value for name, value in row.values.items()})
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step)

    def finish(self, end: EndView) -> None:
        import wandb

        if end.finished:
            if end.plots:
                self.run.log({f"plots/{Path(path).stem}": wandb.Image(str(path)) for path in end.plots}, step=end.step)
            if end.best_checkpoint is not None:
                self.run.summary["hpctrain.best_checkpoint"] = str(end.best_checkpoint)
                self.run.summary["hpctrain.best_step"] = end.best_step
            self.run.summary["hpctrain.stop_reason"] = end.stop_reason
        elif not end.error:  # stopped for a requeue: W&B shows the run preempted, the next start resumes it
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if end.finished or not end.error else 1)
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)


def offline_directories(root: Path, run_id: str) -> list[Path]:
    """The offline directories of one run, in the order of their process's start (`wandb sync` them so)."""
    return sorted((Path(root) / "wandb").glob(f"offline-run-*-{run_id}"))


def read_records(root: Path, run_id: str) -> Iterator[Any]:
    """The records (wandb's protobuf `Record`s) of one run's offline directories, in order."""
    from wandb.proto import wandb_internal_pb2

    for directory in offline_directories(root, run_id):
        for data in _transaction_log(directory / f"run-{run_id}.wandb"):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            yield record


def read_history(root: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row (`run.log`) of one run's offline directories, in order: {key: value, "_step": step}."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in read_records(root, run_id) if record.WhichOneof("record_type") == "history"]


def _transaction_log(path: Path) -> Iterator[bytes]:
    """The records of a `.wandb` file; a chunk cut short or corrupt (a killed writer) ends it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    position, record = _FILE_HEADER, b""
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
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != checksum:
            return
        position += _CHUNK_HEADER.size + length
        record = chunk if kind in (_FULL, _FIRST) else record + chunk
        if kind in (_FULL, _LAST):
            yield record
