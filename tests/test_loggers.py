"""Loggers and user callbacks, for real: a TensorBoard server and an MLflow server on localhost, and W&B's and
Comet's own offline files, read back what a run killed twice and resumed logged (each step once, one run), and a
run with a failing logger, a logger whose server is down and a user callback that draws random numbers ends bitwise
equal to a run without any. An MLflow server killed or hung in the middle of a run, back before its end or never:
the run trains as without it, and MLflow gets every step once, or the run lists the steps it did not get."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain.callbacks import Callbacks, StepView
from hpctrain.loggers import Logger

from . import zygote
from .conftest import PYTHON, REPO, final_weights, kill_after_checkpoint, launch, tiny_overrides

# One xdist group: the tests share the reference run, the offline run and the zygote that has imported the logger
# libraries (_preload_the_loggers), so that one worker trains, writes and starts each once, not every worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("loggers")]

RUN = ["trainer.max_steps=24", "trainer.val_every_steps=6", "callbacks.checkpoint.every_steps=4",
       "callbacks.metrics.flush_every_seconds=0", "callbacks.early_stopping.enabled=false",
       "trainer.micro_batch_size=8", "trainer.num_microbatches=2"]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _preload_the_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run here imports the logger libraries (MLflow alone ~5 s of CPU): its zygote imports them once."""
    monkeypatch.setenv("HPCTRAIN_TEST_PRELOAD", "mlflow,comet_ml,wandb,torch.utils.tensorboard,hpctrain.loggers.mlflow,"
                       "hpctrain.loggers.comet,hpctrain.loggers.wandb,hpctrain.loggers.tensorboard")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 120) -> bytes:
    """The body at `url`, waiting for the server to come up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def get_json(url: str) -> object:
    return json.loads(get(url))


class Server:
    """A server process on a local port, stopped at the end."""

    def __init__(self, command: list[str], port: int, ready_path: str, env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, env={**os.environ, **(env or {})})
        get(self.url + ready_path)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server and everything it started (MLflow's job consumers outlive a SIGTERM of the group);
        `kill`: SIGKILL at once (a server a test stopped with SIGSTOP: let go, it would answer what it holds)."""
        if not kill:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):  # gone already, or deaf to SIGTERM
                pass
        signal_session(self.process.pid, signal.SIGKILL)
        self.process.wait(15)


def signal_session(session_id: int, signum: int) -> None:
    """Signal every process of a session (a server started with start_new_session: its id is its leader's pid)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, IndexError, ValueError):
            continue
        if session == session_id:
            try:
                os.kill(int(stat.parent.name), signum)
            except ProcessLookupError:
                pass


def start_mlflow_server(directory: Path, port: int) -> Server:
    """`mlflow server` on `port` with its store in `directory` (the same again: the same server, restarted)."""
    return Server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                   "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
                   "--default-artifact-root", str(directory / "artifacts"), "--workers", "1"],
                  port, "/health",
                  # MLflow's server-side jobs (8 huey consumers, each importing all of MLflow: ~55 s of CPU here)
                  # are not what a logger uses; the tracking server is the same without them.
                  env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    launch(tiny_overrides(tiny_data, *RUN), run_dir=run_dir)
    return final_weights(run_dir)


def assert_equal_weights(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = final_weights(run_dir)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def test_tensorboard_mlflow_wandb_and_comet_show_each_step_once_in_one_run_after_two_kills(
        tmp_path: Path, tiny_data: Path, reference: dict[str, torch.Tensor]) -> None:
    mlflow_server = start_mlflow_server(tmp_path, free_port())
    try:
        run_dir, records = tmp_path / "run", tmp_path / "records"
        records.mkdir()
        args = tiny_overrides(tiny_data, *RUN, "callbacks.loggers=[tensorboard,{_target_: "
                              f"hpctrain.loggers.mlflow.MLflowLogger, tracking_uri: '{mlflow_server.url}'}},"
                              "wandb,comet]",
                              f"callbacks.user=[{{_target_: tests.test_loggers.RecordingCallback, "
                              f"directory: '{records}'}}, {{_target_: tests.test_loggers.WaitForLoggers, "
                              "names: [tensorboard, mlflow, wandb, comet]}]")
        # 0.2 s past each checkpoint: a few steps logged, then recomputed after the restart
        kill_after_checkpoint(args, run_dir, 8, delay=0.2)
        kill_after_checkpoint(args, run_dir, 16, delay=0.2)
        assert "resumed from" in launch(args, run_dir=run_dir).stdout
        assert_equal_weights(run_dir, reference)  # loggers and callbacks change nothing
        seen = [tuple(line) for line in map(json.loads, (records / "rank0.jsonl").read_text().splitlines())]
        starts = [step for hook, step in seen if hook == "on_start"]
        assert len(starts) == 3 and starts[0] == 0 and 8 <= starts[1] < starts[2] and seen[-1] == ("on_end", 24)
        last_start = len(seen) - 1 - seen[::-1].index(("on_start", starts[2]))
        assert [step for hook, step in seen[last_start:] if hook == "on_step_end"] == list(range(starts[2] + 1, 25))
        with h5py.File(run_dir / "metrics.h5", "r") as metrics:
            train_loss = metrics["train/loss"][()]
            validation_loss = metrics["validation/loss"][()]
        steps = list(range(1, 25))

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_server.url)
        runs = [run for found in client.search_experiments() for run in client.search_runs([found.experiment_id])]
        assert len(runs) == 1, "one MLflow run across the kills"
        run_id = runs[0].info.run_id
        assert json.loads((run_dir / "loggers" / "mlflow.json").read_text())["run_id"] == run_id
        history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda point: point.step)
        assert [point.step for point in history] == steps  # each step once
        np.testing.assert_array_equal([point.value for point in history], train_loss)
        validation = client.get_metric_history(run_id, "validation/loss")
        assert sorted(point.step for point in validation) == [6, 12, 18, 24]
        np.testing.assert_array_equal([p.value for p in sorted(validation, key=lambda p: p.step)], validation_loss)
        assert runs[0].data.params["trainer.max_steps"] == "24"
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        mlflow_server.stop()
    expected = dict(train_steps=steps, validation_steps=[6, 12, 18, 24])
    assert_wandb_offline_run_holds_each_step_once(run_dir, train_loss, validation_loss, **expected, processes=3)
    # The two killed processes left no archive (Comet archives at a process's end): the last one holds every step.
    assert_comet_offline_experiment_holds_each_step_once(run_dir, train_loss, validation_loss, **expected,
                                                         archives=1)
    assert_tensorboard_run_holds_each_step_once(run_dir, train_loss, validation_loss, **expected, processes=3)

    tensorboard_port = free_port()
    tensorboard = Server([str(BIN / "tensorboard"), "--logdir", str(run_dir / "tensorboard"), "--host",
                          "127.0.0.1", "--port", str(tensorboard_port), "--reload_interval", "0"],
                         tensorboard_port, "/data/runs")
    try:
        assert get_json(f"{tensorboard.url}/data/runs") == ["."], "one TensorBoard run across the kills"
        scalars = get_json(f"{tensorboard.url}/data/plugin/scalars/scalars?run=.&tag=train%2Floss")
        assert [step for _, step, _ in scalars] == steps  # each step once: purge_step dropped the killed rows
        np.testing.assert_allclose([value for _, _, value in scalars], train_loss, rtol=1e-6)
        scalars = get_json(f"{tensorboard.url}/data/plugin/scalars/scalars?run=.&tag=validation%2Floss")
        assert [step for _, step, _ in scalars] == [6, 12, 18, 24]
    finally:
        tensorboard.stop()


def assert_count(found: list[Path], expected: int | range, what: str) -> None:
    """`expected` exactly, or any count in a range (where it depends on how the processes ended)."""
    assert len(found) in (expected if isinstance(expected, range) else [expected]), \
        f"{len(found)} {what}, expected {expected}: {[path.name for path in found]}"


def assert_wandb_offline_run_holds_each_step_once(run_dir: Path, train_loss: np.ndarray, validation_loss: np.ndarray,
                                                  *, train_steps: list[int], validation_steps: list[int],
                                                  processes: int | range) -> None:
    """W&B's offline directories, read through its own transaction-log records: one run id, each step once.
    Offline, every process that opened W&B writes a directory of its own (`processes` of them), all of one run id;
    `train_loss` and `validation_loss` (metrics.h5's) are the values of `train_steps` and `validation_steps`."""
    from hpctrain.loggers.wandb_offline_log import offline_directories, read_history, read_records

    run_id = json.loads((run_dir / "loggers" / "wandb.json").read_text())["run_id"]
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert segments == offline_directories(run_dir, run_id), "one run id in every process"
    assert_count(segments, processes, "W&B offline directories")
    history = read_history(run_dir, run_id)
    train = [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row]
    assert [step for step, _ in train] == train_steps  # each step once, across the segments
    np.testing.assert_array_equal([value for _, value in train], train_loss)
    validation = [(row["_step"], row["validation/loss"]) for row in history if "validation/loss" in row]
    assert [step for step, _ in validation] == validation_steps
    np.testing.assert_array_equal([value for _, value in validation], validation_loss)
    records = list(read_records(run_dir, run_id))
    config = {item.key: json.loads(item.value_json) for record in records if record.HasField("run")
              for item in record.run.config.update}
    assert config["trainer"]["max_steps"] == train_steps[-1] and config["hpctrain.phase"] == "train"
    summary = {item.key: json.loads(item.value_json) for record in records if record.HasField("summary")
               for item in record.summary.update if item.key}
    assert f"trainer.max_steps={train_steps[-1]}" in summary["hpctrain.stop_reason"]
    assert summary["hpctrain.best_checkpoint"].startswith(str(run_dir))


def assert_comet_offline_experiment_holds_each_step_once(run_dir: Path, train_loss: np.ndarray,
                                                         validation_loss: np.ndarray, *, train_steps: list[int],
                                                         validation_steps: list[int], archives: int | range,
                                                         unarchived: bool = False) -> None:
    """Comet's offline archives, read from their JSON messages: one experiment key, each step once. Only a process
    that ends (not a SIGKILLed one) archives, so how many `archives` there are depends on how the processes ended;
    every archive in comet/ is the experiment's, the first `<key>.zip` with its parameters. `unarchived`: a process
    may have ended before Comet finished its archive (a stop waits callbacks.logger_stop_timeout_s for it), leaving
    the empty zip Comet writes at its start, or a zip cut short: neither is an archive (both are skipped)."""
    import zipfile

    from hpctrain.loggers.comet_offline_archive import archives as archives_of, read_metrics

    def holds_files(path: Path) -> bool:
        try:
            with zipfile.ZipFile(path) as archive:
                return bool(archive.namelist())
        except zipfile.BadZipFile:
            return False

    key = json.loads((run_dir / "loggers" / "comet.json").read_text())["experiment_key"]
    found = archives_of(run_dir / "comet", key)
    zips = [path for path in sorted((run_dir / "comet").glob("*.zip")) if not unarchived or holds_files(path)]
    assert sorted(found) == zips, "one experiment key in every archive"
    assert found[:1] == [run_dir / "comet" / f"{key}.zip"]
    assert_count(found, archives, "Comet offline archives")
    metrics = read_metrics(run_dir / "comet", key)
    train = [(step, value) for name, step, value in metrics if name == "train/loss"]
    assert [step for step, _ in train] == train_steps
    np.testing.assert_array_equal([value for _, value in train], train_loss)
    assert [step for name, step, _ in metrics if name == "validation/loss"] == validation_steps
    np.testing.assert_array_equal([value for name, _, value in metrics if name == "validation/loss"],
                                  validation_loss)
    with zipfile.ZipFile(run_dir / "comet" / f"{key}.zip") as archive:
        messages = [json.loads(line) for line in archive.read("messages.json").decode().splitlines()]
    parameters = {message["payload"]["param"]["paramName"]: message["payload"]["param"]["paramValue"]
                  for message in messages if message["type"] == "parameter_msg"}
    assert str(parameters["trainer.max_steps"]) == str(train_steps[-1])


def assert_tensorboard_run_holds_each_step_once(run_dir: Path, train_loss: np.ndarray, validation_loss: np.ndarray,
                                                *, train_steps: list[int], validation_steps: list[int],
                                                processes: int | range) -> None:
    """TensorBoard's event files, read the way TensorBoard reads them (its EventMultiplexer, which drops the events a
    `purge_step` restart discards) without starting a server: one run, each step once in the order read (a step a
    restart did not purge would come twice), the values metrics.h5's as float32 (what add_scalar stores). Every
    process that opened the logger wrote one event file of its own (`processes` of them), all in the one run."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    directory = run_dir / "tensorboard"
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert {path.parent for path in files} == {directory}, "one TensorBoard run in every process"
    assert_count(files, processes, "TensorBoard event files")
    multiplexer = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(directory))
    multiplexer.Reload()
    assert list(multiplexer.Runs()) == ["."]
    for tag, steps, values in (("train/loss", train_steps, train_loss),
                               ("validation/loss", validation_steps, validation_loss)):
        scalars = multiplexer.Scalars(".", tag)
        assert [event.step for event in scalars] == steps, tag  # each step once
        np.testing.assert_array_equal(np.float32([event.value for event in scalars]), np.float32(values))


class WaitForLoggers:
    """Holds each process's second step until its loggers have opened their run (their state file written by this
    process), so that a kill comes after that (opening W&B, Comet or MLflow takes seconds, the tiny run less)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def on_start(self, run):  # type: ignore[no-untyped-def]
        self.state_dir, self.start_step, self.started = run.run_dir / "loggers", run.start_step, time.time()

    def on_step_end(self, step):  # type: ignore[no-untyped-def]
        if step.step != self.start_step + 2:
            return
        deadline = time.monotonic() + 300  # a first import of MLflow can take a minute on a busy machine
        while time.monotonic() < deadline:
            try:
                if all((self.state_dir / f"{name}.json").stat().st_mtime >= self.started for name in self.names):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the loggers {self.names} did not open in 300 s")


class RaisingLogger(Logger):
    """A logger that raises at every call (built from tests, like a user's own)."""

    name = "raising"

    def open(self, run, state, *, rewind_to):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    def log_rows(self, rows):  # type: ignore[no-untyped-def]
        raise OSError("disk full")


class RecordingCallback:
    """Records every hook it sees, per rank, and draws random numbers to prove they do not shift training."""

    rank_zero_only = False

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _record(self, hook: str, step: int) -> None:
        torch.rand(3), np.random.rand(), __import__("random").random()  # must not change the run's streams
        rank = os.environ.get("RANK", "0")
        with open(self.directory / f"rank{rank}.jsonl", "a") as file:
            file.write(json.dumps([hook, step]) + "\n")

    def on_start(self, run):  # type: ignore[no-untyped-def]
        self._record("on_start", run.start_step)

    def on_step_end(self, step):  # type: ignore[no-untyped-def]
        assert isinstance(step.loss, float)
        self._record("on_step_end", step.step)

    def on_validation_end(self, evaluation):  # type: ignore[no-untyped-def]
        assert not evaluation.per_sample["loss"].flags.writeable
        self._record("on_validation_end", evaluation.step)

    def on_checkpoint(self, checkpoint):  # type: ignore[no-untyped-def]
        self._record("on_checkpoint", checkpoint.step)

    def on_end(self, end):  # type: ignore[no-untyped-def]
        self._record("on_end", end.step)


def test_callbacks_on_two_ranks_and_failing_loggers_leave_the_run_bitwise_unchanged(
        tmp_path: Path, tiny_data: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    dead_port = free_port()  # nothing listens: an MLflow server that is down
    two_ranks = [*RUN, "launcher.num_processes=2"]
    launch(tiny_overrides(tiny_data, *two_ranks), run_dir=tmp_path / "reference")
    args = tiny_overrides(tiny_data, *two_ranks,
                          f"callbacks.user=[{{_target_: tests.test_loggers.RecordingCallback, directory: '{records}'}}]",
                          "callbacks.loggers=[{_target_: tests.test_loggers.RaisingLogger}, {_target_: "
                          f"hpctrain.loggers.mlflow.MLflowLogger, tracking_uri: 'http://127.0.0.1:{dead_port}'}}]",
                          "callbacks.logger_close_timeout_s=5")
    # MLflow reads these two at each request, not at import: the logger zygote's child takes them
    result = zygote.run([PYTHON, "-m", "hpctrain.launch", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                        cwd=REPO, timeout=600, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_equal_weights(tmp_path / "run", final_weights(tmp_path / "reference"))
    log = result.stdout + result.stderr
    assert log.count("callbacks.loggers[0] (raising) failed") == 1  # logged once
    assert log.count("callbacks.loggers[1] (mlflow) failed") == 1
    for rank in (0, 1):
        seen = [tuple(line) for line in map(json.loads, (records / f"rank{rank}.jsonl").read_text().splitlines())]
        assert seen[0] == ("on_start", 0) and seen[-1] == ("on_end", 24)
        assert [step for hook, step in seen if hook == "on_step_end"] == list(range(1, 25))
        assert [step for hook, step in seen if hook == "on_validation_end"] == [6, 12, 18, 24]
        checkpoints = [step for hook, step in seen if hook == "on_checkpoint"]  # every 4 steps and at a new best
        assert checkpoints == sorted(set(checkpoints)) and {4, 8, 12, 16, 20, 24} <= set(checkpoints) <= \
            {4, 6, 8, 12, 16, 18, 20, 24}


class ServerOutage:
    """Takes the MLflow server away in the middle of a run (built in the run's process, like a user's callback): at
    step `away`, once the logger has delivered every step up to it (no request in flight), it SIGKILLs the server
    (`how: kill`) or SIGSTOPs it (`how: stop`: a server that hangs). At step `back`, if given, it asks the test to
    start the server again (the file `restart`) and holds the run until the logger has delivered every step up to
    `back` (then the file `caught_up`): the held rows reached MLflow while the run went on."""

    def __init__(self, directory: str, server: int, away: int, how: str = "kill", back: int = 0) -> None:
        self.directory, self.server, self.away, self.how, self.back = Path(directory), server, away, how, back

    def on_start(self, run):  # type: ignore[no-untyped-def]
        self.state = run.run_dir / "loggers" / "mlflow.json"

    def on_step_end(self, step):  # type: ignore[no-untyped-def]
        if step.step == self.away:
            self._wait_for_delivery(self.away)
            signal_session(self.server, signal.SIGKILL if self.how == "kill" else signal.SIGSTOP)
        elif self.back and step.step == self.back:
            (self.directory / "restart").touch()
            self._wait_for_delivery(self.back)
            (self.directory / "caught_up").touch()

    def _wait_for_delivery(self, step: int) -> None:
        deadline = time.monotonic() + 300  # a restart of MLflow's server takes half a minute on a busy machine
        while time.monotonic() < deadline:
            try:
                if json.loads(self.state.read_text())["delivered"]["train"] >= step:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"the MLflow logger did not deliver step {step} in 300 s")


def mlflow_logger(url: str) -> str:
    return f"callbacks.loggers=[{{_target_: hpctrain.loggers.mlflow.MLflowLogger, tracking_uri: '{url}'}}]"


def outage(directory: Path, server: Server, **arguments: object) -> str:
    named = "".join(f", {name}: {value}" for name, value in arguments.items())
    return (f"callbacks.user=[{{_target_: tests.test_loggers.ServerOutage, directory: '{directory}', "
            f"server: {server.process.pid}{named}}}]")


def mlflow_steps(tracking_uri: str, run_dir: Path) -> dict[str, list[int]]:
    """Of the run's one MLflow run, the sorted steps of each metric key (a step twice is there twice)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert len(runs) == 1, "one MLflow run"
    run_id = runs[0].info.run_id
    assert json.loads((run_dir / "loggers" / "mlflow.json").read_text())["run_id"] == run_id
    return {key: sorted(point.step for point in client.get_metric_history(run_id, key))
            for key in runs[0].data.metrics}


def test_an_mlflow_server_killed_mid_run_and_started_again_gets_every_step_once(
        tmp_path: Path, tiny_data: Path, reference: dict[str, torch.Tensor]) -> None:
    """The server SIGKILLed at step 8 and started again (same port, same store) at step 16: training goes on as if
    nothing happened, the failure is logged once, the rows held meanwhile reach MLflow before the run ends, and at
    the end every step of every metric is in MLflow exactly once."""
    run_dir, port = tmp_path / "run", free_port()
    servers = [start_mlflow_server(tmp_path, port)]
    try:
        args = tiny_overrides(tiny_data, *RUN, mlflow_logger(servers[0].url),
                              outage(tmp_path, servers[0], away=8, back=16))
        process = zygote.start([PYTHON, "-m", "hpctrain.launch", *args, f"hydra.run.dir={run_dir}"],
                               output=tmp_path / "output.log", merge_stderr=True)
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if (tmp_path / "restart").exists() and len(servers) == 1:
                servers.append(start_mlflow_server(tmp_path, port))
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
        output = (tmp_path / "output.log").read_text()
        assert process.wait() == 0, output[-3000:]
        assert len(servers) == 2 and (tmp_path / "caught_up").exists(), output[-3000:]
        assert_equal_weights(run_dir, reference)
        assert output.count("callbacks.loggers[0] (mlflow) failed") == 1
        assert "callbacks.loggers[0] (mlflow) delivers again" in output and "not sent" not in output
        steps = mlflow_steps(servers[1].url, run_dir)
    finally:
        for server in servers:
            server.stop()
    with h5py.File(run_dir / "metrics.h5", "r") as metrics:
        assert list(metrics["train/step"][()]) == list(range(1, 25))
    assert steps["train/loss"] == list(range(1, 25)) and steps["validation/loss"] == [6, 12, 18, 24]
    assert all(steps[key] == steps[f"{key.split('/')[0]}/loss"] for key in steps), steps  # none twice
    state = json.loads((run_dir / "loggers" / "mlflow.json").read_text())
    assert state["delivered"] == {"train": 24, "validation": 24, "test": 0} and "not_sent" not in state


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_an_mlflow_server_gone_for_good_mid_run_leaves_the_run_finished_and_lists_what_was_not_sent(
        tmp_path: Path, tiny_data: Path, reference: dict[str, torch.Tensor], how: str) -> None:
    """The server SIGKILLed (refuses connections) or SIGSTOPped (hangs: a call to it never returns) at step 8 for
    good: the run finishes as if nothing happened; its end does not wait past callbacks.logger_close_timeout_s (a
    hung call is left behind); the log and loggers/mlflow.json list the steps not sent, and MLflow holds the
    others once."""
    from hpctrain.loggers import not_sent

    run_dir = tmp_path / "run"
    server = start_mlflow_server(tmp_path, free_port())
    try:
        args = tiny_overrides(tiny_data, *RUN, mlflow_logger(server.url), outage(tmp_path, server, away=8, how=how),
                              "callbacks.logger_close_timeout_s=5")
        result = launch(args, run_dir=run_dir)  # returncode 0
        output = result.stdout + result.stderr
    finally:
        server.stop(kill=True)
    assert_equal_weights(run_dir, reference)
    assert "training finished at step 24" in output
    missing = {"rows": {"train": {"first": 9, "last": 24, "rows": 16},
                        "validation": {"first": 12, "last": 24, "rows": 3}}, "run_end": True}
    state = json.loads((run_dir / "loggers" / "mlflow.json").read_text())
    assert state["delivered"] == {"train": 8, "validation": 6, "test": 0} and state["not_sent"] == missing
    assert not_sent(run_dir) == {"mlflow": missing}
    shown = zygote.run([PYTHON, "-m", "hpctrain.inspect", str(run_dir)], check=True, cwd=REPO).stdout
    assert ("logger     mlflow: not sent to its tracker: train steps 9-24 (16 rows), validation steps 12-24 (3 rows), "
            "the run's end (status, plots, best checkpoint) (in metrics.h5; the run has finished: hpctrain does not "
            "send them later)") in shown, shown
    assert output.count("callbacks.loggers[0] (mlflow): not sent to the tracker by the end of this process: train "
                        "steps 9-24 (16 rows), validation steps 12-24 (3 rows), the run's end") == 1
    assert "the run has finished: hpctrain does not send them later" in output
    # The end's one more try: refused at once, or left behind in a call that does not return (the bound)
    stuck = "(mlflow): still inside a call to its tracker after callbacks.logger_close_timeout_s=5 s"
    assert (stuck in output) == (how == "stop")
    if how == "kill":
        assert output.count("callbacks.loggers[0] (mlflow) failed") == 1
    steps = mlflow_steps(f"sqlite:///{tmp_path / 'mlflow.db'}", run_dir)  # the server's store, read directly
    assert steps["train/loss"] == list(range(1, 9)) and steps["validation/loss"] == [6]
    assert all(steps[key] == steps[f"{key.split('/')[0]}/loss"] for key in steps), steps


class Unreachable(Logger):
    """A tracker whose server is away until `back` is set (a user's own logger, as the feed sees any)."""

    name = "unreachable"

    def __init__(self) -> None:
        import threading

        self.back = threading.Event()
        self.received: list[int] = []

    def log_rows(self, rows):  # type: ignore[no-untyped-def]
        if not self.back.is_set():
            raise ConnectionRefusedError("the tracker's server is away")
        self.received += [row.step for row in rows]


def test_rows_held_for_an_away_tracker_are_bounded_and_those_past_the_bound_are_listed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With room for 10 values, rows of 2 values: steps 1-5 are held while the tracker is away, 6-8 are not (and
    nothing after them, so that what the tracker has is every step up to one); when it is back the held rows are
    delivered while the run goes on, once; the end lists 6-8, and a requeued start sends them from metrics.h5."""
    import hpctrain.loggers as loggers
    from hpctrain.callbacks import EndView, RunView
    from hpctrain.run.metrics import MetricsRow

    monkeypatch.setattr(loggers, "MAX_HELD_VALUES", 10)
    monkeypatch.setattr(loggers, "FIRST_RETRY_S", 0.01)
    monkeypatch.setattr(loggers, "MAX_RETRY_S", 0.05)
    caplog.set_level(logging.INFO, logger="hpctrain.loggers")
    logger = Unreachable()
    feed = loggers.LoggerFeed(logger, key="callbacks.loggers[0]", close_timeout_s=120)
    feed.on_start(RunView(run_dir=tmp_path, run_name="demo", config={}, start_step=0, parameter_groups=("all",)))
    for step in range(1, 9):
        feed.metrics_flushed([MetricsRow("train", step, {"loss": step / 10, "lr/all": 0.1})])
    deadline = time.monotonic() + 120
    while not any("failed" in record.getMessage() for record in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread tried, and failed
    logger.back.set()
    state_file = tmp_path / "loggers" / "unreachable.json"
    while logger.received != [1, 2, 3, 4, 5] and time.monotonic() < deadline:  # before the end: a retry
        time.sleep(0.01)
    assert logger.received == [1, 2, 3, 4, 5]
    feed.metrics_flushed([MetricsRow("train", 9, {"loss": 0.9, "lr/all": 0.1})])  # past the gap: not held
    feed.on_end(EndView(run_dir=tmp_path, step=9, finished=False, stop_reason="", best_step=9, best_loss=0.0,
                        best_checkpoint=None))
    assert logger.received == [1, 2, 3, 4, 5]
    state = json.loads(state_file.read_text())
    assert state["delivered"]["train"] == 5
    assert state["not_sent"] == {"rows": {"train": {"first": 6, "last": 9, "rows": 4}}}
    messages = [record.getMessage() for record in caplog.records]
    assert sum("(unreachable) failed" in message for message in messages) == 1
    assert sum("from train step 6 on its rows are not held" in message for message in messages) == 1
    assert any("not sent to the tracker by the end of this process: train steps 6-9 (4 rows)" in message
               and "the next start of this run sends them" in message for message in messages)


def test_a_logger_whose_package_is_missing_is_refused_with_the_pip_command(tmp_path: Path, tiny_data: Path) -> None:
    args = tiny_overrides(tiny_data, "callbacks.loggers=[{_target_: tests.test_loggers.NeedsMissingPackage}]")
    result = launch(args, run_dir=tmp_path / "run", check=False)
    assert result.returncode == 2
    assert "callbacks.loggers[0]: the missing logger needs no_such_tracker_package" in result.stderr
    assert "pip install 'hpctrain[missing]'" in result.stderr
    assert not (tmp_path / "run").exists()


class NeedsMissingPackage(Logger):
    name, packages, extra = "missing", ("no_such_tracker_package",), "missing"


@pytest.mark.parametrize("hook_raises", [False, True])
def test_callbacks_restore_random_states_and_a_raising_hook_is_called_once(hook_raises: bool) -> None:
    calls = []

    class Drawing:
        def on_step_end(self, step: StepView) -> None:
            calls.append(step.step)
            torch.rand(5)
            if hook_raises:
                raise RuntimeError("bug in a user's callback")

    callbacks = Callbacks([("callbacks.user[0]", Drawing())], is_main=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    view = StepView(step=1, epoch=0, loss=1.0, loss_components={}, learning_rates=(0.1,), grad_norm=0.0,
                    samples_per_second=1.0, nonfinite=False)
    callbacks.call("on_step_end", view)
    callbacks.call("on_step_end", view)
    assert torch.equal(torch.rand(3), expected)
    assert calls == ([1] if hook_raises else [1, 1])


def test_run_tags_name_a_sweep_point_and_a_test_phase_has_its_own_state_file(tmp_path: Path) -> None:
    from hpctrain.callbacks import RunView
    from hpctrain.config import sweep_point_dirname
    from hpctrain.loggers import run_tags, short_tags, state_path

    # Hydra's layout: multirun.yaml in the sweep directory, .hydra/hydra.yaml in each point's
    (tmp_path / "sweep" / "optim.lr=0.1" / ".hydra").mkdir(parents=True)
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "sweep" / "optim.lr=0.1" / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 3\n")
    point = RunView(run_dir=tmp_path / "sweep" / "optim.lr=0.1", run_name="lr", config={}, start_step=0,
                    parameter_groups=())
    assert run_tags(point) == {"hpctrain.run_name": "lr", "hpctrain.phase": "train",
                               "hpctrain.sweep": str(tmp_path / "sweep"), "hpctrain.sweep_point": "optim.lr=0.1",
                               "hpctrain.sweep_job_num": "3"}
    alone = RunView(run_dir=tmp_path / "run", run_name="lr", config={}, start_step=0, parameter_groups=(),
                    phase="test/best")
    assert run_tags(alone) == {"hpctrain.run_name": "lr", "hpctrain.phase": "test/best"}
    assert short_tags(run_tags(point)) == ["phase=train", "sweep=sweep", "sweep_job_num=3"]
    assert short_tags(run_tags(alone)) == ["phase=test/best"]
    # Loggers do not change what is trained: adding them to a sweep run again finds its points again.
    assert sweep_point_dirname(["optim.lr=0.1", "callbacks.loggers=[mlflow]", "callbacks.user=[]"]) == "optim.lr=0.1"
    assert state_path(tmp_path, "wandb") == tmp_path / "loggers" / "wandb.json"
    assert state_path(tmp_path, "wandb", "test/best") == tmp_path / "loggers" / "wandb.test.best.json"


def feed_process(run_dir: Path, loggers: list[Logger], start: int, stop: int, *, finished: bool) -> None:
    """One process of a run, as the trainer feeds its loggers (no training): it resumes from `start` and logs the
    training rows up to `stop` and a validation row at `stop`, then ends (finished, or stopped for a requeue)."""
    from hpctrain.callbacks import EndView, RunView
    from hpctrain.loggers import LoggerFeed
    from hpctrain.run.metrics import MetricsRow

    run = RunView(run_dir=run_dir, run_name="demo", config={"trainer": {"max_steps": 20}}, start_step=start,
                  parameter_groups=("all",))
    rows = [MetricsRow("train", step, {"loss": step / 10, "lr/all": 0.1}) for step in range(start + 1, stop + 1)]
    for logger in loggers:
        feed = LoggerFeed(logger, key=logger.name, close_timeout_s=120, stop_timeout_s=120)
        feed.on_start(run)
        feed.metrics_flushed([*rows, MetricsRow("validation", stop, {"loss": stop / 100})])
        feed.on_end(EndView(run_dir=run_dir, step=stop, finished=finished, stop_reason="", best_step=stop,
                            best_loss=0.0, best_checkpoint=None))


def wait_for_wandb_to_write(run_dir: Path, step: int, timeout: float = 60.0) -> None:
    """Until W&B's transaction log holds `step`: W&B's service (wandb-core) may still be writing it when the run's
    finish() has returned (once, on a busy machine, a read right after it lacked the process's last steps, which
    were there a moment later). A process's end waits for the service; this test process does not end."""
    from hpctrain.loggers.wandb_offline_log import read_history

    run_id = json.loads((run_dir / "loggers" / "wandb.json").read_text())["run_id"]
    deadline = time.monotonic() + timeout
    while not any(row.get("_step") == step for row in read_history(run_dir, run_id)):
        assert time.monotonic() < deadline, f"W&B's offline files lack step {step} after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory the installed W&B and Comet wrote offline: two processes that end normally (a requeue: the
    second resumes from step 5 of the first's 10 and recomputes 6..10), and between them Comet's state file says
    11 and 12 were sent (a kill lost them). Read only; a test that changes it copies it (`copy_run`)."""
    from hpctrain.loggers.comet import CometLogger
    from hpctrain.loggers.wandb import WandbLogger

    run_dir = tmp_path_factory.mktemp("offline") / "run"
    feed_process(run_dir, [WandbLogger(), CometLogger()], 0, 10, finished=False)
    wait_for_wandb_to_write(run_dir, 10)
    comet_state = run_dir / "loggers" / "comet.json"
    state = json.loads(comet_state.read_text())
    comet_state.write_text(json.dumps({**state, "delivered": {"train": 12, "validation": 10}}))  # 11, 12 lost
    feed_process(run_dir, [WandbLogger(), CometLogger()], 5, 20, finished=True)
    wait_for_wandb_to_write(run_dir, 20)
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run directory whose logger states name the copy's files (they hold absolute paths)."""
    import shutil

    shutil.copytree(source, target)
    for path in (target / "loggers").glob("*.json"):
        path.write_text(path.read_text().replace(str(source), str(target)))
    return target


def test_wandb_and_comet_offline_keep_one_run_over_processes_that_end_and_resume(offline_run: Path) -> None:
    """Two processes that end normally (a requeue: the second resumes from step 5 of the first's 10 and recomputes
    6..10): W&B's two offline directories and Comet's two archives hold each step once, under one id; rows the
    state file says were sent but the tracker does not hold (a kill lost them) are sent again."""
    from hpctrain.loggers.comet_offline_archive import archives, read_metrics
    from hpctrain.loggers.wandb_offline_log import offline_directories, read_history

    tmp_path = offline_run
    state = json.loads((tmp_path / "loggers" / "comet.json").read_text())
    run_id = json.loads((tmp_path / "loggers" / "wandb.json").read_text())["run_id"]
    assert len(offline_directories(tmp_path, run_id)) == len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    history = read_history(tmp_path, run_id)
    assert [(row["_step"], row["train/loss"]) for row in history] == [(step, step / 10) for step in range(1, 21)]
    assert [row["_step"] for row in history if "validation/loss" in row] == [10, 20]
    key = state["experiment_key"]
    assert [path.name for path in archives(tmp_path / "comet", key)][0] == f"{key}.zip"
    assert len(archives(tmp_path / "comet", key)) == len(list((tmp_path / "comet").glob("*.zip"))) == 2
    metrics = read_metrics(tmp_path / "comet", key)
    assert [(step, value) for name, step, value in metrics if name == "train/loss"] == \
        [(step, step / 10) for step in range(1, 21)]
    assert [step for name, step, _ in metrics if name == "validation/loss"] == [10, 20]


def test_comet_archives_of_processes_that_start_with_the_same_random_state_do_not_overwrite_each_other(
        tmp_path: Path) -> None:
    """Every process of a run seeds Python's `random` alike (the run's seed, or the checkpoint's state), and Comet
    names each later archive `<key>-<random suffix>.zip`, drawn from that module: two requeued processes would pick
    the same name, and the second (which writes an empty zip there at its start) would erase the first's steps."""
    import random

    from hpctrain.loggers.comet import CometLogger
    from hpctrain.loggers.comet_offline_archive import archives, read_metrics

    state = random.getstate()
    try:
        for start, stop in ((0, 10), (10, 15), (15, 20)):
            random.seed(0)  # as each process of a run starts
            feed_process(tmp_path, [CometLogger()], start, stop, finished=stop == 20)
    finally:
        random.setstate(state)
    key = json.loads((tmp_path / "loggers" / "comet.json").read_text())["experiment_key"]
    assert len(archives(tmp_path / "comet", key)) == len(list((tmp_path / "comet").glob("*.zip"))) == 3
    metrics = read_metrics(tmp_path / "comet", key)
    assert [step for name, step, _ in metrics if name == "train/loss"] == list(range(1, 21))
    assert [step for name, step, _ in metrics if name == "validation/loss"] == [10, 15, 20]


def test_the_offline_adapters_read_what_the_installed_wandb_and_comet_wrote_and_pin_its_version(
        offline_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The private-format readers against the installed versions, on files those versions wrote: the version is in
    the tested range, the extras pin that same range, and the steps come back without a warning."""
    import re
    import warnings
    from importlib.metadata import version

    from hpctrain.callbacks import RunView
    from hpctrain.loggers.comet import CometLogger
    from hpctrain.loggers.comet_offline_archive import FORMAT as COMET_FORMAT, has_archive
    from hpctrain.loggers.pinned import TrackerFormatWarning
    from hpctrain.loggers.wandb import WandbLogger
    from hpctrain.loggers.wandb_offline_log import FORMAT as WANDB_FORMAT

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    run = RunView(run_dir=offline_run, run_name="demo", config={}, start_step=20, parameter_groups=("all",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pinned, logger in ((WANDB_FORMAT, WandbLogger()), (COMET_FORMAT, CometLogger())):
            assert pinned.installed() == version(pinned.package)
            assert pinned.supported(), f"{pinned.package} {pinned.installed()} is outside {pinned.tested}: " \
                "test the adapter with it, then move the range here and in pyproject.toml"
            assert extras[pinned.extra] == [f"{pinned.package}{pinned.tested}"]
            assert re.fullmatch(r"\d+\.\d+", pinned.below)
            state = json.loads((offline_run / "loggers" / f"{logger.name}.json").read_text())
            assert logger.stored_steps(run, state) == {"train": 20, "validation": 20, "test": 0}
        key = json.loads((offline_run / "loggers" / "comet.json").read_text())["experiment_key"]
        assert has_archive(offline_run / "comet", key)
    assert not [warning for warning in caught if issubclass(warning.category, TrackerFormatWarning)]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING
                and record.name.startswith("hpctrain")]


@pytest.mark.parametrize("fault", ["untested version", "changed format"])
@pytest.mark.parametrize("tracker", ["wandb", "comet"])
def test_an_untested_version_or_a_changed_file_warns_once_and_the_run_goes_on_without_duplicates(
        offline_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tracker: str, fault: str) -> None:
    """Another version of the tracker, or its files changed: one warning (logging and warnings.warn) names the
    installed version, the tested range and the guarantee lost, and the run goes on trusting the state file. Here
    the state file says 21 and 22 were sent (a kill lost them): they stay missing, and no step is shown twice."""
    from hpctrain.loggers import pinned
    from hpctrain.loggers.comet import CometLogger
    from hpctrain.loggers.comet_offline_archive import FORMAT as COMET_FORMAT, read_metrics
    from hpctrain.loggers.wandb import WandbLogger
    from hpctrain.loggers.wandb_offline_log import FORMAT as WANDB_FORMAT, offline_directories, read_history

    run_dir = copy_run(offline_run, tmp_path / "run")
    state_file = run_dir / "loggers" / f"{tracker}.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "delivered": {"train": 22, "validation": 20}}))
    format_ = WANDB_FORMAT if tracker == "wandb" else COMET_FORMAT
    if tracker == "wandb":
        changed = offline_directories(run_dir, state["run_id"])[0] / f"run-{state['run_id']}.wandb"
    else:
        changed = run_dir / "comet" / f"{state['experiment_key']}.zip"
    original = changed.read_bytes()
    installed = "0.99.0" if tracker == "wandb" else "9.0.0"
    if fault == "untested version":
        real_version = pinned.version
        monkeypatch.setattr(pinned, "version",
                            lambda name: installed if name == format_.package else real_version(name))
    else:
        installed = format_.installed()
        change_the_format(changed)
    monkeypatch.setattr(pinned, "_warned", set())
    caplog.set_level(logging.WARNING)
    with pytest.warns(pinned.TrackerFormatWarning) as caught:
        feed_process(run_dir, [WandbLogger() if tracker == "wandb" else CometLogger()], 15, 25, finished=True)
    warned = [str(warning.message) for warning in caught if issubclass(warning.category, pinned.TrackerFormatWarning)]
    logged = [record.getMessage() for record in caplog.records if record.name == "hpctrain.loggers.pinned"]
    assert len(warned) == 1 and logged == warned, (warned, logged)
    assert f"{format_.package} {installed}" in warned[0] and f"{format_.package}{format_.tested}" in warned[0]
    assert "Guarantee lost: steps that a process killed by SIGKILL" in warned[0] and "missing" in warned[0]
    assert not [record for record in caplog.records if "failed" in record.getMessage()]  # the logger went on
    changed.write_bytes(original)  # read back everything the three processes wrote
    if tracker == "wandb":
        wait_for_wandb_to_write(run_dir, 25)
        assert len(offline_directories(run_dir, state["run_id"])) == 3
        history = read_history(run_dir, state["run_id"])
        train = [row["_step"] for row in history if "train/loss" in row]
        validation = [row["_step"] for row in history if "validation/loss" in row]
    else:
        metrics = read_metrics(run_dir / "comet", state["experiment_key"])
        assert len(list((run_dir / "comet").glob("*.zip"))) == 3
        train = [step for name, step, _ in metrics if name == "train/loss"]
        validation = [step for name, step, _ in metrics if name == "validation/loss"]
    assert train == [*range(1, 21), 23, 24, 25]  # 21, 22: the state file's word (the loss named); none twice
    assert validation == [10, 20, 25]


def change_the_format(path: Path) -> None:
    """A tracker's file as a new version might write it: W&B's transaction log with another header, Comet's archive
    with experiment.json naming the key otherwise."""
    import zipfile

    data = path.read_bytes()
    if path.suffix == ".wandb":
        path.write_bytes(b":W&X" + data[4:])
        return
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    meta = json.loads(entries["experiment.json"])
    entries["experiment.json"] = json.dumps({"id": meta.pop("offline_id"), **meta}).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_online_wandb_resumes_from_the_servers_last_step_through_the_public_api_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Online: `wandb.Api().run(path).lastHistoryStep` says where each kind resumes (a step below it W&B drops
    anyway); the private reader is not touched; without API access the state file rules."""
    import types

    import wandb

    from hpctrain.callbacks import RunView
    from hpctrain.loggers import wandb as wandb_logger

    def no_private_reading(*args: object) -> None:
        raise AssertionError("online W&B read a private format")

    monkeypatch.setattr(wandb_logger, "stored_history", no_private_reading)
    monkeypatch.setattr(wandb_logger, "FORMAT", types.SimpleNamespace(supported=no_private_reading))
    asked = []

    class Api:
        def run(self, path: str) -> object:
            asked.append(path)
            return types.SimpleNamespace(lastHistoryStep=17)

    monkeypatch.setattr(wandb, "Api", Api)
    logger = wandb_logger.WandbLogger(mode="online")
    run = RunView(run_dir=Path("/nonexistent"), run_name="demo", config={}, start_step=15, parameter_groups=())
    assert logger.stored_steps(run, {"run_id": "abc", "delivered": {"train": 20}}) is None
    logger.run = types.SimpleNamespace(path="entity/project/abc")
    assert logger.delivered_steps() == {"train": 17, "validation": 17, "test": 17} and asked == ["entity/project/abc"]

    class DownApi:
        def run(self, path: str) -> object:
            raise ConnectionError("no route to api.wandb.ai")

    monkeypatch.setattr(wandb, "Api", DownApi)
    assert logger.delivered_steps() is None
    assert wandb_logger.WandbLogger(mode="offline").delivered_steps() is None


def test_every_built_in_logger_names_an_extra_that_installs_its_packages_and_ci_installs_it() -> None:
    import re

    from hydra.utils import get_class

    from hpctrain.config import LOGGERS

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    in_test = {extra for requirement in extras["test"] for group in re.findall(r"^hpctrain\[(.*)\]$", requirement)
               for extra in group.split(",")}
    for shorthand, target in LOGGERS.items():
        logger = get_class(target)
        assert logger.name == shorthand and logger.extra in extras and logger.extra in in_test
        installed = {requirement.split(">")[0].split("=")[0].replace("-", "_") for requirement in extras[logger.extra]}
        assert set(logger.packages) <= installed, (shorthand, logger.packages, installed)
        logger().check()  # installed here, as in CI


def test_each_sweep_point_is_a_logger_run_of_its_own_tagged_with_its_sweep(tmp_path: Path, tiny_data: Path) -> None:
    """A local Hydra sweep of two points with the W&B logger (offline: the cheapest to open): one W&B run per
    point, each tagged with the sweep and Hydra's job number, and the points named without the logger."""
    from hpctrain.loggers.wandb_offline_log import read_records

    launch(["-m", "optim.lr=1e-3,2e-3", *tiny_overrides(tiny_data, "trainer.max_steps=3"), "run_name=wsweep",
            f"paths.runs_dir={tmp_path}", "callbacks.loggers=[wandb]"])
    sweep = tmp_path / "wsweep"
    points = sorted(path.parent.parent for path in sweep.glob("*/loggers/wandb.json"))
    assert [point.name.split("optim.lr=")[1].split(",")[0] for point in points] == ["0.001", "0.002"]
    assert not any("callbacks.loggers" in point.name for point in points)
    seen = {}
    for point in points:
        run_id = json.loads((point / "loggers" / "wandb.json").read_text())["run_id"]
        run = next(record.run for record in read_records(point, run_id) if record.HasField("run"))
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["hpctrain.sweep"] == str(sweep) and config["hpctrain.sweep_point"] == point.name
        assert f"sweep_job_num={config['hpctrain.sweep_job_num']}" in run.tags and "sweep=wsweep" in run.tags
        assert run.run_group == str(sweep)
        seen[config["hpctrain.sweep_job_num"]] = run_id
    assert sorted(seen) == ["0", "1"] and len(set(seen.values())) == 2  # a run of its own per point
