"""Where each training step's time goes: `StepClock` records it on rank 0 (into metrics.h5's step rows, and so
into every logger), `summarize` and `advice` read it back for `python -m hpctrain.inspect`.

Columns of a step row (seconds, except where said):
  time_step              since the previous step's row: everything the loop did for this step, evaluations and
                         checkpoints left out (they run between steps and are not step time)
  time_data              waiting for the step's micro-batches from the loader (every micro-batch of a gradient
                         accumulation step; a new epoch's loader start counts here too)
  time_forward_backward  the micro-batches' copy to the device, device transforms, forward, loss and backward;
                         with DDP the gradient all-reduce overlaps the backward and is counted here
  time_optimizer         after the last backward: unscaling, clipping or the gradient norm, the step statistics'
                         all-reduce (the step's one host sync), the optimizer steps and zero_grad
  time_bookkeeping       the rest of time_step: hpctrain's own work between steps (LR schedules, the metrics row
                         and its flushes, callbacks, loggers' hand-over, the progress bar), the previous step's
                         work after its row included
  rss                    bytes of the process's resident memory (rank 0), at the row
  gpu_utilization        percent (torch.cuda.utilization, NVML's average over its last sample period), read at
                         most once a second (NaN in the other rows); absent without NVML or a GPU

On a CPU every time is the host's (`time.perf_counter`), and the four parts add up to time_step. On a GPU,
time_forward_backward and time_optimizer are the device's, measured by CUDA events recorded in the stream (no
synchronisation: the events are read when the row is flushed, by when they are long complete); time_data and
time_bookkeeping stay host times, so the parts need not add up exactly (the host queues work ahead of the device).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

PARTS = ("time_data", "time_forward_backward", "time_optimizer", "time_bookkeeping")
PART_LABELS = {"time_data": "data", "time_forward_backward": "forward+backward", "time_optimizer": "optimizer",
               "time_bookkeeping": "bookkeeping"}
# Seconds between two reads of the GPU utilisation (NVML averages over up to a second itself).
UTILIZATION_EVERY_S = 1.0


class _ResidentMemory:
    """The process's resident set size from /proc/self/statm, read with one pread on a descriptor kept open
    (a few microseconds); NaN where there is no /proc (macOS)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            self._fd = None

    def bytes(self) -> float:
        if self._fd is None:
            return math.nan
        return float(int(os.pread(self._fd, 64, 0).split()[1]) * self._page)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Utilization:
    """torch.cuda.utilization at most once every UTILIZATION_EVERY_S; disabled for good if it fails once (no
    pynvml, no NVML driver, an unsupported device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda"
        self._read_at = -math.inf

    def percent(self, now: float) -> float | None:
        """None: not measured on this device at all (no column)."""
        if not self.available:
            return None
        if now - self._read_at < UTILIZATION_EVERY_S:
            return math.nan
        self._read_at = now
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception as error:  # ModuleNotFoundError (pynvml), pynvml's NVMLError, RuntimeError
            log.info("GPU utilisation not recorded (torch.cuda.utilization: %s)", error)
            self.available = False
            return None


class _DeviceTimes:
    """The forward+backward and optimizer times of one GPU step from its CUDA events, read once they are needed
    (the metrics writer's flush): by then the events are complete, so waiting on them costs nothing."""

    __slots__ = ("start", "backward_done", "end")

    def __init__(self, start: torch.cuda.Event, backward_done: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.start, self.backward_done, self.end = start, backward_done, end

    def __call__(self) -> dict[str, float]:
        self.end.synchronize()
        return {"time_forward_backward": self.start.elapsed_time(self.backward_done) / 1e3,
                "time_optimizer": self.backward_done.elapsed_time(self.end) / 1e3}


class StepClock:
    """Marks the phases of each step (host stamps; CUDA events on a GPU) and turns them into a step row's columns.

    The loop calls, per step: `data_started` / `data_done` around reading the micro-batches, `step_started`,
    `backward_done`, `step_done` inside the step, `excluded(seconds)` for an evaluation or checkpoint, and `row`
    when it logs the step. A disabled clock (ranks other than 0) does nothing and returns no columns.
    """

    def __init__(self, device: torch.device, *, enabled: bool) -> None:
        self.enabled = enabled
        self._cuda = device.type == "cuda"
        self._memory = _ResidentMemory()
        self._utilization = _Utilization(device)
        self._row_at = time.perf_counter()
        self._excluded = 0.0
        self._data = self._data_started = 0.0
        self._step_started = self._backward_done = self._step_done = 0.0
        self._events: list[torch.cuda.Event] = []

    def restart(self) -> None:
        """The loop starts (or the clock is switched on): time_step counts from here."""
        self._row_at, self._excluded, self._data = time.perf_counter(), 0.0, 0.0

    # -- the marks (each one perf_counter call, or one event record) ------------------------------------------
    def data_started(self) -> None:
        if self.enabled:
            self._data_started = time.perf_counter()

    def data_done(self) -> None:
        if self.enabled:
            self._data += time.perf_counter() - self._data_started

    def step_started(self) -> None:
        if self.enabled:
            self._step_started = time.perf_counter()
            if self._cuda:
                self._events = [self._record()]

    def backward_done(self) -> None:
        if self.enabled:
            self._backward_done = time.perf_counter()
            if self._cuda:
                self._events.append(self._record())

    def step_done(self) -> None:
        if self.enabled:
            self._step_done = time.perf_counter()
            if self._cuda:
                self._events.append(self._record())

    def excluded(self, seconds: float) -> None:
        """Time between two steps that is no step's (an evaluation, a checkpoint)."""
        self._excluded += seconds

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    # -- the row ---------------------------------------------------------------------------------------------
    def row(self) -> tuple[dict[str, float], Callable[[], dict[str, float]] | None]:
        """The step's columns, and (on a GPU) a callable giving its device-timed columns once they are needed."""
        if not self.enabled:
            return {}, None
        now = time.perf_counter()
        step = now - self._row_at - self._excluded
        host_step = self._step_done - self._step_started
        columns = {"time_step": step, "time_data": self._data, "time_bookkeeping": step - self._data - host_step}
        deferred = None
        if self._cuda and len(self._events) == 3:
            deferred = _DeviceTimes(*self._events)
        else:
            columns["time_forward_backward"] = self._backward_done - self._step_started
            columns["time_optimizer"] = self._step_done - self._backward_done
        columns["rss"] = self._memory.bytes()
        utilization = self._utilization.percent(now)
        if utilization is not None:
            columns["gpu_utilization"] = utilization
        self._row_at, self._excluded, self._data = now, 0.0, 0.0
        return columns, deferred

    def close(self) -> None:
        self._memory.close()


# -- reading it back (python -m hpctrain.inspect) ---------------------------------------------------------------
# Rows summarised: the latest ones (the run as it is now), the run's first row left out (start-up: workers, caches).
SUMMARY_ROWS = 1000
DATA_ADVICE_SHARE = 0.3
BOOKKEEPING_ADVICE_SHARE = 0.1
OPTIMIZER_ADVICE_SHARE = 0.3
LOW_UTILIZATION_PERCENT = 50.0


@dataclass(frozen=True)
class Breakdown:
    steps: int  # rows summarised
    mean_step_s: float
    shares: dict[str, float]  # part -> its share of the summed time_step
    rss_bytes: float  # latest
    max_memory_allocated: float  # the most over the rows summarised (NaN: not on a GPU)
    gpu_utilization: float  # mean of the readings (NaN: none)


def summarize(columns: Mapping[str, np.ndarray]) -> Breakdown | None:
    """The breakdown of the latest rows of metrics.h5's /train columns; None for a file without it (written
    before the breakdown existed) or with too few rows."""
    if "time_step" not in columns or len(columns["time_step"]) < 2:
        return None
    rows = slice(max(1, len(columns["time_step"]) - SUMMARY_ROWS), None)
    step = np.asarray(columns["time_step"][rows], dtype=np.float64)
    valid = np.isfinite(step)  # rows from before a restart with an older hpctrain are NaN
    if not valid.any():
        return None
    total = float(step[valid].sum())
    shares = {}
    for part in PARTS:
        values = np.asarray(columns[part][rows], dtype=np.float64)[valid] if part in columns else np.full(1, np.nan)
        shares[part] = float(np.nansum(values)) / total if total > 0 and not np.isnan(values).all() else math.nan

    def last_finite(name: str) -> float:
        values = np.asarray(columns[name][rows], dtype=np.float64) if name in columns else np.empty(0)
        finite = values[np.isfinite(values)]
        return float(finite[-1]) if len(finite) else math.nan

    def reduce(name: str, function: Callable[[np.ndarray], float]) -> float:
        values = np.asarray(columns[name][rows], dtype=np.float64) if name in columns else np.empty(0)
        finite = values[np.isfinite(values)]
        return float(function(finite)) if len(finite) else math.nan

    return Breakdown(steps=int(valid.sum()), mean_step_s=total / int(valid.sum()), shares=shares,
                     rss_bytes=last_finite("rss"), max_memory_allocated=reduce("max_memory_allocated", np.max),
                     gpu_utilization=reduce("gpu_utilization", np.mean))


def advice(breakdown: Breakdown, *, num_workers: int | None = None, flush_every_seconds: float | None = None,
           ) -> list[str]:
    """What to change, from where the time goes (the run's config values named where known)."""
    shares = breakdown.shares
    lines: list[str] = []

    def share(part: str) -> float:
        value = shares.get(part, math.nan)
        return 0.0 if math.isnan(value) else value

    if share("time_data") >= DATA_ADVICE_SHARE:
        now = ("" if num_workers is None else " (now -1: chosen automatically, hpctrain.log says how many)"
               if num_workers < 0 else f" (now {num_workers})")
        lines.append(f"data {share('time_data'):.0%} of step time: raise data.num_workers{now}; if more workers do "
                     f"not help, the file system or the transforms bound the step (python benchmarks/bench.py "
                     f"loader)")
    if share("time_bookkeeping") >= BOOKKEEPING_ADVICE_SHARE:
        flush = (f"; callbacks.metrics.flush_every_seconds={flush_every_seconds:g}"
                 if flush_every_seconds is not None and flush_every_seconds < 1 else "")
        lines.append(f"bookkeeping {share('time_bookkeeping'):.0%} of step time: the model's step is short for "
                     f"the loop around it; raise trainer.micro_batch_size, or look for a slow callbacks.user hook"
                     f"{flush}")
    if share("time_optimizer") >= OPTIMIZER_ADVICE_SHARE:
        lines.append(f"optimizer {share('time_optimizer'):.0%} of step time: many parameters for the batch; raise "
                     f"trainer.micro_batch_size or trainer.num_microbatches (the optimizer steps once per step)")
    utilization = breakdown.gpu_utilization
    if not math.isnan(utilization) and utilization < LOW_UTILIZATION_PERCENT:
        lines.append(f"GPU utilisation {utilization:.0f}%: the GPU waits for the host; "
                     + ("see the data advice above" if share("time_data") >= DATA_ADVICE_SHARE
                        else "a larger trainer.micro_batch_size or trainer.compile=true gives it more work per launch"))
    return lines


def format_breakdown(breakdown: Breakdown, advice_lines: Sequence[str]) -> list[str]:
    parts = ", ".join(f"{PART_LABELS[part]} {value:.0%}" for part, value in breakdown.shares.items()
                      if not math.isnan(value))
    lines = [f"time       {breakdown.mean_step_s * 1e3:.4g} ms per step (mean of the latest {breakdown.steps}): "
             f"{parts}"]
    memory = [f"RSS {breakdown.rss_bytes / 2**30:.2f} GiB"] if not math.isnan(breakdown.rss_bytes) else []
    if not math.isnan(breakdown.max_memory_allocated):
        memory.append(f"GPU peak {breakdown.max_memory_allocated / 2**30:.2f} GiB")
    if not math.isnan(breakdown.gpu_utilization):
        memory.append(f"GPU utilisation {breakdown.gpu_utilization:.0f}%")
    if memory:
        lines.append(f"memory     {', '.join(memory)}")
    lines += [f"advice     {line}" for line in advice_lines]
    return lines
