"""Experiment trackers (`callbacks.loggers`): TensorBoard, MLflow, W&B, Comet, or a user's own `Logger` subclass.

A logger receives what metrics.h5 receives, once it is in metrics.h5: every training step's row (loss, its
components, LR per group, gradient norm, throughput) and every evaluation's means (with the loss / baseline
ratios), the resolved config as hyperparameters at the start, and at the end the plots and the best checkpoint's
path. It runs on rank 0, in a thread of its own (`LoggerFeed`), fed by the metrics writer's flushes: a slow or
failing logger (server down, disk full) is logged once, its rows are kept and retried, and it never slows or
stops training.

Exactly once, in one run, across kills, requeues and reruns of the same command: each logger keeps its state in
the run directory (`loggers/<name>.json`: its run id and the last step it delivered of each kind). A restarted
run reopens the same logger run, sends what metrics.h5 holds past the delivered steps (rows a kill kept from
the logger), and skips live rows it already delivered: a resumed run recomputes them bit for bit, so the logger
sees each step once with the values of one uninterrupted run. A logger that can rewind (TensorBoard's
`purge_step`) is instead told to drop everything past the resend point, which also covers a kill between a
delivery and the state write. A logger that can tell what its tracker holds overrides the state file: MLflow's
store (asked in the logger's thread), or an offline tracker's files (W&B's transaction logs, Comet's archives,
read at the start), which also brings back rows a kill lost before the tracker wrote them. Each test phase
(hpctrain.test) is a logger run of its own (`log_test_phase`). docs/watching.md says per logger what a reader
sees.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Sequence

from hpctrain.callbacks import EndView, RunView
from hpctrain.config import Config, ConfigError
from hpctrain.run.metrics import MetricsRow, MetricsWriter

log = logging.getLogger(__name__)

STATE_DIRNAME = "loggers"
# The kinds of rows: training steps, evaluations, and a test phase's means (one row, at the checkpoint's step).
KINDS = ("train", "validation", "test")
# Rows a logger that keeps failing may hold before the oldest are dropped (a logger's outage, not training's).
MAX_PENDING_ROWS = 1_000_000


class Logger:
    """Base of a tracker. Its methods run in the logger's own thread, in this order: `open` once per (re)start,
    `log_rows` for each batch of rows, `finish` at the end of the run's process (also a requeued job's), then
    `close`. An exception in any of them is the logger's failure, never training's."""

    # Name of the state file and of the logger in messages; unique among a run's loggers.
    name = "logger"
    # Importable modules it needs, and the extra that installs them: pip install hpctrain[<extra>].
    packages: Sequence[str] = ()
    extra = ""
    # True if `open(..., rewind_to=N)` makes readers discard what earlier processes logged past step N.
    can_rewind = False

    def check(self) -> None:
        """Preflight: refuse a logger whose package is missing, with the pip command."""
        missing = [package for package in self.packages if importlib.util.find_spec(package) is None]
        if missing:
            raise ConfigError(f"the {self.name} logger needs {', '.join(missing)}, which is not installed in this "
                              f"environment: pip install 'hpctrain[{self.extra}]'")

    def open(self, run: RunView, state: dict[str, Any], *, rewind_to: int | None) -> dict[str, Any]:
        """Start or reopen the logger's run; `state` is what the last `open` returned (empty for a new run).
        Returns the state to keep (e.g. the run id). `rewind_to`: for a logger that can rewind, the step after
        which everything logged earlier is to be dropped."""
        return state

    def stored_steps(self, run: RunView, state: dict[str, Any]) -> dict[str, int] | None:
        """The last step of each kind the tracker's own local files hold (an offline tracker), read on the
        training loop at a (re)start, before the rows past them are taken from metrics.h5: a cheap local read,
        nothing that can hang. It is the truth, also when it holds less than the state file says (a kill lost
        what the tracker had not written yet: those rows are sent again). None: not known locally."""
        return None

    def delivered_steps(self) -> dict[str, int] | None:
        """The last step of each kind the tracker itself holds (e.g. its server), if it can tell; called in the
        logger's thread after `open`. It is the truth for the kinds it names (a kill between a delivery and the
        state write left the state file behind). None: trust the state file."""
        return None

    def log_rows(self, rows: list[MetricsRow]) -> None:
        raise NotImplementedError

    def finish(self, end: EndView) -> None:
        """The run's process ends: log the plots and the best checkpoint's path (once the run has finished)."""

    def close(self) -> None:
        pass


class LoggerFeed:
    """Runs one `Logger` off the training loop: a callback for its start and end, a metrics listener for its rows,
    and a thread that delivers them (with the state file that makes delivery exactly once)."""

    rank_zero_only = True

    def __init__(self, logger: Logger, *, key: str, close_timeout_s: float, stop_timeout_s: float = 2.0) -> None:
        self.logger, self.key = logger, key
        self.close_timeout_s, self.stop_timeout_s = close_timeout_s, stop_timeout_s
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._state_path: Path | None = None
        self._delivered = {kind: 0 for kind in KINDS}

    # -- on the training loop's side (cheap: hand over and return) --------------------------------------------
    def on_start(self, run: RunView) -> None:
        self._state_path = state_path(run.run_dir, self.logger.name, run.phase)
        state = read_state(self._state_path)
        self._delivered = {kind: min(int(state.get("delivered", {}).get(kind, 0)), run.start_step)
                           if self.logger.can_rewind else int(state.get("delivered", {}).get(kind, 0))
                           for kind in KINDS}
        if self.logger.can_rewind:  # one rewind point for every tag: resend the phase's kinds from the earliest
            phase_kinds = ("train", "validation") if run.phase == "train" else ("test",)
            low = min(self._delivered[kind] for kind in phase_kinds)
            self._delivered.update({kind: low for kind in phase_kinds})
        try:
            stored = self.logger.stored_steps(run, state)
        except Exception:  # unreadable files: trust the state file
            log.exception("%s (%s): reading what it stored failed", self.key, self.logger.name)
            stored = None
        if stored is not None:
            self._delivered.update({kind: step for kind, step in stored.items() if kind in self._delivered})
        self._queue.put(("open", None))  # at once: opening a tracker takes seconds (imports, a store, a server)
        self._thread = threading.Thread(target=self._deliver, args=(run, state), daemon=True,
                                        name=f"hpctrain-logger-{self.logger.name}")
        self._thread.start()

    def metrics_attached(self, writer: MetricsWriter) -> None:
        """The rows metrics.h5 holds past what this logger delivered (a kill cut its delivery short)."""
        backlog = writer.rows_after(train_step=self._delivered["train"],
                                    validation_step=self._delivered["validation"])
        if backlog:
            self._queue.put(("rows", backlog))

    def metrics_flushed(self, rows: list[MetricsRow]) -> None:
        self._queue.put(("rows", rows))

    def on_end(self, end: EndView) -> None:
        if self._thread is None:
            return
        self._queue.put(("end", end))
        stopped = not end.finished and not end.error  # a requeue: SLURM's KillWait runs (config.py says more)
        key, timeout = (("logger_stop_timeout_s", self.stop_timeout_s) if stopped
                        else ("logger_close_timeout_s", self.close_timeout_s))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s (%s): still busy after callbacks.%s=%g s; training ends without waiting (undelivered "
                        "rows are sent by the next start of this run)", self.key, self.logger.name, key, timeout)

    # -- in the logger's thread ------------------------------------------------------------------------------
    def _deliver(self, run: RunView, state: dict[str, Any]) -> None:
        pending: list[MetricsRow] = []
        opened = False
        failing = False
        while True:
            kind, item = self._queue.get()
            if kind == "rows":
                pending += [row for row in item if row.step > self._delivered[row.kind]]
                if len(pending) > MAX_PENDING_ROWS:
                    del pending[:len(pending) - MAX_PENDING_ROWS]
            try:
                if not opened:
                    rewind_to = self._delivered["train"] if self.logger.can_rewind else None
                    state = {**state, **self.logger.open(run, state, rewind_to=rewind_to)}
                    opened = True
                    remote = self.logger.delivered_steps()
                    if remote is not None:  # the tracker's own record beats the state file (see delivered_steps)
                        self._delivered = {kind: remote.get(kind, self._delivered[kind]) for kind in self._delivered}
                    pending = [row for row in pending if row.step > self._delivered[row.kind]]
                    self._write_state(state)
                if pending:
                    self.logger.log_rows(pending)
                    for row in pending:
                        self._delivered[row.kind] = max(self._delivered[row.kind], row.step)
                    pending = []
                    self._write_state(state)
                if failing:
                    log.info("%s (%s): delivering again", self.key, self.logger.name)
                    failing = False
                if kind == "end":
                    self.logger.finish(item)
            except Exception:  # the tracker's failure (server down, disk full): keep the rows, retry, go on
                if not failing:
                    log.exception("%s (%s) failed; training goes on, its rows are kept and retried", self.key,
                                  self.logger.name)
                failing = True
            if kind == "end":
                try:
                    if opened:
                        self.logger.close()
                except Exception:
                    log.exception("%s (%s): closing failed", self.key, self.logger.name)
                if pending:
                    log.warning("%s (%s): %d rows not delivered at the end; the next start of this run sends them",
                                self.key, self.logger.name, len(pending))
                return

    def _write_state(self, state: dict[str, Any]) -> None:
        assert self._state_path is not None
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._state_path.with_name(f".{self._state_path.name}.tmp")
        temporary.write_text(json.dumps({**state, "delivered": self._delivered}, indent=1))
        os.replace(temporary, self._state_path)


def state_path(run_dir: Path, name: str, phase: str = "train") -> Path:
    """RUN_DIR/loggers/<name>.json for training, <name>.<phase with / as .>.json for a test phase."""
    suffix = "" if phase == "train" else "." + phase.replace("/", ".")
    return Path(run_dir) / STATE_DIRNAME / f"{name}{suffix}.json"


def display_name(run: RunView, name: str | None = None) -> str:
    """A logger run's name: the run's (or the logger's `run_name`), with the phase for a test phase."""
    base = name or run.run_name
    return base if run.phase == "train" else f"{base}/{run.phase}"


def run_tags(run: RunView) -> dict[str, str]:
    """Tags of a logger run: the run's name, its phase, and for a sweep point its sweep (the directory of the
    sweep, the parent of the point's run directory), the point (its directory's name: its overrides) and Hydra's
    job number of the point."""
    tags = {"hpctrain.run_name": run.run_name, "hpctrain.phase": run.phase}
    run_dir = Path(run.run_dir)
    if (run_dir.parent / "multirun.yaml").exists():
        tags.update({"hpctrain.sweep": str(run_dir.parent), "hpctrain.sweep_point": run_dir.name})
        try:
            from omegaconf import OmegaConf

            tags["hpctrain.sweep_job_num"] = str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.num)
        except Exception:  # no Hydra record of the point (a hand-made sweep directory): the point's name says it
            pass
    return tags


def short_tags(tags: dict[str, str]) -> list[str]:
    """`run_tags` as short labels (W&B allows 64 characters): the phase, and a sweep point's sweep (its directory's
    name) and job number."""
    short = [f"phase={tags['hpctrain.phase']}"]
    if "hpctrain.sweep" in tags:
        short += [f"sweep={Path(tags['hpctrain.sweep']).name}",
                  f"sweep_job_num={tags.get('hpctrain.sweep_job_num', tags['hpctrain.sweep_point'])}"]
    return [tag[:64] for tag in short]


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("%s unreadable (%s): the logger starts a new run", path, error)
        return {}


def log_test_phase(feeds: list[Any], config: Config, run_dir: Path, test_file: Path) -> None:
    """A test phase's means (hpctrain.test's file) to each of the run's loggers, as a logger run of its own: phase
    `test/<file name>`, kept in `loggers/<name>.test.<file name>.json` (the same name again reopens that run and
    logs nothing twice). A failing logger is logged, as in training; the test's result stands."""
    import h5py

    from hpctrain.config import to_dict
    from hpctrain.run.metrics import baseline_ratios

    if not feeds:
        return
    with h5py.File(test_file, "r") as file:
        means = {name: float(file[f"test/{name}"][()]) for name in file["test/per_sample"]}
        step, checkpoint = int(file.attrs["checkpoint_step"]), Path(str(file.attrs["checkpoint"]))
    values = {**means, **{f"loss/{name}": ratio for name, ratio in baseline_ratios(means["loss"], means).items()}}
    run = RunView(run_dir=Path(run_dir), run_name=config.run_name, config=to_dict(config), start_step=0,
                  parameter_groups=(), phase=f"test/{Path(test_file).stem}")
    for feed in feeds:  # in parallel, each in its thread
        feed.on_start(run)
        feed.metrics_flushed([MetricsRow("test", step, values)])
    end = EndView(run_dir=Path(run_dir), step=step, finished=True, stop_reason="test phase", best_step=step,
                  best_loss=means["loss"], best_checkpoint=checkpoint)
    for feed in feeds:
        feed.on_end(end)


def flat_config(config: Any, prefix: str = "") -> dict[str, str]:
    """The resolved config as flat `a.b.c -> value` strings: trackers' hyperparameters."""
    if isinstance(config, dict):
        flat: dict[str, str] = {}
        for key, value in config.items():
            flat.update(flat_config(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(config) if isinstance(config, (list, tuple)) else str(config)}

