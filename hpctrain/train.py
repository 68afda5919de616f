"""The training loop: one explicit optimizer step (`train_step`), validation, early stopping, and the
bookkeeping that makes a run resumable bit for bit (checkpoint state, RNG states, sampler position).

Every decision that ends or changes the loop (max steps, early stopping, a non-finite loss, a stop request) is
computed from values that are identical on all ranks (all-reduced step statistics, all-gathered validation
losses), so the ranks never disagree about what happens next and never deadlock in a collective.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hpctrain.checkpoint import CheckpointManager
from hpctrain.config import Config, ConfigError, to_json
from hpctrain.data import (DistributedBatchSampler, HDF5BatchDataset, ShardSampler, Split, make_loader,
                           resolve_num_workers, stop_loader_workers)
from hpctrain.distributed import DistributedContext, available_cpus
from hpctrain.metrics import METRICS_FILENAME, MetricsCursor, MetricsWriter, plot_run
from hpctrain.optim import build_parameter_groups
from hpctrain.tasks.base import Task
from hpctrain import watchdog

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or the gradient norm was NaN/Inf (trainer.nonfinite=stop)."""


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # steps done in `epoch`
    best_loss: float = math.inf
    best_step: int = 0
    evaluations_without_improvement: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    finished: bool = False
    stop_reason: str = ""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    num_samples: int
    nonfinite: bool
    stop_requested: bool


def capture_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": {"version": python_state[0], "state": list(python_state[1]), "gauss": python_state[2]},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, *, config: Config, run_dir: Path, dist: DistributedContext, task: Task, split: Split,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.run_dir = run_dir
        self.dist = dist
        self.task = task
        self.split = split
        self.device = dist.device
        # Polled once per step and all-reduced with the step statistics (the SLURM signal handler sets it).
        self.stop_requested = stop_requested
        trainer_cfg = config.trainer

        cpus_per_rank = max(1, available_cpus() // dist.local_world_size)
        torch.set_num_threads(trainer_cfg.num_threads or cpus_per_rank)
        if trainer_cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        seed_everything(config.seed)  # identical initial weights on every rank, and across restarts
        self.model = task.build_model().to(self.device)
        self.sampler = DistributedBatchSampler(
            split.train_indices, micro_batch_size=trainer_cfg.micro_batch_size,
            num_microbatches=trainer_cfg.num_microbatches, rank=dist.rank, world_size=dist.world_size,
            seed=config.seed, block_size=config.data.block_size if config.data.shuffle == "blocks" else 1)
        # Before DDP wraps the model: frozen groups must be frozen when DDP records which parameters get gradients.
        self.groups = build_parameter_groups(self.model, config.optim, max_steps=trainer_cfg.max_steps,
                                             steps_per_epoch=self.sampler.steps_per_epoch)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp_model: nn.Module = (DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                             if self.device.type == "cuda" else None)
                                     if dist.is_distributed else self.model)

        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer_cfg.precision)
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=trainer_cfg.precision == "fp16")

        num_workers = resolve_num_workers(config.data, cpus_per_rank)
        pin_memory = config.data.pin_memory and self.device.type == "cuda"
        data_keys = {"images_key": config.data.images_key, "labels_key": config.data.labels_key}
        self.train_loader = make_loader(HDF5BatchDataset(split.train_path, **data_keys), self.sampler,
                                        config=config.data, num_workers=num_workers, pin_memory=pin_memory)
        val_batch_size = config.data.val_batch_size or trainer_cfg.micro_batch_size
        self.val_loader = make_loader(
            HDF5BatchDataset(split.val_path, **data_keys),
            ShardSampler(split.val_indices, batch_size=val_batch_size, rank=dist.rank, world_size=dist.world_size),
            config=config.data, num_workers=num_workers, pin_memory=pin_memory)

        self.checkpoints = CheckpointManager(run_dir, keep_last=config.callbacks.checkpoint.keep_last,
                                             keep_steps=config.callbacks.checkpoint.keep_steps)
        self.state = TrainState()
        self.metrics: MetricsWriter | None = None
        log.info("rank %d: %d training / %d validation samples, global batch %d (%d x %d micro-batches x %d "
                 "ranks), %d steps per epoch, %d loader workers, %d threads", dist.rank, len(split.train_indices),
                 len(split.val_indices), self.sampler.global_batch_size, trainer_cfg.micro_batch_size,
                 trainer_cfg.num_microbatches, dist.world_size, self.sampler.steps_per_epoch, num_workers,
                 torch.get_num_threads())

    # -- the optimizer step ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self, microbatches: list[dict[str, torch.Tensor]], *, num_samples: int) -> StepResult:
        """One optimizer step over this rank's micro-batches; `num_samples` counts the step's samples on all ranks.

        Gradients are all-reduced only by the last micro-batch (the others run under DDP's no_sync). Each
        micro-batch's loss is its per-sample loss sum divided by the global sample count (times the world size,
        which DDP's gradient averaging divides out again), so the update equals that of one big batch, also for
        the shorter last step of an epoch.
        """
        loss_scale = self.dist.world_size / num_samples
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        last = len(microbatches) - 1
        for index, batch in enumerate(microbatches):
            is_last = index == last
            empty = batch["inputs"].shape[0] == 0
            if empty and not is_last:
                continue  # nothing to add, and no all-reduce to take part in
            sync = is_last or not self.dist.is_distributed
            with nullcontext() if sync else self.ddp_model.no_sync():
                inputs = batch["inputs"].to(self.device, non_blocking=True)
                targets = batch["targets"].to(self.device, non_blocking=True)
                if empty:
                    # This rank has no sample in the step's tail but must join the gradient all-reduce:
                    # a zero-weighted forward pass contributes exactly zero gradient.
                    inputs = torch.zeros((1, *inputs.shape[1:]), device=self.device)
                    targets = torch.zeros((1, *targets.shape[1:]), device=self.device)
                with self._autocast():
                    per_sample = self.task.per_sample_loss(self.ddp_model(inputs), targets)
                weighted = per_sample.sum() * (0.0 if empty else loss_scale)
                self.grad_scaler.scale(weighted).backward()
            if not empty:
                loss_sum += per_sample.detach().sum()

        for group in self.groups:
            self.grad_scaler.unscale_(group.optimizer)
        max_norm = self.config.optim.clip_grad_norm
        # The gradients are already all-reduced, so the norm (and the decision below) is the same on all ranks.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters,
                                                   max_norm if max_norm is not None else math.inf)

        # One small all-reduce per step: the loss for the metrics, and flags every rank must agree on.
        stats = torch.stack([loss_sum, torch.tensor(float(self.stop_requested()), dtype=torch.float64,
                                                    device=self.device)])
        self.dist.all_reduce_sum(stats)
        loss = stats[0].item() / num_samples
        grad_norm_value = grad_norm.item()
        nonfinite = not (math.isfinite(loss) and (math.isfinite(grad_norm_value) or self.grad_scaler.is_enabled()))

        if not nonfinite:
            for group in self.groups:
                self.grad_scaler.step(group.optimizer)  # skips the update itself if fp16 gradients overflowed
            self.grad_scaler.update()
        for group in self.groups:
            group.optimizer.zero_grad(set_to_none=True)
            group.scheduler.step()  # the step counts even when skipped: its data was consumed
        return StepResult(loss=loss, grad_norm=grad_norm_value, num_samples=num_samples, nonfinite=nonfinite,
                          stop_requested=stats[1].item() > 0)

    # -- validation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> tuple[float, np.ndarray]:
        """Per-sample validation losses of the whole validation set (all ranks' shards, in index order)."""
        self.model.eval()
        losses = []
        for batch in self.val_loader:
            with self._autocast():
                outputs = self.model(batch["inputs"].to(self.device, non_blocking=True))
            losses.append(self.task.per_sample_loss(outputs, batch["targets"].to(self.device)).float().cpu())
        self.model.train()
        local = torch.cat(losses).numpy() if losses else np.empty(0, dtype=np.float32)
        per_sample = np.concatenate(self.dist.all_gather_object(local))
        return float(np.mean(per_sample, dtype=np.float64)), per_sample

    def _update_early_stopping(self, loss: float) -> bool:
        """Record an evaluation; True if it is the best so far."""
        settings = self.config.callbacks.early_stopping
        improved = loss < self.state.best_loss - settings.min_delta
        if improved:
            self.state.best_loss, self.state.best_step = loss, self.state.step
            self.state.evaluations_without_improvement = 0
        else:
            self.state.evaluations_without_improvement += 1
        return improved

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: every rank contributes its RNG state; rank 0 writes."""
        rng_states = self.dist.all_gather_object(capture_rng_state())
        if not self.dist.is_main:
            return
        assert self.metrics is not None
        self.metrics.flush()  # the cursor below must describe rows that are on disk
        state = {
            "format_version": 1,
            "step": self.state.step,
            "finished": self.state.finished,
            "train_state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizers": [group.optimizer.state_dict() for group in self.groups],
            "schedulers": [group.scheduler.state_dict() for group in self.groups],
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
        self.checkpoints.save(self.state.step, state, protected_steps=protected)

    def resume(self) -> MetricsCursor | None:
        """Load the newest intact checkpoint of the run directory, if any; returns its metrics cursor."""
        info = None
        if self.dist.is_main:
            self.checkpoints.remove_stale_temporaries()
            info = self.checkpoints.newest_valid()
        info = self.dist.broadcast_object(info)
        if info is None:
            log.info("no checkpoint in %s: starting from step 0", self.checkpoints.directory)
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
        self.model.load_state_dict(state["model"])
        for group, optimizer_state, scheduler_state in zip(self.groups, state["optimizers"], state["schedulers"]):
            group.optimizer.load_state_dict(optimizer_state)
            group.scheduler.load_state_dict(scheduler_state)
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.state = TrainState(**state["train_state"])
        if state["world_size"] != self.dist.world_size:
            log.warning("resuming a %d-rank run on %d ranks: same samples per step, but per-rank random streams "
                        "differ, so the result is not bitwise that of the original layout",
                        state["world_size"], self.dist.world_size)
        restore_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
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

    def _learning_rates(self) -> list[float]:
        return [group.optimizer.param_groups[0]["lr"] for group in self.groups]

    def fit(self) -> TrainState:
        """Train until a limit, early stopping or a stop request; resumes from the run directory first."""
        cursor = self.resume()
        if self.state.finished and (self.state.stop_reason.startswith("early stopping") or self._limit_reached()):
            log.info("run %s already finished at step %d (%s): nothing to do", self.run_dir, self.state.step,
                     self.state.stop_reason)
            return self.state
        self.state.finished, self.state.stop_reason = False, ""
        if self.dist.is_main:
            self.metrics = MetricsWriter(
                self.run_dir / METRICS_FILENAME, parameter_groups=[group.name for group in self.groups],
                validation_sample_index=self.split.val_indices, config_json=to_json(self.config),
                metric_name=self.task.metric_name, cursor=cursor)
        try:
            with watchdog.stepping():
                self._loop()
        finally:
            stop_loader_workers()
            if self.metrics is not None:
                self.metrics.close()
        if self.dist.is_main and self.state.finished and self.config.callbacks.metrics.plots:
            plot_run(self.run_dir)
        return self.state

    def _loop(self) -> None:
        trainer_cfg = self.config.trainer
        callbacks = self.config.callbacks
        progress = tqdm(total=trainer_cfg.max_steps, initial=self.state.step, desc="train", unit="step",
                        disable=not (self.dist.is_main and trainer_cfg.progress_bar), dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)
        batches = None
        while not self._limit_reached():
            step_started = time.perf_counter()  # throughput counts data loading, not evaluation or checkpoints
            if batches is None:
                self.sampler.set_position(self.state.epoch, self.state.step_in_epoch)
                batches = iter(self.train_loader)
            microbatches = [next(batches) for _ in range(trainer_cfg.num_microbatches)]
            learning_rates = self._learning_rates()
            result = self.train_step(microbatches,
                                     num_samples=self.sampler.samples_in_step(self.state.step_in_epoch))

            self.state.step += 1
            self.state.step_in_epoch += 1
            watchdog.beat(self.state.step)
            epoch = self.state.epoch
            if self.state.step_in_epoch == self.sampler.steps_per_epoch:
                self.state.epoch, self.state.step_in_epoch, batches = self.state.epoch + 1, 0, None
            if result.nonfinite:
                self.state.nonfinite_steps += 1
                self.state.consecutive_nonfinite_steps += 1
            else:
                self.state.consecutive_nonfinite_steps = 0

            samples_per_second = result.num_samples / max(time.perf_counter() - step_started, 1e-9)
            if self.metrics is not None:
                self.metrics.log_step(step=self.state.step, epoch=epoch, loss=result.loss,
                                      grad_norm=result.grad_norm, samples_per_second=samples_per_second,
                                      nonfinite=result.nonfinite, learning_rates=learning_rates)
                if self.state.step % callbacks.metrics.flush_every_steps == 0:
                    self.metrics.flush()
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4g}", lr=f"{learning_rates[0]:.3g}",
                                 samples_per_s=f"{samples_per_second:.0f}", refresh=False)

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

            with watchdog.paused("evaluation and checkpoint"):
                self._after_step(result)
            if self.state.finished or result.stop_requested:
                break
        progress.close()

    def _after_step(self, result: StepResult) -> None:
        """Evaluate, decide whether to stop, and checkpoint, in that order."""
        checkpoint_cfg = self.config.callbacks.checkpoint
        step = self.state.step
        limit = self._limit_reached()
        improved = False
        if step % self.config.trainer.val_every_steps == 0 or limit:
            loss, per_sample = self.validate()
            improved = self._update_early_stopping(loss)
            if self.metrics is not None:
                self.metrics.log_validation(step=step, loss=loss, per_sample_loss=per_sample)
            if self.dist.is_main:
                log.info("step %d: validation %s %.5g (best %.5g at step %d)", step, self.task.metric_name, loss,
                         self.state.best_loss, self.state.best_step)
            early_stopping = self.config.callbacks.early_stopping
            if (early_stopping.enabled
                    and self.state.evaluations_without_improvement >= early_stopping.patience):
                limit = (f"early stopping: no improvement over {early_stopping.patience} evaluations "
                         f"(best {self.state.best_loss:.5g} at step {self.state.best_step})")
        if limit:
            self.state.finished, self.state.stop_reason = True, limit
            if self.dist.is_main:
                log.info("training finished at step %d: %s", step, limit)
        if (limit or result.stop_requested or step % checkpoint_cfg.every_steps == 0
                or step in checkpoint_cfg.keep_steps or (improved and checkpoint_cfg.keep_best)):
            self.save_checkpoint()
