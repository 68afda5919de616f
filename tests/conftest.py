"""Shared fixtures: a tiny real HDF5 dataset, and a runner for the real `python -m hpctrain.launch`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.tasks.cbed.generator import CBEDGeneratorConfig, generate_dataset
from tests import zygote

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# One intra-op thread in this process and, through the environment, in every process the tests start (the
# launcher's preflight and dry step, the test phase, inspect, the SLURM jobs): on this 2-core machine, shared by the
# suite's two workers and the SLURM jobs, a second thread waits for the busy core at every operation and makes each
# run several times slower. A run's own training threads are set by trainer.num_threads (tiny_overrides: 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The SLURM tests share the one test cluster: under pytest-xdist (launch/test.sh runs two workers) they run
    in order in one worker, and first, as the longest group, while the other worker takes everything else."""
    slurm = [item for item in items if item.get_closest_marker("slurm")]
    for item in slurm:
        item.add_marker(pytest.mark.xdist_group("slurm"))
    items[:] = slurm + [item for item in items if not item.get_closest_marker("slurm")]


@pytest.hookimpl(trylast=True)  # after pytest-xdist has put the group into the node ids
def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.getoption("loadgroup", default=False):
        ungrouped = [item.nodeid for item in session.items
                     if item.get_closest_marker("slurm") and not item.nodeid.endswith("@slurm")]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group the SLURM tests ({ungrouped[0]}, ...): they would "
                                    "run at once on the one test cluster; see the pytest pin in pyproject.toml")


_running: pytest.Item | None = None  # the test being run (its fixtures included)
# HPCTRAIN_CPU_PROFILE=FILE: each test's wall and CPU seconds (fixtures included; this process and the subprocesses
# it waited for) appended to FILE. On a machine shared with other work wall times swell with the load, CPU seconds
# much less (docs/development.md).
_CPU_PROFILE = os.environ.get("HPCTRAIN_CPU_PROFILE")


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + zygote.children_cpu_s


# The SLURM tests are the suite's longest chain, and the SLURM jobs (run by slurmd, at its priority) compete for the
# two cores with the other workers' tests: a worker that runs a test that is not a SLURM test lowers its own
# priority (and its zygotes'), so that the jobs the chain waits for get the CPU first and the other tests take
# what is left. It only ever lowers it: a worker that ran the SLURM group goes on to other tests afterwards.
_OTHER_TESTS_NICE = 5


def _yield_to_the_slurm_jobs() -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ or os.nice(0) >= _OTHER_TESTS_NICE:
        return
    os.nice(_OTHER_TESTS_NICE - os.nice(0))
    for process in zygote.processes():
        os.setpriority(os.PRIO_PROCESS, process, _OTHER_TESTS_NICE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _running
    if not item.get_closest_marker("slurm"):
        _yield_to_the_slurm_jobs()
    _running = item
    wall, cpu = time.monotonic(), _cpu_seconds()
    try:
        return (yield)
    finally:
        _running = None
        if _CPU_PROFILE:
            with open(_CPU_PROFILE, "a") as file:
                file.write(f"{item.nodeid}\t{time.monotonic() - wall:.2f}\t{_cpu_seconds() - cpu:.2f}\n")


def expect_slow_test() -> None:
    """A run of the launcher takes seconds: only tests marked slow (or slurm) start one, so that
    `pytest -m "not slow and not slurm"` stays the quick loop of development."""
    if _running is not None and not any(_running.get_closest_marker(name) for name in ("slow", "slurm")):
        raise AssertionError(f"{_running.nodeid} starts the launcher: mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """192 synthetic 32x32 CBED images (154 training, 38 validation)."""
    path = tmp_path_factory.mktemp("data") / "cbed_32px_192.h5"
    generate_dataset(path, CBEDGeneratorConfig(num_images=192, image_size=32, seed=0), num_processes=1,
                     progress=False)
    return path


# What a tiny run leaves out unless a test names the key itself: the task's plot process (a fresh interpreter),
# the end-of-run PNGs (matplotlib's import and drawing: seconds of CPU per run) and training threads beyond one
# (see OMP_NUM_THREADS above: 2-thread steps were 10x slower under the suite's load). tests/test_evaluate.py draws
# the plots; runs compared bitwise all run one thread.
TINY_DEFAULTS = {"task.plot": "null", "callbacks.metrics.plots": "false", "trainer.num_threads": "1"}


def tiny_overrides(data_path: Path, *extra: str) -> list[str]:
    """A run of the real config shrunk to seconds: small images, a small model, no loader workers, one thread,
    and none of TINY_DEFAULTS' plots unless `extra` names their key."""
    defaults = [f"{key}={value}" for key, value in TINY_DEFAULTS.items()
                if not any(override.split("=", 1)[0].lstrip("+~").startswith(key) for override in extra)]
    return ["debug=fast", f"data.dataset.path={data_path}", "data.prepare.generate_if_missing=false",
            "model.width=8", "model.num_stages=2", *defaults, *extra]


def launch(args: list[str], *, run_dir: Path | None = None, check: bool = True, timeout: float = 300,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    expect_slow_test()
    command = [PYTHON, "-m", "hpctrain.launch", *args]
    if run_dir is not None:
        command.append(f"hydra.run.dir={run_dir}")
    result = zygote.run(command, cwd=cwd, timeout=timeout, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def kill_after_checkpoint(args: list[str], run_dir: Path, step: int, *, delay: float = 0.0, cwd: Path = REPO,
                          env: dict[str, str] | None = None, timeout: float = 240) -> int:
    """Start `python -m hpctrain.launch args`, SIGKILL it `delay` seconds after a checkpoint at or past `step` is
    complete (steps past it are then trained, logged and lost), and return the newest complete checkpoint's step.
    Fails if the run ended first: the test's run must be longer."""
    expect_slow_test()
    process = zygote.start([PYTHON, "-m", "hpctrain.launch", *args, f"hydra.run.dir={run_dir}"], cwd=cwd, env=env)
    manager = CheckpointManager(run_dir, keep_last=2)
    deadline = time.monotonic() + timeout
    reached = False
    while process.poll() is None and time.monotonic() < deadline and not reached:
        reached = any(info.step >= step for info in manager.complete())
        time.sleep(delay if reached else 0.01)
    alive = process.poll() is None
    process.kill()
    process.wait()
    assert reached and alive, f"the run ended (or {timeout} s passed) before a checkpoint at step {step}: make it longer"
    return max(info.step for info in manager.complete())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    manager = CheckpointManager(run_dir, keep_last=2)
    info = manager.newest_valid()
    assert info is not None, f"no checkpoint in {run_dir}"
    return CheckpointManager.load(info)["model"]


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The project's real SLURM test cluster (slurm/cluster-up.sh), started if possible.

    Where it cannot start (not root, no apt-get) the SLURM tests skip with the reason; under CI=true they fail.
    """
    import shutil

    reason = ""
    if os.geteuid() != 0:
        reason = "slurm/cluster-up.sh needs root"
    elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        reason = "slurm/cluster-up.sh needs a Debian/Ubuntu machine (apt-get)"
    else:
        up = subprocess.run(["bash", str(REPO / "slurm" / "cluster-up.sh")], capture_output=True, text=True,
                            timeout=900)
        if up.returncode != 0:
            reason = f"slurm/cluster-up.sh failed ({up.returncode}):\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM test cluster is required under CI=true: {reason}")
        pytest.skip(f"SLURM TEST CLUSTER UNAVAILABLE, SLURM tests not run: {reason}")


def run_two_gloo_ranks(target: Any, *args: Any) -> dict[int, Any]:
    """Run target(rank, *args, port, results) in two spawned processes (ranks of a gloo group on MASTER_PORT
    `port`), each putting (rank, result) on `results`; {rank: result}. A rank that fails (its traceback on stderr)
    fails the caller at once instead of leaving it waiting for the other's result."""
    import queue

    import torch.multiprocessing as mp

    from hpctrain.launching.job import _free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, *args, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    outcome: dict[int, Any] = {}
    while len(outcome) < 2:
        assert all(process.exitcode in (None, 0) for process in processes), [p.exitcode for p in processes]
        with contextlib.suppress(queue.Empty):
            outcome.update([results.get(timeout=1)])
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcome
