"""`trainer.compile`: the model's forward (and so its backward) compiled with torch.compile, once per process.

Only the model is compiled, not the loss or the metrics. The Trainer keeps the plain module for everything that
names parameters (state dicts, freezing, the optimizers), so checkpoints hold the uncompiled state dict (no
`_orig_mod.` keys): a compiled run resumes uncompiled and back. The compiled module shares the plain module's
parameters; DDP wraps the compiled module (compiled first, so a freeze phase's new DDP wrapper reuses it).

Recompilation happens only where torch's guards say the graph no longer fits:
- the batch dimension of every input is marked dynamic (`maybe_mark_dynamic`) from the first call, so the last,
  shorter batch of an epoch and a validation batch of another size reuse the same graph, and the graph a step
  runs is a function of the config and the batch's shape alone, never of what the process ran before (the
  condition for bit-exact resume; torch's automatic dynamic shapes would swap graphs after the first shape change).
  A `dynamic` key in trainer.compile is the user's choice and turns this off (dynamic: true makes every dimension
  dynamic; false recompiles for each new batch size). Inductor's CPU code generator may still split a batch size
  range (e.g. batches under 16), which costs one more graph, once.
- a freeze phase that changes which parameters need gradients gets its own graph (guarded on requires_grad), once;
  a later phase with the same pattern reuses it.
- evaluation (eval mode, no gradients) has its own graph.
The recompile limit per function is raised to RECOMPILE_LIMIT so that these graphs are kept (past torch's default
of 8, dynamo would fall back to eager for the rest of the process: a run's numerics would depend on its history).
The hang watchdog does not time a compilation (the first step's, a new freeze phase's, a lazily compiled backward):
it may take minutes where the steps take milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from hpctrain.process import watchdog

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


class BatchDynamicModule(nn.Module):
    """The compiled model, called with the first (batch) dimension of each input tensor marked dynamic."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *inputs: Any) -> Any:
        for value in inputs:
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return self.compiled(*inputs)


def compile_model(model: nn.Module, setting: bool | dict[str, Any]) -> nn.Module:
    """The module to call for forward passes: `model` itself (setting false), or a compiled module sharing its
    parameters (true: torch.compile's defaults; a dict: its keyword arguments)."""
    if setting is False:
        return model
    options = {} if setting is True else dict(setting)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    _pause_watchdog_while_compiling()
    compiled = torch.compile(model, **options)
    log.info("trainer.compile: model compiled with %s (on its first step)", options or "torch.compile's defaults")
    return compiled if "dynamic" in options else BatchDynamicModule(compiled)


_compilation = contextlib.ExitStack()  # the watchdog's pause while dynamo compiles


def _compilation_started(_: object) -> None:
    _compilation.enter_context(watchdog.paused("compilation"))


def _compilation_ended(_: object) -> None:
    _compilation.close()


def _pause_watchdog_while_compiling() -> None:
    """Register (once) dynamo's callbacks that start and end every compilation (torch >= 2.5)."""
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None or _compilation_started in handler.start_callbacks:
        return
    handler.register_start_callback(_compilation_started)
    handler.register_end_callback(_compilation_ended)
