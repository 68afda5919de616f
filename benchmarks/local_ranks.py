"""Local ranks forked from a preloaded forkserver (hpctrain.launching.job) against spawned ones: a whole
`python -m hpctrain.launch debug=fast launcher.num_processes=N` run each way, in alternating rounds.

    python benchmarks/local_ranks.py [--rounds 5] [--num-processes 2] [--steps 20]

Reports each way's wall time and the machine's busy CPU seconds during the run (from /proc/stat, so it counts
the ranks, the forkserver and every helper process; run it on an otherwise idle machine). The spawn side is the
same launcher with `hpctrain.launching.job._rank_context` returning multiprocessing's spawn context, which is how local ranks
started before. Uses the debug dataset (data/cbed_64px_4096.h5), generated first if missing.
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
sys.path.insert(1, str(REPO))  # hpctrain, for harness
from harness import debug_data  # noqa: E402

LAUNCH = """
import multiprocessing, runpy, sys
import hpctrain.launching.job

if sys.argv[1] == "spawn":
    hpctrain.launching.job._rank_context = lambda work: multiprocessing.get_context("spawn")
sys.argv = ["hpctrain.launch", *sys.argv[2:]]
runpy.run_module("hpctrain.launch", run_name="__main__")
"""
WAYS = ("forkserver", "spawn")


def busy_cpu_s() -> float:
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def one_run(way: str, overrides: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        cpu, started = busy_cpu_s(), time.monotonic()
        result = subprocess.run([sys.executable, "-c", LAUNCH, way, *overrides, f"hydra.run.dir={run_dir}"],
                                cwd=REPO, capture_output=True, text=True, timeout=900)
        wall, cpu = time.monotonic() - started, busy_cpu_s() - cpu
    if result.returncode != 0:
        raise RuntimeError(f"{way}: exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall, cpu


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    debug_data()
    overrides = ["debug=fast", f"launcher.num_processes={args.num_processes}", f"trainer.max_steps={args.steps}",
                 "trainer.num_threads=1", "callbacks.metrics.plots=false", "task.plot=null"]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {' '.join(overrides)}", flush=True)
    results: dict[str, dict[str, list[float]]] = {way: {"wall": [], "cpu": []} for way in WAYS}
    for round_index in range(args.rounds):
        for way in WAYS if round_index % 2 == 0 else reversed(WAYS):
            wall, cpu = one_run(way, overrides)
            results[way]["wall"].append(wall)
            results[way]["cpu"].append(cpu)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{way} {r['wall'][-1]:.2f} s wall / {r['cpu'][-1]:.2f} s CPU" for way, r in results.items()), flush=True)
    for way, r in results.items():
        print(f"{way:10s} wall {summary(r['wall'])}   busy CPU {summary(r['cpu'])}")
    for measure in ("wall", "cpu"):
        ratios = [a / b for a, b in zip(results["forkserver"][measure], results["spawn"][measure])]
        print(f"forkserver / spawn, {measure}: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
