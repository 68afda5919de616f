"""Loaders: how batches get from a dataset to the training loop. Without workers, a plain iterator reads each
micro-batch in the training process; with workers, a DataLoader whose workers hand batches over through
shared-memory slots (`SlotLoader`), so a hand-over costs a copy, not the per-tensor shared-memory set-up of torch's
default path. Also: the automatic worker count, the workers' set-up, their stacks for the hang watchdog, and
their end.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpctrain.process import watchdog
from hpctrain.config import DataConfig
from hpctrain.data.dataset import BatchReader
from hpctrain.process.distributed import exit_with_parent
from hpctrain.process.stop import STOP_SIGNALS

log = logging.getLogger(__name__)

WORKER_STACKS_SIGNAL = signal.SIGUSR1
# SLURM signals every process of a job step. Its stop signals (STOP_SIGNALS, USR2/SIGTERM) are the training
# process's stop protocol's to handle (checkpoint at the next step boundary); a worker dying of one would crash the
# loader first.


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM/USR2 back in this thread while loader workers are forked: a worker inherits the mask, and torch's
    worker loop installs a SIGTERM handler that re-raises the signal with the default action (death) before
    `_init_worker` can ignore it. The worker unblocks them once they are ignored; here they are delivered on exit."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_worker(worker_id: int) -> None:
    exit_with_parent()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back while this worker started: now dropped
    # The hang watchdog asks a worker for its Python stacks with SIGUSR1 (dump_loader_worker_stacks); faulthandler
    # answers from C, so it works even while the worker is stuck.
    faulthandler.register(WORKER_STACKS_SIGNAL, all_threads=True, chain=False)
    # Loader workers only read; one thread each keeps them from fighting the training process for cores.
    torch.set_num_threads(1)


def dump_loader_worker_stacks(wait_s: float = 1.0) -> None:
    """Print the Python stacks of this process's loader workers to stderr (for the hang watchdog: a deadlocked
    worker is a common reason a rank stops), one worker after the other, each under a header line."""
    for child in multiprocessing.active_children():
        if not child.daemon or child.pid is None:
            continue
        print(f"--- hpctrain watchdog: Python stacks of loader worker pid {child.pid} of pid {os.getpid()} ---",
              file=sys.stderr, flush=True)
        try:
            os.kill(child.pid, WORKER_STACKS_SIGNAL)
        except ProcessLookupError:
            continue
        time.sleep(wait_s)  # its dump goes to the same stderr; the next header must not cut into it


def stop_loader_workers() -> None:
    """SIGKILL this process's loader workers (its daemonic children; they only read, so nothing is lost).

    Called when training ends and at exit: the polite shutdown of an iterator abandoned mid-epoch can wait
    seconds per worker, and multiprocessing's exit handler would terminate() them with SIGTERM, which they ignore
    (see _init_worker), and then wait forever. torch's SIGCHLD handler, which reports a worker that died while a
    loader still needed it, is removed first: these workers are meant to die."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join()


# Below this much reading + transforming per batch in the training process, loader workers cannot win: handing
# a batch over from a worker (queue, slot copy) costs about 0.8 ms of the training process's time (measured with
# 2 workers on the 2-core development machine; docs/benchmarks.md), and a worker needs some of the CPUs too.
WORKER_BREAK_EVEN_S = 1e-3


def resolve_num_workers(config: DataConfig, cpus_per_rank: int, *, reader: BatchReader | None = None,
                        indices: np.ndarray | None = None, batch_size: int = 1) -> int:
    """`data.num_workers`, or with -1 (automatic): 0 when a batch is produced faster in the training process than
    a worker could hand it over (measured on a few real batches), else one worker per CPU of the rank minus one.
    The sample order and every random draw are keyed on samples, so the choice never changes the result."""
    if config.num_workers >= 0:
        return config.num_workers
    workers = max(0, cpus_per_rank - 1)
    if workers == 0 or reader is None or indices is None or len(indices) == 0:
        return workers
    # A few batches of random samples, as training reads them (a generator of its own: no global RNG is touched).
    sample = indices[np.random.default_rng(0).permutation(len(indices))[:4 * batch_size]]
    probe = [sample[start:start + batch_size] for start in range(0, len(sample), batch_size)]
    reader[probe[0]]  # the first read opens files and maps them: not what a batch costs
    started = time.perf_counter()
    for batch in probe:
        reader[batch]
    per_batch = (time.perf_counter() - started) / len(probe)
    chosen = 0 if per_batch < WORKER_BREAK_EVEN_S else workers
    log.info("data.num_workers=-1: a batch takes %.2f ms to read in the training process -> %d loader workers",
             per_batch * 1e3, chosen)
    return chosen


class InProcessLoader:
    """What a DataLoader without workers does with `batch_size=None` (read each request of the sampler in this
    process, pin if asked), without its per-batch bookkeeping (a profiler range, a recursive conversion of the
    batch), which costs more than reading a small batch from a memory-mapped file."""

    def __init__(self, dataset: BatchReader, sampler: Sampler, *, pin_memory: bool) -> None:
        self.dataset, self.sampler, self.pin_memory = dataset, sampler, pin_memory

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A map, not a generator: no frame keeps the batch it handed out, so once the loop drops it, its memory,
        # still in the CPU cache, takes the next one (into memory not in the cache, a batch is read ~15% slower).
        return map(self._batch, self.sampler)

    def _batch(self, request: Any) -> dict[str, torch.Tensor]:
        batch = self.dataset[request]
        return {name: value.pin_memory() for name, value in batch.items()} if self.pin_memory else batch

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


# -- hand-over through shared-memory slots ------------------------------------------------------------------------
# torch's own hand-over sets up shared memory for every tensor of every batch and passes its file descriptor through
# a socket: about 1 ms per batch of three tensors here, ten times the read of a 32 x 64 x 64 batch. Slots are set up
# once: the training process gives each request a free slot, the worker writes the batch into it and hands over only
# where the fields lie, and the training process copies them out and frees the slot. A slot is only ever written by
# the one worker its request went to, and only taken again once the batch in it was copied out, so no batch is
# overwritten while it is read.
SLOT_ALIGN = 64
SLOT_HEADROOM = 1.25  # slots are sized on one batch; ragged fields vary (a batch that does not fit goes torch's way)
SLOT_MEMORY_LIMIT = 1 << 30  # bytes of slots per loader, at most: bigger batches go torch's way, where its cost is
#                              small beside the copy itself


class _Tagged(NamedTuple):
    request: Any
    slot: int | None  # None: no slot was free; the worker returns the batch itself


class _InSlot(NamedTuple):
    slot: int
    layout: Any  # ((field, dtype, shape, byte offset), ...)


class _Slots:
    """`count` shared-memory buffers of `nbytes` each, and which are free (known to the training process only)."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.buffer = torch.empty((count, nbytes), dtype=torch.uint8).share_memory_()
        self._free: deque[int] = deque(range(count))

    def reset(self) -> None:
        self._free = deque(range(len(self.buffer)))

    def take(self) -> int | None:
        return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)


class _TaggingSampler(Sampler):
    """The loader's sampler with a free slot attached to each request (runs in the training process). It starts
    when a new pass starts handing out requests, after DataLoader has drained the workers of the previous pass, so
    every slot is free again."""

    def __init__(self, sampler: Sampler, slots: _Slots) -> None:
        self.sampler, self.slots = sampler, slots

    def __iter__(self) -> Iterator[_Tagged]:
        self.slots.reset()
        for request in self.sampler:
            yield _Tagged(request, self.slots.take())

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class _SlotWriter(Dataset):
    """What the workers index: reads the batch and writes it into the request's slot."""

    def __init__(self, reader: BatchReader, slots: _Slots) -> None:
        self.reader, self.slots = reader, slots

    def __getitem__(self, tagged: _Tagged) -> Any:
        batch = self.reader[tagged.request]
        if tagged.slot is None:
            return batch
        row, layout, end = self.slots.buffer[tagged.slot], [], 0
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                return batch
            value = value.contiguous()
            size = value.numel() * value.element_size()
            if end + size > len(row):
                return batch  # larger than the slot: torch's hand-over
            if size:
                row[end:end + size].copy_(value.reshape(-1).view(torch.uint8))
            layout.append((name, value.dtype, tuple(value.shape), end))
            end += -(-size // SLOT_ALIGN) * SLOT_ALIGN
        return _InSlot(tagged.slot, tuple(layout))


class SlotLoader:
    """A DataLoader with workers whose batches come through shared-memory slots (see above); batches that do not
    fit a slot, or find none free, come the usual way."""

    def __init__(self, dataset: BatchReader, sampler: Sampler, *, slots: _Slots, num_workers: int, pin_memory: bool,
                 config: DataConfig) -> None:
        self.slots, self.pin_memory = slots, pin_memory
        self.rows = slots.buffer.numpy()
        self.loader = _data_loader(_SlotWriter(dataset, slots), _TaggingSampler(sampler, slots), seed=dataset.seed,
                                   num_workers=num_workers, pin_memory=False, config=config)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return map(self._hand_out, self.loader)  # no reference kept to a batch handed out: see InProcessLoader

    def _hand_out(self, item: Any) -> dict[str, torch.Tensor]:
        if isinstance(item, _InSlot):
            return self._copy_out(item)
        return {name: value.pin_memory() for name, value in item.items()} if self.pin_memory else item

    def _copy_out(self, item: _InSlot) -> dict[str, torch.Tensor]:
        row, batch = self.rows[item.slot], {}
        for name, dtype, shape, offset in item.layout:
            value = torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
            size = value.numel() * value.element_size()
            if size:
                # numpy's copy is one memcpy in this thread; torch's copy_ of a large tensor wakes its intra-op
                # threads, which then spin and take the cores the loader workers need.
                np.copyto(value.reshape(-1).view(torch.uint8).numpy(), row[offset:offset + size])
            batch[name] = value
        self.slots.release(item.slot)
        return batch

    def __len__(self) -> int:
        return len(self.loader)


class _WorkerLoader(DataLoader):
    """A DataLoader whose workers start with SLURM's stop signals held back (`_stop_signals_held`)."""

    def __iter__(self) -> Any:
        with _stop_signals_held():
            return super().__iter__()


def _data_loader(dataset: Dataset, sampler: Sampler, *, seed: int, num_workers: int, pin_memory: bool,
                 config: DataConfig) -> DataLoader:
    # A generator of its own for the workers' base seed: otherwise each iter() draws from torch's global one, and
    # a model's random stream (dropout) would depend on whether the loader has workers.
    return _WorkerLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=config.persistent_workers, prefetch_factor=config.prefetch_factor,
                      worker_init_fn=_init_worker, generator=torch.Generator().manual_seed(seed))


def _slots_for(dataset: BatchReader, sampler: Sampler, *, num_workers: int, config: DataConfig) -> _Slots | None:
    """Slots sized on the first batch of the sampler, read here; None where slots cannot be used safely (workers
    that are not persistent: an abandoned pass's workers may still write while the next pass starts) or would take
    too much memory."""
    if not config.persistent_workers:
        return None
    first = next(iter(sampler), None)
    if first is None:
        return None
    batch = dataset[first]
    if not all(isinstance(value, torch.Tensor) for value in batch.values()):
        return None
    nbytes = sum(-(-value.numel() * value.element_size() // SLOT_ALIGN) * SLOT_ALIGN for value in batch.values())
    nbytes = int(nbytes * SLOT_HEADROOM) + SLOT_ALIGN
    # Requests in flight (prefetch_factor per worker), plus the batch being copied out, plus one spare.
    count = config.prefetch_factor * num_workers + 2
    if count * nbytes > SLOT_MEMORY_LIMIT:
        log.info("loader: batches of %.0f MB go through torch's hand-over (slots would take more than %.0f MB)",
                 nbytes / 1e6, SLOT_MEMORY_LIMIT / 1e6)
        return None
    return _Slots(count, nbytes)


def make_loader(dataset: BatchReader, sampler: Sampler, *, config: DataConfig, num_workers: int,
                pin_memory: bool) -> DataLoader | InProcessLoader | SlotLoader:
    """The iterable of batches for `sampler`: in this process without workers, else from `num_workers` loader
    workers through shared-memory slots where possible."""
    if num_workers == 0:
        return InProcessLoader(dataset, sampler, pin_memory=pin_memory)
    atexit.unregister(stop_loader_workers)  # registered once, and after multiprocessing's, so it runs first
    atexit.register(stop_loader_workers)
    watchdog.add_stack_dump(dump_loader_worker_stacks)
    slots = _slots_for(dataset, sampler, num_workers=num_workers, config=config)
    if slots is None:
        return _data_loader(dataset, sampler, seed=dataset.seed, num_workers=num_workers, pin_memory=pin_memory,
                            config=config)
    return SlotLoader(dataset, sampler, slots=slots, num_workers=num_workers, pin_memory=pin_memory, config=config)
