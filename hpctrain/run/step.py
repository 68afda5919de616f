"""One optimizer step: what it produced (`StepResult`), read by the loop and by every observer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepResult:
    loss: float
    # Mean of each named per-sample loss component (empty when the loss returns one tensor).
    loss_components: dict[str, float] = field(default_factory=dict)
    # With callbacks.metrics.per_sample_train, on rank 0: the step's sample indices and their losses (all ranks).
    sample_index: np.ndarray | None = None
    sample_loss: np.ndarray | None = None
    grad_norm: float = 0.0
    num_samples: int = 0
    nonfinite: bool = False
    stop_requested: bool = False
