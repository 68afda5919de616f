"""A study on shared storage: what the tune command, its workers and `inspect` share.

`StudySpec` (written to TUNE_DIR/tune.json by the tune command, pickled into each worker) names the storage, the
study, the config (overrides and --config-dir) and the search space; `open_study` opens it with the config's
sampler and pruner (neither is stored by Optuna: every process makes its own). `summarize_study` and `plot_study`
are what `python -m hpctrain.inspect TUNE_DIR` shows.

With an RDB storage (a database URL) the study's trials have Optuna's heartbeats: a worker records its trial's
heartbeat every `heartbeat_s` (`Heartbeat`), and a RUNNING trial whose heartbeat is older than `grace_s` is failed
and retried (enqueued again with its parameters) by Optuna's `fail_stale_trials` and retry callback, which the
workers and the tune command call before they count and ask (`fail_stale`). Everything that touches Optuna's
heartbeat API, experimental since Optuna 2.x, is in this module's section "Optuna's heartbeats".
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shlex
import socket
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from hpctrain.config import ConfigError, TuneConfig

log = logging.getLogger(__name__)

SPEC_FILENAME = "tune.json"
JOURNAL_FILENAME = "study.journal"
PLOTS_DIRNAME = "plots"
OPTUNA_MISSING = "tune: needs optuna, which is not installed: pip install 'hpctrain[optuna]'"
# The heartbeat interval and grace period of an RDB storage's trials (seconds): HPCTRAIN_TUNE_HEARTBEAT_S=60,600.
# The grace is long because a live trial taken for dead is retried in the same run directory, where the retry
# finds the run lock held and fails: it must outlast any pause of the heartbeat thread (a database outage, a
# C call that holds the GIL for minutes). A dead worker's trial waits that long before another worker retries it.
HEARTBEAT_ENV = "HPCTRAIN_TUNE_HEARTBEAT_S"
HEARTBEAT_S, GRACE_S = 60, 600
MAX_RETRY = 3  # retries of one trial whose worker keeps dying (killed for memory at the same step, say)
# The versions whose heartbeat API hpctrain uses as written here (pyproject.toml's optuna extra pins the same).
OPTUNA_VERSIONS = ">=4.0,<6"


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(OPTUNA_MISSING) from None


@dataclass(frozen=True)
class StudySpec:
    tune_dir: str
    storage: str  # an RDB URL, or the path of the journal file
    study_name: str
    overrides: list[str]  # the plain overrides every trial starts from
    config_dir: str | None
    search_space: dict[str, str]  # flat key -> expression
    n_trials: int
    direction: str  # minimize, maximize
    metric: str  # callbacks.monitor.metric, the objective
    heartbeat_s: int = HEARTBEAT_S  # an RDB storage's heartbeat interval and grace period (a tune.json written
    grace_s: int = GRACE_S  # before they existed reads as the defaults)

    @property
    def path(self) -> Path:
        return Path(self.tune_dir)

    @property
    def heartbeats(self) -> bool:
        """Whether the storage has Optuna's trial heartbeats: only RDBStorage implements them, the journal file
        has none (Optuna's JournalStorage; issue optuna#6615)."""
        return is_rdb_url(self.storage)

    def write(self) -> None:
        (self.path / SPEC_FILENAME).write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def read(tune_dir: Path) -> "StudySpec":
        return StudySpec(**json.loads((tune_dir / SPEC_FILENAME).read_text()))


def is_tune_dir(directory: Path) -> bool:
    return (directory / SPEC_FILENAME).is_file()


def storage_location(tune: TuneConfig, tune_dir: Path) -> str:
    return tune.storage or str(tune_dir / JOURNAL_FILENAME)


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def check_storage(storage: str) -> None:
    """Refuse a storage URL that cannot work (malformed, no driver, server unreachable) without writing to it."""
    if not is_rdb_url(storage):
        return
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    where = f"tune.storage={_without_password(storage)}"
    try:
        url = sqlalchemy.engine.make_url(storage)
        url.get_dialect()
    except NoSuchModuleError:  # before ArgumentError, its base class
        raise ConfigError(f"{where}: SQLAlchemy knows no database {url.drivername!r}") from None
    except (ArgumentError, ValueError) as error:
        raise ConfigError(f"{where}: not a database URL ({error}); e.g. mysql+pymysql://user:password@host/db") \
            from None
    except ImportError as error:
        raise ConfigError(f"{where}: its driver is not installed ({error}); for MySQL/MariaDB: "
                          f"pip install 'hpctrain[optuna]' (pymysql)") from None
    if url.get_backend_name() == "sqlite":
        database = Path(url.database or "")
        if not url.database or not database.absolute().parent.is_dir():
            raise ConfigError(f"{where}: the directory of the SQLite file {url.database!r} does not exist")
        return
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except SQLAlchemyError as error:
        raise ConfigError(f"{where}: cannot connect ({str(error.orig or error).splitlines()[0]})") from None


def _without_password(storage: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except Exception:  # a malformed URL: shown as given (it holds no usable password)
        return storage


@functools.lru_cache(maxsize=None)
def make_storage(storage: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Any:
    """One storage object per process (an RDB storage's set-up checks the schema: a second or so each time). The
    journal file uses Optuna's default lock, JournalFileSymlinkLock (docs/tuning.md, "Which storage")."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if not is_rdb_url(storage):
        return optuna.storages.JournalStorage(JournalFileBackend(storage))
    retry, keyword = _retry_callback_api()
    with _experimental_quiet():
        return optuna.storages.RDBStorage(
            storage, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_s, grace_period=grace_s,
            **{keyword: retry(max_retry=MAX_RETRY, inherit_intermediate_values=True)})


def make_sampler(tune: TuneConfig, seed: int) -> Any:
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(tune: TuneConfig) -> Any:
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.n_startup_trials,
                                           n_warmup_steps=tune.n_warmup_steps)
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, *, sampler: Any = None, pruner: Any = None, create: bool = False) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(spec.storage, spec.heartbeat_s, spec.grace_s)
    if create:
        return optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
    return optuna.load_study(storage=storage, study_name=spec.study_name, sampler=sampler, pruner=pruner)


@contextlib.contextmanager
def ask_lock(tune_dir: Path) -> Iterator[None]:
    """Held while a worker counts the study's trials and asks for one, so that no more than n_trials are asked
    (Optuna has no "ask unless n trials exist": its MaxTrialsCallback counts after the fact, so parallel workers
    overshoot), with either storage. A POSIX record lock, like a run directory's
    (hpctrain.process.distributed.run_lock): on NFS it needs the server's lock manager (NFSv4, or lockd for v3)."""
    with open(tune_dir / ".ask.lock", "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def counts(study: Any) -> dict[str, int]:
    """Trials by state: complete, pruned, failed, running, waiting (enqueued or a retry, not asked yet), and
    retried (failed for a stale heartbeat and retried: the retry stands for it)."""
    from optuna.trial import TrialState

    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    result = dict.fromkeys([*names.values(), "retried"], 0)
    trials = study.get_trials(deepcopy=False)
    retried = retried_as(trials)
    for trial in trials:
        result["retried" if trial.number in retried else names[trial.state]] += 1
    return result


def asked(study: Any) -> int:
    """Trials taken by workers (finished or running): what counts against n_trials. A retried trial counts once,
    as its retry: while the retry waits, a worker may ask, and the ask takes it."""
    found = counts(study)
    return found["complete"] + found["pruned"] + found["failed"] + found["running"]


# -- Optuna's heartbeats (RDB storages only) -----------------------------------------------------------------------
# Optuna records heartbeats and fails stale trials only inside Study.optimize (its heartbeat thread is private to
# it, and Study.ask warns that heartbeats are "supposed to be used with Study.optimize"). hpctrain's workers ask and
# tell: one trial is a whole run, resumed after a requeue. So they do what optimize does, through the public names
# it uses: RDBStorage.record_heartbeat from a thread of their own while a trial trains, and
# optuna.storages.fail_stale_trials before they ask, which runs the storage's retry callback. All of it is marked
# experimental by Optuna (ExperimentalWarning, silenced here and only here); OPTUNA_VERSIONS is the range it is
# written for, and check_heartbeat_api refuses, in the tune command's preflight, an Optuna that lacks a piece.


@contextlib.contextmanager
def _experimental_quiet() -> Iterator[None]:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _retry_callback_api() -> tuple[Any, str]:
    """The retry callback's class and RDBStorage's keyword for it. Optuna 4.9 renamed both
    (RetryFailedTrialCallback, failed_trial_callback=: deprecated then, gone in 6.0), so the new names where they
    exist: the old ones would warn."""
    import optuna.storages as storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    return storages.RetryFailedTrialCallback, "failed_trial_callback"


def check_heartbeat_api() -> None:
    """Refuse an Optuna without the heartbeat API that an RDB storage's workers use (loudly, before anything is
    queued: a worker would otherwise fail on its first trial)."""
    import inspect

    import optuna

    try:
        retry, keyword = _retry_callback_api()
        found = {"optuna.storages.RDBStorage.record_heartbeat": hasattr(optuna.storages.RDBStorage, "record_heartbeat"),
                 "optuna.storages.fail_stale_trials": hasattr(optuna.storages, "fail_stale_trials"),
                 f"RDBStorage({keyword}=)": keyword in inspect.signature(optuna.storages.RDBStorage).parameters,
                 f"{retry.__name__}.retried_trial_number": hasattr(retry, "retried_trial_number"),
                 f"{retry.__name__}.retry_history": hasattr(retry, "retry_history")}
    except AttributeError as error:
        found = {str(error): False}
    missing = [name for name, present in found.items() if not present]
    if missing:
        raise ConfigError(f"tune.storage: an RDB storage's trials use Optuna's heartbeats, and optuna "
                          f"{optuna.__version__} lacks {', '.join(missing)}; hpctrain is written for optuna"
                          f"{OPTUNA_VERSIONS}: pip install 'hpctrain[optuna]'")


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds, from HPCTRAIN_TUNE_HEARTBEAT_S=interval[,grace] or the defaults."""
    value = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not value:
        return HEARTBEAT_S, GRACE_S
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    interval, grace = (numbers + [10 * numbers[0]])[:2] if len(numbers) in (1, 2) else (0, 0)
    if interval <= 0 or grace <= interval:
        raise ConfigError(f"{HEARTBEAT_ENV}={value}: expected interval[,grace], whole seconds with "
                          f"0 < interval < grace (default {HEARTBEAT_S},{GRACE_S})")
    return interval, grace


def fail_stale(study: Any) -> None:
    """Fail the RUNNING trials whose heartbeat is older than the grace period, and enqueue their retries (the
    storage's retry callback). Called under the ask lock, before trials are counted."""
    import optuna

    with _experimental_quiet():
        optuna.storages.fail_stale_trials(study)


def retried_from(trial: Any) -> int | None:
    """The number of the trial that `trial` (a FrozenTrial) retries, the first of a chain of retries; None for a
    trial that is no retry."""
    retry, _ = _retry_callback_api()
    with _experimental_quiet():
        return retry.retried_trial_number(trial)


def retried_as(trials: list[Any]) -> dict[int, int]:
    """Trial number -> the number of the trial that retried it, for every retried trial."""
    retry, _ = _retry_callback_api()
    with _experimental_quiet():
        return {retry.retry_history(trial)[-1]: trial.number for trial in trials if retry.retry_history(trial)}


def ask_quietly(study: Any, distributions: dict[str, Any]) -> Any:
    """study.ask, without its warning that heartbeats are meant for Study.optimize: the caller records them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask(distributions)


class Heartbeat:
    """Records a trial's heartbeat in the RDB storage at once, then every `interval_s` from a thread of its own,
    until `stop`: what Study.optimize's heartbeat thread does for its trials."""

    def __init__(self, spec: StudySpec, trial_id: int) -> None:
        self.storage = make_storage(spec.storage, spec.heartbeat_s, spec.grace_s)
        self.trial_id, self.interval_s, self.grace_s = trial_id, spec.heartbeat_s, spec.grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpctrain-tune-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        # The first one now, in the caller: a trial without any heartbeat is never found stale (Optuna skips it).
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
                failing = False
            except Exception as error:  # the database out of reach: the trial trains on; say it once
                if not failing:
                    log.warning("trial id %d: could not record its heartbeat (%s); after %d s without one it is "
                                "taken for lost and retried", self.trial_id, error, self.grace_s)
                failing = True


def claim(trial: Any, index: int) -> None:
    """Mark the trial as worker `index`'s (under the ask lock): who trains it, for a restarted worker with an RDB
    storage (it resumes the RUNNING trial marked with its index) and for people (`inspect`)."""
    for key, value in (("worker", index), ("pid", os.getpid()), ("host", socket.gethostname())):
        trial.set_user_attr(key, value)


def summarize_study(tune_dir: Path) -> dict[str, Any]:
    spec = StudySpec.read(tune_dir)
    require_optuna()
    study = open_study(spec)
    from optuna.trial import TrialState

    summary: dict[str, Any] = {"tune_dir": str(tune_dir), "study_name": spec.study_name,
                               "storage": _without_password(spec.storage), "n_trials": spec.n_trials,
                               "metric": spec.metric, "direction": spec.direction, "counts": counts(study),
                               "trials": []}
    retried = retried_as(study.get_trials(deepcopy=False))
    for trial in study.get_trials(deepcopy=False):
        reason = trial.user_attrs.get("fail_reason")
        if trial.number in retried:  # a finished trial takes no attribute: the reason is the retry's
            reason = (f"worker lost: no heartbeat for {spec.grace_s} s; retried as trial {retried[trial.number]} "
                      f"in the same run directory")
        summary["trials"].append({"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                                  "params": dict(trial.params), "run_dir": trial.user_attrs.get("run_dir"),
                                  "overrides": trial.user_attrs.get("overrides", []), "fail_reason": reason,
                                  "retry_of": retried_from(trial)})
    if any(trial.state is TrialState.COMPLETE for trial in study.get_trials(deepcopy=False)):
        best = study.best_trial
        summary["best"] = next(row for row in summary["trials"] if row["number"] == best.number)
        # The same run again, alone (bitwise the same weights on CPU): the study's overrides, then the trial's.
        config_dir = [] if spec.config_dir is None else ["--config-dir", spec.config_dir]
        summary["best"]["rerun"] = shlex.join(["python", "-m", "hpctrain.launch", *config_dir, *spec.overrides,
                                               *summary["best"]["overrides"], "run_name=best_of_" + spec.study_name])
    return summary


def format_study(summary: dict[str, Any]) -> str:
    found = summary["counts"]
    lines = [f"study      {summary['study_name']} in {summary['storage']}",
             f"trials     {found['complete']} complete, {found['pruned']} pruned, {found['failed']} failed, "
             f"{found['running']} running (of tune.n_trials={summary['n_trials']})"
             + (f"; {found['retried']} lost with their worker and retried" if found.get("retried") else "")]
    best = summary.get("best")
    if best is None:
        lines.append("best       none complete yet")
    else:
        lines += [f"best       trial {best['number']}: {summary['metric']} {best['value']:.6g} "
                  f"({summary['direction']})",
                  f"  overrides  {' '.join(best['overrides'])}",
                  f"  run dir    {best['run_dir']}",
                  f"  rerun      {best['rerun']}"]
    for row in summary["trials"]:
        value = "-" if row["value"] is None else f"{row['value']:.6g}"
        reason = f"  ({row['fail_reason']})" if row.get("fail_reason") else ""
        lines.append(f"  {row['number']:>4} {row['state']:<9} {value:>12}  {' '.join(row['overrides'])}{reason}")
    return "\n".join(lines)


def plot_study(tune_dir: Path) -> list[Path]:
    """Optuna's matplotlib plots of the study, written to TUNE_DIR/plots/; one that cannot be drawn (too few
    finished trials) is logged and left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as plots

    study = open_study(StudySpec.read(tune_dir))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its "no complete trials" warnings: the log below says it
    directory = tune_dir / PLOTS_DIRNAME
    directory.mkdir(exist_ok=True)
    written = []
    for name, draw in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("parallel_coordinates", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # "too few trials to compute importances", ...
                axes = draw(study)
        except Exception as error:  # Optuna refuses some plots for too few complete trials or parameters
            log.warning("plot %s not drawn: %s", name, error)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
