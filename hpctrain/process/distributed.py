"""The process group: who this rank is, which device it drives, and the few collectives the trainer needs.

Ranks come from the environment: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT as set by the local
launcher, torchrun, or submitit's TorchDistributedEnvironment under SLURM. With none of them this is a single
process and every collective is the identity, so the same trainer code runs in debug mode and on a cluster.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from hpctrain.config import ConfigError
from hpctrain.process import history

log = logging.getLogger(__name__)


class RunDirectoryInUse(ConfigError):
    """Another live process is training in this run directory."""


class RunDirectoryTakenOver(RuntimeError):
    """This process held the run lock, but the run directory now belongs to another job (it was deleted and
    re-created, or its lock file replaced): this process must not write into it."""


class RendezvousError(RuntimeError):
    """The process group did not form in time."""


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place, and returned)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def available_cpus() -> int:
    """CPUs this process may use: SLURM's --cpus-per-task inside a job, else the affinity mask."""
    if "SLURM_CPUS_PER_TASK" in os.environ and "SLURM_JOB_ID" in os.environ:
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def select_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible to this process")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


# Set for NCCL process groups (a value already in the environment is kept), as torchrun sets it: a collective that
# outlives trainer.distributed_timeout_s (a dead or hung peer) aborts the communicators and ends the process with
# an error, instead of leaving it blocked on the GPU; SLURM then sees the failure (and the watchdog's requeue acts).
NCCL_ENVIRONMENT = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def process_group_environment(backend: str) -> dict[str, str]:
    """The environment variables set (unless already set) before a process group of `backend` is formed."""
    return dict(NCCL_ENVIRONMENT) if backend == "nccl" else {}


def step_peak_memory(device: torch.device) -> float:
    """The most GPU memory (bytes) allocated by tensors on `device` since the previous call (the first: since the
    process started), and reset; NaN on a CPU."""
    if device.type != "cuda":
        return math.nan
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return float(peak)


def rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The TCP store at MASTER_ADDR:MASTER_PORT through which the ranks find each other: rank 0 serves it and waits
    for every rank to connect (wait_for_workers), the others wait for rank 0, each up to `timeout`."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=rank == 0, timeout=timeout, wait_for_workers=True)


def init_distributed(*, device_preference: str, timeout_s: int, rendezvous_timeout_s: int | None = None,
                     store: dist.Store | None = None) -> DistributedContext:
    """Join the process group described by the environment (or run alone).

    Two timeouts: `rendezvous_timeout_s` bounds forming the group (a rank that died at launch, before it joined,
    makes the others fail after this long instead of after the collective timeout), `timeout_s` bounds each
    collective afterwards. `store`: the store the group forms on, opened by the caller (a multi-rank tune worker's
    ranks form one group per trial on a prefix of their job's store: hpctrain.tuning.ranks); None: the
    rendezvous store, opened here."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = select_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        for name, value in process_group_environment(backend).items():
            os.environ.setdefault(name, value)
        rendezvous = datetime.timedelta(seconds=rendezvous_timeout_s or timeout_s)
        try:
            if store is None:
                store = rendezvous_store(rank, world_size, rendezvous)
            else:
                store.set_timeout(rendezvous)
            dist.init_process_group(
                backend=backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, dist.DistStoreError) as error:
            raise RendezvousError(
                f"rank {rank}/{world_size}: the process group did not form within trainer.rendezvous_timeout_s="
                f"{rendezvous.total_seconds():g} s (master {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}): another rank died or never started ({error})") from None
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined the %s process group (master %s:%s)", rank, world_size, backend,
                 os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank,
                              local_world_size=local_world_size, device=device)


def exit_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies, so no rank or loader worker outlives a
    killed run (they would hold its files open)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


LOCK_FILENAME = ".lock"
# Run directories whose lock this process holds: resolved path -> (device, inode) of the lock file it locked.
_held_locks: dict[Path, tuple[int, int]] = {}


def lock_owner() -> dict[str, Any]:
    """Who takes a run lock: the SLURM job (or 'local'), host and pid."""
    return {"job_id": history.job_identity()[0], "host": socket.gethostname(), "pid": os.getpid()}


def _describe(holder_text: str) -> str:
    try:
        holder = json.loads(holder_text)
        return f"job {holder['job_id']} (host {holder['host']}, pid {holder['pid']})"
    except (ValueError, KeyError, TypeError):
        return holder_text or "another process"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Held by rank 0 while it trains: a second job on the same run directory is refused instead of corrupting
    it. A POSIX record lock: released when the process dies, and never inherited by forked loader workers.

    The lock file records its owner (job id, host, pid). `check_run_owner` (called before every checkpoint
    commit, and every few seconds by the watchdog through `check_held_run_locks`) verifies that the run
    directory's lock file is still the one this process locked: after the directory was deleted and re-created
    for another job, a lingering process of the old job holds a lock on a file that is no longer there, and must
    not write."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILENAME
    with open(path, "a+") as file:
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = _describe(file.read().strip())
            raise RunDirectoryInUse(f"run directory {run_dir} is in use by {holder}; wait for it to end or "
                                    f"choose another run_name / hydra.run.dir") from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps(lock_owner()) + "\n")
        file.flush()
        stat = os.fstat(file.fileno())
        key = run_dir.resolve()
        _held_locks[key] = (stat.st_dev, stat.st_ino)
        try:
            yield
        finally:
            _held_locks.pop(key, None)


def check_run_owner(run_dir: Path) -> None:
    """Raise RunDirectoryTakenOver if this process took the run lock of `run_dir` and the directory's lock file is
    no longer the one it locked. A no-op where this process never took the lock (other ranks, tools)."""
    key = run_dir.resolve()
    held = _held_locks.get(key)
    if held is None:
        return
    try:
        stat = os.stat(key / LOCK_FILENAME)
        current = (stat.st_dev, stat.st_ino)
    except OSError:
        current = None
    if current != held:
        try:
            holder = _describe((key / LOCK_FILENAME).read_text().strip())
        except OSError:
            holder = "nobody (the lock file is gone)"
        raise RunDirectoryTakenOver(
            f"run directory {run_dir} was taken over (its lock is now held by {holder}); this process "
            f"({json.dumps(lock_owner())}) no longer owns it and writes nothing more into it")


def check_held_run_locks() -> None:
    """`check_run_owner` for every run directory this process holds the lock of: the watchdog's periodic check,
    which ends this process soon after a take-over, before its next checkpoint commit would find it."""
    for run_dir in list(_held_locks):
        check_run_owner(run_dir)


def holds_run_lock(run_dir: Path) -> bool:
    return run_dir.resolve() in _held_locks


def shutdown_distributed(*, clean: bool = True) -> None:
    """Leave the process group. After a clean run, wait for all ranks first: a rank that tears down its
    connections while another still uses the group (rank 0 writing its last checkpoint) can abort."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
