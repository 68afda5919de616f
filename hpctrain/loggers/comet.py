"""Comet: one Comet experiment per run directory, offline by default (`comet_ml.OfflineExperiment`: nothing leaves
the machine; `comet upload` sends it later). Its archives are in `RUN_DIR/comet/`.

The experiment key is stored in `RUN_DIR/loggers/comet.json`. An offline experiment cannot append to an earlier
archive: each process that logs writes one archive of its own when it ends, the first `<key>.zip`
(`OfflineExperiment` with that key), every later one `<key>-<suffix>.zip` (`ExistingOfflineExperiment` of the
same key, which `comet upload` appends to the experiment: upload them oldest first). Comet keeps a process's
messages in a temporary directory and archives them only at its end, so a SIGKILLed process leaves no archive:
on reopening, the feed reads the archives for the last step of each kind they hold and sends only later ones, from
metrics.h5 then live, so each step is in exactly one archive (and while no archive exists, the next process starts
the experiment anew, with the same key). The archives are Comet's private format: hpctrain/loggers/
comet_offline_archive.py reads them, pinned to the versions it was tested with; under an untested version or a
changed format it warns once and the state file is trusted (that module says what is lost). Online
(`online: true`, the API key from Comet's own config), the same key is reopened with `ExistingExperiment`, and the
state file says what was sent (Comet keeps repeated steps, and hpctrain reads nothing of Comet's then).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from hpctrain.callbacks import EndView, RunView
from hpctrain.loggers import KINDS, Logger, display_name, flat_config, run_tags, short_tags
from hpctrain.loggers.comet_offline_archive import FORMAT, has_archive, stored_metrics
from hpctrain.run.metrics import MetricsRow

log = logging.getLogger(__name__)
_ARCHIVE_NAME_METHOD = "_get_offline_archive_file_name"  # Comet's, private: overridden below

# Nothing but what hpctrain logs: no code, git, environment, console or framework auto-logging.
_QUIET = dict(log_code=False, log_graph=False, auto_param_logging=False, auto_metric_logging=False,
              parse_args=False, auto_output_logging=False, log_env_details=False, log_git_metadata=False,
              log_git_patch=False, log_env_gpu=False, log_env_host=False, log_env_cpu=False,
              display_summary_level=0)


class CometLogger(Logger):
    name = "comet"
    packages = ("comet_ml",)
    extra = "comet"

    def __init__(self, *, online: bool = False, project: str | None = None, workspace: str | None = None,
                 offline_directory: str | None = None, run_name: str | None = None, tags: Sequence[str] = ()) -> None:
        self.online, self.project, self.workspace = online, project, workspace
        self.offline_directory, self.run_name, self.tags = offline_directory, run_name, tuple(tags)
        self.experiment: Any = None
        self.key = ""
        self.directory = Path()

    def open(self, run: RunView, state: dict[str, Any], *, rewind_to: int | None) -> dict[str, Any]:
        os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")  # imported after torch: no import hooks
        if not self.online:  # offline means nothing leaves the machine: not even Comet's error reports (Sentry)
            os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
        import comet_ml

        self.key = state.get("experiment_key", "")
        self.directory = Path(state.get("offline_directory") or self.offline_directory or run.run_dir / "comet")
        project = self.project or str(run.config.get("task", {}).get("name", "hpctrain"))
        common = dict(project_name=project, workspace=self.workspace, **_QUIET)
        if self.online:
            new = not self.key
            self.experiment = (comet_ml.Experiment(**common) if new
                               else comet_ml.ExistingExperiment(previous_experiment=self.key, **common))
        else:
            # Appending needs the experiment's first archive: until one exists (the processes that made the key
            # were killed before archiving), the experiment starts anew with the same key.
            self.directory.mkdir(parents=True, exist_ok=True)
            offline = dict(offline_directory=str(self.directory), **common)
            new = not (self.key and has_archive(self.directory, self.key))
            self.experiment = (comet_ml.OfflineExperiment(experiment_key=self.key or None, **offline) if new
                               else _existing_offline_experiment(comet_ml, previous_experiment=self.key, **offline))
        if new:  # the experiment's name, tags and the config as hyperparameters, once
            self.key = self.experiment.get_key()
            tags = run_tags(run)
            self.experiment.set_name(display_name(run, self.run_name))
            self.experiment.add_tags([*self.tags, *short_tags(tags)])
            self.experiment.log_others({**tags, "hpctrain.run_dir": str(run.run_dir)})
            self.experiment.log_parameters(flat_config(dict(run.config)))
        return {"experiment_key": self.key, "offline_directory": str(self.directory), "online": self.online}

    def stored_steps(self, run: RunView, state: dict[str, Any]) -> dict[str, int] | None:
        """Offline: the steps the experiment's archives hold (the pinned reader of Comet's offline archives)."""
        if self.online:
            return None
        if not state.get("experiment_key"):  # a new experiment holds nothing; check the version now, not at a requeue
            FORMAT.supported()
            return None
        directory = Path(state.get("offline_directory") or self.offline_directory or run.run_dir / "comet")
        metrics = stored_metrics(directory, state["experiment_key"])
        if metrics is None:  # an untested version or a changed format (warned): the state file is trusted
            return None
        steps = {kind: 0 for kind in KINDS}
        for name, step, _ in metrics:
            kind, _, metric = name.partition("/")
            if metric == "loss" and kind in steps:
                steps[kind] = max(steps[kind], step)
        return steps

    def log_rows(self, rows: list[MetricsRow]) -> None:
        for row in rows:
            self.experiment.log_metrics({f"{row.kind}/{name}": value for name, value in row.values.items()},
                                        step=row.step)

    def finish(self, end: EndView) -> None:
        if end.finished:
            for path in end.plots:
                self.experiment.log_image(str(path), name=f"plots/{Path(path).stem}", step=end.step)
            if end.best_checkpoint is not None:
                self.experiment.log_others({"hpctrain.best_checkpoint": str(end.best_checkpoint),
                                            "hpctrain.best_step": end.best_step})
            self.experiment.log_other("hpctrain.stop_reason", end.stop_reason)

    def close(self) -> None:
        if self.experiment is not None:
            self.experiment.end()  # offline: writes this process's archive
            self.experiment = None


def _existing_offline_experiment(comet_ml: Any, **arguments: Any) -> Any:
    """`comet_ml.ExistingOfflineExperiment` whose archive, `<key>-<suffix>.zip`, has a suffix no other process draws.
    Comet draws the suffix from Python's `random`, which every process of a run seeds alike (the run's seed, or the
    checkpoint's state): the processes of a requeued run picked the same name, and a later one, which writes an
    empty zip under it as it starts, erased an earlier one's archive with its steps. The suffix here comes from
    os.urandom (uuid4). The name is part of the pinned private format (comet_offline_archive.py)."""
    suffix = uuid.uuid4().hex[:12]
    if not hasattr(comet_ml.ExistingOfflineExperiment, _ARCHIVE_NAME_METHOD):  # loud, as for the archive format
        log.warning("comet_ml %s has no ExistingOfflineExperiment.%s: the offline archives of a requeued run's "
                    "processes may overwrite each other and lose steps (hpctrain was tested with comet_ml %s)",
                    getattr(comet_ml, "__version__", "?"), _ARCHIVE_NAME_METHOD, f">={FORMAT.lowest},<{FORMAT.below}")

    class UniquelyNamed(comet_ml.ExistingOfflineExperiment):
        def _get_offline_archive_file_name(self) -> str:
            self.offline_archive_name_suffix = suffix
            return super()._get_offline_archive_file_name()

    return UniquelyNamed(**arguments)
