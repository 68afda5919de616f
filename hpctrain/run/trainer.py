"""The training loop: one explicit optimizer step (`train_step`), validation, early stopping, and the
bookkeeping that makes a run resumable bit for bit (checkpoint state, RNG states, sampler position).

Every decision that ends or changes the loop (max steps, early stopping, a non-finite loss, a stop request) is
computed from values that are identical on all ranks (all-reduced step statistics, all-gathered validation
losses), so the ranks never disagree about what happens next and never deadlock in a collective.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpctrain.run.breakdown import StepClock
from hpctrain.callbacks import Callbacks, CheckpointView, RunView
from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.compile import compile_model
from hpctrain.run.contract import Batch, Components, model_inputs, per_sample_components
from hpctrain.config import Config, ConfigError, to_dict, to_json
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler, ShardSampler
from hpctrain.data.loader import make_loader, resolve_num_workers, stop_loader_workers
from hpctrain.process.distributed import DistributedContext, available_cpus
from hpctrain.run.evaluate import Evaluation, Evaluator, autocast_for
from hpctrain.run.fine_tune import initialise_from
from hpctrain.run.freeze import FreezeSchedule, Phase, apply_phase
from hpctrain.run.metrics import MetricsCursor
from hpctrain.run.step import StepResult
from hpctrain.run.observers import EvaluationEnded, MetricsRecorder, RunEnded, StepEnded, build_observers
from hpctrain.process import watchdog
from hpctrain.optim import build_parameter_groups
from hpctrain.run.resume_check import check_checkpoint_fits
from hpctrain.process.seeding import capture_rng_state, configure_determinism, restore_rng_state
from hpctrain.transforms import apply_device_transforms

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or the gradient norm was NaN/Inf (trainer.nonfinite=stop)."""


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # steps done in `epoch`
    best_loss: float = math.inf  # the validation loss at best_step
    best_step: int = 0
    # The best validation mean of callbacks.monitor so far (NaN: none yet; checkpoints from before it have none).
    best_value: float = math.nan
    evaluations_without_improvement: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    finished: bool = False
    stop_reason: str = ""


class Trainer:
    """Trains the components built from the config (hpctrain.components) as one rank of `dist`."""

    def __init__(self, *, config: Config, run_dir: Path, dist: DistributedContext, components: Components,
                 stop_requested: Callable[[], bool] = lambda: False,
                 evaluation_stop: Callable[[int, float], str] | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.dist = dist
        self.split = split = components.split
        self.loss = components.loss
        self.device_transforms = components.device_transforms
        self.record_train_samples = config.callbacks.metrics.per_sample_train
        self.inputs = list(config.task.inputs)
        self.device = dist.device
        # Polled once per step and all-reduced with the step statistics (the SLURM signal handler sets it).
        self.stop_requested = stop_requested
        # Rank 0's judge of each evaluation (step, monitored mean) -> a stop reason or "" (hpctrain.tune_worker's
        # pruning); a trainer-level stop like early stopping, its decision broadcast so all ranks stop together.
        self.evaluation_stop = evaluation_stop
        trainer_cfg = config.trainer

        cpus_per_rank = max(1, available_cpus() // dist.local_world_size)
        torch.set_num_threads(trainer_cfg.num_threads or cpus_per_rank)
        configure_determinism(trainer_cfg.deterministic)

        # Built right after seeding (components.build_components): identical initial weights on every rank.
        self.model = components.model.to(self.device)
        # What forward passes call: the model itself, or with trainer.compile a compiled module sharing its
        # parameters (state dicts, freezing and the optimizers keep using self.model).
        self.compiled_model = compile_model(self.model, trainer_cfg.compile)
        self.sampler = DistributedBatchSampler(
            split.train_indices, micro_batch_size=trainer_cfg.micro_batch_size,
            num_microbatches=trainer_cfg.num_microbatches, rank=dist.rank, world_size=dist.world_size,
            seed=config.seed, block_size=config.data.block_size if config.data.shuffle == "blocks" else 1)
        # Before DDP wraps the model: frozen groups must be frozen when DDP records which parameters get gradients.
        self.freeze = FreezeSchedule(config.optim.freeze, steps_per_epoch=self.sampler.steps_per_epoch)
        self.groups = build_parameter_groups(self.model, config.optim, max_steps=trainer_cfg.max_steps,
                                             steps_per_epoch=self.sampler.steps_per_epoch,
                                             phase_factor=self.freeze.lr_factor if self.freeze.enabled else None,
                                             monitor=config.callbacks.monitor.metric,
                                             monitor_mode=config.callbacks.monitor.mode)
        # Groups with a torch scheduler (schedule.scheduler), stepped after steps, epochs or evaluations.
        self.scheduled_groups = [group for group in self.groups if group.scheduler is not None]
        self.always_frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        self.phase: Phase | None = None
        self.ddp_model: nn.Module = self.compiled_model
        self._enter_phase(self.freeze.phase(0))

        self._autocast = autocast_for(self.device, trainer_cfg.precision)
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=trainer_cfg.precision == "fp16")
        self._scaling = self.grad_scaler.is_enabled()
        self._output_gradients: dict[tuple[float, torch.dtype], torch.Tensor] = {}  # see _backward
        # Each update's gradient is checked for NaN/Inf (a clipped or tracked norm, or fp16's scaler), so the
        # weights stay finite; otherwise save_checkpoint checks the weights themselves.
        self.gradients_checked = (config.optim.clip_grad_norm is not None or config.optim.track_grad_norm
                                  or self._scaling)

        train_reader = BatchReader(split.train_dataset, transforms=components.transforms, seed=config.seed,
                                   stage="train")
        num_workers = resolve_num_workers(config.data, cpus_per_rank, reader=train_reader,
                                          indices=split.train_indices, batch_size=trainer_cfg.micro_batch_size)
        pin_memory = config.data.pin_memory and self.device.type == "cuda"
        self.train_loader = make_loader(train_reader, self.sampler, config=config.data, num_workers=num_workers,
                                        pin_memory=pin_memory)
        val_batch_size = config.data.val_batch_size or trainer_cfg.micro_batch_size
        self.val_loader = make_loader(
            BatchReader(split.val_dataset, transforms=components.transforms, seed=config.seed, stage="validation"),
            ShardSampler(split.val_indices, batch_size=val_batch_size, rank=dist.rank, world_size=dist.world_size),
            config=config.data, num_workers=num_workers, pin_memory=pin_memory)

        self.evaluator = Evaluator(inputs=self.inputs, loss=self.loss, metrics=components.metrics, dist=dist,
                                   device=self.device, autocast=self._autocast, gather=config.task.gather,
                                   on_cpu=config.task.evaluate_on_cpu,
                                   device_transforms=components.device_transforms, seed=config.seed)
        self.plot = components.plot  # the task's plot hook (rank 0 draws it: hpctrain.observers.TaskPlots)
        self.checkpoints = CheckpointManager(run_dir, keep_last=config.callbacks.checkpoint.keep_last,
                                             keep_steps=config.callbacks.checkpoint.keep_steps)
        self.state = TrainState()
        # Where each step's time goes, into rank 0's metrics rows (hpctrain.breakdown); marks only, no device sync.
        self.clock = StepClock(self.device, enabled=dist.is_main)
        # What watches the run, built by fit once it knows where it resumes (hpctrain.observers): the metrics
        # recorder (rank 0; its flush and cursor are part of the checkpoint protocol), the plots, the progress bar,
        # then the user's callbacks and the loggers (`watchers`: called with copies, never changing training).
        self.metrics: MetricsRecorder | None = None
        self.watchers = components.callbacks
        self.callbacks = Callbacks((), is_main=dist.is_main)  # nothing watches before fit
        log.info("rank %d: %d training / %d validation samples, global batch %d (%d x %d micro-batches x %d "
                 "ranks), %d steps per epoch, %d loader workers, %d threads", dist.rank, len(split.train_indices),
                 len(split.val_indices), self.sampler.global_batch_size, trainer_cfg.micro_batch_size,
                 trainer_cfg.num_microbatches, dist.world_size, self.sampler.steps_per_epoch, num_workers,
                 torch.get_num_threads())

    def _enter_phase(self, phase: Phase) -> None:
        """Freeze the phase's parameters and (re)wrap the model in DDP, which must know which parameters get
        gradients: every rank changes phase at the same step, so the new wrapper's set-up collectives match."""
        frozen = apply_phase(self.model, phase, always_frozen=self.always_frozen)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        if self.dist.is_distributed:
            self.ddp_model = self.compiled_model  # the old wrapper's reducer (and its autograd hooks) go first
            gc.collect()
            self.ddp_model = DistributedDataParallel(self.compiled_model, device_ids=[self.device.index]
                                                     if self.device.type == "cuda" else None)
        if self.phase is not None and self.dist.is_main:
            log.info("step %d: freeze phase %d, %d parameter tensors frozen, LR factor %g", self.state.step,
                     phase.index, len(frozen), phase.lr_factor)
        self.phase = phase

    # -- the optimizer step ----------------------------------------------------------------------------------
    def _per_sample_loss(self, outputs: object, batch: Batch) -> dict[str, torch.Tensor]:
        return per_sample_components(self.loss(outputs, batch), len(batch["index"]), key="task.loss")

    def _backward(self, batch_sum: torch.Tensor, scale: float) -> None:
        """Back-propagate `scale * batch_sum`."""
        if self._scaling:
            self.grad_scaler.scale(batch_sum * scale).backward()
            return
        # The scale as the output's gradient: the same gradients, bit for bit, without the product, its backward
        # node and backward's tensor of ones (ops cost a tiny model's step microseconds each). A step has at most
        # three scales (a full step, the last of an epoch, a stand-in's 0), made once.
        gradient = self._output_gradients.get((scale, batch_sum.dtype))
        if gradient is None:
            gradient = torch.tensor(scale, dtype=batch_sum.dtype, device=batch_sum.device)
            self._output_gradients[(scale, batch_sum.dtype)] = gradient
        batch_sum.backward(gradient)

    def train_step(self, microbatches: list[Batch], sizes: list[int], *, num_samples: int) -> StepResult:
        """One optimizer step over this rank's micro-batches; `sizes` are their sample counts (0: a stand-in that
        only joins the all-reduce), `num_samples` counts the step's samples on all ranks.

        Gradients are all-reduced only by the last micro-batch (the others run under DDP's no_sync). Each
        micro-batch's loss is its per-sample loss sum divided by the global sample count (times the world size,
        which DDP's gradient averaging divides out again), so the update equals that of one big batch, also for
        the shorter last step of an epoch.
        """
        self.clock.step_started()
        loss_scale = self.dist.world_size / num_samples
        sums: dict[str, torch.Tensor] = {}
        record = self.record_train_samples
        recorded: list[tuple[np.ndarray, np.ndarray]] = []
        last = len(microbatches) - 1
        for index, (batch, size) in enumerate(zip(microbatches, sizes)):
            sync = index == last or not self.dist.is_distributed
            with nullcontext() if sync else self.ddp_model.no_sync():
                if self.device.type != "cpu":
                    batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
                if self.device_transforms:  # the steps of an epoch never span two: its batches are this epoch's
                    batch = apply_device_transforms(self.device_transforms, batch, seed=self.config.seed,
                                                    stage="train", epoch=self.state.epoch)
                with self._autocast():
                    outputs = self.ddp_model(*model_inputs(batch, self.inputs))
                    components = self._per_sample_loss(outputs, batch)
                # Each op costs a tiny model's step several microseconds: one component is used as it is.
                per_sample = sum(components.values()) if len(components) > 1 else next(iter(components.values()))
                # At least float32: a half-precision sum would lose the loss's digits.
                batch_sum = per_sample.sum(dtype=torch.promote_types(per_sample.dtype, torch.float32))
                # A stand-in micro-batch is weighted by zero: exactly no gradient, but the all-reduce happens.
                self._backward(batch_sum, loss_scale if size else 0.0)
            for name, value in components.items():
                contribution = (batch_sum.detach() if len(components) == 1
                                else value.detach().sum(dtype=batch_sum.dtype))
                if not size:
                    contribution = contribution * 0.0
                sums[name] = sums[name] + contribution if name in sums else contribution
            if record and size:
                recorded.append((batch["index"].cpu().numpy(), per_sample.detach().float().cpu().numpy()))
        self.clock.backward_done()

        if self._scaling:
            for group in self.groups:
                self.grad_scaler.unscale_(group.optimizer)
        max_norm = self.config.optim.clip_grad_norm
        # The gradients are already all-reduced, so the norm (and the decision below) is the same on all ranks:
        # clipping's total norm, or (for the metrics and the non-finite check) each gradient's norm, combined on
        # the host; torch's total norm costs ~3x more (~0.1 ms of a tiny model's step on a CPU).
        norm_terms: list[torch.Tensor] = []
        if max_norm is not None:
            norm_terms = [torch.nn.utils.clip_grad_norm_(self.trainable_parameters, max_norm)]
        elif self.config.optim.track_grad_norm:
            norm_terms = list(torch._foreach_norm(
                [parameter.grad for parameter in self.trainable_parameters if parameter.grad is not None]))

        names = sorted(sums)
        stop = self.stop_requested()
        if self.dist.is_distributed:  # one small all-reduce per step: the loss sums and the stop flag
            stats = torch.stack([*(sums[name] for name in names), torch.tensor(float(stop), device=self.device)])
            self.dist.all_reduce_sum(stats)
            *totals, stop_flag = stats.tolist()  # the step's host sync
            stop = stop_flag > 0
            norms = torch.stack(norm_terms).tolist() if norm_terms else []
        else:
            values = torch.stack([*(sums[name] for name in names), *norm_terms]).tolist()  # the host sync
            totals, norms = values[:len(names)], values[len(names):]
        grad_norm = math.hypot(*norms) if norm_terms else math.nan
        means = {name: total / num_samples for name, total in zip(names, totals)}
        loss = sum(means.values())
        nonfinite = not (math.isfinite(loss) and (not norm_terms or math.isfinite(grad_norm) or self._scaling))

        if not nonfinite:
            for group in self.groups:
                if self._scaling:
                    self.grad_scaler.step(group.optimizer)  # skips the update itself if fp16 gradients overflowed
                else:
                    group.optimizer.step()
            if self._scaling:
                self.grad_scaler.update()
        for group in self.groups:
            group.optimizer.zero_grad(set_to_none=True)
        self.clock.step_done()
        result = StepResult(loss=loss, loss_components={name: value for name, value in means.items() if name},
                            grad_norm=grad_norm, num_samples=num_samples, nonfinite=nonfinite,
                            stop_requested=stop)
        if record:
            gathered = [pair for rank_pairs in self.dist.all_gather_object(recorded) for pair in rank_pairs]
            result.sample_index = np.concatenate([index for index, _ in gathered])
            result.sample_loss = np.concatenate([values for _, values in gathered])
        return result

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> Evaluation:
        """Per-sample validation values of the whole validation set (all ranks' shards, in index order): the loss,
        its named components (`loss.<name>`) and every metric."""
        return self.evaluator(self.compiled_model, self.val_loader, step=self.state.step)

    def _update_early_stopping(self, means: dict[str, float]) -> bool:
        """Record an evaluation's validation means; True if its monitored value (callbacks.monitor) is the best so
        far."""
        settings = self.config.callbacks.early_stopping
        monitor = self.config.callbacks.monitor
        value, best = means[monitor.metric], self.state.best_value
        better = value < best - settings.min_delta if monitor.mode == "min" else value > best + settings.min_delta
        improved = not math.isnan(value) and (math.isnan(best) or better)
        if improved:
            self.state.best_value, self.state.best_step = value, self.state.step
            self.state.best_loss = means["loss"]
            self.state.evaluations_without_improvement = 0
        else:
            self.state.evaluations_without_improvement += 1
        return improved

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: every rank contributes its RNG state; rank 0 writes."""
        rng_states = self.dist.all_gather_object(capture_rng_state(self.device))
        if not self.dist.is_main:
            return
        assert self.metrics is not None
        self.metrics.flush()  # the cursor below must describe rows that are on disk
        if not self.gradients_checked and not self._weights_finite():
            # Kept out, so that pruning (keep_last) can never remove the last good checkpoint for a bad one.
            log.error("step %d: the model's weights are NaN/Inf (a non-finite gradient under a finite loss was "
                      "applied; optim.track_grad_norm=true or optim.clip_grad_norm skips such updates): checkpoint "
                      "not written, the newest in %s is the last good one", self.state.step,
                      self.checkpoints.directory)
            return
        state = {
            "format_version": 1,
            "step": self.state.step,
            "finished": self.state.finished,
            "train_state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizers": [group.optimizer.state_dict() for group in self.groups],
            # Each group's torch scheduler (schedule.scheduler), None for a built-in schedule (a function of step).
            "schedulers": [None if group.scheduler is None else group.scheduler.state_dict() for group in self.groups],
            "parameter_groups": [group.name for group in self.groups],
            "grad_scaler": self.grad_scaler.state_dict(),
            "rng": rng_states,
            "metrics_cursor": asdict(self.metrics.cursor()),
            "world_size": self.dist.world_size,
            "global_batch_size": self.sampler.global_batch_size,
            "seed": self.config.seed,
            "config": to_json(self.config),
        }
        protected = {self.state.best_step} if self.config.callbacks.checkpoint.keep_best else set()
        if self.config.callbacks.checkpoint.asynchronous:
            self.checkpoints.save_async(self.state.step, state, protected_steps=protected)
        else:
            self.checkpoints.save(self.state.step, state, protected_steps=protected)

    def _weights_finite(self) -> bool:
        finite = [parameter.detach().isfinite().all() for parameter in self.model.parameters()
                  if parameter.is_floating_point()]
        return not finite or bool(torch.stack(finite).all())

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
        if state["global_batch_size"] != self.sampler.global_batch_size or state["seed"] != self.config.seed:
            raise ConfigError(
                f"cannot resume {self.run_dir}: its checkpoints were made with seed {state['seed']} and global "
                f"batch size {state['global_batch_size']}, this config has seed {self.config.seed} and global "
                f"batch size {self.sampler.global_batch_size} (micro_batch_size x num_microbatches x ranks); "
                f"use a new run directory")
        if state["parameter_groups"] != [group.name for group in self.groups]:
            raise ConfigError(f"cannot resume {self.run_dir}: parameter groups {state['parameter_groups']} "
                              f"became {[group.name for group in self.groups]}; use a new run directory")
        check_checkpoint_fits(state, self.config, self.model, run_dir=self.run_dir, checkpoint=info.path,
                              steps_per_epoch=self.sampler.steps_per_epoch)
        self.model.load_state_dict(state["model"])
        for group, optimizer_state in zip(self.groups, state["optimizers"]):
            group.optimizer.load_state_dict(optimizer_state)
        for group, scheduler_state in zip(self.groups, state.get("schedulers", [None] * len(self.groups))):
            if (group.scheduler is None) != (scheduler_state is None):
                raise ConfigError(f"cannot resume {self.run_dir}: parameter group {group.name!r}'s schedule changed "
                                  f"between a torch scheduler (schedule.scheduler) and a built-in one; use a new "
                                  f"run directory")
            if group.scheduler is not None:
                group.scheduler.load_state_dict(scheduler_state)
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.state = TrainState(**state["train_state"])
        monitor = self.config.callbacks.monitor
        if "best_value" not in state["train_state"] and (monitor.metric, monitor.mode) == ("loss", "min"):
            self.state.best_value = self.state.best_loss  # a checkpoint from before callbacks.monitor
        if state["world_size"] != self.dist.world_size:
            log.warning("resuming a %d-rank run on %d ranks: same samples per step, but per-rank random streams "
                        "differ, so the result is not bitwise that of the original layout",
                        state["world_size"], self.dist.world_size)
        restore_rng_state(state["rng"][self.dist.rank % len(state["rng"])], self.device)
        log.info("resumed from %s (step %d, epoch %d)", info.path, self.state.step, self.state.epoch)
        return MetricsCursor(**state["metrics_cursor"])

    # -- the loop --------------------------------------------------------------------------------------------
    def _limit_reached(self) -> str:
        trainer_cfg = self.config.trainer
        if self.state.step >= trainer_cfg.max_steps:
            return f"reached trainer.max_steps={trainer_cfg.max_steps}"
        if trainer_cfg.max_epochs is not None and self.state.epoch >= trainer_cfg.max_epochs:
            return f"reached trainer.max_epochs={trainer_cfg.max_epochs}"
        return ""

    def _set_learning_rates(self) -> list[float]:
        """The schedules' learning rates for the coming step (a skipped step counts: its data was consumed)."""
        return [group.set_learning_rates(self.state.step) for group in self.groups]

    def fit(self) -> TrainState:
        """Train until a limit, early stopping or a stop request; resumes from the run directory first."""
        cursor = self.resume()
        if self.state.finished and (self.state.stop_reason.startswith(("early stopping", "pruned"))
                                    or self._limit_reached()):
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
            self.checkpoints.close()
            best = self.checkpoints.path_of(self.state.best_step) if self.state.best_step else None
            self.callbacks.call("on_end", RunEnded(
                run_dir=self.run_dir, step=self.state.step, finished=self.state.finished,
                stop_reason=self.state.stop_reason, best_step=self.state.best_step, best_loss=self.state.best_loss,
                best_checkpoint=best if best and best.exists() else None, error=error))
        return self.state

    def _loop(self) -> None:
        trainer_cfg = self.config.trainer
        batches = None
        self.clock.restart()
        while not self._limit_reached():
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
            learning_rates = self._set_learning_rates()
            # The micro-batches are referenced by the step only: freed when it returns, their memory (likely still
            # in the CPU cache) takes the next step's.
            result = self.train_step(self._read_microbatches(batches, len(sizes)), sizes,
                                     num_samples=self.sampler.samples_in_step(self.state.step_in_epoch))

            self.state.step += 1
            self.state.step_in_epoch += 1
            watchdog.beat(self.state.step)
            epoch = self.state.epoch
            epoch_ended = self.state.step_in_epoch == self.sampler.steps_per_epoch
            if epoch_ended:
                self.state.epoch, self.state.step_in_epoch, batches = self.state.epoch + 1, 0, None
            for group in self.scheduled_groups:  # a skipped step counts, as for the built-in schedules
                group.after_step(epoch_ended=epoch_ended)
            if result.nonfinite:
                self.state.nonfinite_steps += 1
                self.state.consecutive_nonfinite_steps += 1
            else:
                self.state.consecutive_nonfinite_steps = 0

            samples_per_second = result.num_samples / max(time.perf_counter() - step_started, 1e-9)
            self.callbacks.call("on_step_end", StepEnded(step=self.state.step, epoch=epoch, result=result,
                                                         learning_rates=learning_rates,
                                                         samples_per_second=samples_per_second))

            if result.nonfinite:
                log.warning("step %d: non-finite loss %s or gradient norm %s; update skipped (%d so far)",
                            self.state.step, result.loss, result.grad_norm, self.state.nonfinite_steps)
                if trainer_cfg.nonfinite == "stop" or (self.state.consecutive_nonfinite_steps
                                                       >= trainer_cfg.max_consecutive_nonfinite):
                    if self.metrics is not None:
                        self.metrics.flush()
                    raise NonFiniteLossError(
                        f"loss {result.loss} / gradient norm {result.grad_norm} at step {self.state.step} "
                        f"({self.state.consecutive_nonfinite_steps} consecutive non-finite steps, "
                        f"trainer.nonfinite={trainer_cfg.nonfinite}); the last good checkpoint is kept in "
                        f"{self.checkpoints.directory}")

            after_step_started = time.perf_counter()
            if self._after_step(result):  # an evaluation or a checkpoint: time between steps, no step's
                self.clock.excluded(time.perf_counter() - after_step_started)
            if self.state.finished or result.stop_requested:
                break

    def _read_microbatches(self, batches: Iterator[Batch], count: int) -> list[Batch]:
        """The step's micro-batches from the loader, timed as the step's data wait."""
        self.clock.data_started()
        microbatches = [next(batches) for _ in range(count)]
        self.clock.data_done()
        return microbatches

    def _after_step(self, result: StepResult) -> bool:
        """Evaluate, decide whether to stop, and checkpoint, in that order; True if it evaluated or checkpointed."""
        checkpoint_cfg = self.config.callbacks.checkpoint
        step = self.state.step
        limit = self._limit_reached()
        improved = False
        evaluated = step % self.config.trainer.val_every_steps == 0 or bool(limit)
        if evaluated:
            with watchdog.paused("evaluation"):
                evaluation = self.validate()
            per_sample = evaluation.per_sample
            # The same on every rank: every rank gathered every sample's values (Evaluator).
            means = {name: float(np.mean(values, dtype=np.float64)) for name, values in per_sample.items()}
            improved = self._update_early_stopping(means)
            for group in self.scheduled_groups:  # before the checkpoint below, which must hold the new state
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
            self.state.finished, self.state.stop_reason = True, limit
            if self.dist.is_main:
                log.info("training finished at step %d: %s", step, limit)
        checkpointed = bool(limit or result.stop_requested or step % checkpoint_cfg.every_steps == 0
                            or step in checkpoint_cfg.keep_steps or (improved and checkpoint_cfg.keep_best))
        if checkpointed:
            with watchdog.paused("checkpoint"):
                self.save_checkpoint()
            self.callbacks.call("on_checkpoint", CheckpointView(
                step=step, path=self.checkpoints.path_of(step), best_step=self.state.best_step))
        return evaluated or checkpointed
