"""Building the user's components from their `_target_` nodes: the one place where the model, the datasets, the
loss, the metrics and the batch transforms are constructed (the composition root), and the checks that run
before anything is queued: every `_target_` imports, every constructor accepts its arguments, and one dry step
(forward, loss, backward on one real micro-batch, on CPU) shows that data, model and loss fit together.

The task contract (docs/your-own-model.md): a batch is a dict of named tensors (the core adds `index`, the sample
indices); `outputs = model(*[batch[name] for name in task.inputs])`; `loss(outputs, batch)` returns a per-sample
tensor of shape (batch,) or a dict of named per-sample components whose sum is the loss; each metric
`metric(outputs, batch)` returns a per-sample tensor (batch,).

Every error is a ConfigError whose message starts with the config key of the node at fault.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hpctrain.callbacks import HOOKS
from hpctrain.config import LOGGERS, CallbacksConfig, Config, ConfigError, DataConfig, is_target_node
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler, ShardSampler, make_split
from hpctrain.data.loader import make_loader, resolve_num_workers
from hpctrain.instantiate import build, first_line
from hpctrain.optim import build_parameter_groups
from hpctrain.process.distributed import DistributedContext, available_cpus
from hpctrain.process.seeding import configure_determinism, seed_everything
from hpctrain.run.averaging import WeightAveraging
from hpctrain.run.breakdown import StepClock
from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.compile import compile_model
from hpctrain.run.contract import Components, describe, model_inputs, per_sample_components
from hpctrain.run.evaluate import Evaluator
from hpctrain.run.freeze import FreezeSchedule
from hpctrain.run.step import TrainStep
from hpctrain.run.trainer import Trainer, TrainingParts
from hpctrain.transforms import apply_device_transforms

log = logging.getLogger(__name__)

# -- building --------------------------------------------------------------------------------------------------
def _target_nodes(value: Any, key: str) -> list[tuple[str, str]]:
    """(key, dotted path) of every `_target_` in a resolved config tree."""
    found = []
    if isinstance(value, Mapping):
        if isinstance(value.get("_target_"), str):
            found.append((key, value["_target_"]))
        for child_key, child in value.items():
            found += _target_nodes(child, f"{key}.{child_key}" if key else str(child_key))
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            found += _target_nodes(child, f"{key}[{index}]")
    return found


def _importable(path: str) -> str:
    """'' if the dotted path names an importable attribute, else why not."""
    module_path, _, attribute = path.rpartition(".")
    while module_path:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as error:
            if error.name and module_path.startswith(error.name) and "." in module_path:
                # maybe a class nested in a module (pkg.module.Class.method): try one level up
                module_path, _, parent = module_path.rpartition(".")
                attribute = f"{parent}.{attribute}"
                continue
            return f"cannot import {path!r} ({error})"
        except Exception as error:  # the user's module failed while importing
            return f"importing {module_path!r} for {path!r} failed: {type(error).__name__}: {first_line(error)}"
        target: Any = module
        for part in attribute.split("."):
            if not hasattr(target, part):
                return f"cannot import {path!r}: module {module_path!r} has no attribute {part!r}"
            target = getattr(target, part)
        return ""
    return f"{path!r} is not a dotted path (package.module.Name)"


def check_targets(config: Config) -> None:
    """Every `_target_` in the config imports (the user's package is installed in this environment)."""
    from hpctrain.config import to_dict

    for key, path in _target_nodes(to_dict(config), ""):
        problem = _importable(path)
        if problem:
            raise ConfigError(f"{key}._target_: {problem}; is the package that defines it installed in this "
                              f"environment (or on PYTHONPATH), also on the compute nodes (launcher.setup)?")


def _dataset_node(data: DataConfig, key: str) -> Any:
    """A validation/test node: a full `_target_` node, or keys that override the training dataset's node."""
    node = getattr(data, key)
    if node is None or is_target_node(node):
        return node
    return {**data.dataset, **node}


def dataset_node(data: DataConfig, key: str) -> Any:
    """The whole `_target_` node of `data.<key>` (dataset, val_dataset or test_dataset); None when it is null."""
    return data.dataset if key == "dataset" else _dataset_node(data, key)


def build_dataset(data: DataConfig, key: str) -> Dataset | None:
    node = dataset_node(data, key)
    if node is None:
        return None
    dataset = build(f"data.{key}", node)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigError(f"data.{key}: {type(dataset).__name__} is not a map-style dataset (it needs "
                          f"__len__ and __getitem__)")
    if len(dataset) == 0:
        raise ConfigError(f"data.{key}: {type(dataset).__name__} holds no samples")
    return dataset


def prepare_data(config: Config) -> None:
    """Run the data preparation hook (e.g. generate a missing synthetic file); on the launching machine only."""
    if config.data.prepare is not None:
        build("data.prepare", config.data.prepare)


def build_callbacks(config: CallbacksConfig) -> list[tuple[str, Any]]:
    """The user's callbacks and the loggers (checked: a logger's package is installed, with the pip command if
    not; a callback has at least one hook)."""
    callbacks: list[tuple[str, Any]] = []
    for index, node in enumerate(config.user):
        key = f"callbacks.user[{index}]"
        callback = build(key, node)
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            raise ConfigError(f"{key}: {type(callback).__name__} has none of the hooks {', '.join(HOOKS)}")
        callbacks.append((key, callback))
    return callbacks + build_loggers(config)


def build_loggers(config: CallbacksConfig) -> list[tuple[str, Any]]:
    """The loggers of callbacks.loggers, each in its LoggerFeed (checked as build_callbacks says)."""
    from hpctrain.loggers import Logger, LoggerFeed

    loggers: list[tuple[str, Any]] = []
    names: dict[str, str] = {}
    for index, node in enumerate(config.loggers):
        key = f"callbacks.loggers[{index}]"
        logger = build(key, {"_target_": LOGGERS[node]} if isinstance(node, str) else node)
        if not isinstance(logger, Logger):
            raise ConfigError(f"{key}: {type(logger).__name__} is not a hpctrain.loggers.Logger")
        try:
            logger.check()
        except ConfigError as error:
            raise ConfigError(f"{key}: {error}") from None
        if logger.name in names:  # each logger keeps its state in loggers/<name>.json
            raise ConfigError(f"{key}: a second logger named {logger.name!r} (also {names[logger.name]}); give it "
                              f"another `name`")
        names[logger.name] = key
        loggers.append((key, LoggerFeed(logger, key=key, close_timeout_s=config.logger_close_timeout_s,
                                        stop_timeout_s=config.logger_stop_timeout_s)))
    return loggers


def build_components(config: Config) -> Components:
    """The model (after seeding, so every rank and every restart starts from the same weights), the datasets and
    their split, the loss, the metrics and the transforms."""
    check_targets(config)
    train = build_dataset(config.data, "dataset")
    val = build_dataset(config.data, "val_dataset")
    test = build_dataset(config.data, "test_dataset")
    assert train is not None
    split = make_split(train, val, val_fraction=config.data.val_fraction)
    loss = build("task.loss", config.task.loss)
    metrics = {name: build(f"task.metrics.{name}", node) for name, node in config.task.metrics.items()}
    transforms = [build(f"data.transforms[{index}]", node) for index, node in enumerate(config.data.transforms)]
    plot = build("task.plot", config.task.plot) if config.task.plot is not None else None
    device_transforms = [build(f"task.device_transforms[{index}]", node)
                         for index, node in enumerate(config.task.device_transforms)]
    for key, function in [("task.loss", loss), *((f"task.metrics.{n}", f) for n, f in metrics.items()),
                          *([("task.plot", plot)] if plot is not None else []),
                          *((f"data.transforms[{i}]", t) for i, t in enumerate(transforms)),
                          *((f"task.device_transforms[{i}]", t) for i, t in enumerate(device_transforms))]:
        if not callable(function):
            raise ConfigError(f"{key}: {type(function).__name__} is not callable; use `_partial_: true` for a "
                              f"function that takes more arguments than (outputs, batch)")
    seed_everything(config.seed)
    model = build("model", config.model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {type(model).__name__} is not a torch.nn.Module")
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError(f"model: {type(model).__name__} has no trainable parameter")
    return Components(model=model, loss=loss, metrics=metrics, split=split, transforms=transforms,
                      test_dataset=test, plot=plot, device_transforms=device_transforms,
                      callbacks=build_callbacks(config.callbacks))


# -- the contract, checked --------------------------------------------------------------------------------------
def read_checked_batch(reader: BatchReader, indices: np.ndarray, inputs: list[str], *,
                       device_transforms: list[Any] = (), seed: int = 0, stage: str = "train") -> dict[str, Any]:
    """Samples `indices` read and put through the device transforms (on CPU), or one ConfigError naming what
    failed or which of the model's `inputs` the batch lacks: the dry step, prediction and export start with it."""
    try:
        batch = reader[indices]
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"data.dataset: reading samples {indices.tolist()[:4]}... failed: "
                          f"{type(error).__name__}: {first_line(error)}") from None
    if device_transforms:
        try:
            batch = apply_device_transforms(device_transforms, batch, seed=seed, stage=stage)
        except Exception as error:
            raise ConfigError(f"task.device_transforms: the batch {describe(batch)} failed: "
                              f"{type(error).__name__}: {first_line(error)}") from None
    missing = [name for name in inputs if name not in batch]
    if missing:
        raise ConfigError(f"task.inputs: the batch has no field {', '.join(map(repr, missing))}; its fields are "
                          f"{describe(batch)}")
    return batch


def dry_step(config: Config, components: Components) -> list[str]:
    """Forward, loss, backward and metrics on one real micro-batch, on CPU, so a mismatch between data, model
    and loss is refused now with the fields and shapes named, not after hours in a queue. Returns the names of
    the validation values (loss, loss.<component>, each metric or <metric>.<key>)."""
    split = components.split
    size = min(config.trainer.micro_batch_size, len(split.train_indices))
    reader = BatchReader(split.train_dataset, transforms=components.transforms, seed=config.seed)
    batch = read_checked_batch(reader, split.train_indices[:size], config.task.inputs,
                               device_transforms=components.device_transforms, seed=config.seed, stage="train")
    model = components.model
    model.train()
    try:
        outputs = model(*model_inputs(batch, config.task.inputs))
    except Exception as error:
        raise ConfigError(f"model: the dry step's forward pass model({describe(batch, config.task.inputs)}) "
                          f"failed: {type(error).__name__}: {first_line(error)}") from None
    try:
        terms = per_sample_components(components.loss(outputs, batch), size, key="task.loss")
    except Exception as error:
        raise ConfigError(f"task.loss: the dry step failed on outputs {_shape_of(outputs)} and batch "
                          f"{describe(batch)}: {type(error).__name__}: {first_line(error)}") from None
    total = sum(terms.values())
    if not torch.is_floating_point(total):
        raise ConfigError(f"task.loss returned {total.dtype}, not a floating-point tensor")
    try:
        total.sum().backward()
    except RuntimeError as error:
        raise ConfigError(f"task.loss: backward through the loss failed ({first_line(error)}); the loss must be "
                          f"differentiable in the model's outputs") from None
    model.zero_grad(set_to_none=True)
    model.eval()
    names = ["loss", *(f"loss.{name}" for name in terms if name)]
    with torch.no_grad():
        outputs = model(*model_inputs(batch, config.task.inputs))
        for name, metric in components.metrics.items():
            try:
                parts = per_sample_components(metric(outputs, batch), size, key=f"task.metrics.{name}")
                names += [f"{name}.{part}" if part else name for part in parts]
            except Exception as error:
                raise ConfigError(f"task.metrics.{name}: the dry step failed on outputs {_shape_of(outputs)} "
                                  f"and batch {describe(batch)}: {type(error).__name__}: "
                                  f"{first_line(error)}") from None
    model.train()
    log.info("dry step passed: model(%s) -> %s, loss components %s", describe(batch, config.task.inputs),
             _shape_of(outputs), sorted(name or "loss" for name in terms))
    return names


def check_monitored(config: Config, names: list[str] | None) -> None:
    """callbacks.monitor.metric and every schedule.monitor name a validation value: one of `names` (found by the
    dry step), or without a dry step loss, loss.<component> or <metric>[.<key>] of a task.metrics name."""
    schedules = [("optim.schedule", config.optim.schedule),
                 *((f"optim.param_groups[{index}].schedule", group.schedule)
                   for index, group in enumerate(config.optim.param_groups) if group.schedule is not None)]
    monitored = [("callbacks.monitor.metric", config.callbacks.monitor.metric),
                 *((f"{key}.monitor", schedule.monitor) for key, schedule in schedules
                   if schedule.monitor is not None)]
    for key, name in monitored:
        known = name in names if names is not None else (
            name == "loss" or name.startswith("loss.") or name.split(".")[0] in config.task.metrics)
        if not known:
            available = names if names is not None else ["loss", "loss.<component>", *config.task.metrics]
            raise ConfigError(f"{key}: {name!r} is not a validation value; available: {', '.join(available)}")


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shape_of(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_shape_of(v) for v in value) + ")"
    return type(value).__name__


def check_run_inputs(config: Config, *, prepare: bool) -> Components:
    """Everything the launcher checks before a run starts or is queued; returns the built components."""
    if prepare:
        prepare_data(config)
    components = build_components(config)
    if config.trainer.precision == "fp16" and config.trainer.device == "cpu":
        raise ConfigError("trainer.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    # Patterns match, and a torch scheduler's node builds around an optimizer?
    build_parameter_groups(components.model, config.optim, max_steps=1, steps_per_epoch=1,
                           monitor=config.callbacks.monitor.metric, monitor_mode=config.callbacks.monitor.mode)
    from hpctrain.run.freeze import check_schedule

    check_schedule(components.model, config.optim.freeze)
    if config.trainer.init_from.run is not None:
        from hpctrain.run.fine_tune import initial_weights

        initial_weights(components.model, config.trainer.init_from)  # the run, its checkpoint, patterns, shapes
    check_monitored(config, dry_step(config, components) if config.trainer.dry_step else None)
    return components



# -- a rank's trainer ----------------------------------------------------------------------------------------------
def build_trainer(config: Config, run_dir: Path, dist: DistributedContext, components: Components | None = None, *,
                  stop_requested: Callable[[], bool] = lambda: False,
                  evaluation_stop: Callable[[int, float], str] | None = None) -> Trainer:
    """The trainer of one rank, with every part it trains with built here: the components (seeded, so identical
    initial weights on every rank), the model on its device, the parameter groups and freeze schedule, the step,
    the sampler and loaders, the evaluator and the checkpoint manager."""
    components = components if components is not None else build_components(config)
    trainer_config = config.trainer
    cpus_per_rank = max(1, available_cpus() // dist.local_world_size)
    torch.set_num_threads(trainer_config.num_threads or cpus_per_rank)
    configure_determinism(trainer_config.deterministic)
    model = components.model.to(dist.device)
    sampler = DistributedBatchSampler(
        components.split.train_indices, micro_batch_size=trainer_config.micro_batch_size,
        num_microbatches=trainer_config.num_microbatches, rank=dist.rank, world_size=dist.world_size,
        seed=config.seed, block_size=config.data.block_size if config.data.shuffle == "blocks" else 1)
    # Before DDP wraps the model (the trainer's first phase): frozen groups must be frozen when DDP records which
    # parameters get gradients.
    freeze = FreezeSchedule(config.optim.freeze, steps_per_epoch=sampler.steps_per_epoch)
    groups = build_parameter_groups(model, config.optim, max_steps=trainer_config.max_steps,
                                    steps_per_epoch=sampler.steps_per_epoch,
                                    phase_factor=freeze.lr_factor if freeze.enabled else None,
                                    monitor=config.callbacks.monitor.metric, monitor_mode=config.callbacks.monitor.mode)
    clock = StepClock(dist.device, enabled=dist.is_main)
    step = TrainStep(loss=components.loss, inputs=config.task.inputs, groups=groups, dist=dist, clock=clock,
                     precision=trainer_config.precision, clip_grad_norm=config.optim.clip_grad_norm,
                     track_grad_norm=config.optim.track_grad_norm, device_transforms=components.device_transforms,
                     seed=config.seed, record_samples=config.callbacks.metrics.per_sample_train,
                     stop_requested=stop_requested)
    train_loader, val_loader = _build_loaders(config, components, dist, sampler, cpus_per_rank)
    evaluator = Evaluator(inputs=list(config.task.inputs), loss=components.loss, metrics=components.metrics,
                          dist=dist, device=dist.device, autocast=step.autocast, gather=config.task.gather,
                          on_cpu=config.task.evaluate_on_cpu, device_transforms=components.device_transforms,
                          seed=config.seed)
    averaging = WeightAveraging(config.optim.weight_averaging, model, groups, dist=dist,
                                inputs=list(config.task.inputs),
                                training_batches=lambda: _one_epoch(sampler, train_loader))
    checkpoints = CheckpointManager(run_dir, keep_last=config.callbacks.checkpoint.keep_last,
                                    keep_steps=config.callbacks.checkpoint.keep_steps)
    parts = TrainingParts(model=model, compiled_model=compile_model(model, trainer_config.compile), groups=groups,
                          freeze=freeze, step=step, sampler=sampler, train_loader=train_loader,
                          val_loader=val_loader, evaluator=evaluator, averaging=averaging, checkpoints=checkpoints,
                          clock=clock, split=components.split, plot=components.plot, watchers=components.callbacks)
    return Trainer(config=config, run_dir=run_dir, dist=dist, parts=parts, evaluation_stop=evaluation_stop)


def _one_epoch(sampler: DistributedBatchSampler, train_loader: Any) -> Any:
    """One pass over this rank's training data in the first epoch's order (SWA's BatchNorm statistics, after the
    last step: the loop reads no batch after it)."""
    sampler.set_position(0, 0)
    return train_loader


def _build_loaders(config: Config, components: Components, dist: DistributedContext,
                   sampler: DistributedBatchSampler, cpus_per_rank: int) -> tuple[Any, Any]:
    """The training loader (over `sampler`) and the validation loader (this rank's shard), with as many workers
    as data.num_workers asks for or the automatic count finds (hpctrain.data.loader)."""
    split, micro_batch_size = components.split, config.trainer.micro_batch_size
    train_reader = BatchReader(split.train_dataset, transforms=components.transforms, seed=config.seed,
                               stage="train")
    num_workers = resolve_num_workers(config.data, cpus_per_rank, reader=train_reader, indices=split.train_indices,
                                      batch_size=micro_batch_size)
    pin_memory = config.data.pin_memory and dist.device.type == "cuda"
    train_loader = make_loader(train_reader, sampler, config=config.data, num_workers=num_workers,
                               pin_memory=pin_memory)
    val_loader = make_loader(
        BatchReader(split.val_dataset, transforms=components.transforms, seed=config.seed, stage="validation"),
        ShardSampler(split.val_indices, batch_size=config.data.val_batch_size or micro_batch_size, rank=dist.rank,
                     world_size=dist.world_size),
        config=config.data, num_workers=num_workers, pin_memory=pin_memory)
    log.info("rank %d: %d training / %d validation samples, global batch %d (%d x %d micro-batches x %d ranks), "
             "%d steps per epoch, %d loader workers, %d threads", dist.rank, len(split.train_indices),
             len(split.val_indices), sampler.global_batch_size, micro_batch_size, config.trainer.num_microbatches,
             dist.world_size, sampler.steps_per_epoch, num_workers, torch.get_num_threads())
    return train_loader, val_loader
