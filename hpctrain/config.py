"""Typed configuration schemas of the core, one dataclass per config group, registered with Hydra's ConfigStore.

The YAML files under conf/ (and a user's own `--config-dir`) are merged onto these schemas, so an unknown
key or a value of the wrong type in a core group fails at composition time with the key named. Range checks that
types cannot express live in each schema's ``__post_init__`` (run by :func:`to_config`, before any work starts)
and raise ``ValueError`` naming the key.

The user's components (the model, the datasets, the loss, the metrics, a custom optimizer or LR multiplier) are
free-form `_target_` nodes (typed ``Any`` here): the core never knows a task's fields. They are checked by
building them (hpctrain.components), which reports a constructor's error with the node's key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException



class ConfigError(ValueError):
    """A user error in the configuration or its inputs; the message names the key, file or value at fault."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key} must be one of {', '.join(choices)}; got {value!r}")


def is_target_node(value: Any) -> bool:
    """A config node that names a class or function to build: a mapping with a `_target_` key."""
    return isinstance(value, dict) and isinstance(value.get("_target_"), str)


def _require_target(key: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    _require(is_target_node(value), f"{key} must be a config node with a `_target_` (the class or function to "
                                    f"build), got {value!r}")


@dataclass
class PathsConfig:
    """Where data and runs live. Relative paths are resolved against the directory the launcher runs in."""

    data_dir: str = "data"
    runs_dir: str = "runs"


@dataclass
class TaskConfig:
    """What is learned: how a batch reaches the model, and the per-sample loss and metrics (see
    docs/your-own-model.md). The model itself is the top-level `model` node."""

    # A label recorded with the run (metrics.h5, inspect).
    name: str = "task"
    # Batch fields passed to the model, positionally and in this order: outputs = model(*[batch[f] for f in inputs]).
    inputs: List[str] = field(default_factory=list)
    # `_target_` node of a callable loss(outputs, batch) -> per-sample tensor (batch,) or a dict of named
    # per-sample components whose sum is the loss.
    loss: Any = None
    # name -> `_target_` node of a callable metric(outputs, batch) -> per-sample tensor (batch,), evaluated at
    # every validation and stored per sample in metrics.h5.
    metrics: Dict[str, Any] = field(default_factory=dict)
    # `_target_` node of a plot hook plot(evaluation, directory) -> PNG paths, drawn for rank 0 in a process of
    # its own after every evaluation and at the end (hpctrain.run.evaluate); null: none.
    plot: Any = None
    # Batch fields (and `outputs`) of every validation sample to gather for the plot hook (Evaluation.gathered).
    gather: List[str] = field(default_factory=list)
    # Move each validation batch's outputs to the CPU and compute the loss and metrics there (hippynn's default:
    # large validation sets stay off the GPU's memory).
    evaluate_on_cpu: bool = False
    # `_target_` nodes of callables transform(batch[, context]) -> batch run in the training process on each batch
    # once it is on the device, before the forward pass, in training, validation, the test phase and prediction
    # (hpctrain.transforms.apply_device_transforms; random draws from context.generators()).
    device_transforms: List[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(bool(self.inputs), "task.inputs must name at least one batch field to pass to the model")
        _require_target("task.plot", self.plot, optional=True)
        _require_target("task.loss", self.loss)
        for index, node in enumerate(self.device_transforms):
            _require_target(f"task.device_transforms[{index}]", node)
        for name, node in self.metrics.items():
            _require_target(f"task.metrics.{name}", node)
            _require(name not in ("loss", "step", "sample_index", "per_sample") and "/" not in name
                     and not name.startswith("loss."),
                     f"task.metrics.{name}: the names loss, loss.*, step, sample_index, per_sample and names with "
                     f"'/' are reserved")


@dataclass
class DataConfig:
    """The datasets (any map-style torch Dataset from `_target_`; hpctrain.data.HDF5Dataset is built in) and
    the DataLoader settings."""

    # The training samples (and, with val_dataset null, the validation ones: the last `val_fraction` of them).
    dataset: Any = None
    # Validation samples: a node with a `_target_`, or a node without one whose keys override `dataset`'s
    # (e.g. {path: val.h5}), or null to hold out the last `val_fraction` of `dataset`.
    val_dataset: Any = None
    val_fraction: float = 0.2
    # Test samples, the same forms as val_dataset (null: none).
    test_dataset: Any = None
    # A `_target_` called once on the launching machine before the datasets are opened (e.g. to generate a
    # missing synthetic file); null: nothing.
    prepare: Any = None
    # `_target_` nodes of callables transform(batch) -> batch, applied in the loader workers in this order.
    transforms: List[Any] = field(default_factory=list)
    # -1: automatic: none when the training process reads a batch faster than a worker could hand it over
    # (measured at start), else one worker per CPU this rank was given, minus one for the training process.
    num_workers: int = -1
    persistent_workers: bool = True
    pin_memory: bool = True
    prefetch_factor: int = 2
    val_batch_size: int = 0  # 0: the training micro-batch size
    # samples: every epoch a permutation of all samples (batches read with one sorted read per field).
    # blocks: a permutation of blocks of `block_size` consecutive samples, so a batch is a few contiguous slices
    # (several times faster to read; right for datasets whose neighbouring samples are independent draws,
    # like the synthetic CBED files).
    shuffle: str = "samples"
    block_size: int = 64

    def __post_init__(self) -> None:
        _require_target("data.dataset", self.dataset)
        for key in ("val_dataset", "test_dataset"):
            value = getattr(self, key)
            _require(value is None or isinstance(value, dict),
                     f"data.{key} must be a config node or null, got {value!r}")
        _require_target("data.prepare", self.prepare, optional=True)
        for index, node in enumerate(self.transforms):
            _require_target(f"data.transforms[{index}]", node)
        _one_of("data.shuffle", self.shuffle, ("samples", "blocks"))
        _require(self.block_size > 0, f"data.block_size must be > 0, got {self.block_size}")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.num_workers >= -1, f"data.num_workers must be >= 0 (or -1 for automatic), got {self.num_workers}")
        _require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _require(self.val_batch_size >= 0, f"data.val_batch_size must be >= 0, got {self.val_batch_size}")


@dataclass
class ScheduleConfig:
    """A learning-rate multiplier as a function of the optimizer step or of the epoch.

    name: constant | warmup_cosine | warmup_linear | cosine_restarts | custom.
    All lengths count `interval`s (steps or epochs). `total` defaults to the run's max steps (or max epochs).
    custom: `function` is a `_target_` node of the user's multiplier f(interval_index) -> float (with
    `_partial_: true` when it takes more arguments); it must be a pure function of its argument, so a resumed
    run reproduces the learning rates exactly.

    scheduler: instead of the built-in multipliers, a `_target_` node of any torch.optim.lr_scheduler class (or a
    class with the same protocol), built around each parameter group's optimizer as cls(optimizer, **node); a
    `schedulers` list in it (SequentialLR, ChainedScheduler, hpctrain.optim.SequentialSchedule) is built the same
    way, around the same optimizer. It is stepped after every `interval`; one whose step() takes the metric
    (ReduceLROnPlateau) is stepped after every evaluation with the mean of `monitor`. Its state is checkpointed.
    """

    name: str = "warmup_cosine"
    interval: str = "step"
    warmup: int = 50
    warmup_start_factor: float = 0.01
    total: Optional[int] = None
    min_factor: float = 0.02
    # cosine_restarts: length of the first cycle and the growth of each next one.
    cycle: int = 100
    cycle_multiplier: float = 1.0
    function: Any = None
    scheduler: Any = None
    # The validation mean a scheduler stepped at evaluations (ReduceLROnPlateau) reacts to; null: the metric of
    # callbacks.monitor (whose mode is then passed to a ReduceLROnPlateau node that sets none).
    monitor: Optional[str] = None

    def validate(self, key: str) -> None:
        _require_target(f"{key}.scheduler", self.scheduler, optional=True)
        _require(self.scheduler is None or self.function is None,
                 f"{key}.scheduler and {key}.function exclude each other")
        _one_of(f"{key}.interval", self.interval, ("step", "epoch"))
        if self.scheduler is not None:  # the built-in multiplier's keys are not used
            return
        _one_of(f"{key}.name", self.name, ("constant", "warmup_cosine", "warmup_linear", "cosine_restarts", "custom"))
        _require((self.name == "custom") == (self.function is not None),
                 f"{key}.function (a `_target_` node) is required with, and only with, {key}.name=custom")
        _require_target(f"{key}.function", self.function, optional=True)
        _require(self.warmup >= 0, f"{key}.warmup must be >= 0, got {self.warmup}")
        _require(0.0 < self.warmup_start_factor <= 1.0,
                 f"{key}.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        _require(self.total is None or self.total > 0, f"{key}.total must be > 0, got {self.total}")
        _require(0.0 <= self.min_factor <= 1.0, f"{key}.min_factor must be in [0, 1], got {self.min_factor}")
        _require(self.cycle > 0, f"{key}.cycle must be > 0, got {self.cycle}")
        _require(self.cycle_multiplier >= 1.0, f"{key}.cycle_multiplier must be >= 1, got {self.cycle_multiplier}")


# Shorthands for torch.optim classes; any other optimizer is a `_target_` node (see OptimConfig.optimizer).
OPTIMIZERS = ("adamw", "adam", "sgd")


def _check_optimizer(key: str, value: Any) -> None:
    if isinstance(value, str):
        _one_of(key, value, OPTIMIZERS)
    else:
        _require(is_target_node(value), f"{key} must be one of {', '.join(OPTIMIZERS)} or a `_target_` node "
                                        f"(e.g. {{_target_: torch.optim.RMSprop, alpha: 0.9}}); got {value!r}")


@dataclass
class ParamGroupConfig:
    """Parameters matched by name patterns, with their own optimizer settings and LR schedule.

    Each group gets its own optimizer and learning-rate schedule (as emicroml's LR scheduler manager does); unset
    fields inherit the top-level optim values. Parameters no group matches form the group named "default".
    """

    name: str = "group"
    # fnmatch patterns over parameter names, e.g. ["stem.*", "stages.0.*"].
    params: List[str] = field(default_factory=list)
    optimizer: Any = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule: Optional[ScheduleConfig] = None
    # Freeze these parameters (no gradient, no optimizer); VirtuaLearn3D-style partial training.
    frozen: bool = False


@dataclass
class FreezePhaseConfig:
    """One phase of an explicit freeze schedule: from `start` (steps or epochs) until the next phase starts."""

    start: int = 0
    # fnmatch patterns of the parameters frozen in this phase (e.g. ["stem.*", "stages.0.*"]).
    freeze: List[str] = field(default_factory=list)
    # Multiplies every parameter group's learning rate during the phase.
    lr_factor: Optional[float] = None


@dataclass
class FreezeScheduleConfig:
    """VirtuaLearn3D's freeze training (hpctrain.run.freeze): none | explicit | round_robin | random."""

    strategy: str = "none"
    interval: str = "step"
    phases: List[FreezePhaseConfig] = field(default_factory=list)
    # round_robin / random: the layer groups (each a list of patterns) of which `num_trainable` are trainable at a
    # time, changing every `every` intervals (random: drawn with `seed`).
    layer_groups: List[List[str]] = field(default_factory=list)
    num_trainable: int = 1
    every: int = 1
    seed: int = 0

    def validate(self) -> None:
        key = "optim.freeze"
        _one_of(f"{key}.strategy", self.strategy, ("none", "explicit", "round_robin", "random"))
        _one_of(f"{key}.interval", self.interval, ("step", "epoch"))
        if self.strategy == "explicit":
            starts = [phase.start for phase in self.phases]
            _require(bool(starts) and starts == sorted(set(starts)) and starts[0] >= 0,
                     f"{key}.phases must be a non-empty list with increasing, distinct starts >= 0; got {starts}")
            for index, phase in enumerate(self.phases):
                _require(phase.lr_factor is None or phase.lr_factor > 0,
                         f"{key}.phases[{index}].lr_factor must be > 0, got {phase.lr_factor}")
        if self.strategy in ("round_robin", "random"):
            _require(len(self.layer_groups) >= 2 and all(self.layer_groups),
                     f"{key}.layer_groups must list at least two groups of parameter-name patterns for "
                     f"{self.strategy}")
            _require(1 <= self.num_trainable < len(self.layer_groups),
                     f"{key}.num_trainable must be in [1, {len(self.layer_groups) - 1}], got {self.num_trainable}")
            _require(self.every >= 1, f"{key}.every must be >= 1, got {self.every}")


@dataclass
class WeightAveragingConfig:
    """An average of the weights kept beside them (hpctrain.run.averaging, on torch's AveragedModel): validation,
    the best checkpoint, load_model, predict, test, export and init_from use it once it holds an update."""

    # null: none; ema: an exponential moving average; swa: the equal average from start_step on (stochastic
    # weight averaging, its BatchNorm statistics recomputed over the training data at trainer.max_steps).
    kind: Optional[str] = None
    decay: float = 0.999  # ema: average = decay * average + (1 - decay) * weights
    warmup: bool = False  # ema: the decay is min(decay, (1 + n) / (10 + n)) after n updates
    start_step: int = 0  # the weights after this optimizer step are the first averaged (0: after the first step)
    every_steps: int = 1  # then after every N-th optimizer step
    swa_lr: Optional[float] = None  # swa: from start_step, SWALR anneals every group's learning rate to this
    anneal_steps: int = 0  # swa: over this many steps (0: at once)
    anneal_strategy: str = "cos"  # swa: cos or linear
    evaluate_raw: bool = False  # validation also records the raw weights' values (raw.loss, raw.<metric>...)

    def __post_init__(self) -> None:
        key = "optim.weight_averaging"
        _require(self.kind in (None, "ema", "swa"), f"{key}.kind must be null, ema or swa, got {self.kind!r}")
        _require(0.0 < self.decay < 1.0, f"{key}.decay must be in (0, 1), got {self.decay}")
        _require(self.start_step >= 0, f"{key}.start_step must be >= 0, got {self.start_step}")
        _require(self.every_steps >= 1, f"{key}.every_steps must be >= 1, got {self.every_steps}")
        _require(self.swa_lr is None or (self.kind == "swa" and self.swa_lr > 0),
                 f"{key}.swa_lr must be > 0 and only with kind=swa, got {self.swa_lr} (kind {self.kind})")
        _require(self.anneal_steps >= 0, f"{key}.anneal_steps must be >= 0, got {self.anneal_steps}")
        _one_of(f"{key}.anneal_strategy", self.anneal_strategy, ("cos", "linear"))


@dataclass
class OptimConfig:
    """The optimizer: a shorthand (adamw, adam, sgd: built with the momentum/betas/eps below) or a `_target_`
    node of any optimizer class, torch's or the user's, called as cls(params, lr=..., weight_decay=..., **node)."""

    optimizer: Any = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    param_groups: List[ParamGroupConfig] = field(default_factory=list)
    # Phases that freeze and unfreeze parameters by name pattern (VirtuaLearn3D's freeze training).
    freeze: FreezeScheduleConfig = field(default_factory=FreezeScheduleConfig)
    # Clip the global gradient norm to this value; null records the norm without clipping.
    clip_grad_norm: Optional[float] = 1.0
    # With clip_grad_norm=null: still compute the norm at every step, to record it (train/grad_norm) and to skip
    # an update whose gradient is NaN/Inf although its loss is finite. Off (the default: not clipping costs
    # nothing, ~0.05 ms per step less on a tiny model), only a non-finite loss is caught (a NaN gradient under a
    # finite loss shows in the next steps' losses, and trainer.max_consecutive_nonfinite stops the run with the
    # last good checkpoint kept) and train/grad_norm is NaN. Clipping always computes the norm.
    track_grad_norm: bool = False
    weight_averaging: WeightAveragingConfig = field(default_factory=WeightAveragingConfig)

    def __post_init__(self) -> None:
        _check_optimizer("optim.optimizer", self.optimizer)
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0,
                 f"optim.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")
        self.schedule.validate("optim.schedule")
        self.freeze.validate()
        names = [group.name for group in self.param_groups]
        _require(len(set(names)) == len(names) and "default" not in names,
                 f"optim.param_groups names must be unique and not 'default', got {names}")
        schedules = [self.schedule, *(group.schedule for group in self.param_groups if group.schedule is not None)]
        _require(not any(schedule.scheduler is not None for schedule in schedules)
                 or all(phase.lr_factor is None for phase in self.freeze.phases),
                 "optim.freeze.phases[*].lr_factor: a torch scheduler (schedule.scheduler) sets the learning rates "
                 "from its own history, so a phase's LR factor cannot apply; use a built-in schedule with LR factors")
        for index, group in enumerate(self.param_groups):
            key = f"optim.param_groups[{index}]"
            _require(bool(group.params), f"{key}.params must list at least one parameter-name pattern")
            if group.optimizer is not None:
                _check_optimizer(f"{key}.optimizer", group.optimizer)
            _require(group.lr is None or group.lr > 0, f"{key}.lr must be > 0, got {group.lr}")
            if group.schedule is not None:
                group.schedule.validate(f"{key}.schedule")


@dataclass
class InitFromConfig:
    """Fine-tuning (hpctrain.run.fine_tune): the model's initial weights, only those, from another run's checkpoint,
    taken when this run starts without a checkpoint of its own (a resumed run resumes from its own)."""

    # The other run's directory; null: no fine-tuning (the model's own initialisation).
    run: Optional[str] = None
    # best, latest or a step of that run.
    checkpoint: str = "best"
    # true: every parameter and buffer of this model must be initialised, and every weight taken must fit.
    strict: bool = False
    # fnmatch patterns of the parameter/buffer names to take (empty: all), then those to leave out (a new head).
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)
    # Where that run keeps a weight average (optim.weight_averaging), it is taken; true: its raw weights instead.
    raw_weights: bool = False

    def __post_init__(self) -> None:
        _require(self.run is None or bool(self.run), "trainer.init_from.run must name a run directory, or be null")


@dataclass
class TrainerConfig:
    max_steps: int = 1500
    # Stop after this many epochs even when max_steps is not reached.
    max_epochs: Optional[int] = None
    micro_batch_size: int = 32
    # Gradient accumulation: micro-batches per optimizer step (per rank).
    num_microbatches: int = 1
    val_every_steps: int = 100
    precision: str = "fp32"
    device: str = "auto"
    # What to do when the loss or the gradient norm is NaN/Inf: skip the update and count it, or stop.
    nonfinite: str = "skip"
    # Stop anyway after this many consecutive non-finite steps.
    max_consecutive_nonfinite: int = 20
    deterministic: bool = True
    # 0: the CPUs this rank was given, shared among the ranks on its node.
    num_threads: int = 0
    progress_bar: bool = True
    distributed_timeout_s: int = 600
    # Before anything runs or is queued, take one forward + loss + backward on one real micro-batch on CPU (turn
    # off for a model too large for the login node).
    dry_step: bool = True
    # Forming the process group (a rank dead at launch fails the others after this long); see docs/signals.md.
    rendezvous_timeout_s: int = 120
    # Hang watchdog: a rank without a step for this long dumps its stacks and exits; 0: from the step time; <0: off.
    watchdog_s: float = 0.0
    # Fine-tuning: start from another run's model weights (InitFromConfig; off while its `run` is null).
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
    # torch.compile the model (hpctrain.run.compile): false, true (torch's defaults) or a dict of torch.compile
    # options, e.g. {mode: max-autotune}. The batch dimension is marked dynamic unless the dict sets `dynamic`.
    compile: Any = False

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, f"trainer.max_steps must be > 0, got {self.max_steps}")
        _require(self.max_epochs is None or self.max_epochs > 0,
                 f"trainer.max_epochs must be > 0 or null, got {self.max_epochs}")
        _require(self.micro_batch_size > 0, f"trainer.micro_batch_size must be > 0, got {self.micro_batch_size}")
        _require(self.num_microbatches > 0, f"trainer.num_microbatches must be > 0, got {self.num_microbatches}")
        _require(self.val_every_steps > 0, f"trainer.val_every_steps must be > 0, got {self.val_every_steps}")
        _one_of("trainer.precision", self.precision, ("fp32", "bf16", "fp16"))
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("trainer.nonfinite", self.nonfinite, ("skip", "stop"))
        _require(self.max_consecutive_nonfinite > 0,
                 f"trainer.max_consecutive_nonfinite must be > 0, got {self.max_consecutive_nonfinite}")
        _require(self.num_threads >= 0, f"trainer.num_threads must be >= 0, got {self.num_threads}")
        _require(self.distributed_timeout_s > 0,
                 f"trainer.distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        _require(self.rendezvous_timeout_s > 0, f"trainer.rendezvous_timeout_s must be > 0, got {self.rendezvous_timeout_s}")
        _check_compile(self.compile)


# The torch.compile keyword arguments trainer.compile may set, and its modes.
COMPILE_OPTIONS = ("mode", "dynamic", "backend", "fullgraph", "options", "disable")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile(value: Any) -> None:
    if isinstance(value, bool):
        return
    _require(isinstance(value, dict), f"trainer.compile must be true, false or a dict of torch.compile options "
                                      f"({', '.join(COMPILE_OPTIONS)}); got {value!r}")
    for key, option in value.items():
        _require(key in COMPILE_OPTIONS, f"trainer.compile.{key}: not a torch.compile option; use "
                                         f"{', '.join(COMPILE_OPTIONS)}")
        expected = {"mode": str, "backend": str, "dynamic": bool, "fullgraph": bool, "disable": bool,
                    "options": dict}[key]
        _require(option is None or isinstance(option, expected),
                 f"trainer.compile.{key} must be a {expected.__name__} or null, got {option!r}")
    if value.get("mode") is not None:
        _one_of("trainer.compile.mode", value["mode"], COMPILE_MODES)
    _require(value.get("mode") is None or value.get("options") is None,
             "trainer.compile: torch.compile takes `mode` or `options`, not both")


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    # The newest `keep_last` checkpoints are kept (at least 2: the newest may be the one a crash interrupted).
    keep_last: int = 2
    keep_best: bool = True
    # Global steps whose checkpoints are kept for good (emicroml's `checkpoints`).
    keep_steps: List[int] = field(default_factory=list)
    # Write checkpoints in a background thread: the loop waits only for a copy of the state in host memory (the
    # next checkpoint, and the end of the run, wait for the previous write). Costs one more copy of the state in
    # host memory, kept for the run and reused. (The key is not `async`: that is a Python keyword.) Off by default:
    # a synchronous save of 1 GB stalls the loop about 0.9 s here, which every few minutes is noise, while a copy of
    # the state held for good can be what a node's host memory lacks (docs/benchmarks.md, "Checkpoints").
    asynchronous: bool = False

    def __post_init__(self) -> None:
        _require(self.every_steps > 0, f"callbacks.checkpoint.every_steps must be > 0, got {self.every_steps}")
        _require(self.keep_last >= 2, f"callbacks.checkpoint.keep_last must be >= 2, got {self.keep_last}")
        _require(all(step > 0 for step in self.keep_steps),
                 f"callbacks.checkpoint.keep_steps must be positive steps, got {list(self.keep_steps)}")


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    # Evaluations without an improvement of more than min_delta before training stops.
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _require(self.patience > 0, f"callbacks.early_stopping.patience must be > 0, got {self.patience}")
        _require(self.min_delta >= 0, f"callbacks.early_stopping.min_delta must be >= 0, got {self.min_delta}")


@dataclass
class MetricsConfig:
    # Buffered rows are written to metrics.h5 once this many seconds have passed since the last write (0: after
    # every step), and at every evaluation and checkpoint: a crash loses at most this much of the training curve.
    # By time, not steps: a fast model's steps would otherwise flush many times a second (on a shared parallel
    # file system too), a slow model's keep minutes of rows in memory.
    flush_every_seconds: float = 10.0
    # loss.png, metrics.png, lr.png at the end of the run.
    plots: bool = True
    # Run the task's plot hook (task.plot) after every this many evaluations (0: only at the end).
    task_plot_every_evaluations: int = 1
    # Record the loss of every training sample at every step, with its index (emicroml): /train_samples in
    # metrics.h5. Costs one gather per step; off by default.
    per_sample_train: bool = False

    def __post_init__(self) -> None:
        _require(self.flush_every_seconds >= 0,
                 f"callbacks.metrics.flush_every_seconds must be >= 0, got {self.flush_every_seconds}")
        _require(self.task_plot_every_evaluations >= 0,
                 f"callbacks.metrics.task_plot_every_evaluations must be >= 0, got {self.task_plot_every_evaluations}")


# Shorthands of callbacks.loggers entries for the built-in loggers (hpctrain.loggers).
LOGGERS = {"tensorboard": "hpctrain.loggers.tensorboard.TensorBoardLogger",
           "mlflow": "hpctrain.loggers.mlflow.MLflowLogger",
           "wandb": "hpctrain.loggers.wandb.WandbLogger",
           "comet": "hpctrain.loggers.comet.CometLogger"}


@dataclass
class MonitorConfig:
    """The validation value that decides early stopping, the best checkpoint, a ReduceLROnPlateau schedule and
    inspect's "best" line: `loss`, `loss.<component>` or a metric's name (`<metric>` or `<metric>.<key>` for one
    that returns a dict), the mean over the validation set; with `mode` min (lower is better) or max."""

    metric: str = "loss"
    mode: str = "min"

    def __post_init__(self) -> None:
        _one_of("callbacks.monitor.mode", self.mode, ("min", "max"))


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # Experiment trackers (docs/watching.md): a shorthand (tensorboard, mlflow, wandb, comet) or a `_target_` node of a
    # hpctrain.loggers.Logger, e.g. {_target_: hpctrain.loggers.mlflow.MLflowLogger, tracking_uri: ...}.
    loggers: List[Any] = field(default_factory=list)
    # The user's own callbacks (hpctrain.callbacks): `_target_` nodes of objects with on_step_end, ... hooks.
    user: List[Any] = field(default_factory=list)
    # How long the end of a run's process waits for a logger to deliver its last rows (they are not lost: the
    # next start of the run sends what is left).
    logger_close_timeout_s: float = 60.0
    # The same for a process that stops before the end (a requeue, a preemption, a time limit): what comes after
    # its checkpoint must fit in SLURM's KillWait (30 s by default, often less), so a logger still busy (a server
    # slow to answer) is left; what it had not delivered, the next start sends.
    logger_stop_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for index, node in enumerate(self.loggers):
            if isinstance(node, str):
                _one_of(f"callbacks.loggers[{index}]", node, tuple(LOGGERS))
            else:
                _require_target(f"callbacks.loggers[{index}]", node)
        for index, node in enumerate(self.user):
            _require_target(f"callbacks.user[{index}]", node)
        _require(self.logger_close_timeout_s >= 0,
                 f"callbacks.logger_close_timeout_s must be >= 0, got {self.logger_close_timeout_s}")
        _require(self.logger_stop_timeout_s >= 0,
                 f"callbacks.logger_stop_timeout_s must be >= 0, got {self.logger_stop_timeout_s}")


@dataclass
class LauncherConfig:
    """How the ranks are started.

    local: on this machine, `num_processes` ranks (1 is plain debug mode).
    slurm: submitted with submitit; the resource keys are those of hydra-submitit-launcher.
    srun: this process is one task of a job step that srun started (slurm/train.sbatch); the resource keys are
        ignored, the job script holds them.
    """

    name: str = "local"
    num_processes: int = 1
    # -- slurm --
    nodes: int = 1
    tasks_per_node: int = 1  # one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 2  # loader workers + 1
    mem_gb: Optional[float] = None
    timeout_min: int = 60
    partition: Optional[str] = None
    qos: Optional[str] = None
    account: Optional[str] = None
    constraint: Optional[str] = None
    # USR2 arrives this long before the time limit: enough for one step and a checkpoint.
    signal_delay_s: int = 120
    # Requeues after hitting the time limit; preemptions are not counted.
    max_num_timeout: int = 3
    array_parallelism: int = 256
    job_name: str = "hpctrain"
    # Shell lines run in the sbatch script before srun (module load ..., source venv ...).
    setup: List[str] = field(default_factory=list)
    # Any other sbatch option, e.g. {reservation: my_resv}.
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    # Block until the job ends and print its result (submission alone returns at once).
    wait: bool = False
    # What SIGTERM means: auto (ask SLURM: scancel ends the job, a preemption requeues it), requeue, or cancel.
    sigterm: str = "auto"
    # Requeues after a hang found by the watchdog (trainer.watchdog_s); then the job ends.
    max_num_hang: int = 2

    def __post_init__(self) -> None:
        _one_of("launcher.name", self.name, ("local", "slurm", "srun"))
        for key in ("num_processes", "nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
            _require(getattr(self, key) > 0, f"launcher.{key} must be > 0, got {getattr(self, key)}")
        _require(self.gpus_per_node >= 0, f"launcher.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        _require(self.mem_gb is None or self.mem_gb > 0, f"launcher.mem_gb must be > 0 or null, got {self.mem_gb}")
        _require(self.signal_delay_s >= 0, f"launcher.signal_delay_s must be >= 0, got {self.signal_delay_s}")
        _require(self.max_num_timeout >= 0, f"launcher.max_num_timeout must be >= 0, got {self.max_num_timeout}")
        _one_of("launcher.sigterm", self.sigterm, ("auto", "requeue", "cancel"))
        _require(self.max_num_hang >= 0, f"launcher.max_num_hang must be >= 0, got {self.max_num_hang}")
        _require(self.gpus_per_node == 0 or self.tasks_per_node == self.gpus_per_node,
                 f"launcher.tasks_per_node={self.tasks_per_node} must equal launcher.gpus_per_node="
                 f"{self.gpus_per_node}: one rank per GPU")


@dataclass
class TuneConfig:
    """`python -m hpctrain.tune` (docs/tuning.md): an Optuna study whose trials are runs of this config, each with
    the values its sampler chose for the keys of `search_space`, run by `parallel` workers that share the study's
    storage; the objective is the best validation value of callbacks.monitor (minimized or maximized by its mode)."""

    # key -> Hydra's Optuna-sweeper expression: interval(a, b), tag(log, interval(a, b)), int(interval(a, b)),
    # choice(a, b, ...), range(a, b, step=s); nested keys flatten to dotted ones (optim: {lr: ...} is optim.lr).
    # Sweep overrides on the command line (optim.lr='tag(log, interval(1e-4, 1e-2))') join it.
    search_space: Dict[str, Any] = field(default_factory=dict)
    # Trials to finish (complete, pruned or failed) before the study ends.
    n_trials: int = 16
    # Workers asking and running trials at once: one job of a SLURM job array each (launcher=slurm) or one local
    # process each (launcher=local).
    parallel: int = 2
    # The study's directory: its journal, one run directory per trial (trial_<number>), the workers' state.
    dir: str = "${paths.runs_dir}/${run_name}"
    study_name: Optional[str] = None  # null: run_name
    # null: Optuna's journal file storage in `dir` (no server; for one machine, docs/tuning.md "Which storage"); or an
    # RDB URL (mysql+pymysql://user:password@host/db, postgresql://...), with Optuna's heartbeats, across nodes.
    storage: Optional[str] = None
    sampler: str = "tpe"  # tpe, random
    pruner: str = "median"  # median, successive_halving, hyperband, none
    # median: trials finished before any is pruned; evaluations of a trial (steps) before it can be pruned.
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    # Parameter values to try first, e.g. a known good setting: a list of {key: value} (study.enqueue_trial),
    # enqueued once, when the study is created.
    enqueue: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.n_trials > 0, f"tune.n_trials must be > 0, got {self.n_trials}")
        _require(self.parallel > 0, f"tune.parallel must be > 0, got {self.parallel}")
        _one_of("tune.sampler", self.sampler, ("tpe", "random"))
        _one_of("tune.pruner", self.pruner, ("median", "successive_halving", "hyperband", "none"))
        _require(self.n_startup_trials >= 0, f"tune.n_startup_trials must be >= 0, got {self.n_startup_trials}")
        _require(self.n_warmup_steps >= 0, f"tune.n_warmup_steps must be >= 0, got {self.n_warmup_steps}")


@dataclass
class Config:
    seed: int = 0
    run_name: str = "debug"
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: TaskConfig = MISSING
    data: DataConfig = MISSING
    # The user's model: a `_target_` node of an nn.Module (built after seeding, identically on every rank).
    model: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# Overrides that do not change what is trained, left out of a sweep point's directory name, so the same sweep
# run again with another partition, time limit, data location or loggers finds its points again.
_NOT_IN_POINT_NAME = ("launcher", "hydra", "paths", "run_name", "data.dataset.path", "data.val_dataset.path",
                      "data.test_dataset.path", "debug", "callbacks.loggers", "callbacks.user",
                      "callbacks.logger_close_timeout_s", "callbacks.logger_stop_timeout_s")


_MAX_POINT_NAME_BYTES = 200  # below the usual 255-byte limit, leaving room for a suffix


def sweep_point_dirname(overrides: list[str]) -> str:
    """Directory name of a sweep point: its sorted `key=value` overrides (without launcher/path keys)."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not any(key == prefix or key.startswith(prefix + ".") for prefix in _NOT_IN_POINT_NAME):
            kept.append(override.replace("/", "_"))
    name = ",".join(sorted(kept)) or "default"
    if len(name.encode()) <= _MAX_POINT_NAME_BYTES:
        return name
    # File systems refuse names over 255 bytes: keep a readable prefix and a digest of the whole name, so that
    # points stay distinct and a rerun finds the same directory (the overrides are in its .hydra/overrides.yaml).
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    prefix = name.encode()[:_MAX_POINT_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{prefix}~{digest}"


def register_configs() -> None:
    """Register the schemas (conf/config.yaml lists `config_schema` first) and the config resolvers."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("hpctrain_point_dirname"):
        OmegaConf.register_new_resolver("hpctrain_point_dirname", lambda overrides: sweep_point_dirname(list(overrides)))


@functools.cache
def _schema() -> DictConfig:
    """The schema as an OmegaConf node, built once (34 ms): merge copies it, never changes it."""
    return OmegaConf.structured(Config)


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Resolve a composed config into typed dataclasses, running every schema's checks."""
    try:
        if isinstance(cfg, DictConfig):  # resolve everything but Hydra's own node, which may not be ready yet
            cfg = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                   for key, value in cfg.items() if key != "hydra"}
        config = OmegaConf.to_object(OmegaConf.merge(_schema(), cfg))
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as error:  # the message names the key; drop OmegaConf's internals
        message = str(error).split("\n")[0]
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{message} (key: {key})" if key and key not in message else message) from None
    assert isinstance(config, Config)
    return config


def to_json(config: Config) -> str:
    """The fully resolved config as JSON, enough to rebuild the run (see `from_json`)."""
    return json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True)


def from_json(text: str) -> Config:
    return to_config(OmegaConf.create(json.loads(text)))


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
