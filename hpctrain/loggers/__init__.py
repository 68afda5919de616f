"""Experiment trackers (`callbacks.loggers`): TensorBoard, MLflow, W&B, Comet, or a user's own `Logger` subclass.

A logger receives what metrics.h5 receives, once it is in metrics.h5: every training step's row (loss, its
components, LR per group, gradient norm, throughput) and every evaluation's means (with the loss / baseline
ratios), the resolved config as hyperparameters at the start, and at the end the plots and the best checkpoint's
path. It runs on rank 0, in a thread of its own (`LoggerFeed`), fed by the metrics writer's flushes: a slow or
failing logger (server down or hung, disk full) is logged once, its rows are held (at most MAX_HELD_VALUES) and
retried with backoff, what it could not send by the end of the process is logged and kept in its state file
(`not_sent`), and it never slows or stops training.

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
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from hpctrain.callbacks import EndView, RunView
from hpctrain.config import Config, ConfigError
from hpctrain.run.metrics import MetricsRow, MetricsWriter

log = logging.getLogger(__name__)

STATE_DIRNAME = "loggers"
# The kinds of rows: training steps, evaluations, and a test phase's means (one row, at the checkpoint's step).
KINDS = ("train", "validation", "test")
# What a logger whose tracker does not take its rows (a server down) holds in memory, in metric values (memory
# grows with them: a training row of the demo holds 12, ~0.9 KB in Python), so ~150 MB, some 166,000 of the demo's
# steps. Rows past it are not held: they are in metrics.h5, and the next start of the run sends them
# (LoggerFeed._hand_over).
MAX_HELD_VALUES = 2_000_000
# After a failure the logger's thread tries again after 1 s, then 2, 4, ... up to once a minute: a server that
# comes back gets the held rows within a minute, and one that does not costs a connection attempt a minute.
FIRST_RETRY_S, MAX_RETRY_S = 1.0, 60.0


class Logger:
    """Base of a tracker. Its methods run in the logger's own thread, in this order: `open` once per (re)start,
    `log_rows` for each batch of rows, `finish` at the end of the run's process (also a requeued job's), then
    `close`. An exception in any of them is the logger's failure, never training's: the feed keeps the rows and
    calls again later (`open` until it succeeds, `log_rows` with the same rows)."""

    # Name of the state file and of the logger in messages; unique among a run's loggers.
    name = "logger"
    # Importable modules it needs, and the extra that installs them: pip install hpctrain[<extra>].
    packages: Sequence[str] = ()
    extra = ""
    # True if `open(..., rewind_to=N)` makes readers discard what earlier processes logged past step N.
    can_rewind = False
    # At most this many metric values per `log_rows` call (None: any number). The feed counts a call as all
    # delivered or none: a tracker that keeps duplicates (MLflow) takes no more per call than one request holds.
    max_values_per_call: int | None = None

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
        logger's thread after `open`, and after a failed `log_rows` before its rows are sent again (the tracker
        may have stored them and lost the answer). It is the truth for the kinds it names (a kill between a
        delivery and the state write left the state file behind). None: trust the state file."""
        return None

    def log_rows(self, rows: list[MetricsRow]) -> None:
        raise NotImplementedError

    def finish(self, end: EndView) -> None:
        """The run's process ends: log the plots and the best checkpoint's path (once the run has finished)."""

    def close(self) -> None:
        pass


class LoggerFeed:
    """Runs one `Logger` off the training loop: a callback for its start and end, a metrics listener for its rows,
    and a thread that delivers them (with the state file that makes delivery exactly once).

    The loop only hands rows over (under a lock the thread never holds while it calls the tracker). The thread
    delivers them in order, so what a logger delivered of a kind is always every step up to `delivered[kind]`:
    a failed call keeps its rows held, and the thread retries with backoff (FIRST_RETRY_S .. MAX_RETRY_S) while
    training goes on; held rows are bounded by MAX_HELD_VALUES. At the end of the process, what it could not
    send is logged and kept in the state file (`not_sent`, see `not_sent`)."""

    rank_zero_only = True

    def __init__(self, logger: Logger, *, key: str, close_timeout_s: float, stop_timeout_s: float = 2.0) -> None:
        self.logger, self.key = logger, key
        self.close_timeout_s, self.stop_timeout_s = close_timeout_s, stop_timeout_s
        self._thread: threading.Thread | None = None
        self._state_path: Path | None = None
        self._phase = "train"
        self._reset({}, {kind: 0 for kind in KINDS})

    def _reset(self, state: dict[str, Any], delivered: dict[str, int]) -> None:
        # Shared by the loop and the logger's thread, under _lock:
        self._lock = threading.Condition()
        self._delivered = delivered
        self._held: list[MetricsRow] = []  # handed over and not delivered yet, in order
        self._held_values = 0
        self._refused: dict[str, list[int]] = {}  # kind -> [first, last, count] of rows not held (the bound)
        self._end: EndView | None = None
        self._reported = False  # the end's report is made (then every state write says what is not sent)
        # The logger's thread's own (read by the report, which only needs a glimpse):
        self._state = {key: value for key, value in state.items() if key not in ("delivered", "not_sent")}
        self._state_lock = threading.Lock()  # one state write at a time, each from a snapshot taken in it
        self._opened = self._finished = False
        # What the tracker holds is to be asked before more is sent: "opened" (its word replaces the state
        # file's), "sent" (a call failed: it may have stored part of what it got); "" when known.
        self._check = ""
        self._failing = 0  # failed tries in a row (0: delivering)

    # -- on the training loop's side (cheap: hand over and return) --------------------------------------------
    def on_start(self, run: RunView) -> None:
        self._state_path, self._phase = state_path(run.run_dir, self.logger.name, run.phase), run.phase
        state = read_state(self._state_path)
        delivered = {kind: min(int(state.get("delivered", {}).get(kind, 0)), run.start_step)
                     if self.logger.can_rewind else int(state.get("delivered", {}).get(kind, 0)) for kind in KINDS}
        if self.logger.can_rewind:  # one rewind point for every tag: resend the phase's kinds from the earliest
            phase_kinds = ("train", "validation") if run.phase == "train" else ("test",)
            low = min(delivered[kind] for kind in phase_kinds)
            delivered.update({kind: low for kind in phase_kinds})
        try:
            stored = self.logger.stored_steps(run, state)
        except Exception:  # unreadable files: trust the state file
            log.exception("%s (%s): reading what it stored failed", self.key, self.logger.name)
            stored = None
        if stored is not None:
            delivered.update({kind: step for kind, step in stored.items() if kind in delivered})
        self._reset(state, delivered)
        # At once (opening a tracker takes seconds: imports, a store, a server), in a thread that outlives
        # nothing: the process's exit ends it wherever it is.
        self._thread = threading.Thread(target=self._deliver, args=(run,), daemon=True,
                                        name=f"hpctrain-logger-{self.logger.name}")
        self._thread.start()

    def metrics_attached(self, writer: MetricsWriter) -> None:
        """The rows metrics.h5 holds past what this logger delivered (a kill cut its delivery short)."""
        with self._lock:
            train, validation = self._delivered["train"], self._delivered["validation"]
        self._hand_over(writer.rows_after(train_step=train, validation_step=validation))

    def metrics_flushed(self, rows: list[MetricsRow]) -> None:
        self._hand_over(rows)

    def _hand_over(self, rows: list[MetricsRow]) -> None:
        """Hold the rows for the thread, up to MAX_HELD_VALUES. Past it every later row is refused, not only those
        that do not fit: the logger then has each kind up to a step, and metrics.h5 the rest, which the next start
        of this run sends (metrics_attached); delivering later rows would leave a gap that nothing fills."""
        with self._lock:
            for row in rows:
                if row.step <= self._delivered[row.kind]:
                    continue  # a resumed run recomputes rows the logger already has
                if self._refused or self._held_values + len(row.values) > MAX_HELD_VALUES:
                    self._refuse(row)
                    continue
                self._held.append(row)
                self._held_values += len(row.values)
            self._lock.notify()

    def _refuse(self, row: MetricsRow) -> None:
        if not self._refused:
            log.warning("%s (%s): %s metric values are held for it (hpctrain.loggers.MAX_HELD_VALUES), the most "
                        "it holds; from %s step %d on its rows are not held: they are in metrics.h5, and the next "
                        "start of this run sends them", self.key, self.logger.name, f"{self._held_values:,}",
                        row.kind, row.step)
        first, _, count = self._refused.get(row.kind, (row.step, row.step, 0))
        self._refused[row.kind] = [first, row.step, count + 1]

    def on_end(self, end: EndView) -> None:
        """Hand the end over and wait at most the configured time: the thread tries once more to send what it
        holds (also while it was backing off), ends the logger's run and reports what is not sent; a thread still
        inside a call to the tracker is left behind (a daemon), and the report is made here."""
        if self._thread is None:
            return
        with self._lock:
            self._end = end
            self._lock.notify()
        stopped = not end.finished and not end.error  # a requeue: SLURM's KillWait runs (config.py says more)
        key, timeout = (("logger_stop_timeout_s", self.stop_timeout_s) if stopped
                        else ("logger_close_timeout_s", self.close_timeout_s))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s (%s): still inside a call to its tracker after callbacks.%s=%g s; training ends "
                        "without waiting", self.key, self.logger.name, key, timeout)
        self._report_end(end)  # made by the thread already, unless it is stuck (or died)

    # -- in the logger's thread ------------------------------------------------------------------------------
    def _deliver(self, run: RunView) -> None:
        """Open the logger, deliver the held rows as they come; after a failure, retry with backoff (rows handed
        over meanwhile are held); at the end one more try, without waiting for the backoff, then the end."""
        backoff, retry_at = 0.0, 0.0
        while True:
            end = self._wait(retry_at)
            try:
                self._attempt(run, end)
            except Exception:  # the tracker's failure (server down, disk full): keep the rows, retry, go on
                self._failed()
                backoff = min(max(2 * backoff, FIRST_RETRY_S), MAX_RETRY_S)
                retry_at = time.monotonic() + backoff
            else:
                if self._failing:
                    with self._lock:
                        sent = describe_steps(self._delivered)
                    log.info("%s (%s) delivers again, after %d failed tries; delivered now: %s", self.key,
                             self.logger.name, self._failing, sent)
                self._failing, backoff, retry_at = 0, 0.0, 0.0
            if end is not None:  # one try at the end: a tracker still away is not waited for
                break
        try:
            if self._opened:
                self.logger.close()
        except Exception:
            log.exception("%s (%s): closing failed", self.key, self.logger.name)
        self._report_end(end)

    def _wait(self, retry_at: float) -> EndView | None:
        """Until there is something to do (rows held or the logger to open) and the backoff has passed, or the
        end has come (which does not wait for the backoff). Returns the end, if it came."""
        with self._lock:
            while self._end is None:
                wait_s = retry_at - time.monotonic()
                if wait_s <= 0 and (self._held or not self._opened):
                    break
                self._lock.wait(wait_s if wait_s > 0 else None)
            return self._end

    def _attempt(self, run: RunView, end: EndView | None) -> None:
        if not self._opened:
            rewind_to = self._delivered["train"] if self.logger.can_rewind else None
            self._state = {**self._state, **self.logger.open(run, self._state, rewind_to=rewind_to)}
            self._opened, self._check = True, "opened"
            self._write_state()  # the run id, at once: a kill from now on reopens this run
        if self._check:  # also after a try of it failed: until it is asked, the tracker may hold held rows
            self._trust_tracker(opening=self._check == "opened")
            self._check = ""
            self._write_state()
        while batch := self._next_batch():
            self._check = "sent"  # until the call returns: it may store the rows and fail (the answer lost)
            self.logger.log_rows(batch)
            self._check = ""
            with self._lock:
                del self._held[:len(batch)]  # the loop only appends: the batch is still the front
                self._held_values -= sum(len(row.values) for row in batch)
                for row in batch:
                    self._delivered[row.kind] = max(self._delivered[row.kind], row.step)
            self._write_state()
        if end is not None and not self._finished:
            self.logger.finish(end)
            self._finished = True

    def _trust_tracker(self, *, opening: bool) -> None:
        """What the tracker says it holds, if it can tell. Opening, it replaces the state file's word (see
        delivered_steps); after a failed call it can only add to what is known delivered (the rows of the
        failed call it stored); the held rows it holds are dropped, never sent twice."""
        remote = self.logger.delivered_steps()
        if remote is None:
            return
        with self._lock:
            for kind, step in remote.items():
                if kind in self._delivered:
                    self._delivered[kind] = step if opening else max(step, self._delivered[kind])
            kept = [row for row in self._held if row.step > self._delivered[row.kind]]
            self._held_values -= sum(len(row.values) for row in self._held) - sum(len(row.values) for row in kept)
            self._held[:] = kept

    def _next_batch(self) -> list[MetricsRow]:
        """The front of the held rows, at most max_values_per_call values (one row at least)."""
        limit = self.logger.max_values_per_call
        with self._lock:
            if limit is None:
                return list(self._held)
            count = values = 0
            for row in self._held:
                if count and values + len(row.values) > limit:
                    break
                count, values = count + 1, values + len(row.values)
            return self._held[:count]

    def _failed(self) -> None:
        """Logged once per outage, with what is not sent yet; later tries fail quietly until one succeeds."""
        self._failing += 1
        if self._failing > 1:
            return
        with self._lock:
            waiting = describe_not_sent(self._not_sent())
        log.warning("%s (%s) failed; training goes on. Not sent yet: %s. Held (up to %s metric values) and "
                    "tried again after %g s, then less and less often, down to once every %g s", self.key,
                    self.logger.name, waiting or "nothing", f"{MAX_HELD_VALUES:,}", FIRST_RETRY_S, MAX_RETRY_S,
                    exc_info=True)

    # -- the end's report and the state file (either thread) -------------------------------------------------
    def _not_sent(self) -> dict[str, Any]:
        """Under the lock: per kind, the first and last step of the rows this process had and did not deliver
        (held or refused) and their count; whether the logger's end of the run (status, plots) was not sent."""
        rows: dict[str, dict[str, int]] = {}
        for kind in KINDS:
            steps = [row.step for row in self._held if row.kind == kind]
            first, last, count = self._refused.get(kind, (0, 0, 0))
            if steps or count:
                rows[kind] = {"first": steps[0] if steps else first, "last": last or steps[-1],
                              "rows": len(steps) + count}
        not_sent: dict[str, Any] = {"rows": rows} if rows else {}
        if self._end is not None and not self._finished:
            not_sent["run_end"] = True
        return not_sent

    def _report_end(self, end: EndView | None) -> None:
        """Once, from the thread at its end or from on_end if the thread is stuck: log what is not sent and keep
        it in the state file (read by `not_sent`)."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
            not_sent = self._not_sent()
        if not not_sent:
            return
        self._write_state()
        later = ("the same hpctrain.test command (the same --name) sends them" if self._phase != "train" else
                 "the run has finished: hpctrain does not send them later" if end is not None and end.finished else
                 "the next start of this run sends them")
        log.warning("%s (%s): not sent to the tracker by the end of this process: %s. The rows are in metrics.h5 "
                    "and listed in %s (not_sent); %s", self.key, self.logger.name, describe_not_sent(not_sent),
                    self._state_path, later)

    def _write_state(self) -> None:
        assert self._state_path is not None
        with self._state_lock:
            with self._lock:
                content = {**self._state, "delivered": dict(self._delivered)}
                if self._reported:
                    content["not_sent"] = self._not_sent()
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._state_path.with_name(f".{self._state_path.name}.tmp")
            temporary.write_text(json.dumps(content, indent=1))
            os.replace(temporary, self._state_path)


def describe_steps(delivered: dict[str, int]) -> str:
    """`delivered` in words: "train up to step 24, validation up to step 24"."""
    return ", ".join(f"{kind} up to step {step}" for kind, step in delivered.items() if step) or "nothing"


def describe_not_sent(not_sent: dict[str, Any]) -> str:
    """A state file's `not_sent` in words: "train steps 9-24 (16 rows), validation steps 12-24 (3 rows), the
    run's end (status, plots, best checkpoint)"."""
    parts = [f"{kind} steps {rows['first']}-{rows['last']} ({rows['rows']} rows)" if rows["rows"] > 1 else
             f"{kind} step {rows['first']}" for kind, rows in not_sent.get("rows", {}).items()]
    if not_sent.get("run_end"):
        parts.append("the run's end (status, plots, best checkpoint)")
    return ", ".join(parts)


def not_sent(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What each logger of a run could not send by the end of its last process (its server away), by logger state
    file name (`mlflow`, `mlflow.test.best`, ...): the `not_sent` of loggers/<name>.json, as `describe_not_sent`
    reads it. Empty: everything was sent (or the run had no logger)."""
    found = {}
    for path in sorted((Path(run_dir) / STATE_DIRNAME).glob("*.json")):
        missing = read_state(path).get("not_sent")
        if missing:
            found[path.stem] = missing
    return found


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

