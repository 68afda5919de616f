"""The measuring pieces that benchmarks/bench.py and benchmarks/gpu_check.py share: the ratio line they print,
hpctrain's loop timed step by step, the raw PyTorch loop it is measured against, the two taking turns, the tiny
model, and the config that strips a run down to its steps; for the scripts that launch whole runs (first_step.py,
local_ranks.py, ddp_step.py), the debug demo's file and a free port.

Not a command and not part of the hpctrain package: the scripts beside it import it (`import harness`: a script's
own directory is first on sys.path; they put the checkout's root there too, for its hpctrain). It builds trainers
only through hpctrain.components.build_trainer, and of a trainer uses fit(), clock and train_step (timed by
wrapping it on the instance).
"""

from __future__ import annotations

import copy
import itertools
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from hpctrain.config import Config
from hpctrain.data.dataset import BatchReader, DistributedBatchSampler
from hpctrain.run.contract import Components, model_inputs, per_sample_components

WARMUP_STEPS = 3  # not timed: first-call allocations, lazy initialisation
REPO = Path(__file__).resolve().parents[1]
DEBUG_DATA = REPO / "data" / "cbed_64px_4096.h5"  # the debug demo's file, for the scripts that launch whole runs


def ratio_line(label: str, ours: list[float], reference: list[float], unit: str, *, higher_is_better: bool) -> str:
    """Per-round ratios ours/reference: median (min-max), and the medians of both."""
    ratios = [a / b for a, b in zip(ours, reference)]
    return (f"  {label:<46} {statistics.median(ratios):6.3f}x ({min(ratios):.3f}-{max(ratios):.3f})   "
            f"hpctrain {statistics.median(ours):10.4g} {unit}, reference {statistics.median(reference):10.4g} {unit}"
            f"{'' if higher_is_better else '  (lower is better)'}")


def debug_data() -> Path:
    """The debug demo's file (DEBUG_DATA), generated first by a one-step debug run (its data.prepare hook) if
    missing."""
    if not DEBUG_DATA.exists():
        print(f"generating {DEBUG_DATA} first (the debug run's data.prepare hook)", flush=True)
        with tempfile.TemporaryDirectory() as run_dir:
            subprocess.run([sys.executable, "-m", "hpctrain.launch", "debug=fast", "trainer.max_steps=1",
                            f"hydra.run.dir={run_dir}"], cwd=REPO, check=True, capture_output=True)
    return DEBUG_DATA


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def quiet() -> Iterator[None]:
    """hpctrain's INFO logging off (the runs' start and end would interleave with the measurements)."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


# -- the loader -------------------------------------------------------------------------------------------------
def loader_rate(loader: Iterable[dict[str, torch.Tensor]], num_batches: int) -> float:
    """Samples per second of `num_batches` batches of `loader`, after its first (worker start-up)."""
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    started, samples = time.perf_counter(), 0
    for _ in range(num_batches):
        samples += len(next(batches)["index"])
    return samples / (time.perf_counter() - started)


def epochs(loader: Iterable[dict[str, torch.Tensor]], sampler: DistributedBatchSampler,
           steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches read by `loader`, epoch after epoch, as hpctrain's loop reads them."""
    for epoch in itertools.count():
        sampler.set_position(epoch, 0)
        for batch in loader:
            yield batch
            steps -= 1
            if steps == 0:
                return


# -- the tiny model ---------------------------------------------------------------------------------------------
class TinyModel(nn.Module):
    """A model whose step costs almost nothing, so the loop's own bookkeeping shows."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class TinyLoss:
    """Per-sample mean squared error against a batch field of the outputs' shape: a loss that costs almost nothing
    (the task's own may cost more than a tiny model's whole step)."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __call__(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (outputs - batch[self.field]).square().flatten(1).mean(dim=1)


def tiny_components(base: Config, components: Components) -> Config:
    """Swap the run's model and loss for the tiny ones (in `components`); returns the config that feeds it."""
    sample = BatchReader(components.split.train_dataset)[components.split.train_indices[:1]]
    width = int(np.prod(sample[base.task.inputs[0]].shape[1:]))
    outputs = components.model(*model_inputs(sample, base.task.inputs))
    components.model = TinyModel(width, outputs.shape[-1])
    base = replace(base, task=replace(base.task, inputs=base.task.inputs[:1]))
    target = next((name for name, value in sample.items() if name not in base.task.inputs
                   and value.is_floating_point() and value.shape == outputs.shape), None)
    if target is not None:
        components.loss = TinyLoss(target)
    return base


# -- the raw PyTorch loop ---------------------------------------------------------------------------------------
def step_durations(stamps: list[float]) -> np.ndarray:
    """Seconds of each step after the warm-up steps, from the times at which the steps ended."""
    return np.diff(stamps[WARMUP_STEPS - 1:])


def raw_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_function, batch: dict[str, torch.Tensor],
             inputs: list[str], autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """The reference step: forward, per-sample loss (under `autocast`), mean, backward, AdamW, zero_grad."""
    with autocast():
        terms = per_sample_components(loss_function(model(*model_inputs(batch, inputs)), batch),
                                      len(batch["index"]), key="task.loss")
    sum(terms.values()).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def raw_loop_seconds(model: nn.Module, loss_function, batches: Iterable[dict[str, torch.Tensor]], inputs: list[str],
                     lr: float) -> np.ndarray:
    """The reference: a plain PyTorch loop of `raw_step` over batches already in RAM, or read by hpctrain's
    loader; the seconds of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    stamps = []
    for batch in batches:
        raw_step(model, optimizer, loss_function, batch, inputs)
        stamps.append(time.perf_counter())
    return step_durations(stamps)


# -- hpctrain's loop --------------------------------------------------------------------------------------------
def step_config(config: Config, steps: int) -> Config:
    """The run's config for timing `steps` steps: no evaluation, checkpoint, plot, clipping, schedule or loader
    worker."""
    return replace(config, trainer=replace(config.trainer, max_steps=steps, max_epochs=None, progress_bar=False,
                                           val_every_steps=10**9),
                   data=replace(config.data, num_workers=0),
                   optim=replace(config.optim, clip_grad_norm=None,
                                 schedule=replace(config.optim.schedule, name="constant")),
                   callbacks=replace(config.callbacks, checkpoint=replace(config.callbacks.checkpoint,
                                                                          every_steps=10**9),
                                     metrics=replace(config.callbacks.metrics, plots=False)),
                   task=replace(config.task, plot=None))  # a plot process starting would share the CPU


def hpctrain_loop_seconds(config: Config, components: Components, steps: int, run_dir: Path,
                          between: Callable[[], None] | None = None,
                          device: torch.device = torch.device("cpu"),
                          built: Callable[[Any], None] | None = None) -> np.ndarray:
    """hpctrain's loop, the seconds of each step: from the end of one step to the end of the next, so each counts
    reading its batches from the file, the step, and the loop's bookkeeping (metrics, schedule, progress); the
    run's start and end (and no evaluation or checkpoint, which are configured away) are not timed. `between`, if
    given, runs after each step, untimed (the next step's time starts when it returns); `built`, if given,
    receives the trainer before it starts."""
    from hpctrain.components import build_trainer
    from hpctrain.process.distributed import DistributedContext

    context = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    run_dir.mkdir(parents=True)
    config = replace(config, trainer=replace(config.trainer, max_steps=steps))
    trainer = build_trainer(config, run_dir, context, components)
    if built is not None:
        built(trainer)
    ends: list[float] = []
    resumes: list[float] = []
    step = trainer.train_step

    def timed_step(*args, **kwargs):
        result = step(*args, **kwargs)
        ends.append(time.perf_counter())
        if between is not None:
            between()
        resumes.append(time.perf_counter())
        return result

    trainer.train_step = timed_step  # the loop calls self.train_step: this instance's, timed
    trainer.fit()
    return np.subtract(ends[WARMUP_STEPS:], resumes[WARMUP_STEPS - 1:-1])


def interleaved_seconds(config: Config, components: Components, raw_batches: Iterator[dict[str, torch.Tensor]],
                        steps: int, run_dir: Path, device: torch.device = torch.device("cpu")
                        ) -> tuple[np.ndarray, np.ndarray]:
    """hpctrain's steps and raw steps (on a copy of the model, reading `raw_batches`) taking turns, one step each:
    pairs measured within a fraction of a second of each other, which a machine whose speed drifts between
    rounds cannot tell apart. The seconds of each hpctrain step and of each raw step (the read included).

    On a GPU the raw step copies its batch there (non-blocking, from pinned memory if the loader pins) and ends
    with a synchronisation, as hpctrain's step ends with its one host sync; both run under trainer.precision's
    autocast."""
    from hpctrain.run.evaluate import autocast_for

    model = copy.deepcopy(components.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    autocast = autocast_for(device, config.trainer.precision)
    raw: list[float] = []

    def one_raw_step() -> None:
        started = time.perf_counter()
        batch = next(raw_batches)
        if device.type != "cpu":
            batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
        raw_step(model, optimizer, components.loss, batch, config.task.inputs, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        raw.append(time.perf_counter() - started)

    ours = hpctrain_loop_seconds(config, components, steps, run_dir, between=one_raw_step, device=device)
    return ours, np.array(raw[WARMUP_STEPS:len(ours) + WARMUP_STEPS])
