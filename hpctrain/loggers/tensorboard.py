"""TensorBoard (`torch.utils.tensorboard`): event files in `RUN_DIR/tensorboard/`, one run per run directory (and
one per test phase, in `tensorboard/test/<name>/`).

A restart opens its writer with `purge_step`: TensorBoard's readers drop every event an earlier writer logged at
that step or later, and the feed resends those rows from metrics.h5, so each step appears once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpctrain.callbacks import EndView, RunView
from hpctrain.loggers import Logger, flat_config
from hpctrain.run.metrics import MetricsRow


class TensorBoardLogger(Logger):
    name = "tensorboard"
    packages = ("tensorboard",)
    extra = "tensorboard"
    can_rewind = True

    def __init__(self, *, log_dir: str | None = None, flush_secs: float = 10.0) -> None:
        self.log_dir = log_dir
        self.flush_secs = flush_secs
        self.writer: Any = None

    def open(self, run: RunView, state: dict[str, Any], *, rewind_to: int | None) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(self.log_dir) if self.log_dir else run.run_dir / "tensorboard"
        if run.phase != "train":  # a test phase: a run of its own in TensorBoard, e.g. test/step_000000024
            log_dir = log_dir / run.phase
        # purge_step: the first step whose earlier events readers discard (nothing to discard in a new run).
        purge = rewind_to + 1 if rewind_to is not None and state else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=self.flush_secs)
        if not state:  # the hyperparameters, once per run
            config = "\n".join(f"    {key}: {value}" for key, value in sorted(flat_config(dict(run.config)).items()))
            self.writer.add_text("config", config, global_step=0)
        return {"log_dir": str(log_dir)}

    def log_rows(self, rows: list[MetricsRow]) -> None:
        for row in rows:
            for name, value in row.values.items():
                self.writer.add_scalar(f"{row.kind}/{name}", value, global_step=row.step)
        self.writer.flush()

    def finish(self, end: EndView) -> None:
        if not end.finished:
            return
        import matplotlib.image

        for path in end.plots:
            image = matplotlib.image.imread(str(path))
            self.writer.add_image(f"plots/{Path(path).stem}", image[..., :3], global_step=end.step,
                                  dataformats="HWC")
        if end.best_checkpoint is not None:
            self.writer.add_text("best_checkpoint", f"step {end.best_step}: {end.best_checkpoint}",
                                 global_step=end.step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
