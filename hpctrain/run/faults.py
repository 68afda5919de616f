"""What the loop does when data, numbers or the disk go bad mid-run: a step whose loss or gradient is not finite
(`nonfinite_stop`, `nonfinite_weights_refused`), a batch that cannot be read (`MicrobatchReader`,
`data_fault_stop`), a checkpoint or
metrics write that fails (`disk_stop`). Each logs one line that names the culprit and says what is kept; a stop
reason starts with one of run.state's NONFINITE_STOP, DATA_FAULT_STOP, DISK_STOP, which the launcher reports as a
failed run (docs/your-own-model.md, "When data is bad").
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from hpctrain.config import TrainerConfig
from hpctrain.data.dataset import DataReadError
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.contract import Batch
from hpctrain.run.evaluate import describe_samples
from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.state import DATA_FAULT_STOP, DISK_STOP, NONFINITE_STOP, TrainState, weights_finite
from hpctrain.run.step import StepResult

log = logging.getLogger("hpctrain.run.trainer")

# The exit status of a rank of a multi-rank run that could not read its batch and had no stand-in to join the
# others' step with (MicrobatchReader): the launcher or SLURM ends the others, which wait in its collectives.
DATA_FAULT_EXIT = 3


def nonfinite_stop(result: StepResult, state: TrainState, trainer: TrainerConfig, dataset: Any) -> str:
    """Log a skipped, non-finite step and its culprits; the stop reason under trainer.nonfinite=stop (or after
    trainer.max_consecutive_nonfinite in a row), else "". The update was not applied, so a checkpoint written at
    the stop holds the last good weights."""
    where = describe_samples(result.nonfinite_samples, dataset) or "no sample's loss is NaN"
    log.warning("step %d: non-finite loss %s or gradient norm %s; update skipped (%d so far): %s", state.step,
                result.loss, result.grad_norm, state.nonfinite_steps, where)
    if trainer.nonfinite != "stop" and state.consecutive_nonfinite_steps < trainer.max_consecutive_nonfinite:
        return ""
    return (f"{NONFINITE_STOP} {result.loss} / gradient norm {result.grad_norm} at step {state.step} "
            f"({state.consecutive_nonfinite_steps} consecutive non-finite steps, trainer.nonfinite="
            f"{trainer.nonfinite}): {where}")


def nonfinite_weights_refused(model: nn.Module, step: int, checkpoints: CheckpointManager) -> bool:
    """True (and logged) if the weights hold NaN/Inf, which happens only when gradients are not checked (a
    non-finite gradient under a finite loss was applied): such a checkpoint is never written, so that pruning
    (keep_last) can never remove the last good checkpoint for a bad one."""
    if weights_finite(model):
        return False
    log.error("step %d: the model's weights are NaN/Inf (a non-finite gradient under a finite loss was applied; "
              "optim.track_grad_norm=true or optim.clip_grad_norm skips such updates): checkpoint not written, the "
              "newest in %s is the last good one", step, checkpoints.directory)
    return True


def disk_stop(error: OSError, step: int, checkpoints: CheckpointManager) -> str:
    """The stop reason of a checkpoint or metrics write that failed (ENOSPC, a quota, an I/O error), logged as one
    line naming the newest intact checkpoint, which stays the one to resume from."""
    newest = checkpoints.newest_valid()
    kept = f"the newest intact checkpoint is step {newest.step}" if newest else "no checkpoint was written yet"
    reason = f"{DISK_STOP} at step {step} in {checkpoints.run_dir}: {error.strerror or error}"
    log.error("%s; %s. Free space and run the same command to resume", reason, kept)
    return f"{reason}; {kept}"


def data_fault_stop(error: DataReadError | None, step: int, dist: DistributedContext) -> str:
    """The stop reason, the same on every rank, of a batch that could not be read before step `step + 1` (here:
    `error`, or on another rank: None), logged as one line by the rank that could not read it."""
    reason = f"{DATA_FAULT_STOP} before step {step + 1}: {error.reason}" if error is not None else ""
    if error is not None:
        log.error("%s; the run stops here (fix or remove the file, then run the same command to resume)", reason)
    if dist.is_distributed:  # the first rank's that could not read (every rank steps to the same boundary)
        reason = next(found for found in dist.all_gather_object(reason) if found)
    return reason


class MicrobatchReader:
    """A step's micro-batches from the loader, timed as the step's data wait. If one cannot be read, the rank does
    not leave its peers waiting in the step's collectives: it steps on zero-weighted stand-ins, its last micro-batch
    read (or the first validation batch), with the step's unreadable flag up, so every rank skips the update and
    stops at the same boundary with a checkpoint. With no stand-in to be had, a multi-rank run's rank ends with
    DATA_FAULT_EXIT (the launcher or SLURM ends the others); one rank needs none (no step to join).

    Every rank's step has then run a forward pass, which may have drawn from torch's generators (dropout): on
    several ranks their state at the step's start is kept (torch.get_rng_state, ~2 us a step) and `rewind` puts
    it back, so the checkpoint is that of the boundary and the resumed run is bit-exact. numpy's and Python's
    generators are not kept (a model's forward rarely draws from them; ~0.1 ms a step)."""

    def __init__(self, clock: Any, val_loader: Iterable[Batch], dist: DistributedContext) -> None:
        self.clock, self.val_loader, self.dist = clock, val_loader, dist
        self.last: Batch | None = None
        self._rng: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, batches: Iterator[Batch],
                 sizes: list[int]) -> tuple[list[Batch], list[int], DataReadError | None]:
        """The micro-batches, their `sizes` and None; or stand-ins (none on one rank), their sizes (0: weighted by
        zero) and the error."""
        self.clock.data_started()
        if self.dist.is_distributed:
            device = self.dist.device
            self._rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            microbatches = [next(batches) for _ in sizes]
            self.last = microbatches[0]
            error = None
        except DataReadError as raised:
            error, microbatches = raised, self._stand_ins(len(sizes), raised) if self.dist.is_distributed else []
            sizes = [0] * len(microbatches)
        self.clock.data_done()
        return microbatches, sizes, error

    def rewind(self) -> None:
        """Put torch's generators back to their state at the start of the step that was not applied."""
        if self._rng is not None:
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1], self.dist.device)

    def _stand_ins(self, count: int, error: DataReadError) -> list[Batch]:
        stand_in = self.last
        if stand_in is None:  # the first step of this process
            try:
                stand_in = next(iter(self.val_loader))
            except (DataReadError, StopIteration):
                log.error("%s before the next step: %s; no batch of this rank is readable to join the other "
                          "ranks' step with, so this rank ends (fix or remove the file, then run the same command "
                          "to resume)", DATA_FAULT_STOP, error.reason)
                raise SystemExit(DATA_FAULT_EXIT) from None
        return [stand_in] * count
