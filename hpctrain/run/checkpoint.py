"""Atomic, checksummed checkpoints in `<run dir>/checkpoints/`, their retention, and discovery at start-up.

A checkpoint is two files: `step_<n>.pt` (torch.save of plain containers and tensors, loadable with
`weights_only=True`) and `step_<n>.json`, its manifest (step, size, CRC-32 of the .pt). Both are written to a
temporary name, fsynced and renamed; the manifest goes last, so it marks the checkpoint complete. At start the
newest checkpoint whose file matches its manifest is used; a truncated or corrupt one is skipped with a warning.

Writing costs the loop no more than a plain torch.save + fsync: torch.save's own CRC32 of each record is left
out (the manifest's covers the whole file), and the checksum is computed by another thread, reading the file back
from the page cache just behind the writer, and its tail while fsync waits for the disk. The checksum is zlib's
CRC-32, not a cryptographic hash: it is there to find torn and corrupted files, and it does (every burst of up
to 32 bits, any other corruption but for a chance of 2**-32), and at about 2 GB/s on one core it keeps up with
torch.save, which SHA-256 (1.3 GB/s) did not. Manifests written with a SHA-256 (`sha256`) are verified with it.
Old checkpoints are pruned by a background thread once the new one is complete (unlinking a large file can take
longer than checksumming it).
With `save_async` the loop only waits for a copy of the state in host memory; the background thread serialises,
writes, checksums, fsyncs, renames and prunes. The next checkpoint waits for the previous one and its pruning, and
`wait()` (called before a run ends, also when it stops to be requeued) returns only once every checkpoint handed
over is complete.
A process killed during a background write leaves only a temporary file: the previous checkpoint stays the newest
valid one. A write that fails (a full disk, a quota: an OSError, raised by `save`, or for `save_async` by the next
`save_async`, `wait` or `close`) leaves nothing of its checkpoint behind, not even a .pt without its manifest, and
prunes nothing: old checkpoints are only pruned once a newer one is complete.

Only the owner commits: before writing and before each rename, `save` checks that this process still holds the
run directory's lock (`hpctrain.process.distributed.check_run_owner`), so a lingering rank of an old job cannot commit a
checkpoint into a run directory another job has taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from hpctrain.config import ConfigError
from hpctrain.process.distributed import RunDirectoryTakenOver, check_run_owner

try:
    from torch.utils.serialization import config as serialization_config
except ImportError:  # torch < 2.6: the CRC32 of each record is computed
    serialization_config = None

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
CHECKSUM_BLOCK = 1 << 20


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    manifest: dict[str, Any]


def _to_host(value: Any, reuse: Any = None) -> Any:
    """A copy of a checkpoint state that later training steps cannot change: tensors copied to host memory, into
    the tensors of `reuse` (the previous copy, already written) where shapes and dtypes match, because fresh
    memory costs a page fault per page on first touch, several times the copy itself."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if not (isinstance(reuse, torch.Tensor) and reuse.shape == value.shape and reuse.dtype == value.dtype):
            reuse = torch.empty(value.shape, dtype=value.dtype)
        if value.device.type == "cpu" and value.is_contiguous() and value.dtype != torch.bfloat16:
            # A plain memcpy: torch's parallel copy waits on its thread pool, which on a busy node costs more than
            # the copy itself.
            np.copyto(reuse.numpy(), value.numpy())
            return reuse
        return reuse.copy_(value)
    if isinstance(value, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {key: _to_host(item, reuse.get(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(value) else [None] * len(value)
        return type(value)(_to_host(item, old) for item, old in zip(value, reuse))
    return value


class _ChecksummingWriter:
    """The file object torch.save writes a checkpoint through, unbuffered, while a thread computes the CRC-32 of
    what is already in the file by reading it back from the page cache, trailing the writer. Serialisation and
    checksumming then overlap (zlib.crc32 and file reads release the GIL), and only the tail is left to do during
    fsync."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.written = 0
        self._done = threading.Event()
        self._crc32 = 0
        self._error: OSError | None = None
        self.write_error: OSError | None = None  # torch.save reports it as a RuntimeError, without the errno
        self._thread = threading.Thread(target=self._checksum, name="hpctrain-checkpoint-checksum", daemon=True)
        self._thread.start()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):  # a raw write may be partial
                done += self.file.write(view[done:])
        except OSError as error:
            self.write_error = error
            raise
        self.written += done
        return done

    def flush(self) -> None:
        pass  # unbuffered: every write is already in the kernel

    def _checksum(self) -> None:
        offset = 0
        # One small buffer, reused: it stays in the CPU cache, and fresh memory would cost a page fault per page.
        buffer = memoryview(bytearray(CHECKSUM_BLOCK))
        try:
            with open(self.file.name, "rb", buffering=0) as reader:  # a descriptor of its own, read in order
                while True:
                    finished = self._done.is_set()  # read before `written`: no byte written before it is missed
                    end = self.written
                    while offset < end:
                        read = reader.readinto(buffer[: min(CHECKSUM_BLOCK, end - offset)])
                        if not read:
                            raise OSError(f"{self.file.name}: shorter than written ({offset} < {end} bytes)")
                        self._crc32 = zlib.crc32(buffer[:read], self._crc32)
                        offset += read
                    if finished:
                        return
                    self._done.wait(0.002)
        except OSError as error:
            self._error = error

    def finish(self) -> None:
        """Nothing more will be written: the thread checksums the rest and ends."""
        self._done.set()

    def join(self) -> None:
        """After `finish`: wait for the thread (also when writing failed, so that no thread outlives the file)."""
        self._thread.join()

    def digest(self) -> tuple[str, int]:
        """After `finish`: (CRC-32 as 8 hex digits, size)."""
        self.join()
        if self._error is not None:
            raise self._error
        return f"{self._crc32:08x}", self.written


def _without_record_crc32() -> contextlib.AbstractContextManager[Any]:
    """torch.save without the CRC32 of each record, which costs as much as writing the bytes: the manifest's
    CRC-32 covers the whole file, off the critical path. (torch.load does not need the CRCs; zip tools warn.)
    The patch is thread-local in recent torch; in older versions a torch.save of another thread meanwhile also
    goes without, which torch.load does not mind either."""
    if serialization_config is None:
        return contextlib.nullcontext()
    return serialization_config.patch({"save.compute_crc32": False})


def _torch_save(state: dict[str, Any], writer: _ChecksummingWriter) -> None:
    """torch.save through `writer`, raising the disk's own error (ENOSPC, EDQUOT: an OSError the trainer stops
    on) where torch.save turns it into a RuntimeError without it."""
    try:
        with _without_record_crc32():
            torch.save(state, writer)
    except RuntimeError:
        if writer.write_error is None:
            raise
        raise writer.write_error from None


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
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._snapshot: Any = None

    def path_of(self, step: int) -> Path:
        """Where the checkpoint of `step` is (or would be) written."""
        return self.directory / f"{_checkpoint_name(step)}.pt"

    def remove_stale_temporaries(self) -> None:
        """Delete what a write killed half-way left behind (only ever temporary names)."""
        if self.directory.is_dir():
            for stale in self.directory.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)

    def save(self, step: int, state: dict[str, Any], *, protected_steps: Iterable[int] = ()) -> Path:
        """Write the checkpoint of `step` atomically and return once it is complete; old ones are then pruned
        (keeping `protected_steps`) in the background, done before the next checkpoint starts or `wait()` returns.
        Raises RunDirectoryTakenOver, having committed nothing, if this process no longer owns the run."""
        self.wait()  # checkpoints are committed in order
        path = self._write(step, state)
        self._submit(self._prune_after_write, set(protected_steps))
        return path

    def save_async(self, step: int, state: dict[str, Any], *, protected_steps: Iterable[int] = ()) -> None:
        """Copy the state to host memory and return; a background thread writes it as `save` would, then prunes.
        The previous background work is finished first; its error, if any, is raised here."""
        self.wait()  # the previous snapshot is written: its memory can take this one
        snapshot = self._snapshot = _to_host(state, self._snapshot)
        self._submit(self._write_and_prune, step, snapshot, set(protected_steps))

    def _write_and_prune(self, step: int, state: dict[str, Any], protected_steps: set[int]) -> None:
        self._write(step, state)
        self._prune_after_write(protected_steps)

    def _prune_after_write(self, protected_steps: set[int]) -> None:
        """Prune in the background, as the owner of the run only (a run taken over meanwhile is told so by its
        next checkpoint's commit check). A file that cannot be deleted now (a network file system's transient
        error) is left for the next checkpoint's pruning: the checkpoints are safe, and the run must not fail
        over it."""
        try:
            check_run_owner(self.run_dir)
        except RunDirectoryTakenOver as error:
            log.warning("old checkpoints not pruned: %s", error)
            return
        try:
            self.prune(protected_steps)
        except OSError as error:
            log.warning("pruning old checkpoints in %s failed (%s); the next checkpoint tries again",
                        self.directory, error)

    def _submit(self, work: Callable[..., None], *args: Any) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpctrain-checkpoint")
        self._pending = self._writer.submit(work, *args)

    def wait(self) -> None:
        """Block until the background write and pruning (if any) are done; their error, if any, is raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the background write and pruning, then stop their thread."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def _write(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of `step`: the .pt, then its manifest, each to a temporary name, fsynced and
        renamed. An OSError (a full disk, a quota, an I/O error) leaves nothing of it behind, so that it holds no
        space and the previous checkpoints stay the newest: the temporaries are removed, and so is a committed .pt
        whose manifest could not be written or made durable. The error names the checkpoint's file."""
        check_run_owner(self.run_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = _checkpoint_name(step)
        path, manifest_path = self.directory / f"{name}.pt", self.directory / f"{name}.json"
        started = time.perf_counter()
        try:
            crc32, size = self._write_file(state, path)
            manifest = {"step": step, "file": path.name, "size": size, "crc32": crc32,
                        "finished": bool(state.get("finished", False)), "written_at": time.time()}
            try:
                self._write_manifest(manifest, manifest_path)
                _fsync_directory(self.directory)
            except OSError:
                # Manifest first: at every moment of the removal the checkpoint is simply incomplete.
                manifest_path.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                raise
        except OSError as error:
            # A write's error names no file, and an asynchronous one shows a checkpoint later: name it.
            if error.filename is None and error.errno is not None:
                raise OSError(error.errno, error.strerror, str(path)) from error
            raise
        log.info("checkpoint step %d written to %s (%.1f MB, %.2f s)", step, path, size / 1e6,
                 time.perf_counter() - started)
        return path

    def _write_file(self, state: dict[str, Any], path: Path) -> tuple[str, int]:
        """torch.save `state` to `path` through a fsynced temporary; (CRC-32 as 8 hex digits, size)."""
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "w+b", buffering=0) as file:
                writer = _ChecksummingWriter(file)
                try:
                    _torch_save(state, writer)
                    writer.finish()
                    # The checksum thread reads the last bytes from the page cache while fsync waits for the disk.
                    os.fsync(file.fileno())
                finally:
                    writer.finish()
                    writer.join()
                crc32, size = writer.digest()
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._commit(temporary, path)
        return crc32, size

    def _write_manifest(self, manifest: dict[str, Any], manifest_path: Path) -> None:
        temporary = manifest_path.with_name(f".{manifest_path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                file.write(json.dumps(manifest, indent=1).encode())
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._commit(temporary, manifest_path)

    def _commit(self, temporary: Path, path: Path) -> None:
        """Rename `temporary` to `path` if this process still owns the run; else (or if the rename fails) remove
        it."""
        try:
            check_run_owner(self.run_dir)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def complete(self) -> list[CheckpointInfo]:
        """Checkpoints with a manifest, newest first (their content is verified by `load`)."""
        found = []
        for manifest_path in self.directory.glob("step_*.json") if self.directory.is_dir() else ():
            try:
                manifest = json.loads(manifest_path.read_text())
                found.append(CheckpointInfo(int(manifest["step"]), self.directory / manifest["file"], manifest))
            except FileNotFoundError:
                continue  # pruned meanwhile
            except (ValueError, KeyError, OSError) as error:
                log.warning("ignoring unreadable checkpoint manifest %s (%s)", manifest_path, error)
        return sorted(found, key=lambda info: info.step, reverse=True)

    def prune(self, protected_steps: Iterable[int] = ()) -> None:
        """Delete the checkpoints not kept, and checkpoint files older than the newest complete checkpoint that
        have no manifest (left by a crash, or by a deletion that failed after its manifest went)."""
        checkpoints = self.complete()
        keep = {info.step for info in checkpoints[: self.keep_last]} | self.keep_steps | set(protected_steps)
        for info in checkpoints:
            if info.step not in keep:
                # Manifest first: a checkpoint half-deleted by a crash is then simply incomplete.
                (self.directory / f"{_checkpoint_name(info.step)}.json").unlink(missing_ok=True)
                info.path.unlink(missing_ok=True)
        complete = {info.path for info in checkpoints}
        for path in self.directory.glob("step_*.pt") if checkpoints else ():
            step = path.stem.removeprefix("step_")
            if path not in complete and step.isdigit() and int(step) < checkpoints[0].step:
                path.unlink(missing_ok=True)

    @staticmethod
    def read_verified(info: CheckpointInfo) -> bytes:
        """The checkpoint's bytes, after checking them against the manifest; ValueError if they differ."""
        manifest = info.manifest
        if "size" not in manifest or not ("crc32" in manifest or "sha256" in manifest):
            raise ValueError("its manifest has no size or no checksum (crc32, or sha256 before)")
        data = info.path.read_bytes()
        if len(data) != manifest["size"]:
            raise ValueError(f"size {len(data)} bytes, manifest says {manifest['size']} (truncated?)")
        if "sha256" in manifest:  # written before the manifests held a CRC-32
            if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
                raise ValueError("SHA-256 does not match the manifest (corrupt)")
        elif f"{zlib.crc32(data):08x}" != manifest["crc32"]:
            raise ValueError("CRC-32 does not match the manifest (corrupt)")
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

    @staticmethod
    def load_mapped(info: CheckpointInfo) -> dict[str, Any]:
        """The checkpoint with its tensors memory-mapped from the file, not read: for a look at names, shapes and
        the config of a checkpoint `newest_valid` has just verified, without holding a second copy in memory."""
        return torch.load(info.path, map_location="cpu", weights_only=True, mmap=True)

    @classmethod
    def load(cls, info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        data = cls.read_verified(info)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def checkpoint_sha256(info: CheckpointInfo) -> str:
    """The SHA-256 of the checkpoint's file, which the files made from it record (export, predict): the manifest's
    where it has one, else computed from the file."""
    if "sha256" in info.manifest:
        return info.manifest["sha256"]
    digest = hashlib.sha256()
    with open(info.path, "rb") as file:
        while block := file.read(CHECKSUM_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, dtypes, shapes and bytes: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- choosing a run's checkpoint for use (load_model, predict, test, export, trainer.init_from) ---------------------
def choose_checkpoint(run_dir: Path, which: str | int) -> CheckpointInfo:
    """The complete checkpoint `which` names: best (the run's best validation loss), latest (the newest intact
    one) or a step."""
    manager = CheckpointManager(run_dir, keep_last=2)
    complete = manager.complete()
    if not complete:
        raise ConfigError(f"{run_dir} holds no complete checkpoint")
    which = str(which)
    if which == "latest":
        info = manager.newest_valid()
        if info is None:
            raise ConfigError(f"{run_dir}: every checkpoint is corrupt or unreadable ({complete[0].path}, ...)")
        return info
    if which == "best":
        best_step = _best_step(run_dir, complete[0])
        if not best_step:  # no evaluation was ever the best (all NaN, or none yet): the newest verified one
            log.warning("%s has no best evaluation (none was finite, or none ran): using its newest intact "
                        "checkpoint", run_dir)
            return choose_checkpoint(run_dir, "latest")
        which = str(best_step)
    try:
        step = int(which)
    except ValueError:
        raise ConfigError(f"checkpoint must be best, latest or a step, got {which!r}") from None
    for info in complete:
        if info.step == step:
            return info
    raise ConfigError(f"{run_dir} has no checkpoint of step {step} (it has {[i.step for i in complete]}); "
                      f"checkpoints kept: the last few, the best (callbacks.checkpoint.keep_best) and keep_steps")


def _best_step(run_dir: Path, newest: CheckpointInfo) -> int | None:
    """The best evaluation's step: result.json's (a finished run; null when none was the best), else the newest
    checkpoint's (0 when none was)."""
    result = run_dir / "result.json"
    if result.exists():
        summary = json.loads(result.read_text())
        if "best_step" in summary:
            return summary["best_step"]
    return load_checkpoint(newest)["train_state"]["best_step"]


def load_checkpoint(info: CheckpointInfo, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's state, verified against its manifest; a ConfigError naming the file if it does not match."""
    try:
        return CheckpointManager.load(info, map_location=map_location)
    except (OSError, ValueError) as error:
        raise ConfigError(f"checkpoint {info.path} is unusable: {error}") from None
