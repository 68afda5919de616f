"""Evaluation: the per-sample loss and metrics of a whole dataset over all ranks (validation during training, and
the test phase of `python -m hpctrain.test`), and the task's plot hook (hippynn's plot maker), which rank 0 runs in
a process of its own so that it never holds up a training step.

A plot hook is the `_target_` node `task.plot`: a callable plot(evaluation, directory) -> list of PNG paths, given
an `Evaluation` (the per-sample values, the first validation batch with the model's outputs on it, and the fields
named by `task.gather` for every validation sample). It is called after every evaluation and once at the end.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hpctrain.data.dataset import nonfinite_fields, where_is
from hpctrain.run.contract import Batch, PerSampleFunction, model_inputs, per_sample_components
from hpctrain.process.distributed import DistributedContext
from hpctrain.transforms import apply_device_transforms

log = logging.getLogger(__name__)


def autocast_for(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[Any]]:
    """The forward passes' context for trainer.precision: autocast to bf16 or fp16, or nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Evaluation:
    """What one evaluation found, on rank 0 (the other ranks get the per-sample values only)."""

    step: int
    # name -> value of every sample, in sample order: `loss`, `loss.<component>`, each metric (`<metric>.<key>`).
    per_sample: dict[str, np.ndarray]
    sample_index: np.ndarray
    # The first batch this rank evaluated: its fields and the model's `outputs` on it (numpy, on CPU).
    examples: dict[str, np.ndarray] = field(default_factory=dict)
    # The fields named by task.gather (and `outputs` if listed) of every sample, in sample order.
    gathered: dict[str, np.ndarray] = field(default_factory=dict)
    final: bool = False
    # (sample index, its floating-point fields holding a NaN/Inf) of every sample whose loss or a value is not
    # finite, in index order; the means (hpctrain.run.metrics.finite_means) leave them out.
    nonfinite: list[tuple[int, list[str]]] = field(default_factory=list)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _as_numpy(value: Any, prefix: str) -> dict[str, np.ndarray]:
    """Tensors of a model output (a tensor, or a dict/tuple of them) as named CPU arrays."""
    if isinstance(value, torch.Tensor):
        return {prefix: value.detach().float().cpu().numpy() if value.is_floating_point()
                else value.detach().cpu().numpy()}
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) \
        else []
    arrays: dict[str, np.ndarray] = {}
    for key, item in items:
        arrays.update(_as_numpy(item, f"{prefix}.{key}"))
    return arrays


class Evaluator:
    """Runs the model over a loader and returns every sample's loss and metrics, gathered from all ranks."""

    def __init__(self, *, inputs: list[str], loss: PerSampleFunction, metrics: dict[str, PerSampleFunction],
                 dist: DistributedContext, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[Any]], gather: Iterable[str] = (),
                 on_cpu: bool = False, device_transforms: Sequence[Callable[..., Batch]] = (), seed: int = 0,
                 stage: str = "validation") -> None:
        self.inputs, self.loss, self.metrics = list(inputs), loss, metrics
        # task.device_transforms, with the loader's keys for this stage (seed, stage, epoch 0).
        self.device_transforms, self.seed, self.stage = list(device_transforms), seed, stage
        self.dist, self.device, self.autocast = dist, device, autocast
        self.gather, self.on_cpu = list(gather), on_cpu

    def values(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        size = len(batch["index"])
        components = per_sample_components(self.loss(outputs, batch), size, key="task.loss")
        values = {"loss": sum(components.values())}
        values.update({f"loss.{name}": value for name, value in components.items() if name})
        for name, metric in self.metrics.items():
            parts = per_sample_components(metric(outputs, batch), size, key=f"task.metrics.{name}")
            values.update({f"{name}.{part}" if part else name: value for part, value in parts.items()})
        return values

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader: Iterable[Batch], *, step: int) -> Evaluation:
        was_training = model.training
        model.eval()
        local: dict[str, list[np.ndarray]] = {}
        gathered: dict[str, list[np.ndarray]] = {}
        examples: dict[str, np.ndarray] = {}
        nonfinite: list[tuple[int, list[str]]] = []
        for batch in loader:
            batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
            batch = apply_device_transforms(self.device_transforms, batch, seed=self.seed, stage=self.stage)
            with self.autocast():
                outputs = model(*model_inputs(batch, self.inputs))
            if self.on_cpu:  # hippynn's way: hold the predictions on the host, compute the statistics there
                outputs, batch = _to_cpu(outputs), {name: value.cpu() for name, value in batch.items()}
                values = self.values(outputs, batch)
            else:
                with self.autocast():
                    values = self.values(outputs, batch)
            for name, value in values.items():
                local.setdefault(name, []).append(value.float().cpu().numpy())
            local.setdefault("_index", []).append(batch["index"].cpu().numpy())
            nonfinite += _nonfinite_samples(batch, {name: parts[-1] for name, parts in local.items()})
            arrays = {**{name: value.cpu().numpy() for name, value in batch.items()}, **_as_numpy(outputs, "outputs")}
            if not examples:
                examples = arrays
            for name in self.gather:
                for key, array in arrays.items():
                    if key == name or key.startswith(f"{name}."):
                        gathered.setdefault(key, []).append(array)
        model.train(was_training)
        gathered_local = self.dist.all_gather_object(
            ({name: np.concatenate(parts) for name, parts in local.items()}, nonfinite))
        shards = [values for values, _ in gathered_local]
        nonfinite = sorted(sample for _, samples in gathered_local for sample in samples)
        names = sorted({name for shard in shards for name in shard})
        per_sample = {name: np.concatenate([shard[name] for shard in shards if name in shard]) for name in names}
        sample_index = per_sample.pop("_index", np.empty(0, dtype=np.int64))
        if self.gather:
            gathered_shards = self.dist.all_gather_object({name: _concatenate_padded(parts)
                                                           for name, parts in gathered.items()})
            gathered_arrays = {name: _concatenate_padded([s[name] for s in gathered_shards if name in s])
                               for name in sorted({n for s in gathered_shards for n in s})}
        else:
            gathered_arrays = {}
        return Evaluation(step=step, per_sample=per_sample, sample_index=sample_index, examples=examples,
                          gathered=gathered_arrays, nonfinite=nonfinite)


def report_nonfinite(samples: list[tuple[int, list[str]]], dataset: Any, where: str, *, shown: int = 5) -> None:
    """Log the samples with a non-finite loss or value (how many, the first few by file, row and field): they
    are left out of the means, and a NaN in the data is found where it is."""
    if samples:
        log.warning("%s: %d sample(s) with a non-finite loss or value, left out of the means: %s", where,
                    len(samples), describe_samples(samples, dataset, shown=shown))


def describe_samples(samples: list[tuple[int, list[str]]], dataset: Any, *, shown: int = 5) -> str:
    """The first few samples by index, file, row and non-finite fields ("" for none)."""
    named = "; ".join(where_is(dataset, index, fields) for index, fields in samples[:shown])
    return named + (f"; and {len(samples) - shown} more" if len(samples) > shown else "")


def _nonfinite_samples(batch: Batch, values: dict[str, np.ndarray]) -> list[tuple[int, list[str]]]:
    """(index, fields holding a NaN/Inf) of the batch's samples with a non-finite loss or value."""
    bad = np.zeros(len(values["_index"]), dtype=bool)
    for name, array in values.items():
        if name != "_index":
            bad |= ~np.isfinite(array)
    return [(int(values["_index"][row]), nonfinite_fields(batch, int(row))) for row in np.flatnonzero(bad)]


def _concatenate_padded(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0; ragged fields padded per batch are padded again to the longest."""
    parts = [part for part in parts if part.size or part.ndim]
    if not parts:
        return np.empty(0)
    if all(part.shape[1:] == parts[0].shape[1:] for part in parts):
        return np.concatenate(parts)
    shape = tuple(max(part.shape[axis] for part in parts) for axis in range(1, parts[0].ndim))
    padded = [np.pad(part, [(0, 0)] + [(0, size - have) for size, have in zip(shape, part.shape[1:])])
              for part in parts]
    return np.concatenate(padded)


def _plot_process(connection: Connection, plot: Callable[[Evaluation, Path], Any]) -> None:
    """The plot process: draws each (evaluation, directory) it receives and answers with the PNGs written or the
    error. It ignores the job's signals (the training process decides when plotting ends) and exits when the
    training process closes the connection, or dies."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(1)  # matplotlib needs none; torch, if the hook uses it, must not compete with training
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        connection.send(_draw_here(plot, *message))


def _draw_here(plot: Callable[[Evaluation, Path], Any], evaluation: Evaluation,
               directory: Path) -> tuple[bool, Any]:
    """(True, PNG paths written) or (False, the error as text): a failing plot is reported, never raised."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return True, [str(path) for path in plot(evaluation, directory) or []]
    except Exception as error:
        return False, f"{type(error).__name__}: {error}"


class PlotWorker:
    """Runs `plot(evaluation, directory)` for rank 0 in a spawned process of its own, so that drawing takes
    neither the training process's interpreter lock nor its CPU time; a thread of the training process only hands
    evaluations over. While a plot is drawn, a newer evaluation replaces a waiting one (plots never queue up behind
    training); the final one is always drawn. A failing plot, or a plot process that dies, is logged and never
    stops training (a dead process is started again for the next evaluation). A hook that cannot be pickled is
    drawn by the thread itself, as said in the log."""

    def __init__(self, plot: Callable[[Evaluation, Path], Any], directory: Path) -> None:
        self.plot, self.directory = plot, directory
        self._pending: queue.Queue[Evaluation | None] = queue.Queue(maxsize=1)
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self.in_process = True
        try:
            pickle.dumps(plot)
        except Exception as error:
            self.in_process = False
            log.info("task.plot cannot be sent to a plot process (%s: %s): plots are drawn in a thread of the "
                     "training process", type(error).__name__, error)
        self._starting = threading.Lock()  # the training thread's start() and the plot thread's restart
        self._thread = threading.Thread(target=self._run, name="hpctrain-plots", daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Start the plot process now, well before the first plot (starting Python and importing the hook takes
        seconds of CPU); the owner calls it once the run's first step is done, which it would slow. A plot that
        comes first starts the process itself."""
        with self._starting:
            if self.in_process and self._process is None:
                self._start_process()

    def submit(self, evaluation: Evaluation) -> None:
        try:
            self._pending.get_nowait()  # drop a waiting, older evaluation
        except queue.Empty:
            pass
        self._pending.put(evaluation)

    def _run(self) -> None:
        try:
            while True:
                evaluation = self._pending.get()
                if evaluation is None:
                    return
                directory = self.directory / ("final" if evaluation.final else f"step_{evaluation.step:09d}")
                try:
                    written = self._draw(evaluation, directory)
                    log.info("plots of step %d: %s", evaluation.step, ", ".join(written))
                except Exception as error:  # a plot must never end a run
                    log.warning("task.plot failed at step %d (training goes on): %s", evaluation.step, error)
        finally:
            self._stop_process()

    def _draw(self, evaluation: Evaluation, directory: Path) -> list[str]:
        if not self.in_process:
            ok, answer = _draw_here(self.plot, evaluation, directory)
        else:
            with self._starting:
                if self._process is None or not self._process.is_alive():
                    self._start_process()
            assert self._process is not None and self._connection is not None
            try:
                self._connection.send((evaluation, directory))
                ok, answer = self._connection.recv()
            except (EOFError, OSError):
                self._process.join(5.0)
                code = self._process.exitcode
                self._stop_process()
                raise RuntimeError(f"the plot process died (exit code {code})") from None
        if not ok:
            raise RuntimeError(answer)
        return answer

    def _start_process(self) -> None:
        self._stop_process()
        # spawn, not fork: the training process holds threads (and possibly CUDA), which a fork does not survive.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_plot_process, args=(theirs, self.plot), name="hpctrain-plots")
        self._process.start()
        theirs.close()
        self._connection = ours

    def _stop_process(self, timeout: float = 10.0) -> None:
        process, connection, self._process, self._connection = self._process, self._connection, None, None
        if connection is not None:
            try:
                connection.send(None)
            except OSError:
                pass
            connection.close()
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()

    def close(self, timeout: float = 300.0) -> None:
        """Wait for the plots already submitted, then stop the thread and the plot process."""
        while True:
            try:
                self._pending.put(None, timeout=1.0)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    return
        self._thread.join(timeout)
        if self._thread.is_alive():  # a plot that hangs: end it rather than the run's exit
            log.warning("task.plot did not finish within %.0f s; its process is killed", timeout)
            process = self._process
            if process is not None:
                process.kill()
