"""One training job: run one rank of it (`run_rank`), or start all its ranks on this machine (`run_local`). The same
`run_rank` runs under SLURM, where each task is one rank. Its inputs are checked before by the launcher
(hpctrain.components.check_run_inputs); those of a run on local ranks in a process forked like them
(`check_in_rank_process`)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import logging.handlers
import math
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from multiprocessing.connection import wait
from multiprocessing.context import BaseContext

from hpctrain.components import check_run_inputs
from hpctrain.config import Config, ConfigError
from hpctrain.instantiate import first_line
from hpctrain.launching import early
from hpctrain.process.distributed import (DistributedContext, init_distributed,
                                  run_lock, shutdown_distributed)
from hpctrain.process.exit import skip_final_collection
from hpctrain.process.forkserver import end_with_starter, preloaded_forkserver
from hpctrain.process.seeding import configure_determinism
from hpctrain.process.watchdog import watching
from hpctrain.run.resume_check import check_run_dir_continues
from hpctrain.run.state import TrainState

log = logging.getLogger(__name__)

RESULT_FILENAME = "result.json"
# The run's log: Hydra's job log (hydra.job.name is hpctrain), appended to by rank 0 of every attempt.
LOG_FILENAME = "hpctrain.log"
# How long local ranks get to end after SIGTERM, once one of them has failed, before SIGKILL.
TERMINATE_GRACE_S = 10.0
# What the launcher (Hydra, the run lock) creates in a run directory before training; removed on refusal.
_LAUNCHER_LEFTOVERS = (".hydra", "hpctrain.log", ".lock")


def check_run_dir_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"hydra.run.dir={run_dir}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"hydra.run.dir={run_dir}: cannot write in {existing} ({error.strerror})") from None


def run_rank(config: Config, run_dir: Path, *, stop_requested: Callable[[], bool] = lambda: False,
             evaluation_stop: Callable[[int, float], str] | None = None, store: Any = None) -> dict[str, Any]:
    """Train as one rank of the process group the environment describes; returns the run's summary
    (`evaluation_stop`: see hpctrain.run.trainer.Trainer; `store`: see init_distributed)."""
    configure_determinism(config.trainer.deterministic)  # before init_distributed starts CUDA
    dist = init_distributed(device_preference=config.trainer.device, timeout_s=config.trainer.distributed_timeout_s,
                            rendezvous_timeout_s=config.trainer.rendezvous_timeout_s, store=store)
    clean = False
    try:
        with run_lock(run_dir) if dist.is_main else nullcontext(), watching(config, dist.rank):
            summary = _train(config, run_dir, dist, stop_requested, evaluation_stop)
        clean = True
        return summary
    finally:
        # _train has returned, so the DDP reducer that used the process group is gone before the group is.
        gc.collect()
        shutdown_distributed(clean=clean)


def _train(config: Config, run_dir: Path, dist: DistributedContext, stop_requested: Callable[[], bool],
           evaluation_stop: Callable[[int, float], str] | None = None) -> dict[str, Any]:
    from hpctrain.components import build_trainer

    if config.trainer.precision == "fp16" and dist.device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    trainer = build_trainer(config, run_dir, dist, stop_requested=stop_requested, evaluation_stop=evaluation_stop)
    state = trainer.fit()
    summary = summarize(state, run_dir, monitor=config.callbacks.monitor.metric)
    if dist.is_main and state.finished:
        write_result(run_dir, summary)
    return summary


def summarize(state: TrainState, run_dir: Path, *, monitor: str) -> dict[str, Any]:
    """What a rank returns and result.json holds: strict JSON (a value that is not finite, such as the best loss
    of a run whose evaluations were all NaN, is null), `best_step` null when no evaluation was ever the best (so
    no command looks for its checkpoint), `failed` true for a run stopped by a non-finite loss or unreadable data."""
    def number(value: float) -> float | None:
        return value if math.isfinite(value) else None

    has_best = math.isfinite(state.best_value)
    return {"run_dir": str(run_dir), "step": state.step, "epoch": state.epoch, "finished": state.finished,
            "stop_reason": state.stop_reason, "failed": state.failed,
            "best_validation_loss": number(state.best_loss) if has_best else None,
            "best_step": state.best_step if has_best else None, "best_metric": monitor,
            "best_value": number(state.best_value), "nonfinite_steps": state.nonfinite_steps}


def write_result(run_dir: Path, summary: dict[str, Any]) -> None:
    """result.json, written whole or not at all (a temporary file renamed over it)."""
    temporary = run_dir / f".{RESULT_FILENAME}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(summary, indent=1, allow_nan=False))
    os.replace(temporary, run_dir / RESULT_FILENAME)


def configure_rank_logging(rank: int, run_dir: Path | None = None) -> None:
    """Log lines tagged with the rank; only rank 0 reports progress (INFO), the others warnings and errors. Rank 0
    of a training run also appends them to the run directory's hpctrain.log, so that every kind of run (local ranks,
    each attempt of a SLURM job) leaves its log where a one-rank local run does."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0 and run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / LOG_FILENAME, mode="a"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True, handlers=handlers,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _local_rank_main(work: Callable[..., Any], config: Config, run_dir: Path, rank: int, world_size: int, port: int,
                     environment: dict[str, str], args: tuple) -> None:
    _start_as_the_launchers(environment)  # hydra.job.env_set included: the ranks start inside the task function
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    configure_rank_logging(rank, run_dir if work is run_rank else None)
    work(config, run_dir, *args)


def _start_as_the_launchers(environment: dict[str, str]) -> None:
    """What a process forked for the launcher does first: end when the launcher ends, skip the final garbage
    collections, and take the launcher's environment as it was when it started the process, not the one the
    forkserver was started with, which may be earlier (hpctrain.launching.early)."""
    end_with_starter()
    skip_final_collection()
    os.environ.clear()
    os.environ.update(environment)


def _rank_context(work: Callable[..., Any]) -> BaseContext:
    """Local ranks fork from a forkserver that has imported hpctrain's training modules (and `work`'s, unless it is
    __main__) once: hpctrain.process.forkserver."""
    own = () if work.__module__ == "__main__" else (work.__module__,)
    return preloaded_forkserver(*early.RANK_MODULES, *own)


def run_local(config: Config, run_dir: Path, *, work: Callable[..., Any] | None = None,
              args: tuple = ()) -> dict[str, Any]:
    """Debug mode (one process, in this one) or `launcher.num_processes` ranks on this machine, each running
    `work(config, run_dir, *args)` (by default: train, `run_rank`)."""
    work = work or run_rank
    world_size = config.launcher.num_processes
    if world_size == 1:
        return work(config, run_dir, *args)
    port = _free_port()
    context = _rank_context(work)
    environment = dict(os.environ)
    processes = [context.Process(target=_local_rank_main,
                                 args=(work, config, run_dir, rank, world_size, port, environment, args),
                                 name=f"hpctrain-rank-{rank}") for rank in range(world_size)]
    for process in processes:
        process.start()
    failed = []
    running = {process.sentinel: (rank, process) for rank, process in enumerate(processes)}
    kill_at: float | None = None  # once a rank has failed: when to SIGKILL those still running
    killed = False
    while running:
        timeout = None if kill_at is None or killed else max(0.0, kill_at - time.monotonic())
        ready = wait(list(running), timeout)
        if not ready:
            # Still there after SIGTERM: a stopped (SIGSTOP) rank keeps SIGTERM pending until it is continued, and
            # a rank that takes SIGTERM for a stop request waits in a collective for the dead one.
            for _, other in running.values():
                other.kill()
            killed = True  # now wait for them without a timeout
        for sentinel in ready:
            rank, process = running.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                failed.append((rank, process.exitcode))
                if kill_at is None:  # the others would block in a collective until its timeout
                    for _, other in running.values():
                        other.terminate()
                    kill_at = time.monotonic() + TERMINATE_GRACE_S
    if failed:
        raise RuntimeError(f"local ranks failed (rank, exit code): {failed}")
    result_path = run_dir / RESULT_FILENAME
    return json.loads(result_path.read_text()) if result_path.exists() else {"run_dir": str(run_dir)}


def check_run(config: Config, run_dir: Path) -> None:
    """What the launcher checks of a run before anything of it is written or queued: its inputs (every component
    built, the data prepared and opened, one dry step) and that the run directory holds this run."""
    check_run_dir_continues(config, check_run_inputs(config, prepare=True), run_dir)


class CheckProcessFailed(RuntimeError):
    """The preflight's check process failed other than by a refusal; the message's first line says why, the rest
    is its traceback."""


def check_in_rank_process(config: Config, run_dir: Path) -> None:
    """`check_run` in a process forked from the local ranks' forkserver, which imported torch and the training
    modules (torch._dynamo included, seconds) on another core while this launcher composed the run: the launcher
    never imports them itself, and the checks start as soon as the forkserver is ready. Its refusal is raised
    here as the same ConfigError, its log records are handled by this process's logging, and any other failure is
    raised here as CheckProcessFailed with the check process's traceback."""
    context = _rank_context(run_rank)
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_check_main, name="hpctrain-preflight",
                              args=(sender, dict(os.environ), _lowest_log_level(), config, run_dir))
    process.start()
    sender.close()
    try:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                process.join()
                raise CheckProcessFailed(f"the preflight's check process ended (exit code {process.exitcode}) "
                                         "before it finished") from None
            if kind == "log":
                target = logging.getLogger(payload.name)
                if target.isEnabledFor(payload.levelno):  # the level this process's logging gives that logger
                    target.handle(payload)
            elif kind == "refused":
                raise ConfigError(payload)
            elif kind == "failed":  # the cause first: the launcher's one-line error quotes the first line
                cause, text = payload
                raise CheckProcessFailed(f"{cause} (in the preflight's check process)\n{text}")
            else:
                return
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached the check process too. An interrupt of the launcher alone is passed on, so
        # that the checks end through KeyboardInterrupt as they would in this process (cleaning up a data file
        # being made).
        process.join(timeout=1.0)
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
        raise
    finally:
        receiver.close()  # what the check process still sends is dropped (_SendRecords, _check_main)
        process.join()


def _lowest_log_level() -> int:
    """The lowest level any of this process's loggers logs at (`hydra.verbose` may lower one of them): what the
    check process sends; this process's loggers then decide what they log."""
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    return min(logger.getEffectiveLevel() for logger in loggers)


class _SendRecords:
    """The queue of a QueueHandler (which makes each record picklable): the pipe to the launcher."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def put_nowait(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):  # the launcher no longer listens (it was interrupted)
            self.connection.send(("log", record))


def _check_main(connection: Any, environment: dict[str, str], log_level: int, config: Config,
                run_dir: Path) -> None:
    _start_as_the_launchers(environment)  # as the checks in its own process see it (before hydra.job.env_set)
    sender = logging.handlers.QueueHandler(_SendRecords(connection))
    sender.setFormatter(logging.Formatter("%(message)s"))  # the launcher's handlers format the record
    logging.basicConfig(level=log_level, force=True, handlers=[sender])
    try:
        try:
            check_run(config, run_dir)
            connection.send(("passed", None))
        except ConfigError as error:
            connection.send(("refused", str(error)))
        except BaseException as error:  # noqa: BLE001 - reported to the launcher, which raises it
            connection.send(("failed", (f"{type(error).__name__}: {first_line(error)}", traceback.format_exc())))
    except OSError:  # the launcher no longer listens (it was interrupted)
        pass
    finally:
        connection.close()


def remove_launcher_leftovers(run_dir: Path) -> None:
    """After a refused start, undo what the launcher created in a run directory that holds nothing else."""
    if not run_dir.is_dir() or any(entry.name not in _LAUNCHER_LEFTOVERS for entry in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir)
