"""What watches a run: the observer interface (`Callback`), the read-only views its hooks receive, and
`Callbacks`, which calls a list of them from the training loop: hpctrain's own observers first (the metrics
writer, the plots, the progress bar: hpctrain.run.observers), then the user's callbacks and the loggers.

A callback is any object with some of the hooks below (all optional), built from a `_target_` node of
`callbacks.user` (the user's own) or `callbacks.loggers` (hpctrain.loggers, built on the same interface):

    on_start(run: RunView)                  once per (re)start, before the first step
    on_step_end(step: StepView)             after every optimizer step
    on_validation_end(evaluation: EvaluationView)
    on_checkpoint(checkpoint: CheckpointView)
    on_end(end: EndView)                    once, when the loop ends (finished, stopped or failed)

Hooks run on rank 0 only, unless the callback has `rank_zero_only = False`. They cannot change training: each
view holds copies (floats, read-only numpy arrays, a dict copy of the config), the RNG states of torch, numpy and
Python are restored after every hook (a callback drawing random numbers does not shift the run's streams), and a
hook that raises is logged once with its traceback and that callback is not called again. So a run with
callbacks gives bitwise the same weights as one without.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

HOOKS = ("on_start", "on_step_end", "on_validation_end", "on_checkpoint", "on_end")


@dataclass(frozen=True)
class RunView:
    run_dir: Path
    run_name: str
    # The resolved config as plain containers (a copy: changing it changes nothing).
    config: Mapping[str, Any]
    # The step the run starts from: 0 for a new run, the checkpoint's step after a resume.
    start_step: int
    # Names of the optimizer parameter groups, in the order of StepView.learning_rates.
    parameter_groups: Sequence[str]
    rank: int = 0
    world_size: int = 1
    # What the process does: "train", or "test/<name>" for a test phase (python -m hpctrain.test), which each
    # logger keeps as a run of its own.
    phase: str = "train"


@dataclass(frozen=True)
class StepView:
    step: int  # 1-based global optimizer step just done
    epoch: int
    loss: float
    loss_components: Mapping[str, float]
    learning_rates: Sequence[float]  # per parameter group
    grad_norm: float
    samples_per_second: float
    nonfinite: bool


@dataclass(frozen=True)
class EvaluationView:
    step: int
    # Mean over the validation set of `loss`, each `loss.<component>` and each metric.
    means: Mapping[str, float]
    # The same per validation sample (read-only arrays, in the order of `sample_index`).
    per_sample: Mapping[str, np.ndarray]
    sample_index: np.ndarray
    best_step: int
    improved: bool


@dataclass(frozen=True)
class CheckpointView:
    step: int
    path: Path  # complete once the hook runs for a synchronous checkpoint; being written for an async one
    best_step: int


@dataclass(frozen=True)
class EndView:
    run_dir: Path
    step: int
    finished: bool
    stop_reason: str
    best_step: int
    best_loss: float
    # The newest checkpoint of the best step, if kept (callbacks.checkpoint.keep_best).
    best_checkpoint: Path | None
    # PNGs the run drew (loss.png, metrics.png, lr.png and the task's plots).
    plots: Sequence[Path] = field(default_factory=tuple)
    # Set when the loop ended with an exception (a non-finite loss, a crash).
    error: str = ""


def read_only(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.setflags(write=False)
    return copy


class _RandomStates:
    """Saves and restores the process's RNG states around a hook."""

    def __enter__(self) -> None:
        self.torch = torch.random.get_rng_state()
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.torch)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


class Callbacks:
    """Calls each hook of a list of callbacks, isolated from the loop (see the module docstring), and of the
    built-in observers (`builtin`, hpctrain.run.observers), which get the loop's event itself, first (on_start: last),
    and are not isolated: an error in one is training's. An event with a `view()` method gives the read-only view
    the user's callbacks receive; another event is the view itself."""

    def __init__(self, callbacks: Sequence[tuple[str, Any]], *, is_main: bool, builtin: Sequence[Any] = ()) -> None:
        # (config key, callback) of those that run on this rank, each with the hooks it has.
        self._hooks: dict[str, list[tuple[str, Any]]] = {hook: [] for hook in HOOKS}
        for key, callback in callbacks:
            if not is_main and getattr(callback, "rank_zero_only", True):
                continue
            for hook in HOOKS:
                if callable(getattr(callback, hook, None)):
                    self._hooks[hook].append((key, callback))
        self.builtin = list(builtin)
        self._builtin_hooks = {hook: [getattr(observer, hook) for observer in self.builtin
                                      if callable(getattr(observer, hook, None))] for hook in HOOKS}
        self._failed: set[int] = set()
        self._random_states = _RandomStates()
        self.active = any(self._hooks.values())

    def wants(self, hook: str) -> bool:
        """Whether a user's callback or a logger has this hook."""
        return bool(self._hooks[hook])

    def call(self, hook: str, event: Any) -> None:
        if hook != "on_start":
            for method in self._builtin_hooks[hook]:
                method(event)
        if self._hooks[hook]:
            self._call_isolated(hook, event.view() if hasattr(event, "view") else event)
        if hook == "on_start":  # after the loggers' on_start, which reads the state their catch-up starts from
            for method in self._builtin_hooks[hook]:
                method(event)

    def close(self) -> None:
        """End the built-in observers' work (the last metrics flush, the plot process), in their order."""
        for observer in self.builtin:
            close = getattr(observer, "close", None)
            if callable(close):
                close()

    def _call_isolated(self, hook: str, view: Any) -> None:
        for key, callback in self._hooks[hook]:
            if id(callback) in self._failed:
                continue
            try:
                with self._random_states:
                    getattr(callback, hook)(view)
            except Exception:  # a user's hook may raise anything: it must not stop training
                self._failed.add(id(callback))
                log.exception("%s.%s raised; this callback is not called again (training goes on)", key, hook)
