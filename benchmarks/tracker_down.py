"""Training's step time while its MLflow tracking server is away, against the same run's steps with the server up.

    python benchmarks/tracker_down.py [--cycles 6] [--block 40] [OVERRIDES]

One run of the demo's settings (`debug=fast`: its model, batch size and metrics flush every second; no evaluation
or checkpoint, as benchmarks/harness.step_config strips them) with an MLflow logger sending to a local
`mlflow server` (SQLite store in a temporary directory). Once the logger has delivered a row, the server's state
changes every --block steps, in cycles of four blocks, and the run ends with one more block up:

  up       the server answers
  stopped  the server is SIGSTOPped: a call to it hangs (SIGCONT at the block's end: it answers the held rows)
  up
  killed   the server is SIGKILLed: every call to it is refused (started again, same port and store, at the end)

Each step is timed by harness.hpctrain_loop_seconds (the loop's own time; the changes of state, a restart
included, run between steps, untimed). Each block away is compared with the mean of the two blocks up around it
(a busy machine's drift over a few seconds cancels out): the lines print block away / blocks up as the median
(min-max) of those ratios of the median step; within 5% (1.05x at most) is the target. The server shares the
machine's cores with training, as on a node where it runs beside the job.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's hpctrain (as benchmarks/bench.py)
from harness import WARMUP_STEPS, hpctrain_loop_seconds, quiet, ratio_line, step_config  # noqa: E402
from hpctrain.components import build_loggers, check_run_inputs  # noqa: E402
from hpctrain.config import Config  # noqa: E402
from hpctrain.launching.app import compose_config  # noqa: E402
from hpctrain.run.contract import Components  # noqa: E402


class MlflowServer:
    """`mlflow server` on a free local port, with its store in `directory`; started again on the same port and
    store after a kill."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                        str(self.port), "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
                        "--default-artifact-root", str(directory / "artifacts"), "--workers", "1"]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        # Without MLflow's server-side job consumers (8 processes importing all of MLflow): not what a logger uses.
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True,
                                        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self.wait_until_up()

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=10):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def signal(self, signum: int) -> None:
        """Every process of the server's session (uvicorn's worker included)."""
        assert self.process is not None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == self.process.pid:
                    os.kill(int(stat.parent.name), signum)
            except (OSError, IndexError, ValueError):
                continue

    def start_again(self) -> None:
        """After a SIGKILL: on the same port, with the same store."""
        assert self.process is not None
        self.process.wait()
        self.start()

    def close(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)


def alternating_run(base: Config, components: Components, server: MlflowServer, *, cycles: int, block: int,
                    run_dir: Path) -> list[tuple[str, float]]:
    """(state of the server, median step) of each block of one run (see the module's docstring)."""
    config = replace(base, callbacks=replace(base.callbacks, loggers=[
        {"_target_": "hpctrain.loggers.mlflow.MLflowLogger", "tracking_uri": server.url}]))
    components.callbacks = build_loggers(config.callbacks)
    schedule = [("up", "stopped", "up", "killed")[index % 4] for index in range(4 * cycles + 1)]
    first = WARMUP_STEPS + 10  # the blocks start after this step (the logger opened by then)
    done = 0

    def between() -> None:
        nonlocal done
        done += 1
        if done == first:
            wait_for_delivery(run_dir)
        index, within = divmod(done - first, block)
        if done >= first and within == 0 and 0 < index < len(schedule):
            change(server, schedule[index - 1], schedule[index])

    durations = hpctrain_loop_seconds(config, components, first + block * len(schedule), run_dir, between=between)
    steps = durations[first - WARMUP_STEPS:]  # durations[0]: the step after the warm-up
    return [(state, float(np.median(steps[index * block + 1:(index + 1) * block])))  # its first step: the change's
            for index, state in enumerate(schedule)]


def change(server: MlflowServer, leaving: str, entering: str) -> None:
    if leaving == "stopped":
        server.signal(signal.SIGCONT)
    elif leaving == "killed":
        server.start_again()
    if entering == "stopped":
        server.signal(signal.SIGSTOP)
    elif entering == "killed":
        server.signal(signal.SIGKILL)


def wait_for_delivery(run_dir: Path) -> None:
    """Until the MLflow logger has delivered a training row (it opens in its thread: seconds)."""
    import json

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if json.loads((run_dir / "loggers" / "mlflow.json").read_text())["delivered"]["train"] > 0:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise RuntimeError("the MLflow logger delivered nothing in 300 s")


def mlflow_steps(url: str) -> list[int]:
    """The sorted steps of train/loss in the server's one run (a step twice is there twice)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    runs = [run for found in client.search_experiments() for run in client.search_runs([found.experiment_id])]
    return sorted(point.step for run in runs for point in client.get_metric_history(run.info.run_id, "train/loss"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/tracker_down.py", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m hpctrain.launch")
    parser.add_argument("--cycles", type=int, default=6, help="cycles of four blocks: up, stopped, up, killed")
    parser.add_argument("--block", type=int, default=40, help="training steps per block")
    args = parser.parse_args(argv)
    # The run ends with its server up; 2 s for its logger's end is plenty (the default is 60).
    config = compose_config(["debug=fast", "callbacks.logger_close_timeout_s=2", *args.overrides])
    components = check_run_inputs(config, prepare=True)
    base = step_config(config, 1)
    import hpctrain.loggers.mlflow  # noqa: F401  (imported before the run, as a process would before its steps)

    logging.getLogger("hpctrain.loggers").setLevel(logging.ERROR)  # each outage's warning
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.cycles} cycles of blocks of "
          f"{args.block} steps; metrics flushed every {base.callbacks.metrics.flush_every_seconds} s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` and friends: the server is stopped too
    with tempfile.TemporaryDirectory() as directory, quiet():
        server = MlflowServer(Path(directory))
        try:
            blocks = alternating_run(base, components, server, cycles=args.cycles, block=args.block,
                                     run_dir=Path(directory) / "run")
            steps = len(blocks) * args.block + WARMUP_STEPS + 10
            held = mlflow_steps(server.url)
        finally:
            server.close()
    once = held == list(range(1, steps + 1))
    print(f"  MLflow holds each of the run's {steps} steps once: {'yes' if once else 'NO'}")
    print("  median step of each block (ms): " + ", ".join(f"{state} {median * 1e3:.1f}" for state, median in blocks))
    worst = 0.0
    for state in ("stopped", "killed"):
        away = [median for index, (name, median) in enumerate(blocks) if name == state]
        up = [(blocks[index - 1][1] + blocks[index + 1][1]) / 2 for index, (name, _) in enumerate(blocks)
              if name == state]
        print(ratio_line(f"median step, server {state} / up", away, up, "s/step", higher_is_better=False))
        worst = max(worst, statistics.median(a / b for a, b in zip(away, up)))
    print(f"  target: within 5% (median ratio <= 1.05): {'met' if worst <= 1.05 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
