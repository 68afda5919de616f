"""What the loop does when data, numbers or the disk go bad mid-run: a step whose loss or gradient is not finite
(`nonfinite_stop`, `nonfinite_weights_refused`), a batch that cannot be read (`data_fault_stop`), a checkpoint or
metrics write that fails (`disk_stop`). Each logs one line that names the culprit and says what is kept; a stop
reason starts with one of run.state's NONFINITE_STOP, DATA_FAULT_STOP, DISK_STOP, which the launcher reports as a
failed run (docs/your-own-model.md, "When data is bad").
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hpctrain.config import TrainerConfig
from hpctrain.data.dataset import DataReadError
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.evaluate import describe_samples
from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.state import DATA_FAULT_STOP, DISK_STOP, NONFINITE_STOP, TrainState, weights_finite
from hpctrain.run.step import StepResult

log = logging.getLogger("hpctrain.run.trainer")

# The exit status of a rank of a multi-rank run that could not read its batch (the launcher or SLURM ends the
# others, which wait in the step's collectives).
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


def data_fault_stop(error: DataReadError, step: int, dist: DistributedContext) -> str:
    """The stop reason of a batch that could not be read before step `step + 1`, logged as one line. On several
    ranks this rank ends with DATA_FAULT_EXIT instead (the others wait for it in a collective, so no checkpoint
    can be agreed); the newest checkpoint stays the one to resume from."""
    reason = f"{DATA_FAULT_STOP} before step {step + 1}: {error.reason}"
    log.error("%s; the run stops here (fix or remove the file, then run the same command to resume)", reason)
    if dist.is_distributed:
        raise SystemExit(DATA_FAULT_EXIT)
    return reason
