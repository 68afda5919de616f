"""Weights & Biases: one W&B run per run directory, offline by default (`mode="offline"`: nothing leaves the
machine; `wandb sync` uploads it later from a login node). Its files are in `RUN_DIR/wandb/`.

The run id is stored in `RUN_DIR/loggers/wandb.json` and every start reopens it by W&B's documented resume by id
(`id=..., resume="allow"`).
- Online (`mode="online"`): W&B resumes the run at its last step and itself drops any step logged below the run's
  current one; hpctrain's resumed rows are bit-identical, so a resend shows nothing twice. After opening, the feed
  asks the server for the run's last step (`wandb.Api().run(path).lastHistoryStep`, public) and sends from the next
  one, so steps a kill kept from the server are sent again. Only public API.
- Offline: W&B ignores `resume=`: each process writes a directory of its own, `wandb/offline-run-<time>-<id>/`, all
  with the same id, and `wandb sync` of them in time order (`wandb sync RUN_DIR/wandb/offline-run-*-<id>`) makes
  one run. On reopening, the feed reads those directories' transaction logs (a private format:
  hpctrain/loggers/wandb_offline_log.py, pinned to the versions it was tested with) for the last step of each kind
  they hold, and sends only later ones (from metrics.h5, then live), so each step is in one of them once: also
  after a kill that lost what W&B had not written yet, whose rows are sent again. Under an untested version or a
  changed format it warns once and trusts the state file (that module says what is lost).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from hpctrain.callbacks import EndView, RunView
from hpctrain.loggers import KINDS, Logger, display_name, run_tags, short_tags
from hpctrain.loggers.wandb_offline_log import FORMAT, stored_history
from hpctrain.process.fork_guard import no_fork_meanwhile
from hpctrain.run.metrics import MetricsRow

log = logging.getLogger(__name__)


class WandbLogger(Logger):
    name = "wandb"
    packages = ("wandb",)
    extra = "wandb"

    def __init__(self, *, mode: str = "offline", project: str | None = None, entity: str | None = None,
                 dir: str | None = None, group: str | None = None, run_name: str | None = None,
                 tags: Sequence[str] = ()) -> None:
        self.mode, self.project, self.entity, self.dir = mode, project, entity, dir
        self.group, self.run_name, self.tags = group, run_name, tuple(tags)
        self.run: Any = None
        self.run_id = ""
        self.root = Path()

    def open(self, run: RunView, state: dict[str, Any], *, rewind_to: int | None) -> dict[str, Any]:
        if self.mode == "offline":  # nothing leaves the machine: not even W&B's error reports (Sentry)
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        self.run_id = state.get("run_id") or uuid.uuid4().hex[:16]  # W&B's ids: lowercase letters and digits
        self.root = Path(state.get("dir") or self.dir or run.run_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        tags = run_tags(run)
        settings = wandb.Settings(mode=self.mode, silent=True, console="off", x_disable_stats=True,
                                  x_disable_meta=True, disable_git=True, save_code=False, x_save_requirements=False)
        # W&B's service process starts here (subprocess.Popen, local): no loader worker may be forked meanwhile,
        # or W&B would wait for that worker's end (hpctrain.process.fork_guard). Opening the run may take
        # longer (online: the network), and forks need not wait for that.
        with no_fork_meanwhile():
            wandb.setup(settings)
        self.run = wandb.init(
            id=self.run_id, resume="allow", dir=str(self.root), settings=settings,
            project=self.project or str(run.config.get("task", {}).get("name", "hpctrain")), entity=self.entity,
            group=self.group or tags.get("hpctrain.sweep") or run.run_name,
            job_type="train" if run.phase == "train" else "test", name=display_name(run, self.run_name),
            tags=[*self.tags, *short_tags(tags)],
            # Every process sends the config (the same): a killed one may have written nothing of its run.
            config={**dict(run.config), **tags, "hpctrain.run_dir": str(run.run_dir)})
        return {"run_id": self.run_id, "dir": str(self.root), "mode": self.mode}

    def stored_steps(self, run: RunView, state: dict[str, Any]) -> dict[str, int] | None:
        """Offline: the steps the run's offline directories hold (the pinned reader of W&B's transaction log)."""
        if self.mode != "offline":
            return None  # online, `delivered_steps` asks W&B's server
        if not state.get("run_id"):  # a new run holds nothing; check the version now, not first at a requeue
            FORMAT.supported()
            return None
        history = stored_history(Path(state.get("dir") or self.dir or run.run_dir), state["run_id"])
        if history is None:  # an untested version or a changed format (warned): the state file is trusted
            return None
        steps = {kind: 0 for kind in KINDS}
        for row in history:
            for kind in KINDS:
                if f"{kind}/loss" in row:
                    steps[kind] = max(steps[kind], int(row["_step"]))
        return steps

    def delivered_steps(self) -> dict[str, int] | None:
        """Online: the run's last step on W&B's server (public API). One W&B step holds every kind's values of a
        step, and W&B drops anything logged below its current step, so that step is where each kind resumes."""
        if self.mode != "online" or self.run is None:
            return None
        import wandb

        try:
            last = int(wandb.Api().run(self.run.path).lastHistoryStep)  # -1 for a run without history
        except Exception as error:  # no API access: W&B's own drop of lower steps still holds, the state file rules
            log.warning("W&B online: asking for the last step of %s failed (%s); trusting loggers/wandb.json",
                        self.run.path, error)
            return None
        return {kind: max(last, 0) for kind in KINDS}

    def log_rows(self, rows: list[MetricsRow]) -> None:
        # One W&B step holds every kind's values of a step (W&B's steps only increase).
        by_step: dict[int, dict[str, float]] = {}
        for row in rows:
            by_step.setdefault(row.step, {}).update({f"{row.kind}/{name}": value for name, value in row.values.items()})
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step)

    def finish(self, end: EndView) -> None:
        import wandb

        if end.finished:
            if end.plots:
                self.run.log({f"plots/{Path(path).stem}": wandb.Image(str(path)) for path in end.plots}, step=end.step)
            if end.best_checkpoint is not None:
                self.run.summary["hpctrain.best_checkpoint"] = str(end.best_checkpoint)
                self.run.summary["hpctrain.best_step"] = end.best_step
            self.run.summary["hpctrain.stop_reason"] = end.stop_reason
        elif not end.error:  # stopped for a requeue: W&B shows the run preempted, the next start resumes it
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if end.finished or not end.error else 1)
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
