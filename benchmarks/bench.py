"""`python benchmarks/bench.py [loader|step|breakdown|checkpoint|averaging|all] [--rounds N] [OVERRIDES]`:
measure, on your machine and file system, hpctrain against the reference that bounds it, side by side in
alternating rounds (A, B, A, B, ...) so a busy machine slows both alike; each line prints hpctrain / reference as
the median and min-max of the per-round ratios.

  loader      the loader's samples/s for each shuffle mode and worker count vs a random gather from the whole
              training set held in RAM (the ceiling: no file system, no HDF5, no processes); with
              --transform-repeats N, a CPU-costly transform is added and workers are also compared to 0 workers
  step        the training loop's time per step vs a raw PyTorch loop (the same model, loss, batch size and
              optimizer) over batches gathered from RAM, and over batches read from the file by the same loader
              (the difference is then the loop's bookkeeping alone), on the run's model and on a tiny model;
              then the two taking turns step by step (one hpctrain step, one raw step, ...), which a machine
              whose speed drifts between rounds cannot tell apart
  breakdown   the step with the step time breakdown (hpctrain.run.breakdown) on vs off, taking turns step by
              step in one run, on the run's model and on a tiny model; then the breakdown of the run's model next
              to torch.profiler's view of the same steps
  checkpoint  the time a checkpoint holds up the loop vs a plain torch.save + fsync of the same state, on the disk
              runs write to and on tmpfs (the CPU side alone), with how much one plain write varies on each
  averaging   the loop's time per step with an EMA of the weights (optim.weight_averaging={kind: ema}) vs the
              same loop without, on the run's model
  (compressed vs uncompressed reads: benchmarks/reader.py)

It composes the same config as the launcher (`--config-dir` for yours), so the numbers are for the run you are
about to start. The numbers measured on the development machine are in docs/benchmarks.md. The measuring pieces
it shares with benchmarks/gpu_check.py are in benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's hpctrain (as benchmarks/reader.py)
from harness import (WARMUP_STEPS, epochs, hpctrain_loop_seconds, interleaved_seconds,  # noqa: E402
                     loader_rate, quiet, ratio_line, raw_loop_seconds, step_config, tiny_components)
from hpctrain.components import build_components, check_run_inputs  # noqa: E402
from hpctrain.config import Config, ConfigError, WeightAveragingConfig  # noqa: E402
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler  # noqa: E402
from hpctrain.data.loader import make_loader  # noqa: E402
from hpctrain.launching.app import compose_config, fail  # noqa: E402
from hpctrain.run.contract import Components  # noqa: E402


# -- loader -----------------------------------------------------------------------------------------------------
def ram_gather_rate(arrays: dict[str, np.ndarray], batches: list[np.ndarray]) -> float:
    started, samples = time.perf_counter(), 0
    for indices in batches:
        for array in arrays.values():
            torch.from_numpy(array[indices])
        samples += len(indices)
    return samples / (time.perf_counter() - started)


class CPUCostTransform:
    """A stand-in for an augmentation that costs CPU: `repeats` FFT round trips of every sample's first floating
    field in numpy (one thread, as in a loader worker); the batch itself is left unchanged."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        field = next(value for value in batch.values() if value.is_floating_point())
        for sample in field.numpy():
            for _ in range(self.repeats):
                sample = np.fft.irfft2(np.fft.rfft2(sample), s=sample.shape[-2:])
        return batch


def bench_loader(config: Config, components: Components, *, rounds: int, num_batches: int, workers: list[int],
                 transform_repeats: int = 0) -> None:
    split = components.split
    batch_size = config.trainer.micro_batch_size
    everything = BatchReader(split.train_dataset, transforms=components.transforms,
                             seed=config.seed)[split.train_indices]  # the whole training set in RAM: the ceiling
    arrays = {name: value.numpy() for name, value in everything.items() if name != "index"}
    extra = [CPUCostTransform(transform_repeats)] if transform_repeats else []
    reader = BatchReader(split.train_dataset, transforms=[*components.transforms, *extra], seed=config.seed)
    print(f"loader: {len(split.train_indices)} training samples, batch {batch_size}, {num_batches} batches per round, "
          f"{rounds} rounds; reference: a random gather from RAM"
          + (f"; with a CPU-costly transform ({transform_repeats} FFT round trips per sample), also against the "
             f"same loader with 0 workers" if transform_repeats else ""))
    for shuffle in ("samples", "blocks"):
        data = replace(config.data, shuffle=shuffle)
        sampler = DistributedBatchSampler(np.arange(len(split.train_indices)), micro_batch_size=batch_size,
                                          num_microbatches=1, rank=0, world_size=1, seed=config.seed,
                                          block_size=data.block_size if shuffle == "blocks" else 1)
        num = min(num_batches, sampler.steps_per_epoch - 1)
        order = sampler.epoch_order(0)
        ram_batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(num)]
        loaders = {count: make_loader(reader, sampler, config=replace(data, persistent_workers=True),
                                      num_workers=count, pin_memory=False) for count in sorted({0, *workers})}
        rates: dict[int, list[float]] = {count: [] for count in loaders}
        reference: list[float] = []
        for _ in range(rounds):
            for count, loader in loaders.items():
                rates[count].append(loader_rate(loader, num))
            reference.append(ram_gather_rate(arrays, ram_batches))
        for count in workers:
            print(ratio_line(f"shuffle={shuffle}, {count} workers", rates[count], reference, "samples/s",
                             higher_is_better=True))
            if count and transform_repeats:
                print(ratio_line(f"shuffle={shuffle}, {count} workers / 0 workers", rates[count], rates[0],
                                 "samples/s", higher_is_better=True))


# -- the training step ------------------------------------------------------------------------------------------
def bench_step(config: Config, *, rounds: int, steps: int, tiny: bool) -> None:
    base = step_config(config, steps)
    components = build_components(base)
    if tiny:
        base = tiny_components(base, components)
    initial = copy.deepcopy(components.model.state_dict())
    reader = BatchReader(components.split.train_dataset, transforms=components.transforms, seed=base.seed)
    sampler = DistributedBatchSampler(components.split.train_indices, micro_batch_size=base.trainer.micro_batch_size,
                                      num_microbatches=1, rank=0, world_size=1, seed=base.seed)
    batches = [reader[request.indices] for request, _ in zip(sampler, range(steps))]
    while len(batches) < steps:
        batches += batches[:steps - len(batches)]
    loader = make_loader(reader, sampler, config=base.data, num_workers=0, pin_memory=False)
    runs: dict[str, list[np.ndarray]] = {"ours": [], "ram": [], "file": []}

    def raw(batch_source: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
        return raw_loop_seconds(components.model, components.loss, batch_source, base.task.inputs, base.optim.lr)

    with tempfile.TemporaryDirectory() as directory, quiet():
        for index in range(rounds):
            loops = [("ram", lambda: raw(batches)), ("file", lambda: raw(epochs(loader, sampler, steps))),
                     ("ours", lambda: hpctrain_loop_seconds(base, components, steps, Path(directory) / f"r{index}"))]
            for name, loop in loops[index % 3:] + loops[:index % 3]:  # each loop in each position in turn
                components.model.load_state_dict(initial)
                runs[name].append(loop())
        components.model.load_state_dict(initial)
        paired_ours, paired_raw = interleaved_seconds(base, components, epochs(loader, sampler, 10**9),
                                                      steps * rounds, Path(directory) / "interleaved")
    label = "tiny model" if tiny else f"{type(components.model).__name__}"
    ours = [float(durations.mean()) for durations in runs["ours"]]
    for what, name in (("batches in RAM", "ram"), ("reading the file", "file")):
        reference = [float(durations.mean()) for durations in runs[name]]
        print(ratio_line(f"step, {label}, raw loop {what}", ours, reference, "s/step", higher_is_better=False))
        # The median step is steadier than the mean on a busy machine (it leaves out rare stalls, and the
        # metrics flush every callbacks.metrics.flush_every_seconds, which the mean above counts).
        overhead = [float(np.median(a) - np.median(b)) for a, b in zip(runs["ours"], runs[name])]
        print(f"  {'':<46} per-step overhead, median step: {statistics.median(overhead) * 1e3:+.3f} ms "
              f"({min(overhead) * 1e3:+.3f} to {max(overhead) * 1e3:+.3f} over the rounds)")
    difference = (paired_ours - paired_raw) * 1e3
    low, high = np.percentile(difference, [25, 75])
    print(f"  step, {label}, taking turns step by step with the raw loop reading the file, {len(paired_ours)} pairs: "
          f"{np.median(paired_ours) / np.median(paired_raw):.3f}x (ratio of the median steps, hpctrain "
          f"{np.median(paired_ours):.4g} s, reference {np.median(paired_raw):.4g} s); per-step overhead, median "
          f"difference of a pair: {np.median(difference):+.3f} ms (quartiles {low:+.3f} to {high:+.3f})")


def bench_averaging(config: Config, *, rounds: int, steps: int) -> None:
    """The step with an EMA of the weights updated after every step, against the same loop without one."""
    base = step_config(config, steps)
    with_ema = replace(base, optim=replace(base.optim, weight_averaging=WeightAveragingConfig(kind="ema")))
    components = build_components(base)
    initial = copy.deepcopy(components.model.state_dict())
    runs: dict[str, list[float]] = {"ema": [], "none": []}
    with tempfile.TemporaryDirectory() as directory, quiet():
        for index in range(rounds):
            loops = [("none", base), ("ema", with_ema)]
            for name, loop_config in loops[index % 2:] + loops[:index % 2]:  # each in each position in turn
                components.model.load_state_dict(initial)
                seconds = hpctrain_loop_seconds(loop_config, components, steps, Path(directory) / f"{name}{index}")
                runs[name].append(float(np.median(seconds)))
    label = f"step with an EMA of the weights, {type(components.model).__name__}, vs without"
    print(ratio_line(label, runs["ema"], runs["none"], "s/step (median step)", higher_is_better=False))
    extra = [(ema - none) * 1e3 for ema, none in zip(runs["ema"], runs["none"])]
    print(f"  {'':<46} difference of the median steps: {statistics.median(extra):+.3f} ms ({min(extra):+.3f} to "
          f"{max(extra):+.3f} over the rounds)")
    # The update alone, timed directly (a difference of two loops' steps drowns in a busy machine's noise).
    from hpctrain.process.distributed import DistributedContext
    from hpctrain.run.averaging import WeightAveraging

    one = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    averaging = WeightAveraging(with_ema.optim.weight_averaging, components.model, [], dist=one, inputs=[])
    averaging.after_step(1, applied=True, last=False)  # the first update is a copy
    updates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for step in range(2, 202):
            averaging.after_step(step, applied=True, last=False)
        updates.append((time.perf_counter() - started) / 200)
    update, step_time = statistics.median(updates), statistics.median(runs["none"])
    print(f"  {'':<46} the EMA update alone: {update * 1e6:.1f} us ({min(updates) * 1e6:.1f}-"
          f"{max(updates) * 1e6:.1f}) for {sum(p.numel() for p in components.model.parameters()):,} parameters: "
          f"{1 + update / step_time:.4f}x the median step without it ({step_time * 1e3:.2f} ms)")


# -- the step time breakdown -----------------------------------------------------------------------------------
STEP_RANGE, FORWARD_RANGE = "hpctrain bench step", "hpctrain bench forward"  # the profiler ranges it records
PARTS = ("data+bookkeeping", "forward+backward", "optimizer", "step")


def breakdown_on_off_seconds(config: Config, components: Components, steps: int, run_dir: Path
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run whose steps take turns with the breakdown (hpctrain.run.breakdown) on and off: the seconds of the
    steps with it, of those without, and each step with it minus the mean of its neighbours without (steps
    a fraction of a second apart, which no drift of the machine tells apart, a linear one cancelled). The clock
    is switched between steps (the private `StepClock.enabled`), so a step's own loop work, its reads and its
    marks all run with one setting."""
    clocks = []

    def toggle() -> None:
        clocks[0].enabled = not clocks[0].enabled

    durations = hpctrain_loop_seconds(config, components, steps, run_dir, between=toggle, built=lambda trainer:
                                      clocks.append(trainer.clock))
    # Step k (0-based) ran with the setting toggled k times: on for even k; durations[i] is step WARMUP_STEPS + i.
    on = (WARMUP_STEPS + np.arange(len(durations))) % 2 == 0
    paired = [durations[i] - np.mean([durations[j] for j in (i - 1, i + 1) if 0 <= j < len(durations)])
              for i in np.flatnonzero(on)]  # a step at either end has one neighbour
    return durations[on], durations[~on], np.asarray(paired)


def clock_seconds_per_step(repeats: int = 20_000) -> float:
    """The breakdown's own calls for one step (its marks and its row) on this machine, in a loop of their own."""
    from hpctrain.run.breakdown import StepClock

    clock = StepClock(torch.device("cpu"), enabled=True)
    clock.restart()
    started = time.perf_counter()
    for _ in range(repeats):
        clock.data_started()
        clock.data_done()
        clock.step_started()
        clock.backward_done()
        clock.step_done()
        clock.row()
    seconds = (time.perf_counter() - started) / repeats
    clock.close()
    return seconds


def profiled_events(config: Config, components: Components, steps: int, run_dir: Path) -> list[Any]:
    """torch.profiler's CPU events of an hpctrain run of `steps` steps, with each step a STEP_RANGE from one
    metrics row to the next (the breakdown's time_step) and the model's forward start a FORWARD_RANGE instant (a
    forward pre-hook)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    ranges: list[record_function] = []
    trainers: list[Any] = []

    def next_range() -> None:
        started = time.perf_counter()
        if ranges:
            ranges[-1].__exit__(None, None, None)
        ranges.append(record_function(STEP_RANGE))
        ranges[-1].__enter__()
        if trainers:  # the profiler's range switch is no step's time (the profiler's ranges leave it out too)
            trainers[0].clock.excluded(time.perf_counter() - started)

    def built(trainer: Any) -> None:
        trainers.append(trainer)
        row = trainer.clock.row

        def row_after_a_range() -> tuple[dict[str, float], Callable[[], dict[str, float]] | None]:
            next_range()
            return row()

        trainer.clock.row = row_after_a_range
        next_range()

    def forward_started(module: nn.Module, inputs: object) -> None:
        with record_function(FORWARD_RANGE):
            pass

    hook = components.model.register_forward_pre_hook(forward_started)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            hpctrain_loop_seconds(config, components, steps, run_dir, built=built)
            ranges[-1].__exit__(None, None, None)
    finally:
        hook.remove()
    return list(profiler.events())


def profiler_parts(events: list[Any], steps: int) -> dict[str, list[float]]:
    """The profiler's microseconds of each part of each step after the warm-up: forward+backward from the forward's
    start to the end of the step's last autograd event, the optimizer from there to the end of the last optimizer
    range (zero_grad), and the rest of the step the data wait plus the loop's bookkeeping."""
    spans = sorted((event for event in events if event.name == STEP_RANGE),
                   key=lambda event: event.time_range.start)[:steps]  # step k's range ends when step k does
    forwards = sorted(event.time_range.start for event in events if event.name == FORWARD_RANGE)
    backward_ends = sorted(event.time_range.end for event in events
                           if event.name.startswith("autograd::engine::evaluate_function"))
    optimizer_ends = sorted(event.time_range.end for event in events if event.name.startswith("Optimizer."))
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    for span in spans[WARMUP_STEPS:]:
        start, end = span.time_range.start, span.time_range.end
        forward = next(t for t in forwards if start <= t <= end)
        backward_end = max(t for t in backward_ends if forward <= t <= end)
        optimizer_end = max(t for t in optimizer_ends if backward_end <= t <= end)
        parts["data+bookkeeping"].append((forward - start) + (end - optimizer_end))
        parts["forward+backward"].append(backward_end - forward)
        parts["optimizer"].append(optimizer_end - backward_end)
        parts["step"].append(end - start)
    return parts


def breakdown_parts(run_dir: Path, steps: int) -> dict[str, np.ndarray]:
    """The breakdown's seconds of the same parts of each step after the warm-up, from the run's metrics.h5."""
    from hpctrain.run.metrics import METRICS_FILENAME, open_for_reading

    with open_for_reading(run_dir / METRICS_FILENAME) as file:
        train = {name: file[f"train/{name}"][WARMUP_STEPS:steps] for name in
                 ("time_step", "time_data", "time_bookkeeping", "time_forward_backward", "time_optimizer")}
    return {"data+bookkeeping": train["time_data"] + train["time_bookkeeping"],
            "forward+backward": train["time_forward_backward"], "optimizer": train["time_optimizer"],
            "step": train["time_step"]}


def profiled_breakdown(config: Config, components: Components, steps: int, run_dir: Path) -> list[str]:
    """The breakdown of `steps` steps next to torch.profiler's view of the same steps (profiler_parts): means over
    the steps after the warm-up, as lines to print."""
    events = profiled_events(config, components, steps, run_dir)
    profiled = profiler_parts(events, steps)
    optimizer_calls = [event.cpu_time_total for event in events if event.name.startswith("Optimizer.step#")]
    ours = breakdown_parts(run_dir, steps)
    lines = [f"  {'part (mean per step)':<24} {'breakdown':>12} {'profiler':>12}  ratio"]
    for part in PARTS:
        mine, theirs = float(np.mean(ours[part])) * 1e3, float(np.mean(profiled[part])) / 1e3
        lines.append(f"  {part:<24} {mine:9.3f} ms {theirs:9.3f} ms  {mine / theirs:.3f}")
    lines.append(f"  (the profiler's Optimizer.step ranges alone: {np.mean(optimizer_calls[WARMUP_STEPS:]) / 1e3:.3f} "
                 f"ms per step)")
    return lines


def bench_breakdown(config: Config, *, rounds: int, steps: int, tiny_steps: int, profile_steps: int) -> None:
    """What recording the step time breakdown costs (on vs off, taking turns step by step, on the run's model
    and the tiny one), and the breakdown next to torch.profiler's view of the same steps."""
    print(f"breakdown: {rounds} rounds; the step with the time breakdown on vs off, taking turns step by step")
    cost = clock_seconds_per_step()
    with tempfile.TemporaryDirectory() as directory, quiet():
        for tiny, count in ((False, steps), (True, tiny_steps)):
            base = step_config(config, count)
            components = build_components(base)
            if tiny:
                base = tiny_components(base, components)
            initial = copy.deepcopy(components.model.state_dict())
            on, off, paired = [], [], []
            for index in range(rounds):
                components.model.load_state_dict(initial)
                with_it, without, differences = breakdown_on_off_seconds(base, components, count,
                                                                         Path(directory) / f"{tiny}-{index}")
                on.append(float(np.median(with_it)))
                off.append(float(np.median(without)))
                paired.append(differences)
            label = "tiny model" if tiny else type(components.model).__name__
            print(ratio_line(f"step with the breakdown, {label}", on, off, "s/step", higher_is_better=False))
            step = statistics.median(off)
            difference = np.concatenate(paired)
            low, high = np.percentile(difference, [25, 75])
            print(f"  {'':<46} per-step cost, median over {len(difference)} steps of a step with it minus its two "
                  f"neighbours without: {np.median(difference) * 1e6:+.1f} us = {np.median(difference) / step:+.3%} "
                  f"of the step (quartiles {low * 1e6:+.1f} to {high * 1e6:+.1f} us); the clock's own calls alone "
                  f"{cost * 1e6:.1f} us = {cost / step:.3%}")
        base = step_config(config, profile_steps)
        components = build_components(base)
        lines = profiled_breakdown(base, components, profile_steps, Path(directory) / "profiled")
    print(f"breakdown vs torch.profiler, {profile_steps - WARMUP_STEPS} steps of "
          f"{type(components.model).__name__} (the profiler's own overhead slows the op-heavy parts)")
    print("\n".join(lines))


# -- checkpoints ------------------------------------------------------------------------------------------------
def bench_checkpoint(*, rounds: int, megabytes: int, directory: Path) -> None:
    """The checkpoint's stall against torch.save + fsync of the same state, where runs write (disk-bound: what a
    run waits for) and on tmpfs (/dev/shm: the CPU side alone, the disk dropped out), with how much one plain
    write varies there, so that no ratio is read from a disk's noise."""
    places = [("disk", directory)] + ([("tmpfs", Path("/dev/shm"))] if Path("/dev/shm").is_dir() else [])
    state = {"model": {f"w{i}": torch.randn(megabytes * (1 << 20) // 4 // 16) for i in range(16)}, "step": 1}
    print(f"checkpoint: a {megabytes} MB state; reference: torch.save + fsync of a new file in the same directory")
    for place, parent in places:
        ours, background, reference = _checkpoint_rounds(state, rounds, parent)
        print(ratio_line(f"checkpoint stall (synchronous), {place}", ours, reference, "s", higher_is_better=False))
        print(ratio_line(f"checkpoint stall (asynchronous=true), {place}", background, reference, "s",
                         higher_is_better=False))
        print(f"  {'':<46} one torch.save + fsync on {place} ({parent}): {min(reference) * 1e3:.1f}-"
              f"{max(reference) * 1e3:.1f} ms over {rounds} rounds, the slowest {max(reference) / min(reference):.2f}x "
              f"the fastest")


def _checkpoint_rounds(state: dict[str, Any], rounds: int, parent: Path) -> tuple[list[float], ...]:
    from hpctrain.run.checkpoint import CheckpointManager

    ours, background, reference = [], [], []
    with tempfile.TemporaryDirectory(dir=parent) as directory:
        manager = CheckpointManager(Path(directory) / "run", keep_last=2)
        plain = Path(directory) / "plain.pt"
        with quiet():
            for step in range(1, rounds + 1):
                plain.unlink(missing_ok=True)  # a new file, as a checkpoint is (truncating one costs like unlinking)
                started = time.perf_counter()
                with open(plain, "wb") as file:
                    torch.save(state, file)
                    file.flush()
                    os.fsync(file.fileno())
                reference.append(time.perf_counter() - started)
                started = time.perf_counter()
                manager.save(2 * step, state)
                ours.append(time.perf_counter() - started)
                manager.wait()  # the pruning after it (in training, the steps until the next checkpoint overlap it)
                started = time.perf_counter()
                manager.save_async(2 * step + 1, state)  # the loop's stall: the copy to host memory
                background.append(time.perf_counter() - started)
                manager.wait()  # (in training, the steps until the next checkpoint overlap this)
        manager.close()
    return ours, background, reference


# -- the command ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all",
                        choices=["loader", "step", "breakdown", "checkpoint", "averaging", "all"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m hpctrain.launch")
    parser.add_argument("--config-dir", "-cd", help="your own config directory (as Hydra's --config-dir)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per comparison")
    parser.add_argument("--batches", type=int, default=60, help="batches per loader round")
    parser.add_argument("--steps", type=int, default=40, help="training steps per round (model step)")
    parser.add_argument("--tiny-steps", type=int, default=400, help="training steps per round (tiny model)")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to compare")
    parser.add_argument("--transform-repeats", type=int, default=0,
                        help="add a CPU-costly transform to the loader: N FFT round trips per sample")
    parser.add_argument("--checkpoint-mb", type=int, default=62, help="size of the checkpointed state")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path.cwd(),
                        help="where the disk-bound checkpoint rounds write (default: here, where runs/ goes)")
    parser.add_argument("--profile-steps", type=int, default=20,
                        help="training steps profiled to compare the step time breakdown with torch.profiler's")
    args = parser.parse_intermixed_args(argv)
    if args.what in ("step", "breakdown", "averaging", "all") and min(args.steps, args.tiny_steps) <= WARMUP_STEPS:
        parser.error(f"--steps and --tiny-steps must be > {WARMUP_STEPS} (the untimed warm-up steps), got "
                     f"{args.steps} and {args.tiny_steps}")
    if args.what in ("breakdown", "all") and min(args.steps, args.tiny_steps, args.profile_steps) <= WARMUP_STEPS + 1:
        parser.error(f"breakdown: --steps, --tiny-steps and --profile-steps must be > {WARMUP_STEPS + 1} (the "
                     f"untimed warm-up steps, then a step with and one without the breakdown)")
    return args


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    args = parse_args(argv)
    try:
        config = compose_config(args.overrides, config_dir=args.config_dir)
        components = check_run_inputs(config, prepare=True) if args.what != "checkpoint" else None
    except ConfigError as error:
        fail(str(error))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.what in ("loader", "all"):
        assert components is not None
        bench_loader(config, components, rounds=args.rounds, num_batches=args.batches,
                     workers=[int(w) for w in args.workers.split(",")], transform_repeats=args.transform_repeats)
    if args.what in ("step", "all"):
        print(f"step: {args.rounds} rounds; references: a raw PyTorch loop over the same batches held in RAM, and "
              f"reading them through hpctrain's loader (0 workers)")
        bench_step(config, rounds=args.rounds, steps=args.steps, tiny=False)
        bench_step(config, rounds=args.rounds, steps=args.tiny_steps, tiny=True)
    if args.what in ("breakdown", "all"):
        bench_breakdown(config, rounds=args.rounds, steps=args.steps, tiny_steps=args.tiny_steps,
                        profile_steps=args.profile_steps)
    if args.what in ("checkpoint", "all"):
        bench_checkpoint(rounds=args.rounds, megabytes=args.checkpoint_mb, directory=args.checkpoint_dir)
    if args.what in ("averaging", "all"):
        bench_averaging(config, rounds=args.rounds, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
