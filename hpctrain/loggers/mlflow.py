"""MLflow: one MLflow run per run directory, reopened by its id (stored in `RUN_DIR/loggers/mlflow.json`) after a
kill, a requeue or a rerun. The default store is an SQLite database in the run directory (no server; MLflow 3
refuses its old `file:` store); any tracking URI is allowed (`http://host:5000` for an `mlflow server`).

MLflow keeps every logged point, duplicates included, and cannot drop points: on reopening, the feed asks the
run for its last step of each kind (the store is the truth, also after a kill between a delivery and the state
write) and sends only later ones; the resumed run recomputes the rows past its checkpoint bit for bit, so each
step is in the metric history once.

A tracking server that goes away (stopped, killed, restarted) is the feed's failure like any other (hpctrain.loggers):
the rows are held and sent again later. MLflow's own HTTP retries are turned off (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0
unless set): they would resend a `log_batch` whose answer was lost, and hold the logger's thread for minutes per
call. Instead, before the feed sends rows again it asks the run what it holds (`delivered_steps`), and each row keeps
the timestamp of its first try: MLflow's SQL stores drop a metric identical in key, step, value and timestamp to one
they hold, so a request the server stored after that question is not stored twice either.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hpctrain.callbacks import EndView, RunView
from hpctrain.loggers import KINDS, Logger, display_name, flat_config, read_state, run_tags, state_path
from hpctrain.run.metrics import MetricsRow

# MLflow's limits: 1000 metrics and 100 params per log_batch call; metric keys of [\w\-. /].
_METRICS_PER_CALL = 1000
_PARAMS_PER_CALL = 100
_PARAM_LENGTH = 6000


def create_sqlite_store(path: Path) -> None:
    """An SQLite store made whole or not at all: MLflow creates its tables in a series of migrations (seconds), and a
    process stopped among them (a requeue) would leave a store that no later start can open. So a new one is made
    under a temporary name and renamed into place."""
    from mlflow import MlflowClient

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    MlflowClient(tracking_uri=f"sqlite:///{temporary}").search_experiments()  # creates and migrates the tables
    os.replace(temporary, path)


def metric_key(kind: str, name: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", f"{kind}/{name}")


class MLflowLogger(Logger):
    name = "mlflow"
    packages = ("mlflow",)
    extra = "mlflow"
    max_values_per_call = _METRICS_PER_CALL  # one log_batch request: stored whole or not at all

    def __init__(self, *, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None) -> None:
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.tags = dict(tags or {})
        self.client: Any = None
        self.run_id = ""
        # (run dir, phase, uri, run id) of the run an earlier try of `open` created: a try that failed after
        # create_run (the server went away) is tried again with that run, not with a second one.
        self._created: tuple[str, str, str, str] | None = None
        # (kind, step) -> the timestamp of the rows' first try, for the rows of the last call (see the docstring).
        self._stamps: dict[tuple[str, int], int] = {}

    def open(self, run: RunView, state: dict[str, Any], *, rewind_to: int | None) -> dict[str, Any]:
        from mlflow import MlflowClient

        uri = state.get("tracking_uri") or self.tracking_uri or f"sqlite:///{run.run_dir / 'mlflow.db'}"
        if uri.startswith(("http://", "https://")):  # the feed retries, and checks first (see the docstring)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        if uri.startswith("sqlite:///"):
            create_sqlite_store(Path(uri.removeprefix("sqlite:///")))
        self.client = MlflowClient(tracking_uri=uri)
        if state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return {"tracking_uri": uri, "run_id": self.run_id}
        key = (str(run.run_dir), run.phase, uri)
        if self._created is None or self._created[:3] != key:
            self._created = (*key, self._create_run(run, uri))
        self.run_id = self._created[3]
        self._log_params(run)
        return {"tracking_uri": uri, "run_id": self.run_id}

    def _create_run(self, run: RunView, uri: str) -> str:
        name = self.experiment or str(run.config.get("task", {}).get("name", "hpctrain"))
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # another run (a sweep point) created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {"hpctrain.run_dir": str(run.run_dir), **run_tags(run), **self.tags}
        training = read_state(state_path(run.run_dir, self.name)) if run.phase != "train" else {}
        if training.get("run_id") and training.get("tracking_uri") == uri:  # a test phase, under its training run
            tags["mlflow.parentRunId"] = training["run_id"]
        return self.client.create_run(experiment_id, run_name=display_name(run, self.run_name), tags=tags).info.run_id

    def _log_params(self, run: RunView) -> None:
        """The config as parameters (again after a failed try: MLflow takes a parameter again with its value)."""
        from mlflow.entities import Param

        params = [Param(key[:250], value[:_PARAM_LENGTH]) for key, value in flat_config(dict(run.config)).items()]
        for start in range(0, len(params), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + _PARAMS_PER_CALL])

    def delivered_steps(self) -> dict[str, int]:
        steps = {}
        for kind in KINDS:
            history = self.client.get_metric_history(self.run_id, metric_key(kind, "loss"))
            steps[kind] = max((point.step for point in history), default=0)
        return steps

    def log_rows(self, rows: list[MetricsRow]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._stamps = {(row.kind, row.step): self._stamps.get((row.kind, row.step), now) for row in rows}
        metrics = [Metric(metric_key(row.kind, name), value, self._stamps[row.kind, row.step], row.step)
                   for row in rows for name, value in row.values.items()]
        # One call at most, but for a row of more than _METRICS_PER_CALL values (max_values_per_call).
        for start in range(0, len(metrics), _METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _METRICS_PER_CALL])

    def finish(self, end: EndView) -> None:
        if end.finished:
            for path in end.plots:
                self.client.log_artifact(self.run_id, str(path), artifact_path="plots")
            if end.best_checkpoint is not None:
                self.client.set_tag(self.run_id, "hpctrain.best_checkpoint", str(end.best_checkpoint))
            self.client.set_tag(self.run_id, "hpctrain.stop_reason", end.stop_reason)
        # A requeued or killed process leaves the run KILLED; its next start sets it RUNNING again.
        self.client.set_terminated(self.run_id, status="FINISHED" if end.finished else
                                   "FAILED" if end.error else "KILLED")
