"""`python -m hpctrain.predict RUN_DIR [--input FILE.h5 | --dataset NODE] [--output PRED.h5]
[--checkpoint best|latest|STEP] [--num-processes N] [--slurm] [OVERRIDES]`: run a trained model over every sample
of a dataset and write its outputs, per sample and in input order, into one HDF5 file.

The dataset is any the config can describe: the run's own `data.dataset` node with another file (`--input`),
the run's node as overridden (`data.dataset.path=...`), or a whole `_target_` node (`--dataset "{_target_: ...}"`).
Each batch goes through the run's transforms (stage `predict`: random augmentations apply only where a transform
lists that stage) and `model(*[batch[name] for name in task.inputs])`; the outputs (a tensor, a tuple or a dict of
tensors, one row per sample) are stored as they are.

How it is computed: the samples are cut into chunks of `--chunk-size` (fixed by the sample count, never by the
number of ranks), and the chunks are shared out among the ranks; inside a chunk, batches start at the chunk's
first sample, so every sample meets the same batch whatever the number of ranks. Each finished chunk goes to the
work directory `<output>.parts/` (an HDF5 file written to a temporary name and renamed, then a manifest with its
SHA-256). A rerun of the same prediction (or a SLURM requeue: the job resubmits itself) verifies and keeps the
finished chunks and computes only the others. At the end rank 0 copies the chunks in order into the final file
(one chunk in memory at a time), fsyncs it, renames it into place and removes the work directory. The result is
the same file content for 1 or N ranks, interrupted or not.

Layout: `/outputs/<name>` (n, ...) for each output (`output` for a single tensor, `output_<i>` for a tuple, the
keys of a dict); a ragged output (the model also returns `<name>_length`, the number of valid rows of each
sample, as hpctrain's reader passes ragged inputs) is stored as `/outputs/<name>/values` (sum of lengths, ...) and
`/outputs/<name>/offsets` (n+1,), the layout hpctrain.data.HDF5Dataset reads (docs/data-format.md);
`/sample_index` (n,); attributes `checkpoint_step`, `checkpoint`, `checkpoint_sha256`, `model_sha256`, `weights`
(raw, or the kind of the checkpoint's weight average that predicted: ema, swa), `seed`,
`stage`, `task`, `plan_sha256` (of what was computed), `dataset` (JSON of the dataset node), `config` (JSON of the
run's config with the overrides; overrides of `launcher.*` and of the loader settings `data.num_workers` etc. only
choose where and how it runs, e.g. `--slurm launcher.nodes=2`: they are used, not recorded, and a rerun with others
keeps the finished chunks).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from hpctrain.config import Config, ConfigError, is_target_node, to_json

log = logging.getLogger(__name__)

PREDICTIONS_DIRNAME = "predictions"
PLAN_FILENAME = "plan.json"
DEFAULT_CHUNK_SIZE = 4096
HDF5_CHUNK_BYTES = 1 << 20  # target size of a chunk of the final file's datasets
FORMAT = "hpctrain.predict"


@dataclass(frozen=True)
class Plan:
    """Everything a prediction's result depends on. Chunks in a work directory are reused only by the same plan."""

    run_dir: str
    checkpoint: str  # the checkpoint file
    checkpoint_step: int
    checkpoint_sha256: str  # of the file (hpctrain.run.checkpoint.checkpoint_sha256)
    model_sha256: str  # of the weights (hpctrain.run.checkpoint.state_dict_digest)
    config_json: str  # the run's config with the overrides
    dataset: dict[str, Any]  # the dataset node predicted over
    num_samples: int
    batch_size: int
    chunk_size: int
    seed: int
    stage: str
    output: str
    raw_weights: bool = False  # the raw weights where the checkpoint holds a weight average
    weights: str = "raw"  # which weights predict (hpctrain.run.averaging.weights_kind)

    @property
    def config(self) -> Config:
        from hpctrain.config import from_json

        return from_json(self.config_json)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min(self.num_samples, (chunk + 1) * self.chunk_size))

    @property
    def work_dir(self) -> Path:
        return work_dir_for(Path(self.output))


def work_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def read_plan(path: str | Path) -> Plan:
    return Plan(**json.loads(Path(path).read_text()))


def plan_digest(plan: Plan) -> str:
    """SHA-256 of what a plan computes (everything but where the file goes)."""
    fields = {key: value for key, value in dataclasses.asdict(plan).items() if key != "output"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def holds_result(plan: Plan) -> bool:
    """The plan's output file is in place, written by this plan (a requeued attempt of a finished prediction)."""
    try:
        with h5py.File(plan.output, "r") as file:
            return file.attrs.get("plan_sha256") == plan_digest(plan)
    except OSError:
        return False


# -- the model's outputs, per sample ----------------------------------------------------------------------------
def named_outputs(outputs: Any, batch_size: int) -> dict[str, Any]:
    """A model's outputs as named CPU arrays, one row per sample; ragged ones (with `<name>_length`) as a list of
    per-sample arrays, trimmed to their lengths. ValueError (naming the output) for anything else."""
    import torch

    if isinstance(outputs, torch.Tensor):
        items = {"output": outputs}
    elif isinstance(outputs, Mapping):
        items = {str(key): value for key, value in outputs.items()}
    elif isinstance(outputs, (tuple, list)):
        items = {f"output_{index}": value for index, value in enumerate(outputs)}
    else:
        raise ValueError(f"the model returned {type(outputs).__name__}; predict stores a tensor, a tuple or a dict "
                         f"of tensors")
    arrays: dict[str, np.ndarray] = {}
    for name, value in items.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"output {name!r} is {type(value).__name__}, not a tensor")
        if "/" in name or not name:
            raise ValueError(f"output name {name!r} cannot be an HDF5 dataset name")
        if value.ndim == 0 or value.shape[0] != batch_size:
            raise ValueError(f"output {name!r} has shape {tuple(value.shape)}; it needs one row per sample "
                             f"(a first axis of {batch_size}, the batch size)")
        value = value.detach()
        if value.dtype in (torch.bfloat16, torch.float16):  # HDF5 has no bfloat16; one float type for both
            value = value.float()
        arrays[name] = value.cpu().numpy()
    named: dict[str, Any] = {}
    for name, array in arrays.items():
        lengths = arrays.get(f"{name}_length")
        if lengths is not None:
            if array.ndim < 2 or lengths.ndim != 1 or lengths.dtype.kind not in "iu":
                raise ValueError(f"output {name!r} with {name}_length: needs (batch, length, ...) rows and "
                                 f"integer lengths (batch,), got {array.shape} and {lengths.shape} {lengths.dtype}")
            named[name] = [array[row, :int(length)] for row, length in enumerate(lengths)]
        elif not (name.endswith("_length") and name.removesuffix("_length") in arrays):
            named[name] = array
    return named


class ChunkOutputs:
    """The outputs of one chunk, batch by batch, and the chunk file they make."""

    def __init__(self, chunk: int, samples: range) -> None:
        self.chunk, self.samples = chunk, samples
        self.parts: dict[str, list[Any]] = {}

    def add(self, named: dict[str, Any]) -> None:
        if self.parts and set(named) != set(self.parts):
            raise ValueError(f"the model's outputs changed between batches: {sorted(self.parts)} then {sorted(named)}")
        for name, value in named.items():
            self.parts.setdefault(name, []).append(value)

    def write(self, directory: Path) -> None:
        """The chunk file (temporary name, fsync, rename), then its manifest with the file's SHA-256."""
        name = chunk_name(self.chunk)
        path = directory / f"{name}.h5"
        temporary = directory / f".{name}.h5.tmp-{os.getpid()}"
        with h5py.File(temporary, "w", track_order=True) as file:
            file.create_dataset("sample_index", data=np.asarray(self.samples, dtype=np.int64))
            for output, parts in sorted(self.parts.items()):
                if isinstance(parts[0], list):  # ragged: per-sample arrays
                    samples = [sample for batch in parts for sample in batch]
                    lengths = np.array([len(sample) for sample in samples], dtype=np.int64)
                    file.create_dataset(f"{output}/values", data=np.concatenate(samples))
                    file.create_dataset(f"{output}/offsets", data=np.concatenate([[0], np.cumsum(lengths)]))
                else:
                    shapes = {part.shape[1:] for part in parts}
                    if len(shapes) > 1:
                        raise ValueError(f"output {output!r} has rows of shapes {sorted(shapes)} in different "
                                         f"batches; for a per-sample length, also return {output}_length (its "
                                         f"valid rows per sample) and it is stored ragged")
                    file.create_dataset(output, data=np.concatenate(parts))
            file.flush()
            os.fsync(file.id.get_vfd_handle())
        os.replace(temporary, path)
        manifest = {"chunk": self.chunk, "start": self.samples.start, "stop": self.samples.stop,
                    "file": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}
        temporary = directory / f".{name}.json.tmp-{os.getpid()}"
        temporary.write_text(json.dumps(manifest))
        os.replace(temporary, directory / f"{name}.json")


def chunk_name(chunk: int) -> str:
    return f"chunk_{chunk:06d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chunk_is_done(directory: Path, plan: Plan, chunk: int) -> bool:
    """The chunk's file is there, complete (its manifest) and intact (size and SHA-256 match)."""
    name = chunk_name(chunk)
    try:
        manifest = json.loads((directory / f"{name}.json").read_text())
    except (OSError, ValueError):
        return False
    samples = plan.chunk_range(chunk)
    path = directory / f"{name}.h5"
    intact = (manifest.get("start"), manifest.get("stop")) == (samples.start, samples.stop) and path.is_file() \
        and path.stat().st_size == manifest.get("size") and file_sha256(path) == manifest.get("sha256")
    if not intact:
        log.warning("chunk %s in %s is incomplete or corrupt: computed again", name, directory)
    return intact


class ChunkBatches:
    """The batches of some chunks, in order; each batch lies in one chunk and starts at a multiple of the batch
    size from the chunk's start (so the batches do not depend on how the chunks are shared among ranks)."""

    def __init__(self, plan: Plan, chunks: Sequence[int]) -> None:
        from hpctrain.data.dataset import ShardSampler

        self.batches: list[tuple[int, np.ndarray]] = []
        for chunk in chunks:
            samples = plan.chunk_range(chunk)
            indices = np.arange(samples.start, samples.stop)
            self.batches += [(chunk, batch) for batch in ShardSampler(indices, batch_size=plan.batch_size, rank=0,
                                                                     world_size=1)]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (indices for _, indices in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# -- one rank ----------------------------------------------------------------------------------------------------
def build_reader(node: dict, config: Config, *, seed: int, stage: str) -> Any:
    """The reader of batches of the dataset `node` describes, with the run's transforms (hpctrain.data)."""
    from hpctrain.components import build
    from hpctrain.data.dataset import BatchReader

    dataset = build("data.dataset", node)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        raise ConfigError(f"data.dataset: {type(dataset).__name__} is not a map-style dataset with samples")
    transforms = [build(f"data.transforms[{index}]", transform)
                  for index, transform in enumerate(config.data.transforms)]
    return BatchReader(dataset, transforms=transforms, seed=seed, stage=stage)


def first_batch(reader: Any, config: Config, batch_size: int, *, device_transforms: list[Any] = (),
                seed: int = 0, stage: str = "predict") -> dict[str, Any]:
    """The dataset's first batch (after the device transforms), checked for the model's inputs."""
    from hpctrain.components import read_checked_batch

    return read_checked_batch(reader, np.arange(min(batch_size, len(reader.dataset))), config.task.inputs,
                              device_transforms=device_transforms, seed=seed, stage=stage)


def build_device_transforms(config: Config) -> list[Any]:
    """task.device_transforms, run on each batch on the device before the forward pass, as in training."""
    from hpctrain.instantiate import build

    return [build(f"task.device_transforms[{index}]", node)
            for index, node in enumerate(config.task.device_transforms)]


def predict_rank(config: Config, run_dir: Path, plan_json: str) -> None:
    """One rank of a prediction: compute this rank's unfinished chunks; rank 0 then assembles the file."""
    import torch

    from hpctrain.data.loader import make_loader, resolve_num_workers, stop_loader_workers
    from hpctrain.process.distributed import available_cpus, init_distributed, shutdown_distributed
    from hpctrain.run.averaging import weights_of
    from hpctrain.run.checkpoint import choose_checkpoint, load_checkpoint, state_dict_digest
    from hpctrain.use.runs import build_model

    plan = Plan(**json.loads(plan_json))
    if not plan.work_dir.is_dir() and holds_result(plan):
        # An attempt that finished in the moment SLURM requeued it: its result is complete.
        log.info("%s is complete already: nothing to do", plan.output)
        return
    dist = init_distributed(device_preference=config.trainer.device, timeout_s=config.trainer.distributed_timeout_s)
    clean = False
    try:
        state = load_checkpoint(choose_checkpoint(Path(plan.run_dir), plan.checkpoint_step),
                                map_location=dist.device)
        if state_dict_digest(weights_of(state, raw=plan.raw_weights)) != plan.model_sha256:
            raise ConfigError(f"{plan.checkpoint}: the weights changed since the prediction started (model SHA-256 "
                              f"{plan.model_sha256[:12]}...); remove {plan.work_dir} to start it again")
        model = build_model(config, state, dist.device, raw=plan.raw_weights)
        device_transforms = build_device_transforms(config)
        reader = build_reader(plan.dataset, config, seed=plan.seed, stage=plan.stage)
        mine = np.array_split(np.arange(plan.num_chunks), dist.world_size)[dist.rank]
        todo = [int(chunk) for chunk in mine if not chunk_is_done(plan.work_dir, plan, int(chunk))]
        log.info("rank %d: %d of its %d chunks to compute (%d kept from an earlier attempt)", dist.rank, len(todo),
                 len(mine), len(mine) - len(todo))
        cpus = max(1, available_cpus() // dist.local_world_size)
        torch.set_num_threads(config.trainer.num_threads or cpus)
        batches = ChunkBatches(plan, todo)
        num_workers = resolve_num_workers(config.data, cpus) if len(batches) > 1 else 0
        loader = make_loader(reader, batches, config=config.data, num_workers=num_workers, pin_memory=False)
        compute_chunks(model, zip(batches.batches, loader), plan, config=config, device=dist.device,
                       device_transforms=device_transforms)
        stop_loader_workers()
        if dist.is_distributed:
            dist.barrier()  # every chunk is written
        if dist.is_main:
            assemble(plan)
        clean = True
    finally:
        shutdown_distributed(clean=clean)


def compute_chunks(model: Any, batches: Any, plan: Plan, *, config: Config, device: Any,
                   device_transforms: list[Any]) -> None:
    """Run the model over ((chunk, indices), batch) pairs, in chunk order, and write each chunk's outputs as it
    completes (a requeued prediction keeps the chunks written)."""
    import torch

    from hpctrain.run.contract import model_inputs
    from hpctrain.run.evaluate import autocast_for
    from hpctrain.transforms import apply_device_transforms

    autocast = autocast_for(device, config.trainer.precision)
    current: ChunkOutputs | None = None
    with torch.no_grad():
        for (chunk, indices), batch in batches:
            if current is None or current.chunk != chunk:
                if current is not None:
                    current.write(plan.work_dir)
                current = ChunkOutputs(chunk, plan.chunk_range(chunk))
            if device.type != "cpu":
                batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
            batch = apply_device_transforms(device_transforms, batch, seed=plan.seed, stage=plan.stage)
            with autocast():
                outputs = model(*model_inputs(batch, config.task.inputs))
            current.add(named_outputs(outputs, len(indices)))
    if current is not None:
        current.write(plan.work_dir)


# -- the final file ---------------------------------------------------------------------------------------------
def assemble(plan: Plan) -> Path:
    """Copy the verified chunks in order into the final file (temporary, fsync, rename); remove the work
    directory."""
    output, directory = Path(plan.output), plan.work_dir
    missing = [chunk for chunk in range(plan.num_chunks) if not chunk_is_done(directory, plan, chunk)]
    if missing:
        raise RuntimeError(f"{directory}: chunks {missing[:5]} are missing or corrupt; run the same command again")
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w", track_order=True) as final:
            outputs = final.create_group("outputs")
            index = final.create_dataset("sample_index", shape=(plan.num_samples,), dtype=np.int64,
                                         chunks=_rows_per_chunk(plan.num_samples, 8))
            index.attrs["dim_0"] = "sample"
            ragged_ends: dict[str, int] = {}
            for chunk in range(plan.num_chunks):
                samples = plan.chunk_range(chunk)
                with h5py.File(directory / f"{chunk_name(chunk)}.h5", "r") as part:
                    index[samples.start:samples.stop] = part["sample_index"][()]
                    for name in part:
                        if name == "sample_index":
                            continue
                        if chunk == 0:
                            _create_output(outputs, name, part[name], plan.num_samples)
                        elif name not in outputs:
                            raise RuntimeError(f"chunk {chunk} has output {name!r}, the first chunk has not")
                        if isinstance(part[name], h5py.Group):  # ragged
                            values, offsets = part[f"{name}/values"][()], part[f"{name}/offsets"][()]
                            target = outputs[f"{name}/values"]
                            end = ragged_ends.get(name, 0)
                            target.resize(end + len(values), axis=0)
                            target[end:] = values
                            outputs[f"{name}/offsets"][samples.start + 1:samples.stop + 1] = offsets[1:] + end
                            ragged_ends[name] = end + len(values)
                        else:
                            outputs[name][samples.start:samples.stop] = part[name][()]
            final.attrs.update({
                "format": FORMAT, "format_version": 1, "checkpoint_step": plan.checkpoint_step,
                "checkpoint": plan.checkpoint, "checkpoint_sha256": plan.checkpoint_sha256,
                "model_sha256": plan.model_sha256, "weights": plan.weights, "seed": plan.seed, "stage": plan.stage,
                "plan_sha256": plan_digest(plan),
                "task": plan.config.task.name, "dataset": json.dumps(plan.dataset, sort_keys=True),
                "config": plan.config_json})
            final.flush()
            os.fsync(final.id.get_vfd_handle())
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    shutil.rmtree(directory)
    log.info("predictions of %d samples written to %s", plan.num_samples, output)
    return output


def _rows_per_chunk(num_rows: int, row_bytes: int) -> int:
    return max(1, min(num_rows, HDF5_CHUNK_BYTES // max(1, row_bytes)))


def _create_output(group: h5py.Group, name: str, first: h5py.Dataset | h5py.Group, num_samples: int) -> None:
    if isinstance(first, h5py.Group):
        values = first["values"]
        row = values.shape[1:]
        group.create_dataset(f"{name}/values", shape=(0, *row), maxshape=(None, *row), dtype=values.dtype,
                             chunks=(_rows_per_chunk(1 << 30, values.dtype.itemsize * int(np.prod(row))), *row))
        offsets = group.create_dataset(f"{name}/offsets", shape=(num_samples + 1,), dtype=np.int64,
                                       chunks=_rows_per_chunk(num_samples + 1, 8))
        offsets[0] = 0
        group[name].attrs["layout"] = "ragged: sample i is values[offsets[i]:offsets[i+1]]"
    else:
        row = first.shape[1:]
        dataset = group.create_dataset(name, shape=(num_samples, *row), dtype=first.dtype,
                                       chunks=(_rows_per_chunk(num_samples, first.dtype.itemsize
                                                               * int(np.prod(row))), *row))
        dataset.attrs["dim_0"] = "sample"


# -- preflight and the command ----------------------------------------------------------------------------------
def dataset_node(config: Config, *, input_path: Path | None, node_text: str | None, inputs_only: bool) -> dict:
    """The dataset to predict over: a whole `_target_` node (--dataset), the run's data.dataset with another file
    (--input), or the run's data.dataset; with `inputs_only`, an HDF5Dataset's fields cut down to the model's
    inputs (a file without targets)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if node_text is not None:
        try:
            node = OmegaConf.to_container(OmegaConf.create(node_text), resolve=True)
        except (OmegaConfBaseException, ValueError) as error:
            raise ConfigError(f"--dataset: not a YAML config node ({str(error).splitlines()[0]})") from None
        if not is_target_node(node):
            raise ConfigError(f"--dataset must be a config node with a `_target_`, got {node_text!r}")
    else:
        node = dict(config.data.dataset)
        if input_path is not None:
            if "path" not in node:
                raise ConfigError(f"--input: the run's data.dataset ({node['_target_']}) takes no `path`; give the "
                                  f"whole dataset node with --dataset")
            if not input_path.is_file():
                raise ConfigError(f"--input: {input_path} does not exist")
            node["path"] = str(input_path.absolute())
    if inputs_only:
        fields = node.get("fields")
        if not isinstance(fields, Mapping):
            raise ConfigError("--inputs-only: the dataset node has no `fields` mapping to cut down")
        wanted = {name.removesuffix("_length") for name in config.task.inputs}
        node["fields"] = {name: where for name, where in fields.items() if name in wanted}
    return node


def make_plan(run: Any, node: dict, *, output: Path, batch_size: int, chunk_size: int, seed: int,
              stage: str) -> Plan:
    """Build and check everything a prediction needs (dataset, transforms, model, one forward pass): the one
    error is a ConfigError; nothing is written."""
    import torch

    from hpctrain.run.checkpoint import checkpoint_sha256
    from hpctrain.run.contract import describe, model_inputs
    from hpctrain.config import from_json

    config = run.config
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"--batch-size and --chunk-size must be >= 1, got {batch_size} and {chunk_size}")
    reader = build_reader(node, config, seed=seed, stage=stage)
    recorded = without_runtime_settings(config, from_json(run.state["config"]))
    plan = Plan(run_dir=str(run.run_dir), checkpoint=str(run.checkpoint.path),
                checkpoint_step=run.checkpoint.step, checkpoint_sha256=checkpoint_sha256(run.checkpoint),
                model_sha256=run.model_sha256, config_json=to_json(recorded), dataset=node,
                num_samples=len(reader.dataset), batch_size=batch_size, chunk_size=chunk_size, seed=seed,
                stage=stage, output=str(output), raw_weights=run.raw_weights, weights=run.weights)
    batch = first_batch(reader, config, batch_size, device_transforms=build_device_transforms(config), seed=seed,
                        stage=stage)
    model = run.model()
    try:
        with torch.no_grad():
            outputs = model(*model_inputs(batch, config.task.inputs))
        named_outputs(outputs, len(batch["index"]))
    except Exception as error:
        raise ConfigError(f"model: model({describe(batch, config.task.inputs)}) failed: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if output.exists() and not output.is_file():
        raise ConfigError(f"--output: {output} is not a file")
    return plan


# Settings that choose how a prediction runs, not what it computes: overrides of them are used, not recorded, and
# do not stop a rerun from keeping the chunks already written.
LOADER_SETTINGS = ("num_workers", "persistent_workers", "pin_memory", "prefetch_factor")


def without_runtime_settings(config: Config, trained: Config) -> Config:
    """`config` with the launcher and the loader settings of the run's own config `trained`."""
    data = dataclasses.replace(config.data, **{key: getattr(trained.data, key) for key in LOADER_SETTINGS})
    return dataclasses.replace(config, launcher=trained.launcher, data=data)


def start(plan: Plan, *, overwrite: bool) -> Path:
    """Check the output and the work directory, and record the plan there (reused by a rerun of the same plan)."""
    output, directory = Path(plan.output), plan.work_dir
    if output.exists() and not overwrite:
        raise ConfigError(f"--output: {output} exists; remove it or pass --overwrite")
    plan_path = directory / PLAN_FILENAME
    if plan_path.exists():
        try:
            earlier = read_plan(plan_path)
        except (OSError, ValueError, TypeError):
            earlier = None
        if earlier != plan:
            differs = [key for key in Plan.__dataclass_fields__ if earlier is None
                       or getattr(earlier, key) != getattr(plan, key)]
            raise ConfigError(f"--output: {directory} holds the chunks of another prediction into {output} "
                              f"(it differs in {', '.join(differs)}); run it with the same settings to finish it, "
                              f"or remove {directory}")
        log.info("continuing the prediction in %s", directory)
        return plan_path
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output: cannot create {directory} ({error.strerror})") from None
    temporary = directory / f".{PLAN_FILENAME}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(dataclasses.asdict(plan), indent=1))
    os.replace(temporary, plan_path)
    return plan_path


class PredictJob:
    """The callable submitit runs on every task of a prediction job: one rank each. Checkpointable: on a time
    limit or preemption it resubmits itself, and the requeued job keeps the chunks already written. SIGTERM
    (a requeue, a preemption, `scancel`) stops it at once: what is finished is on disk, and a chunk cut short is
    only a temporary file."""

    def __init__(self, config: Config, run_dir: Path, plan_json: str) -> None:
        self.args = (config, run_dir, plan_json)

    def __call__(self) -> None:
        import signal

        import submitit

        from hpctrain.launching.job import configure_rank_logging

        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        configure_rank_logging(environment.rank)
        signal.signal(signal.SIGTERM, _stop_at_once)  # submitit's own handler would go on until SIGKILL
        predict_rank(*self.args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(PredictJob(*self.args))  # state is on disk, in the chunks


def _stop_at_once(signum: int, frame: Any) -> None:
    raise SystemExit(f"hpctrain.predict: signal {signum}: stopping; the finished chunks are kept, and the same "
                     f"command (or the requeued job) continues from them")


def run_prediction(plan_path: Path, *, config: Config, num_processes: int, slurm: bool) -> None:
    """Run a recorded plan on `num_processes` local ranks or as a SLURM job; `config` is the plan's with this
    command's launcher and loader settings."""
    plan = read_plan(plan_path)
    run_dir = Path(plan.run_dir)
    if without_runtime_settings(config, plan.config) != plan.config:
        raise ConfigError(f"the config differs from the plan recorded in {plan_path} in more than where and how "
                          f"it runs")
    if slurm:
        from hpctrain.launching.slurm import check_resources, make_executor

        check_resources(config.launcher)
        executor = make_executor(Path(plan.output).parent / "submitit", config.launcher)
        job = executor.submit(PredictJob(config, run_dir, plan_path.read_text()))
        print(f"submitted SLURM prediction job {job.job_id}; waiting for it", flush=True)
        job.results()
    else:
        from hpctrain.launching.job import run_local

        local = dataclasses.replace(config, launcher=dataclasses.replace(config.launcher, name="local",
                                                                         num_processes=num_processes))
        run_local(local, run_dir, work=predict_rank, args=(plan_path.read_text(),))


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    from hpctrain.launching.app import fail
    from hpctrain.use.runs import load_run

    parser = argparse.ArgumentParser(prog="python -m hpctrain.predict", description=(
        "Run a trained model over every sample of a dataset and write its outputs, in input order, to one HDF5 "
        "file; an interrupted prediction continues where it stopped."))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step")
    parser.add_argument("--num-processes", type=int, default=1, help="local ranks (default 1)")
    parser.add_argument("--slurm", action="store_true", help="run as a SLURM job with the run's launcher settings")
    parser.add_argument("--input", type=Path, default=None, help="an HDF5 file of the run's data.dataset format")
    parser.add_argument("--dataset", default=None, help="a whole dataset node, YAML: \"{_target_: pkg.Data, ...}\"")
    parser.add_argument("--inputs-only", action="store_true",
                        help="read only the fields the model takes (a file without the targets)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: RUN_DIR/predictions/<input name>_step_<checkpoint step>.h5")
    parser.add_argument("--batch-size", type=int, default=0, help="default: data.val_batch_size or the "
                                                                  "micro-batch size")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"samples per chunk of work (default {DEFAULT_CHUNK_SIZE}); a rerun keeps finished ones")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--raw-weights", action="store_true",
                        help="predict with the raw weights where the run keeps a weight average")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    if args.input is not None and args.dataset is not None:
        fail("give --input or --dataset, not both")
    try:
        if args.num_processes < 1:
            raise ConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
        run = load_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides,
                       raw_weights=args.raw_weights)
        config = run.config
        node = dataset_node(config, input_path=args.input, node_text=args.dataset, inputs_only=args.inputs_only)
        stem = Path(node["path"]).stem if isinstance(node.get("path"), str) else "dataset"
        output = (args.output or run.run_dir / PREDICTIONS_DIRNAME / f"{stem}_step_{run.checkpoint.step:09d}.h5")
        plan = make_plan(run, node, output=output.absolute(),
                         batch_size=args.batch_size or config.data.val_batch_size or config.trainer.micro_batch_size,
                         chunk_size=args.chunk_size, seed=config.seed, stage="predict")
        plan_path = start(plan, overwrite=args.overwrite)
        run_prediction(plan_path, config=config, num_processes=args.num_processes, slurm=args.slurm)
    except ConfigError as error:
        fail(str(error))
    print(f"predictions of {plan.num_samples} samples by step {plan.checkpoint_step} -> {plan.output}", flush=True)
    return 0

