"""Validation plots of the density_reversion task, for the core's plot hook (``task.plot``, planned).

``DensityPlots()(evaluation, directory)`` writes two PNGs per evaluation and returns their paths:

- ``density_examples_step<step>.png``: for the first ``num_examples`` samples of the first validation batch, the
  observation, the true density, the predicted density (one shared symmetric-log colour scale per sample) and the
  units-normalised residual (pred - true) / max|true|.
- ``density_residuals_step<step>.png``: histograms over every validation sample of the per-sample metrics (the
  loss, ``abs_normed_residual`` and ``normed_residual`` when present).

Only matplotlib's object-oriented API with the Agg canvas is used (no pyplot, no global state), so it may run in
any thread. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# The per-sample metrics histogrammed, in this order, when the evaluation has them.
HISTOGRAMS = (
    ("loss", "ScaledDensityLoss (asinh-scaled MSE)"),
    ("abs_normed_residual", "mean |pred - true| / s"),
    ("normed_residual", "mean (pred - true) / s"),
)


def _save(figure: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attaches the Agg canvas to this figure only
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        figure.savefig(temporary, format="png", dpi=100)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def _image(array: Any, index: int) -> np.ndarray:
    image = np.asarray(array[index], dtype=np.float64)
    return image[0] if image.ndim == 3 and image.shape[0] == 1 else image


class DensityPlots:
    """Plots of one evaluation: a few examples side by side and histograms of the per-sample metrics."""

    def __init__(self, *, num_examples: int = 4) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}")
        self.num_examples = num_examples

    def __call__(self, evaluation: Any, directory: Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        step = int(evaluation.step)
        paths = []
        examples = getattr(evaluation, "examples", None) or {}
        if all(key in examples for key in ("observation", "density", "outputs")):
            paths.append(self.examples(examples, step, directory / f"density_examples_step{step:07d}.png"))
        per_sample = getattr(evaluation, "per_sample", None) or {}
        if any(key in per_sample for key, _ in HISTOGRAMS):
            paths.append(self.histograms(per_sample, step, directory / f"density_residuals_step{step:07d}.png"))
        return paths

    def examples(self, examples: dict[str, np.ndarray], step: int, path: Path) -> Path:
        from matplotlib.colors import SymLogNorm
        from matplotlib.figure import Figure

        count = min(self.num_examples, len(examples["density"]))
        figure = Figure(figsize=(12, 2.9 * count), layout="constrained")
        axes = figure.subplots(count, 4, squeeze=False)
        for row in range(count):
            observation = _image(examples["observation"], row)
            true = _image(examples["density"], row)
            pred = _image(examples["outputs"], row)
            high = max(float(np.abs(true).max()), float(np.abs(pred).max()), 1e-12)
            # Shared scale, linear within 1% of the brightest pixel: faint filaments and dense cores both show.
            norm = SymLogNorm(linthresh=0.01 * high, vmin=min(float(true.min()), float(pred.min()), 0.0), vmax=high)
            scale = max(float(np.abs(true).max()), 1e-12)
            panels = [
                (observation, "observation", {"cmap": "gray"}),
                (true, "true density", {"cmap": "magma", "norm": norm}),
                (pred, "predicted density", {"cmap": "magma", "norm": norm}),
                ((pred - true) / scale, "(pred - true) / max true", {"cmap": "RdBu_r", "vmin": -0.5, "vmax": 0.5}),
            ]
            for column, (image, title, style) in enumerate(panels):
                ax = axes[row, column]
                shown = ax.imshow(image, origin="upper", interpolation="nearest", **style)
                figure.colorbar(shown, ax=ax, shrink=0.85)
                ax.set_title(f"{title}" if row else f"{title}\n(step {step})", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
        return _save(figure, path)

    def histograms(self, per_sample: dict[str, np.ndarray], step: int, path: Path) -> Path:
        from matplotlib.figure import Figure

        present = [(key, label) for key, label in HISTOGRAMS if key in per_sample]
        figure = Figure(figsize=(4.5 * len(present), 3.5), layout="constrained")
        axes = figure.subplots(1, len(present), squeeze=False)[0]
        for ax, (key, label) in zip(axes, present):
            values = np.asarray(per_sample[key], dtype=np.float64).ravel()
            values = values[np.isfinite(values)]
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            if len(values):
                ax.axvline(float(values.mean()), color="black", lw=1, ls="--", label=f"mean {values.mean():.3g}")
                ax.axvline(float(np.median(values)), color="tab:red", lw=1, label=f"median {np.median(values):.3g}")
                ax.legend(fontsize=8)
            ax.set_xlabel(label)
            ax.set_ylabel("validation samples")
            ax.set_title(f"{key} at step {step} ({len(values)} samples)", fontsize=9)
        return _save(figure, path)
