"""Time to the first training step: `python -m hpctrain.launch debug=fast` against a bare PyTorch script that does
the same first step (16 images of the same file, the same model, loss and AdamW, forward, backward, gradient
clipping, step), each in a fresh interpreter, in alternating rounds.

    python benchmarks/first_step.py [--rounds 7]

Time counts from just before the process starts (interpreter start-up and imports included) to the end of its
first optimizer step, which the process reports and then exits. The difference is hpctrain's own start-up:
Hydra's composition, the preflight (every `_target_` built, the datasets opened, one dry step) and the trainer's
set-up. Uses the debug dataset (data/cbed_64px_4096.h5), generated first if missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "cbed_64px_4096.h5"

# The launcher, unchanged, with the first return of Trainer.train_step reported.
HPCTRAIN = """
import os, runpy, sys, time
import hpctrain.run.trainer

step = hpctrain.run.trainer.Trainer.train_step
def first_step(self, *args, **kwargs):
    step(self, *args, **kwargs)
    print(f"FIRST_STEP {time.time():.6f}", flush=True)
    os._exit(0)
hpctrain.run.trainer.Trainer.train_step = first_step
sys.argv = ["hpctrain.launch", *sys.argv[1:]]
runpy.run_module("hpctrain.launch", run_name="__main__")
"""

# The same step by hand: the debug config's model (conf/model/distoptica_net.yaml), loss, optimizer (adamw.yaml:
# lr 3e-3 at the warm-up's first factor 0.01, clip_grad_norm 1.0) and micro-batch (debug/fast.yaml: 16).
BARE = """
import os, sys, time
import h5py, torch
from hpctrain.tasks.cbed import DistopticaNet, EndPointErrorLoss

with h5py.File(sys.argv[1]) as file:
    batch = {"image": torch.from_numpy(file["images"][:16]), "labels": torch.from_numpy(file["labels"][:16])}
torch.manual_seed(0)
model = DistopticaNet(width=16, num_stages=3, blocks_per_stage=1, norm="group", contrast_enhancement=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 * 0.01, weight_decay=1e-4)
loss = EndPointErrorLoss(grid_size=0)(model(batch["image"]), batch).mean()
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
optimizer.step()
print(f"FIRST_STEP {time.time():.6f}", flush=True)
os._exit(0)
"""


def seconds_to_first_step(code: str, *args: str) -> float:
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    marks = [line for line in result.stdout.splitlines() if line.startswith("FIRST_STEP ")]
    if result.returncode != 0 or not marks:
        raise RuntimeError(f"no first step (exit code {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return float(marks[0].split()[1]) - started


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    if not DATA.exists():
        print(f"generating {DATA} first (the debug run's data.prepare hook)", flush=True)
        with tempfile.TemporaryDirectory() as run_dir:
            subprocess.run([sys.executable, "-m", "hpctrain.launch", "debug=fast", "trainer.max_steps=1",
                            f"hydra.run.dir={run_dir}"], cwd=REPO, check=True, capture_output=True)
    times: dict[str, list[float]] = {"hpctrain.launch debug=fast": [], "bare PyTorch": []}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    for round_index in range(rounds):
        order = list(times) if round_index % 2 == 0 else list(reversed(times))
        for name in order:
            with tempfile.TemporaryDirectory() as run_dir:
                if name == "bare PyTorch":
                    times[name].append(seconds_to_first_step(BARE, str(DATA)))
                else:
                    times[name].append(seconds_to_first_step(HPCTRAIN, "debug=fast", f"hydra.run.dir={run_dir}"))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items()),
              flush=True)
    for name, values in times.items():
        print(f"{name:28s} {summary(values)}")
    difference = [a - b for a, b in zip(*times.values())]
    print(f"{'hpctrain start-up, added':28s} {summary(difference)} (per round)")


if __name__ == "__main__":
    main()
