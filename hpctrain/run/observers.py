"""What watches a run, in one place: the built-in observers of the training loop, behind the callbacks interface
(hpctrain.callbacks), and the events the loop reports to them.

Called in this order at every hook (on rank 0; the other ranks have none of them):

  MetricsRecorder  metrics.h5: a row per step (with the step time breakdown of hpctrain.run.breakdown) and per
                   evaluation; its flushes feed the loggers; the flush and the row counts (cursor) a checkpoint
                   records, which the Trainer asks for (`flush`, `cursor`) as part of the checkpoint protocol. Only
                   that flush raises when the disk is full; the others log it once and keep the rows in memory
  TaskPlots        the task's plot hook, drawn in a process of its own at the evaluations
                   (callbacks.metrics.task_plot_every_evaluations) and always at the last one
  ProgressBar      tqdm (trainer.progress_bar)
  RunPlots         loss.png, metrics.png, lr.png from metrics.h5 once the run has finished (callbacks.metrics.plots)

then the user's callbacks (callbacks.user) and the loggers (callbacks.loggers), isolated from training as
hpctrain.callbacks says. Built-in observers receive the loop's events as they are (they only read them; the
user's callbacks get read-only copies, the events' `view()`), see `on_start` after the user's callbacks and the
loggers (the loggers read their state there, which the metrics recorder's catch-up needs), and an error in one
stops training like any error of the loop. Their `close()` ends their work before the run's last checkpoint is
waited for; `on_end` comes after it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from hpctrain.run.breakdown import StepClock
from hpctrain.callbacks import EndView, EvaluationView, RunView, StepView, read_only
from hpctrain.config import Config, to_json
from hpctrain.process.distributed import step_peak_memory
from hpctrain.run.evaluate import Evaluation, PlotWorker
from hpctrain.run.step import StepResult
from hpctrain.run.metrics import METRICS_FILENAME, MetricsCursor, MetricsWriter, plot_run


# -- the events ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepEnded:
    step: int  # 1-based global optimizer step just done
    epoch: int
    result: StepResult
    learning_rates: list[float]
    samples_per_second: float

    def view(self) -> StepView:
        result = self.result
        return StepView(step=self.step, epoch=self.epoch, loss=result.loss,
                        loss_components=dict(result.loss_components), learning_rates=tuple(self.learning_rates),
                        grad_norm=result.grad_norm, samples_per_second=self.samples_per_second,
                        nonfinite=result.nonfinite)


@dataclass(frozen=True)
class EvaluationEnded:
    step: int
    evaluation: Evaluation  # `final` set: the run ends after it
    means: dict[str, float]
    best_step: int
    improved: bool

    def view(self) -> EvaluationView:
        evaluation = self.evaluation
        return EvaluationView(step=self.step, means=dict(self.means),
                              per_sample={name: read_only(values) for name, values in evaluation.per_sample.items()},
                              sample_index=read_only(evaluation.sample_index), best_step=self.best_step,
                              improved=self.improved)


@dataclass
class RunEnded:
    run_dir: Path
    step: int
    finished: bool
    stop_reason: str
    best_step: int
    best_loss: float
    best_checkpoint: Path | None
    error: str = ""
    # The PNGs drawn from metrics.h5 (RunPlots adds them; the task's plots are found in plots/ by `view`).
    plots: list[Path] = field(default_factory=list)

    def view(self) -> EndView:
        task_plots = sorted((self.run_dir / "plots").glob("*.png")) if self.finished else []
        # EndView is the frozen, public copy of these same fields (callbacks see nothing they could change).
        values = {field_.name: getattr(self, field_.name) for field_ in dataclasses.fields(self)}
        return EndView(**{**values, "plots": tuple([*self.plots, *task_plots])})


# -- the built-in observers ---------------------------------------------------------------------------------------
class MetricsRecorder:
    """metrics.h5's rows, from the loop's events; its flushes feed the metrics listeners (the loggers)."""

    def __init__(self, writer: MetricsWriter, *, clock: StepClock, device: torch.device,
                 listeners: Sequence[Any]) -> None:
        self.writer, self.clock, self.device = writer, clock, device
        self.listeners = list(listeners)

    def on_start(self, run: RunView) -> None:
        for listener in self.listeners:  # first the rows metrics.h5 holds that a listener has not had yet
            listener.metrics_attached(self.writer)
            self.writer.listeners.append(listener)

    def on_step_end(self, event: StepEnded) -> None:
        result = event.result
        times, device_times = self.clock.row()
        self.writer.log_step(step=event.step, epoch=event.epoch, loss=result.loss, grad_norm=result.grad_norm,
                             samples_per_second=event.samples_per_second, nonfinite=result.nonfinite,
                             learning_rates=event.learning_rates, loss_components=result.loss_components,
                             max_memory_allocated=step_peak_memory(self.device), extra=times, deferred=device_times)
        if result.sample_index is not None:
            self.writer.log_train_samples(step=event.step, index=result.sample_index, loss=result.sample_loss)
        self.writer.flush_if_due()

    def on_validation_end(self, event: EvaluationEnded) -> None:
        self.writer.log_validation(step=event.step, per_sample=event.evaluation.per_sample)
        self.writer.try_flush()  # as the periodic flushes: a failed write is logged and left to the checkpoint's

    # The checkpoint protocol: a checkpoint records the cursor of rows already on disk (flush, then cursor). The
    # flush raises OSError if the rows cannot be written (a full disk): the trainer then stops the run cleanly.
    def flush(self) -> None:
        self.writer.flush()

    def cursor(self) -> MetricsCursor:
        return self.writer.cursor()

    def close(self) -> None:
        self.writer.close()  # its last flush hands the last rows to the loggers; a failed one is logged, not raised


class TaskPlots:
    """The task's plot hook (task.plot) at every `every_evaluations`-th evaluation and at the last."""

    def __init__(self, plot: Any, directory: Path, *, every_evaluations: int, val_every_steps: int) -> None:
        self.worker = PlotWorker(plot, directory)
        self.every_evaluations, self.val_every_steps = every_evaluations, val_every_steps
        self._started = False

    def on_step_end(self, event: StepEnded) -> None:
        if not self._started:  # after this process's first step, not beside it (PlotWorker.start)
            self._started = True
            self.worker.start()

    def on_validation_end(self, event: EvaluationEnded) -> None:
        every = self.every_evaluations
        if event.evaluation.final or (every and event.step // self.val_every_steps % every == 0):
            self.worker.submit(event.evaluation)

    def close(self) -> None:
        self.worker.close()


class ProgressBar:
    """tqdm on stderr: steps, loss, the first group's LR and throughput (redrawn every 30 s without a terminal)."""

    def __init__(self, *, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def on_step_end(self, event: StepEnded) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{event.result.loss:.4g}", lr=f"{event.learning_rates[0]:.3g}",
                             samples_per_s=f"{event.samples_per_second:.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class RunPlots:
    """The loss, metrics and LR plots from metrics.h5, drawn once the run has finished without an error."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_end(self, event: RunEnded) -> None:
        if event.finished and not event.error:
            event.plots.extend(plot_run(self.run_dir))


def build_observers(config: Config, *, run_dir: Path, is_main: bool, device: torch.device, clock: StepClock,
                    cursor: MetricsCursor | None, start_step: int, parameter_groups: Sequence[str],
                    validation_sample_index: np.ndarray, steps_per_epoch: int, plot: Any,
                    watchers: Sequence[tuple[str, Any]]) -> tuple[MetricsRecorder | None, list[Any]]:
    """The built-in observers of this rank, in the order they are called, and the metrics recorder among them
    (None on ranks other than 0, which have none). `cursor`: the resumed checkpoint's rows of metrics.h5 (the
    writer cuts the file back to them); `watchers`: the user's callbacks and the loggers, whose metrics
    listeners (the loggers' feeds) the recorder's flushes feed."""
    if not is_main:
        return None, []
    val_batch_size = config.data.val_batch_size or config.trainer.micro_batch_size
    writer = MetricsWriter(
        run_dir / METRICS_FILENAME, parameter_groups=parameter_groups,
        validation_sample_index=validation_sample_index, config_json=to_json(config), task_name=config.task.name,
        cursor=cursor,
        # global batches: optimizer steps per epoch, and validation batches of the whole set
        batches_per_epoch=(steps_per_epoch, math.ceil(len(validation_sample_index) / val_batch_size)),
        flush_every_s=config.callbacks.metrics.flush_every_seconds)
    recorder = MetricsRecorder(writer, clock=clock, device=device,
                               listeners=[watcher for _, watcher in watchers if hasattr(watcher, "metrics_flushed")])
    observers: list[Any] = [recorder]
    if plot is not None:
        observers.append(TaskPlots(plot, run_dir / "plots",
                                   every_evaluations=config.callbacks.metrics.task_plot_every_evaluations,
                                   val_every_steps=config.trainer.val_every_steps))
    if config.trainer.progress_bar:
        observers.append(ProgressBar(total=config.trainer.max_steps, initial=start_step))
    if config.callbacks.metrics.plots:
        observers.append(RunPlots(run_dir))
    return recorder, observers
