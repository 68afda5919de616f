"""What the task's plot hook costs a run: the same tiny CBED run with CBED's plot hook drawing after every
evaluation in its own process (how hpctrain draws), drawing in a thread of the training process (what hpctrain
falls back to for a hook that cannot be pickled), and with no hook, in alternating rounds; each run a fresh
`python -m hpctrain.launch` process.

    python benchmarks/plot_hook.py [--rounds 3] [--steps 60] [--val-every 5]

Prints the wall time of each per round, and per variant the ratio to the run without plots as median (min-max)
and the median seconds added. The run is deliberately small (32x32 images, an 8-channel model) so that drawing
is large against training: the worst case.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpctrain.tasks.cbed.generator import CBEDGeneratorConfig, generate_dataset  # noqa: E402
from hpctrain.tasks.cbed.plots import CBEDPlots  # noqa: E402

VARIANTS = {
    "process": ["callbacks.metrics.task_plot_every_evaluations=1"],
    "thread": ["callbacks.metrics.task_plot_every_evaluations=1", "task.plot._target_=plot_hook.ThreadOnlyPlots"],
    "none": ["task.plot=null"],
}


class ThreadOnlyPlots(CBEDPlots):
    """CBED's plots, refusing to be pickled: hpctrain then draws them in a thread of the training process."""

    def __reduce_ex__(self, protocol):
        raise TypeError("drawn in a thread for the benchmark")


def run(data: Path, run_dir: Path, steps: int, val_every: int, variant: str) -> float:
    command = [sys.executable, "-m", "hpctrain.launch", "debug=fast", f"data.dataset.path={data}",
               "data.prepare.generate_if_missing=false", "model.width=8", "model.num_stages=2",
               f"trainer.max_steps={steps}", f"trainer.val_every_steps={val_every}",
               "callbacks.metrics.plots=false", f"hydra.run.dir={run_dir}", *VARIANTS[variant]]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                            os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=environment)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--val-every", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        data = Path(directory) / "cbed_32px_192.h5"
        generate_dataset(data, CBEDGeneratorConfig(num_images=192, image_size=32, seed=0), num_processes=1,
                         progress=False)
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for round_ in range(args.rounds):
            for variant in VARIANTS:
                run_dir = Path(directory) / f"{variant}_{round_}"
                times[variant].append(run(data, run_dir, args.steps, args.val_every, variant))
                drawn = len(list((run_dir / "plots").glob("*/*.png")))
                print(f"round {round_}: {variant:<8} {times[variant][-1]:6.2f} s ({drawn} PNGs)", flush=True)
    for variant in ("process", "thread"):
        ratios = [a / b for a, b in zip(times[variant], times["none"])]
        added = statistics.median(a - b for a, b in zip(times[variant], times["none"]))
        print(f"plots in a {variant:<8} / no plots: {statistics.median(ratios):.3f}x "
              f"({min(ratios):.3f}-{max(ratios):.3f}), {added:+.2f} s per run (median)")


if __name__ == "__main__":
    main()
