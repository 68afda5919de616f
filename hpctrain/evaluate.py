"""Evaluation: the per-sample loss and metrics of a whole dataset over all ranks (validation during training, and
the test phase of `python -m hpctrain.test`), and the task's plot hook (hippynn's plot maker), which rank 0 runs in
a background thread so that it never holds up a training step.

A plot hook is the `_target_` node `task.plot`: a callable plot(evaluation, directory) -> list of PNG paths, given
an `Evaluation` (the per-sample values, the first validation batch with the model's outputs on it, and the fields
named by `task.gather` for every validation sample). It is called after every evaluation and once at the end.
"""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from hpctrain.components import Batch, PerSampleFunction, model_inputs, per_sample_components
from hpctrain.distributed import DistributedContext

log = logging.getLogger(__name__)


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
                 on_cpu: bool = False) -> None:
        self.inputs, self.loss, self.metrics = list(inputs), loss, metrics
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
        for batch in loader:
            batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
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
            arrays = {**{name: value.cpu().numpy() for name, value in batch.items()}, **_as_numpy(outputs, "outputs")}
            if not examples:
                examples = arrays
            for name in self.gather:
                for key, array in arrays.items():
                    if key == name or key.startswith(f"{name}."):
                        gathered.setdefault(key, []).append(array)
        model.train(was_training)
        shards = self.dist.all_gather_object({name: np.concatenate(parts) for name, parts in local.items()})
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
                          gathered=gathered_arrays)


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


class PlotWorker:
    """Runs `plot(evaluation, directory)` on rank 0 in a background thread. While a plot is drawn, a newer
    evaluation replaces a waiting one (plots never queue up behind training); the final one is always drawn.
    A failing plot is logged and never stops training."""

    def __init__(self, plot: Callable[[Evaluation, Path], Any], directory: Path) -> None:
        self.plot, self.directory = plot, directory
        self._pending: queue.Queue[Evaluation | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="hpctrain-plots", daemon=True)
        self._thread.start()

    def submit(self, evaluation: Evaluation) -> None:
        try:
            self._pending.get_nowait()  # drop a waiting, older evaluation
        except queue.Empty:
            pass
        self._pending.put(evaluation)

    def _run(self) -> None:
        while True:
            evaluation = self._pending.get()
            if evaluation is None:
                return
            directory = self.directory / ("final" if evaluation.final else f"step_{evaluation.step:09d}")
            try:
                directory.mkdir(parents=True, exist_ok=True)
                written = self.plot(evaluation, directory)
                log.info("plots of step %d: %s", evaluation.step, ", ".join(str(p) for p in written or []))
            except Exception as error:  # a plot must never end a run
                log.warning("task.plot failed at step %d (training goes on): %s: %s", evaluation.step,
                            type(error).__name__, error)

    def close(self, timeout: float = 300.0) -> None:
        """Wait for the plots already submitted, then stop the thread."""
        while True:
            try:
                self._pending.put(None, timeout=1.0)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    return
        self._thread.join(timeout)
