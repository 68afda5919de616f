"""What a config may change in a run directory that already holds checkpoints: checked by the launcher before a
run starts or is queued (`check_run_dir_continues`), and again by each rank when it resumes (hpctrain.run.trainer calls
`check_checkpoint_fits` with the checkpoint it loads).

- The newest checkpoint's model must load into the model this config builds: a changed architecture (another
  width, a layer more) is refused with the differing entries and shapes named, instead of a load_state_dict
  traceback once the job runs.
- A learning-rate schedule that takes its length from trainer.max_steps (`optim.schedule.total` unset) must not be
  re-stretched under a run that has already stepped along it: extending a run with a larger trainer.max_steps
  would make the LR jump at the first new step. The user chooses explicitly with `optim.schedule.total`: the old
  length continues the run's schedule, the new one stretches it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.config import Config, ConfigError
from hpctrain.optim import SCHEDULES_WITH_LENGTH, make_multiplier, schedule_length

if TYPE_CHECKING:
    from hpctrain.run.contract import Components

SHOWN_PER_KIND = 4  # differing model entries named per kind; the rest are counted


def model_differences(saved: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """What keeps `model.load_state_dict(saved)` from loading: entries with another shape, entries the
    checkpoint lacks, entries this model lacks (each named with its shape); [] when it loads."""
    now = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    before = {name: tuple(tensor.shape) for name, tensor in saved.items()}
    kinds = [("shape changed", [f"{name} {before[name]} -> {now[name]}" for name in now
                                if name in before and before[name] != now[name]]),
             ("not in the checkpoint", [f"{name} {now[name]}" for name in now if name not in before]),
             ("not in this model", [f"{name} {before[name]}" for name in before if name not in now])]
    differences = []
    for kind, entries in kinds:
        if entries:
            more = f" and {len(entries) - SHOWN_PER_KIND} more" if len(entries) > SHOWN_PER_KIND else ""
            differences.append(f"{kind}: {', '.join(entries[:SHOWN_PER_KIND])}{more}")
    return differences


def _schedules(optim: Any) -> list[tuple[str, str, Any]]:
    """(parameter group, config key, schedule) of each group, as hpctrain.optim builds them (a group without a
    schedule of its own follows optim.schedule); `optim` is the typed config or its JSON form."""
    def get(node: Any, name: str) -> Any:
        return node.get(name) if isinstance(node, Mapping) else getattr(node, name)

    found = [("default", "optim.schedule", get(optim, "schedule"))]
    for index, group in enumerate(get(optim, "param_groups") or []):
        own = get(group, "schedule")
        found.append((get(group, "name"), f"optim.param_groups[{index}].schedule" if own else "optim.schedule",
                      own or get(optim, "schedule")))
    return found


def schedule_change(saved_config: Mapping[str, Any], config: Config, *, step: int, steps_per_epoch: int) -> str:
    """'' if this config's LR schedules continue those of the checkpointed run (`saved_config`, its config as a
    dict) from `step` on; else one message: what would change and how to choose."""
    saved_max_steps = saved_config.get("trainer", {}).get("max_steps")
    saved_schedules = {group: schedule for group, _, schedule in _schedules(saved_config.get("optim", {}))}
    max_steps = config.trainer.max_steps
    for group, key, schedule in _schedules(config.optim):
        saved = saved_schedules.get(group)
        if (saved is None or saved_max_steps is None or schedule.total is not None
                or schedule.name not in SCHEDULES_WITH_LENGTH):
            continue  # a length chosen explicitly, or one that does not shape the schedule
        length = schedule_length(None, schedule.interval, max_steps=max_steps, steps_per_epoch=steps_per_epoch)
        saved_length = schedule_length(saved.get("total"), saved.get("interval", "step"), max_steps=saved_max_steps,
                                       steps_per_epoch=steps_per_epoch)
        if length == saved_length:
            continue
        new = make_multiplier(schedule, max_steps=max_steps, steps_per_epoch=steps_per_epoch, key=key)
        old = make_multiplier(dataclasses.replace(schedule, total=saved_length), max_steps=max_steps,
                              steps_per_epoch=steps_per_epoch, key=key)
        first = next((s for s in range(step, max_steps) if new(s) != old(s)), None)  # 0-based steps
        if first is None:
            continue  # e.g. still in the warm-up, which does not depend on the length
        group_config = next((g for g in config.optim.param_groups if g.name == group), None)
        lr = (group_config.lr if group_config is not None and group_config.lr else None) or config.optim.lr
        unit = f"{schedule.interval}s"
        before = f" from {lr * old(first - 1):.3g} at step {first}" if first > 0 else ""  # the LR it last had
        return (f"trainer.max_steps={max_steps}: this run was trained to step {step} on a {schedule.name} LR "
                f"schedule over {saved_length} {unit}; {key}.total is unset, so the schedule follows "
                f"trainer.max_steps and would be stretched over {length} {unit}: the learning rate would jump"
                f"{before} to {lr * new(first):.3g} at step {first + 1} (the run's schedule gives "
                f"{lr * old(first):.3g}). Set {key}.total={saved_length} to continue the run's schedule, or "
                f"{key}.total={length} to stretch it anyway, or use a new run directory for a new run with a schedule "
                f"of its own")
    return ""


def check_checkpoint_fits(state: Mapping[str, Any], config: Config, model: nn.Module, *, run_dir: Path,
                          checkpoint: Path, steps_per_epoch: int) -> None:
    """Refuse (ConfigError) a config that cannot continue the run the checkpoint `state` belongs to."""
    differences = model_differences(state["model"], model)
    if differences:
        raise ConfigError(f"model: cannot resume {run_dir} from {checkpoint.name}: the model this config builds "
                          f"differs from the checkpoint's ({'; '.join(differences)}); use the model config the run "
                          f"was made with (the checkpoint's `config`), or a new run directory")
    train_state = state.get("train_state", {})
    if "config" in state and not str(train_state.get("stop_reason", "")).startswith("early stopping"):
        problem = schedule_change(json.loads(state["config"]), config, step=int(state["step"]),
                                  steps_per_epoch=steps_per_epoch)
        if problem:
            raise ConfigError(problem)


def check_run_dir_continues(config: Config, components: Components, run_dir: Path) -> None:
    """Before a run starts or is queued: if `run_dir` holds a checkpoint, this config must be able to continue
    it. Reads the newest valid checkpoint (the one the run will resume from), its tensors only memory-mapped."""
    manager = CheckpointManager(run_dir, keep_last=config.callbacks.checkpoint.keep_last)
    info = manager.newest_valid()
    if info is None:
        return
    state = CheckpointManager.load_mapped(info)
    # The run's global batch size (a resume with another one is refused) fixes its steps per epoch.
    steps_per_epoch = math.ceil(len(components.split.train_indices) / state["global_batch_size"])
    check_checkpoint_fits(state, config, components.model, run_dir=run_dir, checkpoint=info.path,
                          steps_per_epoch=steps_per_epoch)
