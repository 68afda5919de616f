"""A study on shared storage: what the tune command, its workers and `inspect` share.

`StudySpec` (written to TUNE_DIR/tune.json by the tune command, pickled into each worker) names the storage, the
study, the config (overrides and --config-dir) and the search space; `open_study` opens it with the config's
sampler and pruner (neither is stored by Optuna: every process makes its own). `summarize_study` and `plot_study`
are what `python -m hpctrain.inspect TUNE_DIR` shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import shlex
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

    @property
    def path(self) -> Path:
        return Path(self.tune_dir)

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
def make_storage(storage: str) -> Any:
    """One storage object per process (an RDB storage's set-up checks the schema: a second or so each time)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if is_rdb_url(storage):
        return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
    return optuna.storages.JournalStorage(JournalFileBackend(storage))


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
    storage = make_storage(spec.storage)
    if create:
        return optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
    return optuna.load_study(storage=storage, study_name=spec.study_name, sampler=sampler, pruner=pruner)


@contextlib.contextmanager
def ask_lock(tune_dir: Path) -> Iterator[None]:
    """Held while a worker counts the study's trials and asks for one, so that no more than n_trials are asked.
    A POSIX record lock, like a run directory's (hpctrain.process.distributed.run_lock): it holds across NFS clients."""
    with open(tune_dir / ".ask.lock", "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def counts(study: Any) -> dict[str, int]:
    """Trials by state: complete, pruned, failed, running, waiting (enqueued, not asked yet)."""
    from optuna.trial import TrialState

    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    result = dict.fromkeys(names.values(), 0)
    for trial in study.get_trials(deepcopy=False):
        result[names[trial.state]] += 1
    return result


def asked(study: Any) -> int:
    """Trials taken by workers (finished or running): what counts against n_trials."""
    found = counts(study)
    return found["complete"] + found["pruned"] + found["failed"] + found["running"]


def summarize_study(tune_dir: Path) -> dict[str, Any]:
    spec = StudySpec.read(tune_dir)
    require_optuna()
    study = open_study(spec)
    from optuna.trial import TrialState

    summary: dict[str, Any] = {"tune_dir": str(tune_dir), "study_name": spec.study_name,
                               "storage": _without_password(spec.storage), "n_trials": spec.n_trials,
                               "metric": spec.metric, "direction": spec.direction, "counts": counts(study),
                               "trials": []}
    for trial in study.get_trials(deepcopy=False):
        summary["trials"].append({"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                                  "params": dict(trial.params), "run_dir": trial.user_attrs.get("run_dir"),
                                  "overrides": trial.user_attrs.get("overrides", []),
                                  "fail_reason": trial.user_attrs.get("fail_reason")})
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
             f"{found['running']} running (of tune.n_trials={summary['n_trials']})"]
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
