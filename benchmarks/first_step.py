"""Time to the first training step: `python -m hpctrain.launch debug=fast` against a bare PyTorch script that does
the same first step (the same file, model, loss and AdamW: read the micro-batch, forward, backward, gradient
clipping, step), each in fresh interpreters, in alternating rounds, with where the time went.

    python benchmarks/first_step.py [--rounds 7] [--num-processes 1|2]

Time counts from just before the processes start (interpreter start-up and imports included) to the end of rank
0's first optimizer step, which rank 0 reports; the benchmark then ends the run. With `--num-processes 2`,
hpctrain runs `launcher.num_processes=2` (two local DDP ranks, gloo) and the bare reference is two interpreters
started at once, each a rank of a gloo process group around DistributedDataParallel (global batch 32).

The breakdown is the median, over rounds, of each phase's seconds:
  hpctrain  imports (torch, Hydra, hpctrain's launcher), composition (Hydra, until the preflight starts), preflight
            (every `_target_` built, the datasets opened, the optimizer built, one dry step), process start (the
            run directory, and with several ranks their start until rank 0 begins), rank set-up (process group,
            components, data open, model, loaders), first step (until the end of rank 0's first step)
  bare      imports, process group (several ranks), data open, model and optimizer, first step
The difference is hpctrain's own start-up. Uses the debug dataset (data/cbed_64px_4096.h5), generated first if
missing.
"""

from __future__ import annotations

import argparse
import compileall
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # hpctrain, for harness
from harness import DEBUG_DATA as DATA, debug_data, free_port  # noqa: E402

# Imported by the launcher's process and, with several ranks, preloaded by their forkserver (so that the ranks,
# forked from it, have it too): marks the phases on stdout and ends rank 0 after its first step. The launcher
# itself is unchanged.
MARKS = """
import functools, os, time
import hpctrain.launching.app, hpctrain.launching.job, hpctrain.run.trainer

def mark(name):
    if os.environ.get("RANK", "0") == "0":  # the launcher and rank 0 (the other ranks share the stdout pipe)
        print(f"MARK {name} {time.time():.6f}", flush=True)

def marked(owner, name, before=None, after=None):
    function = getattr(owner, name)
    @functools.wraps(function)  # pickled by name, as the function it wraps (run_rank, to the ranks)
    def wrapper(*args, **kwargs):
        if before:
            mark(before)
        result = function(*args, **kwargs)
        if after:
            mark(after)
        return result
    setattr(owner, name, wrapper)

marked(hpctrain.launching.app.Preflight, "on_run_start", before="composition", after="preflight")
marked(hpctrain.launching.job, "run_rank", before="process start")
marked(hpctrain.run.trainer.Trainer, "fit", before="rank set-up")
step = hpctrain.run.trainer.Trainer.train_step
def first_step(self, *args, **kwargs):
    step(self, *args, **kwargs)
    if self.dist.is_main:
        mark("first step")
    os._exit(0)
hpctrain.run.trainer.Trainer.train_step = first_step
"""

HPCTRAIN = """
import sys
sys.path.insert(0, sys.argv[1])
import hpctrain.launching.early as early
early.RANK_MODULES = (*early.RANK_MODULES, "first_step_marks")  # the ranks' forkserver preloads the marks too
argv = sys.argv[2:]
if early.asks_for_local_ranks(argv):  # what hpctrain.launch.run does, with the marks put in before the app runs
    early.start_rank_forkserver()
import first_step_marks  # the app's imports (torch, Hydra, hpctrain's launcher)
first_step_marks.mark("imports")
sys.argv = ["hpctrain.launch", *argv]
first_step_marks.hpctrain.launching.app.run()
"""

# The same step by hand: the debug config's model (conf/model/distoptica_net.yaml), loss, optimizer (adamw.yaml:
# lr 3e-3 at the warm-up's first factor 0.01, clip_grad_norm 1.0) and micro-batch (debug/fast.yaml: 16 per rank).
BARE = """
import os, sys, time
def mark(name):
    if os.environ.get("RANK", "0") == "0":
        print(f"MARK {name} {time.time():.6f}", flush=True)
import h5py, torch
import torch.distributed as dist
from hpctrain.tasks.cbed import DistopticaNet, EndPointErrorLoss
mark("imports")
rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
torch.set_num_threads(max(1, os.cpu_count() // world_size))  # as torchrun's OMP_NUM_THREADS=1, and hpctrain
if world_size > 1:
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mark("process group")
with h5py.File(sys.argv[1]) as file:
    rows = slice(16 * rank, 16 * (rank + 1))
    batch = {"image": torch.from_numpy(file["images"][rows]), "labels": torch.from_numpy(file["labels"][rows])}
mark("data open")
torch.manual_seed(0)
model = DistopticaNet(width=16, num_stages=3, blocks_per_stage=1, norm="group", contrast_enhancement=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 * 0.01, weight_decay=1e-4)
forward = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
mark("model and optimizer")
loss = EndPointErrorLoss(grid_size=0)(forward(batch["image"]), batch).mean()
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
optimizer.step()
mark("first step")
os._exit(0)
"""



def phases(commands: list[tuple[list[str], dict[str, str]]]) -> dict[str, float]:
    """Start the processes at once; the seconds from their start to each phase mark of rank 0, in order, until
    its first step (then every process of the run is ended)."""
    started = time.time()
    processes = [subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
                 for command, env in commands]
    marks: dict[str, float] = {}
    try:
        for line in processes[0].stdout:
            if line.startswith("MARK "):
                _, *words, stamp = line.split()
                name = " ".join(words)
                marks[name] = float(stamp) - started
                if name == "first step":
                    return marks
        raise RuntimeError(f"no first step (exit code {processes[0].wait()}):\n{processes[0].stderr.read()}")
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            process.stdout.close()
            process.stderr.close()


def hpctrain_run(marks_dir: str, num_processes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        # On PYTHONPATH for the forkserver, which (Python 3.11) does not take its parent's sys.path.
        path = os.pathsep.join(filter(None, [marks_dir, os.environ.get("PYTHONPATH")]))
        return phases([([sys.executable, "-c", HPCTRAIN, marks_dir, "debug=fast",
                         f"launcher.num_processes={num_processes}", f"hydra.run.dir={run_dir}"],
                        {"PYTHONPATH": path})])


def bare_run(num_processes: int) -> dict[str, float]:
    port = str(free_port())
    return phases([([sys.executable, "-c", BARE, str(DATA)],
                    {"RANK": str(rank), "WORLD_SIZE": str(num_processes), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port}) for rank in range(num_processes)])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def breakdown(runs: list[dict[str, float]]) -> str:
    """Each phase's median seconds (from the previous mark to its own)."""
    parts = []
    for name in runs[0]:
        durations = []
        for marks in runs:
            names = list(marks)
            index = names.index(name)
            durations.append(marks[name] - (marks[names[index - 1]] if index else 0.0))
        parts.append(f"{name} {statistics.median(durations):.2f}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--num-processes", type=int, default=1, choices=(1, 2))
    args = parser.parse_args()
    debug_data()
    # Both sides import hpctrain; an installed package has its bytecode, which an environment with
    # PYTHONDONTWRITEBYTECODE=1 never writes for a source tree: compile it once, or each start compiles it again.
    compileall.compile_dir(REPO / "hpctrain", quiet=1)
    hpctrain_name = f"hpctrain.launch debug=fast, {args.num_processes} rank(s)"
    runs: dict[str, list[dict[str, float]]] = {hpctrain_name: [], "bare PyTorch": []}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as marks_dir:
        Path(marks_dir, "first_step_marks.py").write_text(MARKS)
        for round_index in range(args.rounds):
            for name in runs if round_index % 2 == 0 else reversed(list(runs)):
                runs[name].append(bare_run(args.num_processes) if name == "bare PyTorch"
                                  else hpctrain_run(marks_dir, args.num_processes))
            print(f"round {round_index + 1}: " + ", ".join(
                f"{name} {marks[-1]['first step']:.2f} s" for name, marks in runs.items()), flush=True)
    totals = {name: [marks["first step"] for marks in values] for name, values in runs.items()}
    for name, values in totals.items():
        print(f"{name:40s} {summary(values)}")
        print(f"  {breakdown(runs[name])}")
    ours, bare = totals.values()
    ratios = [a / b for a, b in zip(ours, bare)]
    print(f"{'hpctrain / bare, per round':40s} {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})")
    print(f"{'hpctrain start-up, added':40s} {summary([a - b for a, b in zip(ours, bare)])} (per round)")


if __name__ == "__main__":
    main()
