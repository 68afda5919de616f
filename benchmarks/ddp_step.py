"""hpctrain's training step on 2 local DDP ranks (gloo, CPU) against a raw 2-rank PyTorch DDP script with the same
model, data, loss, optimizer and gradient clipping, global batch 64 (32 per rank), each a fresh run, in rounds whose
order alternates (hpctrain first, then raw first, ...).

    python benchmarks/ddp_step.py [--rounds 4] [--steps 25]

A step's time runs from the end of one step to the end of the next, so it counts reading its batch, the step and
whatever the loop does between steps; the first WARMUP_STEPS are dropped. hpctrain's come from rank 0's step rows
in the run's metrics.h5 (`time_step`, hpctrain.run.breakdown), which leave out its evaluations and checkpoints
(configured past the timed steps here, and run between steps anyway). The raw script's come from rank 0's
time.perf_counter() after each step. Both read the training samples (the first 80% of the file: hpctrain holds
out the last data.val_fraction for validation) in the same per-epoch order, hpctrain's sampler's: hpctrain with its
own reader from the file (hpctrain.data.hdf5_reader), the raw script from arrays it loaded whole into RAM before
its first step, so that the ratio is the loop's and DDP's cost alone; the read times printed at the end say what
each side's read cost. Uses the debug dataset (data/cbed_64px_4096.h5), generated first if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # hpctrain, for harness
from harness import DEBUG_DATA as DATA, debug_data, free_port, ratio_line  # noqa: E402

WARMUP_STEPS = 5  # not timed: first-call allocations, DDP's first bucket rebuild, the loader's start
MICRO_BATCH, WORLD = 32, 2
PARTS = ("time_data", "time_forward_backward", "time_optimizer", "time_bookkeeping")

# One rank of the raw script: argv = rank, port, data file, steps. The debug config's model
# (conf/model/distoptica_net.yaml), loss (conf/task/cbed_distortion.yaml), AdamW and clipping (conf/optim/adamw.yaml;
# the schedule is set to constant on hpctrain's side, so lr 3e-3 throughout) and hpctrain's training split
# (val_fraction 0.2) and sample order (DistributedBatchSampler: permutation keyed on (seed 0, epoch), each rank an
# even half of the step's 64 samples).
RAW = """
import json, sys, time
import h5py, numpy as np, torch, torch.distributed as dist
from hpctrain.tasks.cbed import DistopticaNet, EndPointErrorLoss

rank, port, path, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(
    DistopticaNet(width=16, num_stages=3, blocks_per_stage=1, norm="group", contrast_enhancement=True))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
loss_function = EndPointErrorLoss(grid_size=0)
with h5py.File(path, "r") as file:  # all of it in RAM: the raw step's read costs nothing (the ceiling)
    images, labels = file["images"][()], file["labels"][()]
train = np.arange(len(images) - round(len(images) * 0.2))
per_epoch = -(-len(train) // 64)  # the epoch's last step is short, as hpctrain's
stamps, reads = [], []
for step in range(steps):
    epoch, in_epoch = divmod(step, per_epoch)
    if in_epoch == 0:
        order = train[np.random.default_rng([0, epoch]).permutation(len(train))]
    read_started = time.perf_counter()
    mine = np.sort(np.array_split(order[in_epoch * 64:(in_epoch + 1) * 64], 2)[rank])
    batch = {"image": torch.from_numpy(images[mine]), "labels": torch.from_numpy(labels[mine])}
    reads.append(time.perf_counter() - read_started)
    loss = loss_function(model(batch["image"]), batch).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    logged = loss.detach().clone()  # the loss for the log, averaged over the ranks, as a real script would
    dist.all_reduce(logged)
    logged = logged.item() / 2
    stamps.append(time.perf_counter())
if rank == 0:
    print("STAMPS " + json.dumps({"stamps": stamps, "reads": reads}), flush=True)
dist.destroy_process_group()
"""



def raw_run(steps: int) -> dict[str, np.ndarray]:
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", RAW, str(rank), str(port), str(DATA), str(steps)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(WORLD)]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    marks = [line for line in outputs[0][0].splitlines() if line.startswith("STAMPS ")]
    if any(rank.returncode for rank in ranks) or not marks:
        raise RuntimeError("raw run failed:\n" + "\n".join(out + err for out, err in outputs))
    times = json.loads(marks[0].split(" ", 1)[1])
    # The durations of steps WARMUP_STEPS+1 .. steps, and the time each spent reading its batch.
    return {"time_step": np.diff(times["stamps"][WARMUP_STEPS - 1:]),
            "time_data": np.array(times["reads"][WARMUP_STEPS:])}


def hpctrain_run(steps: int) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["debug=fast", f"launcher.num_processes={WORLD}", f"trainer.micro_batch_size={MICRO_BATCH}",
                     f"trainer.max_steps={steps}", "trainer.num_threads=1", "data.num_workers=0",
                     "callbacks.metrics.plots=false", "task.plot=null", "optim.schedule.name=constant",
                     # the default config's metrics flush, not the debug config's every second
                     "callbacks.metrics.flush_every_seconds=10",
                     # no evaluation or checkpoint before the last step (the run's final ones come after it)
                     f"trainer.val_every_steps={steps + 1}", f"callbacks.checkpoint.every_steps={steps + 1}",
                     f"hydra.run.dir={run_dir}"]
        result = subprocess.run([sys.executable, "-m", "hpctrain.launch", *overrides], cwd=REPO,
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"hpctrain run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        with h5py.File(Path(run_dir) / "metrics.h5", "r", locking=False) as file:
            kept = file["train/step"][()] > WARMUP_STEPS  # /train/step: the 1-based optimizer step of each row
            if kept.sum() != steps - WARMUP_STEPS:
                raise RuntimeError(f"metrics.h5 has steps {file['train/step'][()].tolist()}, expected 1..{steps}")
            return {name: file[f"train/{name}"][()][kept] for name in ("time_step", *PARTS)}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ms ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must be more than {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} are not timed)")
    debug_data()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {WORLD} ranks x {MICRO_BATCH} samples, "
          f"{args.steps} steps per run, the first {WARMUP_STEPS} not timed", flush=True)
    sides = {"hpctrain": hpctrain_run, "raw": raw_run}
    medians: dict[str, list[float]] = {name: [] for name in sides}  # ms, per run (median over its steps)
    parts: dict[str, list[float]] = {part: [] for part in ("time_step", *PARTS)}  # hpctrain's, ms, every step
    raw_reads: list[float] = []  # ms, every timed raw step
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            times = sides[name](args.steps)
            medians[name].append(float(np.median(times["time_step"])) * 1e3)
            if name == "hpctrain":
                for part in parts:
                    parts[part] += (times[part] * 1e3).tolist()
            else:
                raw_reads += (times["time_data"] * 1e3).tolist()
        print(f"round {round_index + 1} ({order[0]} first): " + ", ".join(
            f"{name} {values[-1]:.2f} ms" for name, values in medians.items()), flush=True)

    print("median step time per run, median over the rounds (min-max):")
    for name, values in medians.items():
        print(f"  {name:10s} {summary(values)}")
    ours, raw = medians["hpctrain"], medians["raw"]
    print("hpctrain / raw:")
    print(ratio_line("per round", ours, raw, "ms", higher_is_better=False))
    # Position-matched: rounds in pairs (1,2), (3,4), ...; hpctrain runs first in the odd rounds, raw in the even
    # ones, so hpctrain's first run is divided by raw's first (the next round's), its second by raw's second (the
    # round before): an advantage of running first or second cancels. An odd last round has no partner.
    matched_ours, matched_raw = [], []
    for a in range(0, args.rounds - 1, 2):
        matched_ours += [ours[a], ours[a + 1]]
        matched_raw += [raw[a + 1], raw[a]]
    if matched_ours:
        print(ratio_line("position-matched (adjacent rounds)", matched_ours, matched_raw, "ms",
                         higher_is_better=False))
    print("hpctrain's breakdown (rank 0, mean ms per timed step over all runs; the parts add up to time_step):")
    print("  " + ", ".join(f"{part.removeprefix('time_')} {np.mean(values):.2f}" for part, values in parts.items()))
    print(f"raw's batch read (from RAM; rank 0, mean ms per timed step): {np.mean(raw_reads):.2f}")


if __name__ == "__main__":
    main()
