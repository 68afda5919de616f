"""`python -m hpctrain.benchmark [OVERRIDES] [--steps N] [--workers 0,2,4]`: measure, on your machine and file
system, what limits training throughput: the data loader alone (samples/s for several worker counts, and the
cost of one HDF5 read per sample instead of one sorted read per batch) and the training step alone.

It composes the same config as the launcher, so the numbers are for the run you are about to start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpctrain.components import check_run_inputs, model_inputs, per_sample_components
from hpctrain.config import ConfigError
from hpctrain.data import BatchReader, DistributedBatchSampler, make_loader
from hpctrain.launch import compose_config, fail


def loader_samples_per_second(loader, num_batches: int) -> float:
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    started, samples = time.perf_counter(), 0
    for _ in range(num_batches):
        samples += len(next(batches)["index"])
    return samples / (time.perf_counter() - started)


def per_sample_reads_per_second(dataset, indices: list[np.ndarray]) -> float:
    started, samples = time.perf_counter(), 0
    for batch in indices:
        for index in batch:
            dataset[int(index)]
            samples += 1
    return samples / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpctrain.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config-dir", "-cd", help="your own config directory (as Hydra's --config-dir)")
    parser.add_argument("--steps", type=int, default=50, help="batches / training steps to time")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to try")
    args = parser.parse_args(argv)
    try:
        config = compose_config(args.overrides, config_dir=args.config_dir)
        components = check_run_inputs(config, prepare=True)
    except ConfigError as error:
        fail(str(error))
    trainer_cfg, data_cfg = config.trainer, config.data
    split = components.split
    sampler = DistributedBatchSampler(split.train_indices, micro_batch_size=trainer_cfg.micro_batch_size,
                                      num_microbatches=1, rank=0, world_size=1, seed=config.seed,
                                      block_size=data_cfg.block_size if data_cfg.shuffle == "blocks" else 1)
    reader = BatchReader(split.train_dataset, transforms=components.transforms)
    steps = min(args.steps, sampler.steps_per_epoch - 1)
    print(f"data: {type(split.train_dataset).__name__} of {len(split.train_dataset)} samples, "
          f"shuffle={data_cfg.shuffle}, "
          f"batch {trainer_cfg.micro_batch_size}, {steps} batches, torch threads {torch.get_num_threads()}")
    for workers in (int(w) for w in args.workers.split(",")):
        loader = make_loader(reader, sampler, config=data_cfg, num_workers=workers, pin_memory=False)
        print(f"  loader, {workers} workers, batch reads:              "
              f"{loader_samples_per_second(loader, steps):8.0f} samples/s")
    order = sampler.epoch_order(0)
    batches = [sampler.step_microbatches(order, step)[-1] for step in range(steps)]
    print(f"  one read per sample (for comparison), in-process:  "
          f"{per_sample_reads_per_second(split.train_dataset, batches):8.0f} samples/s")

    model, loss_function = components.model, components.loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = reader[batches[0]]
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        terms = per_sample_components(loss_function(model(*model_inputs(batch, config.task.inputs)), batch),
                                      len(batch["index"]), key="task.loss")
        sum(terms.values()).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    median = float(np.median(timings[2:] or timings))
    print(f"  training step (forward, backward, AdamW) on CPU: {median * 1e3:.1f} ms median = "
          f"{trainer_cfg.micro_batch_size / median:.0f} samples/s; "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
