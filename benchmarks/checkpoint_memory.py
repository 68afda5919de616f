"""An asynchronous checkpoint's stall against the floor, a bare copy of the same state into preallocated host
buffers, and the peak host memory it takes on top of the training state.

    python benchmarks/checkpoint_memory.py [--megabytes 1000] [--rounds 5] [--directory DIR]

The state is float32 tensors of 100 MB (the last one smaller), as a model's and optimizer's are. Each round:
a bare copy into buffers allocated and touched before (np.copyto, what hpctrain's snapshot does), then
`CheckpointManager.save_async` followed by `wait` (its stall is the call alone; the write runs meanwhile in
its thread and is waited for outside the timing). Peak memory is Linux's VmHWM of this process, reset before
each save through /proc/self/clear_refs, minus the memory in use before the save: the first save allocates its
snapshot (one copy of the state), later ones reuse it, so the steady state should add only torch.save's
transient buffers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpctrain.run.checkpoint import CheckpointManager  # noqa: E402

CHUNK = 25_000_000  # float32 elements: 100 MB


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--directory", type=Path, default=None, help="where to write (default: a temporary one "
                                                                      "in the current directory)")
    args = parser.parse_args()
    elements = args.megabytes * 250_000
    sizes = [CHUNK] * (elements // CHUNK) + ([elements % CHUNK] if elements % CHUNK else [])
    state = {"model": {f"layer{i}": torch.randn(n) for i, n in enumerate(sizes)}, "step": 0}
    buffers = {name: np.empty(t.shape, dtype=np.float32) for name, t in state["model"].items()}
    for buffer in buffers.values():
        buffer.fill(0)  # touched: no page fault in the timed copy
    state_mb = sum(t.numel() * 4 for t in state["model"].values()) / 1e6
    with tempfile.TemporaryDirectory(dir=args.directory or Path.cwd()) as directory:
        manager = CheckpointManager(Path(directory), keep_last=2)
        copies, stalls, extra_mb = [], [], []
        for step in range(1, args.rounds + 2):  # the first save allocates the snapshot: reported apart
            started = time.perf_counter()
            for name, tensor in state["model"].items():
                np.copyto(buffers[name], tensor.numpy())
            copy = time.perf_counter() - started
            before_kb = memory_kb("VmRSS")
            reset_peak()
            started = time.perf_counter()
            manager.save_async(step, {**state, "step": step})
            stall = time.perf_counter() - started
            manager.wait()
            extra = (memory_kb("VmHWM") - before_kb) / 1e3
            if step == 1:
                print(f"first save (allocates its snapshot): stall {stall * 1e3:.0f} ms, peak memory +{extra:.0f} MB "
                      f"({extra / state_mb:.2f}x the {state_mb:.0f} MB state)")
                continue
            copies.append(copy)
            stalls.append(stall)
            extra_mb.append(extra)
        manager.close()
    ratios = [s / c for s, c in zip(stalls, copies)]
    print(f"bare copy into preallocated buffers: {statistics.median(copies) * 1e3:.0f} ms "
          f"({min(copies) * 1e3:.0f}-{max(copies) * 1e3:.0f}), {state_mb / 1e3 / statistics.median(copies):.1f} GB/s")
    print(f"save_async stall: {statistics.median(stalls) * 1e3:.0f} ms ({min(stalls) * 1e3:.0f}-"
          f"{max(stalls) * 1e3:.0f}); per round stall / bare copy {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")
    print(f"peak host memory during a later save and its write: +{statistics.median(extra_mb):.0f} MB "
          f"({min(extra_mb):.0f}-{max(extra_mb):.0f}) on top of the state and its snapshot, "
          f"{statistics.median(extra_mb) / state_mb:.3f}x the state")


if __name__ == "__main__":
    main()
