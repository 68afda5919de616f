"""Typed configuration schemas, one dataclass per config group, registered with Hydra's ConfigStore.

The YAML files under conf/ are merged onto these schemas, so an unknown key or a value of the wrong type fails
at composition time with the key named. Range checks that types cannot express live in each schema's
``__post_init__`` (run by :func:`to_config`, before any work starts) and raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpctrain.tasks.cbed.generator import CBEDGeneratorConfig
from hpctrain.tasks.cbed.model import CBEDModelConfig


class ConfigError(ValueError):
    """A user error in the configuration or its inputs; the message names the key, file or value at fault."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class PathsConfig:
    """Where data and runs live. Relative paths are resolved against the directory the launcher runs in."""

    data_dir: str = "data"
    runs_dir: str = "runs"


@dataclass
class TaskConfig:
    """What is learned. The task builds the model and the per-sample loss."""

    name: str = "cbed_distortion"
    # The EPE is evaluated on a grid of this many pixels per side; 0 means the image size.
    loss_grid_size: int = 0

    def __post_init__(self) -> None:
        _one_of("task.name", self.name, ("cbed_distortion",))
        _require(self.loss_grid_size >= 0, f"task.loss_grid_size must be >= 0, got {self.loss_grid_size}")


@dataclass
class DataConfig:
    """The HDF5 file(s) and the DataLoader settings."""

    path: str = "${paths.data_dir}/cbed_${data.generator.image_size}px_${data.generator.num_images}.h5"
    # A separate validation file; when unset, the last `val_fraction` of `path` is held out.
    val_path: Optional[str] = None
    val_fraction: float = 0.2
    # Generate `path` with `generator` when it does not exist (meant for small debug datasets).
    generate_if_missing: bool = True
    generator: CBEDGeneratorConfig = field(default_factory=CBEDGeneratorConfig)
    images_key: str = "images"
    labels_key: str = "labels"
    # -1: one worker per CPU this rank was given, minus one for the training process.
    num_workers: int = -1
    persistent_workers: bool = True
    pin_memory: bool = True
    prefetch_factor: int = 2
    val_batch_size: int = 0  # 0: the training micro-batch size
    # samples: every epoch a permutation of all samples (batches read with one sorted fancy-index read).
    # blocks: a permutation of blocks of `block_size` consecutive samples, so a batch is a few contiguous slices
    # (several times faster to read; right for datasets whose neighbouring samples are independent draws,
    # like the synthetic CBED files).
    shuffle: str = "samples"
    block_size: int = 64

    def __post_init__(self) -> None:
        _one_of("data.shuffle", self.shuffle, ("samples", "blocks"))
        _require(self.block_size > 0, f"data.block_size must be > 0, got {self.block_size}")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.num_workers >= -1, f"data.num_workers must be >= 0 (or -1 for automatic), got {self.num_workers}")
        _require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _require(self.val_batch_size >= 0, f"data.val_batch_size must be >= 0, got {self.val_batch_size}")


@dataclass
class ScheduleConfig:
    """A learning-rate multiplier as a function of the optimizer step or of the epoch.

    name: constant | warmup_cosine | warmup_linear | cosine_restarts.
    All lengths count `interval`s (steps or epochs). `total` defaults to the run's max steps (or max epochs).
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

    def validate(self, key: str) -> None:
        _one_of(f"{key}.name", self.name, ("constant", "warmup_cosine", "warmup_linear", "cosine_restarts"))
        _one_of(f"{key}.interval", self.interval, ("step", "epoch"))
        _require(self.warmup >= 0, f"{key}.warmup must be >= 0, got {self.warmup}")
        _require(0.0 < self.warmup_start_factor <= 1.0,
                 f"{key}.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        _require(self.total is None or self.total > 0, f"{key}.total must be > 0, got {self.total}")
        _require(0.0 <= self.min_factor <= 1.0, f"{key}.min_factor must be in [0, 1], got {self.min_factor}")
        _require(self.cycle > 0, f"{key}.cycle must be > 0, got {self.cycle}")
        _require(self.cycle_multiplier >= 1.0, f"{key}.cycle_multiplier must be >= 1, got {self.cycle_multiplier}")


OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class ParamGroupConfig:
    """Parameters matched by name patterns, with their own optimizer settings and LR schedule.

    Each group gets its own optimizer and scheduler (as emicroml's LR scheduler manager does); unset fields
    inherit the top-level optim values. Parameters no group matches form the group named "default".
    """

    name: str = "group"
    # fnmatch patterns over parameter names, e.g. ["stem.*", "stages.0.*"].
    params: List[str] = field(default_factory=list)
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule: Optional[ScheduleConfig] = None
    # Freeze these parameters (no gradient, no optimizer); VirtuaLearn3D-style partial training.
    frozen: bool = False


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    param_groups: List[ParamGroupConfig] = field(default_factory=list)
    # Clip the global gradient norm to this value; null records the norm without clipping.
    clip_grad_norm: Optional[float] = 1.0

    def __post_init__(self) -> None:
        _one_of("optim.optimizer", self.optimizer, OPTIMIZERS)
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0,
                 f"optim.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")
        self.schedule.validate("optim.schedule")
        names = [group.name for group in self.param_groups]
        _require(len(set(names)) == len(names) and "default" not in names,
                 f"optim.param_groups names must be unique and not 'default', got {names}")
        for index, group in enumerate(self.param_groups):
            key = f"optim.param_groups[{index}]"
            _require(bool(group.params), f"{key}.params must list at least one parameter-name pattern")
            if group.optimizer is not None:
                _one_of(f"{key}.optimizer", group.optimizer, OPTIMIZERS)
            _require(group.lr is None or group.lr > 0, f"{key}.lr must be > 0, got {group.lr}")
            if group.schedule is not None:
                group.schedule.validate(f"{key}.schedule")


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
    # Forming the process group (a rank dead at launch fails the others after this long); see docs/signals.md.
    rendezvous_timeout_s: int = 120
    # Hang watchdog: a rank without a step for this long dumps its stacks and exits; 0: from the step time; <0: off.
    watchdog_s: float = 0.0

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


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    # The newest `keep_last` checkpoints are kept (at least 2: the newest may be the one a crash interrupted).
    keep_last: int = 2
    keep_best: bool = True
    # Global steps whose checkpoints are kept for good (emicroml's `checkpoints`).
    keep_steps: List[int] = field(default_factory=list)

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
    # Buffered rows are written to metrics.h5 every this many steps (and at every evaluation and checkpoint).
    flush_every_steps: int = 20
    plots: bool = True

    def __post_init__(self) -> None:
        _require(self.flush_every_steps > 0,
                 f"callbacks.metrics.flush_every_steps must be > 0, got {self.flush_every_steps}")


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


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
class Config:
    seed: int = 0
    run_name: str = "debug"
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: CBEDModelConfig = field(default_factory=CBEDModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# Overrides that do not change what is trained, left out of a sweep point's directory name, so the same sweep
# run again with another partition, time limit or data location finds its points again.
_NOT_IN_POINT_NAME = ("launcher", "hydra", "paths", "run_name", "data.path", "data.val_path", "debug")


def sweep_point_dirname(overrides: list[str]) -> str:
    """Directory name of a sweep point: its sorted `key=value` overrides (without launcher/path keys)."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not any(key == prefix or key.startswith(prefix + ".") for prefix in _NOT_IN_POINT_NAME):
            kept.append(override.replace("/", "_"))
    return ",".join(sorted(kept)) or "default"


def register_configs() -> None:
    """Register the schemas (conf/config.yaml lists `config_schema` first) and the config resolvers."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("hpctrain_point_dirname"):
        OmegaConf.register_new_resolver("hpctrain_point_dirname", lambda overrides: sweep_point_dirname(list(overrides)))


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Resolve a composed config into typed dataclasses, running every schema's checks."""
    try:
        if isinstance(cfg, DictConfig):  # resolve everything but Hydra's own node, which may not be ready yet
            cfg = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                   for key, value in cfg.items() if key != "hydra"}
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
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
