"""The training loop (`Trainer.fit`): steps (hpctrain.run.step), freeze phases, validation, early stopping,
checkpoints and resume, over parts built by the composition root (hpctrain.components.build_trainer).

Every decision that ends or changes the loop (max steps, early stopping, a non-finite loss, a stop request) is
computed from values that are identical on all ranks (all-reduced step statistics, all-gathered validation
losses), so the ranks never disagree about what happens next and never deadlock in a collective.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpctrain.callbacks import Callbacks, CheckpointView, RunView
from hpctrain.config import Config, to_dict
from hpctrain.data.dataset import DistributedBatchSampler, Split
from hpctrain.data.loader import stop_loader_workers
from hpctrain.optim import ParameterGroup
from hpctrain.process import watchdog
from hpctrain.process.distributed import DistributedContext
from hpctrain.process.seeding import capture_rng_state
from hpctrain.run.averaging import WeightAveraging
from hpctrain.run.breakdown import StepClock
from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.contract import Batch
from hpctrain.run.evaluate import Evaluation, Evaluator, report_nonfinite
from hpctrain.run.faults import (MicrobatchReader, data_fault_stop, disk_stop, nonfinite_stop,
                                 nonfinite_weights_refused)
from hpctrain.run.fine_tune import initialise_from
from hpctrain.run.freeze import FreezeSchedule, Phase, apply_phase
from hpctrain.run.metrics import MetricsCursor, finite_means
from hpctrain.run.observers import EvaluationEnded, MetricsRecorder, RunEnded, StepEnded, build_observers
from hpctrain.run.state import Resumable, TrainState, checkpoint_state, restore
from hpctrain.run.step import StepResult, TrainStep

log = logging.getLogger(__name__)




@dataclass
class TrainingParts:
    """What a trainer trains with, built by the composition root (hpctrain.components.build_trainer)."""

    model: nn.Module  # on the device; state dicts, freezing and the optimizers use it
    # What forward passes call: the model itself, or with trainer.compile a compiled module sharing its parameters.
    compiled_model: nn.Module
    groups: list[ParameterGroup]
    freeze: FreezeSchedule
    step: TrainStep
    sampler: DistributedBatchSampler
    train_loader: Iterable[Batch]
    val_loader: Iterable[Batch]
    evaluator: Evaluator
    averaging: WeightAveraging  # optim.weight_averaging (disabled: every call a no-op)
    checkpoints: CheckpointManager
    clock: StepClock  # where each step's time goes, into rank 0's metrics rows; marks only, no device sync
    split: Split
    plot: Any = None  # the task's plot hook (rank 0 draws it: hpctrain.run.observers.TaskPlots)
    watchers: list[tuple[str, Any]] = field(default_factory=list)  # the user's callbacks and the loggers


class Trainer:
    """One rank of `dist`, trained with the parts it is given: loop, validation, early stopping, checkpoints."""

    def __init__(self, *, config: Config, run_dir: Path, dist: DistributedContext, parts: TrainingParts,
                 evaluation_stop: Callable[[int, float], str] | None = None) -> None:
        self.config, self.run_dir, self.dist, self.device = config, run_dir, dist, dist.device
        self.model, self.compiled_model, self.groups = parts.model, parts.compiled_model, parts.groups
        self.freeze, self.step, self.sampler = parts.freeze, parts.step, parts.sampler
        self.train_loader, self.val_loader, self.evaluator = parts.train_loader, parts.val_loader, parts.evaluator
        self.averaging = parts.averaging
        self.checkpoints, self.clock, self.split = parts.checkpoints, parts.clock, parts.split
        self.plot, self.watchers = parts.plot, parts.watchers
        # Rank 0's judge of each evaluation (a study's pruning): (step, monitored mean) -> a stop reason or "".
        self.evaluation_stop = evaluation_stop
        self.always_frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        self.state = TrainState()
        self.resumable = Resumable(self.model, self.groups, self.step.scaler, dist, self.sampler.global_batch_size,
                                   self.sampler.steps_per_epoch, self.averaging)
        self.phase: Phase | None = None
        self._read_microbatches = MicrobatchReader(self.clock, self.val_loader, dist)
        self.ddp_model: nn.Module = self.compiled_model
        self._enter_phase(self.freeze.phase(0))
        # Built by fit (run.observers): the metrics recorder (rank 0), the plots, the progress bar, the watchers.
        self.metrics: MetricsRecorder | None = None
        self.callbacks = Callbacks((), is_main=dist.is_main)  # nothing watches before fit

    def _enter_phase(self, phase: Phase) -> None:
        """Freeze the phase's parameters and (re)wrap the model in DDP, which must know which parameters get
        gradients: every rank changes phase at the same step, so the new wrapper's set-up collectives match."""
        frozen = apply_phase(self.model, phase, always_frozen=self.always_frozen)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.dist.is_distributed:
            self.ddp_model = self.compiled_model  # the old wrapper's reducer (and its autograd hooks) go first
            gc.collect()
            self.ddp_model = DistributedDataParallel(self.compiled_model, device_ids=[self.device.index]
                                                     if self.device.type == "cuda" else None)
        self.step.use(self.ddp_model, trainable)
        if self.phase is not None and self.dist.is_main:
            log.info("step %d: freeze phase %d, %d parameter tensors frozen, LR factor %g", self.state.step,
                     phase.index, len(frozen), phase.lr_factor)
        self.phase = phase

    def train_step(self, microbatches: list[Batch], sizes: list[int], *, num_samples: int,
                   unreadable: bool = False) -> StepResult:
        """One optimizer step (hpctrain.run.step.TrainStep) over this rank's micro-batches."""
        return self.step(microbatches, sizes, num_samples=num_samples, epoch=self.state.epoch, unreadable=unreadable)

    def validate(self) -> Evaluation:
        """Every validation sample's loss, `loss.<name>` and metrics (all ranks'): of the weight average if any."""
        return self.averaging.evaluate(self.evaluator, self.compiled_model, self.val_loader, step=self.state.step)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: every rank contributes its RNG state; rank 0 writes. The watchdog times the collectives (a
        stopped peer is found here as in a step), not rank 0's write nor the other ranks' wait for it."""
        rng_states = self.dist.all_gather_object(capture_rng_state(self.device))
        with watchdog.paused("checkpoint"):
            failed = self._write_checkpoint(rng_states) if self.dist.is_main else ""
        if self.dist.is_distributed:
            with contextlib.nullcontext() if self.dist.is_main else watchdog.paused("checkpoint"):
                failed = self.dist.broadcast_object(failed)
        if failed:
            self._stop(failed)  # every rank stops at this step boundary

    def _write_checkpoint(self, rng_states: list[Any]) -> str:
        """Write this step's checkpoint (or hand it to the writer thread); a failure's stop reason, or ''."""
        assert self.metrics is not None
        settings = self.config.callbacks.checkpoint
        if not self.step.checks_gradients and nonfinite_weights_refused(self.model, self.state.step, self.checkpoints):
            return ""
        try:
            self.metrics.flush()  # the cursor below must describe rows that are on disk
            state = checkpoint_state(self.state, self.resumable, rng_states=rng_states,
                                     metrics_cursor=self.metrics.cursor(), config=self.config)
            save = self.checkpoints.save_async if settings.asynchronous else self.checkpoints.save
            save(self.state.step, state, protected_steps={self.state.best_step} if settings.keep_best else set())
        except OSError as error:  # a full disk or quota, an I/O error: the newest intact checkpoint stays
            return disk_stop(error, self.state.step, self.checkpoints)
        return ""

    def resume(self) -> MetricsCursor | None:
        """Load the newest intact checkpoint of the run directory, if any; returns its metrics cursor."""
        info = None
        if self.dist.is_main:
            self.checkpoints.remove_stale_temporaries()
            info = self.checkpoints.newest_valid()
        info = self.dist.broadcast_object(info)
        if info is None:
            log.info("no checkpoint in %s: starting from step 0", self.checkpoints.directory)
            initialise_from(self.model, self.config.trainer.init_from)  # fine-tuning: only a run's first start
            return None
        state = CheckpointManager.load(info, map_location=self.device)
        self.state = restore(state, self.resumable, config=self.config, run_dir=self.run_dir, checkpoint=info.path)
        log.info("resumed from %s (step %d, epoch %d)", info.path, self.state.step, self.state.epoch)
        return MetricsCursor(**state["metrics_cursor"])

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train until a limit, early stopping or a stop request; resumes from the run directory first."""
        cursor = self.resume()
        if self.state.done(self.config.trainer):
            log.info("run %s already finished at step %d (%s): nothing to do", self.run_dir, self.state.step,
                     self.state.stop_reason)
            return self.state
        self.state.finished, self.state.stop_reason = False, ""
        parameter_groups = tuple(group.name for group in self.groups)
        self.metrics, builtin = build_observers(
            self.config, run_dir=self.run_dir, is_main=self.dist.is_main, device=self.device, clock=self.clock,
            cursor=cursor, start_step=self.state.step, parameter_groups=parameter_groups,
            validation_sample_index=self.split.val_indices, steps_per_epoch=self.sampler.steps_per_epoch,
            plot=self.plot, watchers=self.watchers)
        self.callbacks = Callbacks(self.watchers, is_main=self.dist.is_main, builtin=builtin)
        self.callbacks.call("on_start", RunView(
            run_dir=self.run_dir, run_name=self.config.run_name, config=to_dict(self.config),
            start_step=self.state.step, parameter_groups=parameter_groups, rank=self.dist.rank,
            world_size=self.dist.world_size))
        error = ""
        try:
            with watchdog.stepping():
                self._loop()
        except BaseException as exception:
            error = f"{type(exception).__name__}: {exception}"
            raise
        finally:
            stop_loader_workers()
            self.clock.close()
            self.callbacks.close()  # the metrics writer's last flush (its last rows to the loggers), the plot process
            # The run (or a preemption's requeue) ends only once its last checkpoint is complete.
            try:
                self.checkpoints.close()
            except OSError as write_error:  # the last asynchronous write failed: the newest intact one stays
                if not self.state.failed:  # else a stop for an earlier failure has said it
                    self._stop(disk_stop(write_error, self.state.step, self.checkpoints))
            best = self.checkpoints.path_of(self.state.best_step) if self.state.best_step else None
            self.callbacks.call("on_end", RunEnded(
                run_dir=self.run_dir, step=self.state.step, finished=self.state.finished,
                stop_reason=self.state.stop_reason, best_step=self.state.best_step, best_loss=self.state.best_loss,
                best_checkpoint=best if best and best.exists() else None, error=error))
        return self.state

    def _loop(self) -> None:
        batches: Iterator[Batch] | None = None
        self.clock.restart()
        while not self.state.limit_reached(self.config.trainer):
            step_started = time.perf_counter()  # throughput counts data loading, not evaluation or checkpoints
            self.clock.data_started()
            if batches is None:
                self.sampler.set_position(self.state.epoch, self.state.step_in_epoch)
                batches = iter(self.train_loader)
            self.clock.data_done()
            if self.freeze.enabled:
                phase = self.freeze.phase(self.state.step)
                if self.phase is None or phase.index != self.phase.index:
                    self._enter_phase(phase)
            sizes = self.sampler.microbatch_sizes(self.state.step_in_epoch)
            # The schedules' learning rates for the coming step (a skipped step counts: its data was consumed).
            learning_rates = [group.set_learning_rates(self.state.step) for group in self.groups]
            # Only the step references the micro-batches: freed when it returns, their memory takes the next step's.
            microbatches, sizes, unreadable = self._read_microbatches(batches, sizes)
            result = self.train_step(microbatches, sizes, num_samples=self.sampler.samples_in_step(
                self.state.step_in_epoch), unreadable=bool(unreadable)) if microbatches else StepResult(
                loss=math.nan, unreadable=True)  # one rank: no step to join
            if result.unreadable:  # here or on another rank: no rank applied it; stop where it started, resumable
                self._read_microbatches.rewind()
                self._stop(data_fault_stop(unreadable, self.state.step, self.dist))
                if not self.checkpoints.path_of(self.state.step).exists():
                    self.save_checkpoint()
                break

            epoch = self.state.epoch
            epoch_ended = self.state.advance(steps_per_epoch=self.sampler.steps_per_epoch, nonfinite=result.nonfinite)
            watchdog.beat(self.state.step)
            batches = None if epoch_ended else batches  # the next epoch's order: a new iterator
            for group in self.groups:  # a torch scheduler's step: a skipped step counts, as for the built-in ones
                group.after_step(epoch_ended=epoch_ended)
            if self.averaging.enabled:  # (SWALR: from the next step)
                self.averaging.after_step(self.state.step, applied=not result.nonfinite,
                                          last=bool(self.state.limit_reached(self.config.trainer)))

            samples_per_second = result.num_samples / max(time.perf_counter() - step_started, 1e-9)
            self.callbacks.call("on_step_end", StepEnded(step=self.state.step, epoch=epoch, result=result,
                                                         learning_rates=learning_rates,
                                                         samples_per_second=samples_per_second))

            stop = nonfinite_stop(result, self.state, self.config.trainer, self.split.train_dataset) \
                if result.nonfinite else ""
            if stop:
                self._stop(stop)

            after_step_started = time.perf_counter()
            if self._after_step(result):  # an evaluation or a checkpoint: time between steps, no step's
                self.clock.excluded(time.perf_counter() - after_step_started)
            if self.state.finished or result.stop_requested:
                break

    def _stop(self, reason: str) -> None:  # the run ends at this step boundary
        self.state.finished, self.state.stop_reason = True, reason

    def _after_step(self, result: StepResult) -> bool:
        """Evaluate, decide whether to stop, and checkpoint, in that order; True if it evaluated or checkpointed."""
        checkpoint_cfg = self.config.callbacks.checkpoint
        step = self.state.step
        limit = self.state.limit_reached(self.config.trainer)
        improved = False
        evaluated = step % self.config.trainer.val_every_steps == 0 or bool(limit)
        if evaluated:
            with watchdog.paused("evaluation"):
                evaluation = self.validate()
            # The same on every rank: every rank gathered every sample's values (Evaluator).
            means = finite_means(evaluation.per_sample)
            if self.dist.is_main:
                report_nonfinite(evaluation.nonfinite, self.split.val_dataset, f"step {step}: validation")
            monitor = self.config.callbacks.monitor
            improved = self.state.record_evaluation(means[monitor.metric], means["loss"], mode=monitor.mode,
                                                    min_delta=self.config.callbacks.early_stopping.min_delta)
            for group in self.groups:  # before the checkpoint below, which must hold the new state
                group.after_evaluation(means)
            early_stopping = self.config.callbacks.early_stopping
            if (early_stopping.enabled
                    and self.state.evaluations_without_improvement >= early_stopping.patience):
                limit = (f"early stopping: no improvement over {early_stopping.patience} evaluations "
                         f"(best {self.config.callbacks.monitor.metric} {self.state.best_value:.5g} at step "
                         f"{self.state.best_step})")
            if self.evaluation_stop is not None:  # rank 0 asks (a study's storage: paused watchdog), all ranks hear
                with watchdog.paused("pruning"):
                    monitored = means[self.config.callbacks.monitor.metric]
                    reason = self.evaluation_stop(step, monitored) if self.dist.is_main else ""
                    limit = limit or self.dist.broadcast_object(reason)
            evaluation.final = bool(limit)
            # metrics.h5 (flushed), the task's plots, the user's callbacks and the loggers
            self.callbacks.call("on_validation_end", EvaluationEnded(step=step, evaluation=evaluation, means=means,
                                                                     best_step=self.state.best_step,
                                                                     improved=improved))
            if self.dist.is_main:
                shown = ", ".join(f"{name} {value:.5g}" for name, value in means.items() if "." not in name)
                log.info("step %d: validation %s (best %s %.5g at step %d)", step, shown,
                         self.config.callbacks.monitor.metric, self.state.best_value, self.state.best_step)
        if limit:
            self._stop(limit)
            if self.dist.is_main:
                log.info("training finished at step %d: %s", step, limit)
        checkpointed = bool(self.state.finished or result.stop_requested or step % checkpoint_cfg.every_steps == 0
                            or step in checkpoint_cfg.keep_steps or (improved and checkpoint_cfg.keep_best))
        if checkpointed:
            self.save_checkpoint()
            self.callbacks.call("on_checkpoint", CheckpointView(
                step=step, path=self.checkpoints.path_of(step), best_step=self.state.best_step))
        return evaluated or checkpointed
