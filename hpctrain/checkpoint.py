"""Atomic, checksummed checkpoints in `<run dir>/checkpoints/`, their retention, and discovery at start-up.

A checkpoint is two files: `step_<n>.pt` (torch.save of plain containers and tensors, loadable with
`weights_only=True`) and `step_<n>.json`, its manifest (step, size, SHA-256 of the .pt). Both are written to a
temporary name, fsynced and renamed; the manifest goes last, so it marks the checkpoint complete. At start the
newest checkpoint whose file matches its manifest is used; a truncated or corrupt one is skipped with a warning.

Only the owner commits: before writing and before each rename, `save` checks that this process still holds the
run directory's lock (`hpctrain.distributed.check_run_owner`), so a lingering rank of an old job cannot commit a
checkpoint into a run directory another job has taken over.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from hpctrain.distributed import check_run_owner

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    manifest: dict[str, Any]


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes what passes through, so the checksum costs no second read."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


class CheckpointManager:
    """Writes (rank 0 only), prunes and finds checkpoints of one run."""

    def __init__(self, run_dir: Path, *, keep_last: int, keep_steps: Iterable[int] = ()) -> None:
        self.run_dir = run_dir
        self.directory = run_dir / CHECKPOINT_DIRNAME
        self.keep_last = keep_last
        self.keep_steps = set(keep_steps)

    def remove_stale_temporaries(self) -> None:
        """Delete what a write killed half-way left behind (only ever temporary names)."""
        if self.directory.is_dir():
            for stale in self.directory.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)

    def save(self, step: int, state: dict[str, Any], *, protected_steps: Iterable[int] = ()) -> Path:
        """Write the checkpoint of `step` atomically, then prune old ones (keeping `protected_steps`).
        Raises RunDirectoryTakenOver, having committed nothing, if this process no longer owns the run."""
        check_run_owner(self.run_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = _checkpoint_name(step)
        path = self.directory / f"{name}.pt"
        temporary = self.directory / f".{name}.pt.tmp-{os.getpid()}"
        started = time.perf_counter()
        with open(temporary, "wb") as file:
            writer = _HashingWriter(file)
            torch.save(state, writer)
            file.flush()
            os.fsync(file.fileno())
        self._commit(temporary, path)
        manifest = {"step": step, "file": path.name, "size": writer.size, "sha256": writer.sha256.hexdigest(),
                    "finished": bool(state.get("finished", False)), "written_at": time.time()}
        manifest_path = self.directory / f"{name}.json"
        temporary = manifest_path.with_name(f".{manifest_path.name}.tmp-{os.getpid()}")
        with open(temporary, "wb") as file:
            file.write(json.dumps(manifest, indent=1).encode())
            file.flush()
            os.fsync(file.fileno())
        self._commit(temporary, manifest_path)
        _fsync_directory(self.directory)
        log.info("checkpoint step %d written to %s (%.1f MB, %.2f s)", step, path, writer.size / 1e6,
                 time.perf_counter() - started)
        self.prune(protected_steps)
        return path

    def _commit(self, temporary: Path, path: Path) -> None:
        try:
            check_run_owner(self.run_dir)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, path)

    def complete(self) -> list[CheckpointInfo]:
        """Checkpoints with a manifest, newest first (their content is verified by `load`)."""
        found = []
        for manifest_path in self.directory.glob("step_*.json") if self.directory.is_dir() else ():
            try:
                manifest = json.loads(manifest_path.read_text())
                found.append(CheckpointInfo(int(manifest["step"]), self.directory / manifest["file"], manifest))
            except (ValueError, KeyError, OSError) as error:
                log.warning("ignoring unreadable checkpoint manifest %s (%s)", manifest_path, error)
        return sorted(found, key=lambda info: info.step, reverse=True)

    def prune(self, protected_steps: Iterable[int] = ()) -> None:
        checkpoints = self.complete()
        keep = {info.step for info in checkpoints[: self.keep_last]} | self.keep_steps | set(protected_steps)
        for info in checkpoints:
            if info.step not in keep:
                # Manifest first: a checkpoint half-deleted by a crash is then simply incomplete.
                (self.directory / f"{_checkpoint_name(info.step)}.json").unlink(missing_ok=True)
                info.path.unlink(missing_ok=True)

    @staticmethod
    def read_verified(info: CheckpointInfo) -> bytes:
        """The checkpoint's bytes, after checking them against the manifest; ValueError if they differ."""
        data = info.path.read_bytes()
        if len(data) != info.manifest["size"]:
            raise ValueError(f"size {len(data)} bytes, manifest says {info.manifest['size']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != info.manifest["sha256"]:
            raise ValueError("SHA-256 does not match the manifest (corrupt)")
        return data

    def newest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint whose file is intact; corrupt newer ones are reported and skipped."""
        for info in self.complete():
            try:
                self.read_verified(info)
                return info
            except (OSError, ValueError) as error:
                log.warning("checkpoint %s is unusable: %s; trying the previous one", info.path, error)
        return None

    @classmethod
    def load(cls, info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        data = cls.read_verified(info)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, dtypes, shapes and bytes: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
