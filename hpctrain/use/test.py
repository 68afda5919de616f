"""`python -m hpctrain.test RUN_DIR [--checkpoint best|latest|STEP] [--num-processes N] [--slurm] [--save-outputs]
[OVERRIDES]`:
the test phase (IRIS's test_reverter, hippynn's test evaluation). It evaluates one checkpoint of a run over the
whole test set with the run's own config: its model, loss, metrics and transforms (noise, litter, drawn with the
test stage's own keys and `--seed`), on 1 or N local ranks or as a SLURM job with the run's launcher settings.

Overrides are `key=value` pairs on the run's resolved config, e.g. `data.test_dataset={path: other.h5}`.
Each sample is evaluated exactly once; the per-sample values go to `RUN_DIR/test/<name>.h5` (written to a
temporary file and renamed), and a summary is printed. The run's checkpoints and metrics.h5 are never touched.
The means go to the run's loggers (`callbacks.loggers`), each as a logger run of its own (docs/watching.md).

Layout of a test file: `/test/per_sample/<name>` (v,) and `/test/<name>` (scalar mean) for the loss, its
components and every metric; `/test/sample_index` (v,); attributes `checkpoint_step`, `checkpoint`,
`model_sha256`, `seed`, `task`, `config` (the JSON of the config used).

`--save-outputs` also keeps the model's outputs of every test sample, on the inputs the metrics were computed on,
in `RUN_DIR/test/<name>.outputs.h5` (hpctrain.predict's layout and guarantees).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from hpctrain.run.checkpoint import CheckpointInfo, CheckpointManager, state_dict_digest
from hpctrain.config import Config, ConfigError, to_json
from hpctrain.run.metrics import baseline_ratios, finite_means, nonfinite_count
from hpctrain.run.checkpoint import choose_checkpoint
from hpctrain.use.runs import run_config

if TYPE_CHECKING:
    from hpctrain.use.predict import Plan

log = logging.getLogger(__name__)

TEST_DIRNAME = "test"


def config_for_test(info: CheckpointInfo, overrides: list[str]) -> Config:
    """The run's own config (from the checkpoint) with the overrides applied, checked."""
    typed = run_config(info, overrides)
    if typed.data.test_dataset is None:
        raise ConfigError("the run has no data.test_dataset; name one, e.g. data.test_dataset={path: test.h5} "
                          "(keys missing from it are taken from data.dataset)")
    return typed


def evaluate_rank(config: Config, run_dir: Path, checkpoint: str, output: str, seed: int,
                  raw_weights: bool = False) -> None:
    """One rank of the test phase: evaluate this rank's shard of the test set (with the checkpoint's weight
    average where it holds one, unless `raw_weights`); rank 0 writes the file."""
    from hpctrain.components import build_components
    from hpctrain.data.dataset import BatchReader, ShardSampler
    from hpctrain.data.loader import make_loader, resolve_num_workers, stop_loader_workers
    from hpctrain.process.distributed import available_cpus, init_distributed, shutdown_distributed
    from hpctrain.run.compile import compile_model
    from hpctrain.run.evaluate import Evaluator, autocast_for, report_nonfinite
    from hpctrain.process.seeding import configure_determinism
    from hpctrain.run.averaging import weights_kind, weights_of

    configure_determinism(config.trainer.deterministic)  # before init_distributed starts CUDA
    dist = init_distributed(device_preference=config.trainer.device, timeout_s=config.trainer.distributed_timeout_s)
    clean = False
    try:
        components = build_components(config)
        assert components.test_dataset is not None
        info = next(i for i in CheckpointManager(run_dir, keep_last=2).complete() if str(i.path) == checkpoint)
        state = CheckpointManager.load(info, map_location=dist.device)
        model = components.model.to(dist.device)
        weights = weights_of(state, raw=raw_weights)
        model.load_state_dict(weights)
        indices = np.arange(len(components.test_dataset))
        batch_size = config.data.val_batch_size or config.trainer.micro_batch_size
        num_workers = resolve_num_workers(config.data, max(1, available_cpus() // dist.local_world_size))
        loader = make_loader(
            BatchReader(components.test_dataset, transforms=components.transforms, seed=seed, stage="test"),
            ShardSampler(indices, batch_size=batch_size, rank=dist.rank, world_size=dist.world_size),
            config=config.data, num_workers=num_workers,
            pin_memory=config.data.pin_memory and dist.device.type == "cuda")
        evaluator = Evaluator(inputs=config.task.inputs, loss=components.loss, metrics=components.metrics, dist=dist,
                              device=dist.device, on_cpu=config.task.evaluate_on_cpu,
                              autocast=autocast_for(dist.device, config.trainer.precision),
                              device_transforms=components.device_transforms, seed=seed, stage="test")
        evaluation = evaluator(compile_model(model, config.trainer.compile), loader, step=info.step)
        stop_loader_workers()
        if dist.is_main:
            report_nonfinite(evaluation.nonfinite, components.test_dataset, "test")
            write_test_file(Path(output), evaluation.per_sample, evaluation.sample_index, config=config, info=info,
                            model_sha256=state_dict_digest(weights), seed=seed,
                            weights=weights_kind(state, raw=raw_weights))
        clean = True
    finally:
        shutdown_distributed(clean=clean)


def write_test_file(path: Path, per_sample: dict[str, np.ndarray], sample_index: np.ndarray, *, config: Config,
                    info: CheckpointInfo, model_sha256: str, seed: int, weights: str = "raw") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(temporary, "w") as file:
        group = file.create_group("test")
        means = finite_means(per_sample)  # over the samples whose loss and value are finite
        for name, values in per_sample.items():
            dataset = group.create_dataset(f"per_sample/{name}", data=values.astype(np.float32))
            dataset.attrs["dim_0"] = "test sample"
            group.create_dataset(name, data=means[name])
        group.create_dataset("nonfinite_samples", data=int(nonfinite_count(per_sample)))
        index = group.create_dataset("sample_index", data=sample_index.astype(np.int64))
        index.attrs["dim_0"] = "test sample"
        file.attrs.update({"format": "hpctrain.test", "format_version": 1, "checkpoint_step": info.step,
                           "checkpoint": str(info.path), "model_sha256": model_sha256, "weights": weights, "seed": seed,
                           "task": config.task.name, "config": to_json(config)})
        file.flush()
        os.fsync(file.id.get_vfd_handle())
    os.replace(temporary, path)


def summarize(path: Path) -> str:
    with h5py.File(path, "r") as file:
        means = {name: float(file[f"test/{name}"][()]) for name in file["test/per_sample"]}
        count = len(file["test/sample_index"])
        nonfinite = int(file["test/nonfinite_samples"][()]) if "test/nonfinite_samples" in file else 0
        step = int(file.attrs["checkpoint_step"])
    lines = [f"test of step {step}: {count} samples -> {path}", f"  loss {means['loss']:.6g}"]
    if nonfinite:
        lines.append(f"  {nonfinite} sample(s) with a non-finite loss or value, left out of the means (the log names "
                     f"them; test/per_sample holds every sample's values)")
    lines += [f"  loss / {name} = {ratio:.3f}" for name, ratio in baseline_ratios(means["loss"], means).items()]
    lines += [f"  {name:<40} {value:.6g}" for name, value in means.items() if name != "loss" and "." not in name]
    return "\n".join(lines)


class TestJob:
    """The callable submitit runs on every task of a test job: one rank each."""

    def __init__(self, config: Config, run_dir: Path, checkpoint: str, output: str, seed: int,
                 raw_weights: bool = False) -> None:
        self.args = (config, run_dir, checkpoint, output, seed, raw_weights)

    def __call__(self) -> None:
        import submitit

        from hpctrain.launching.job import configure_rank_logging

        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        configure_rank_logging(environment.rank)
        evaluate_rank(*self.args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpctrain.test", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step")
    parser.add_argument("--num-processes", type=int, default=1, help="local ranks (default 1)")
    parser.add_argument("--slurm", action="store_true", help="run as a SLURM job with the run's launcher settings")
    parser.add_argument("--seed", type=int, default=None, help="seed of the test stage's random transforms "
                                                               "(default: the run's seed)")
    parser.add_argument("--name", default=None, help="test file name (default: step_<checkpoint step>)")
    parser.add_argument("--raw-weights", action="store_true",
                        help="evaluate the raw weights where the run keeps a weight average (optim.weight_averaging)")
    parser.add_argument("--save-outputs", action="store_true",
                        help="also write the model's outputs of every test sample to <test file>.outputs.h5 "
                             "(hpctrain.predict's layout)")
    return parser


def _evaluate(config: Config, run_dir: Path, work_args: tuple[str, str, int, bool], *, num_processes: int,
              slurm: bool) -> None:
    """Evaluate the checkpoint over the test set on `num_processes` local ranks or as a SLURM job; the test file
    is written by rank 0."""
    from hpctrain.launching.app import fail

    if slurm:
        from hpctrain.launching.slurm import check_resources, make_executor

        try:
            check_resources(config.launcher)
            executor = make_executor(run_dir / TEST_DIRNAME / "submitit", config.launcher)
        except ConfigError as error:
            fail(str(error))
        job = executor.submit(TestJob(config, run_dir, *work_args))
        print(f"submitted SLURM test job {job.job_id}; waiting for it", flush=True)
        job.results()
    else:
        from dataclasses import replace

        from hpctrain.launching.job import run_local

        local = replace(config, launcher=replace(config.launcher, name="local", num_processes=num_processes))
        run_local(local, run_dir, work=evaluate_rank, args=work_args)


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    from hpctrain.launching.app import fail

    args = _parser().parse_intermixed_args(argv)  # options may come between the overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    run_dir = args.run_dir.absolute()
    try:
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir} is not a run directory")
        if args.num_processes < 1:
            raise ConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
        info = choose_checkpoint(run_dir, args.checkpoint)
        config = config_for_test(info, list(args.overrides))
        from hpctrain.components import check_run_inputs

        check_run_inputs(config, prepare=False)
    except ConfigError as error:
        fail(str(error))
    seed = config.seed if args.seed is None else args.seed
    output = run_dir / TEST_DIRNAME / f"{args.name or f'step_{info.step:09d}'}.h5"
    try:
        plan = outputs_plan(run_dir, info, list(args.overrides), output=output, seed=seed,
                            raw_weights=args.raw_weights) if args.save_outputs else None
    except ConfigError as error:
        fail(str(error))
    _evaluate(config, run_dir, (str(info.path), str(output), seed, args.raw_weights), num_processes=args.num_processes,
              slurm=args.slurm)
    print(summarize(output), flush=True)
    from hpctrain.components import build_loggers
    from hpctrain.loggers import log_test_phase

    # The run's loggers (callbacks.loggers): the test phase is a logger run of its own.
    log_test_phase([feed for _, feed in build_loggers(config.callbacks)], config, run_dir, output)
    if plan is not None:
        from hpctrain.use.predict import run_prediction, start

        try:
            run_prediction(start(plan, overwrite=True), config=config, num_processes=args.num_processes,
                           slurm=args.slurm)
        except ConfigError as error:
            fail(str(error))
        print(f"  outputs of every test sample -> {plan.output}", flush=True)
    return 0


def outputs_plan(run_dir: Path, info: CheckpointInfo, overrides: list[str], *, output: Path, seed: int,
                 raw_weights: bool = False) -> "Plan":
    """The prediction (hpctrain.predict) that keeps the model's outputs on the test set as the test phase sees it
    (its transforms, stage and seed), beside the test file; checked, nothing written."""
    from hpctrain.components import dataset_node
    from hpctrain.use.predict import DEFAULT_CHUNK_SIZE, make_plan
    from hpctrain.use.runs import load_run

    run = load_run(run_dir, checkpoint=info.step, overrides=overrides, raw_weights=raw_weights)
    config = run.config
    return make_plan(run, dataset_node(config.data, "test_dataset"), output=output.with_name(
        f"{output.stem}.outputs.h5"), seed=seed, stage="test", chunk_size=DEFAULT_CHUNK_SIZE,
        batch_size=config.data.val_batch_size or config.trainer.micro_batch_size)


TestJob.__test__ = False  # type: ignore[attr-defined]  # not a pytest test class
