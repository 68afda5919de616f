"""The cbed_distortion task's plot hook (`task.plot`): after each evaluation, predicted against true value of each
of the 8 distortion parameters, and the distribution of the validation EPE beside its baselines. Drawn with
matplotlib's object-oriented API (no pyplot), so it is safe in hpctrain's background plotting thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpctrain.tasks.cbed.generator import PARAMETER_NAMES, PARAMETER_RANGES


class CBEDPlots:
    def __init__(self, *, max_points: int = 2000) -> None:
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.max_points = max_points

    def __call__(self, evaluation: Any, directory: Path) -> list[Path]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        per_sample = evaluation.per_sample
        written = []
        predicted = [per_sample.get(f"predicted.{name}") for name in PARAMETER_NAMES]
        labels = evaluation.gathered.get("labels")  # task.gather: [labels]
        if all(p is not None for p in predicted) and labels is not None:
            figure = Figure(figsize=(14, 6.5))
            FigureCanvasAgg(figure)
            shown = slice(0, self.max_points)
            for index, name in enumerate(PARAMETER_NAMES):
                axes = figure.add_subplot(2, 4, index + 1)
                guess, truth = predicted[index][shown], labels[shown, index]
                low, high = PARAMETER_RANGES[index]
                axes.plot([low, high], [low, high], color="0.6", lw=1)
                axes.scatter(truth, guess, s=3, alpha=0.5)
                axes.set(title=name.replace("_", " "), xlabel="true", ylabel="predicted")
                axes.title.set_fontsize(8)
                mean_absolute_error = np.mean(np.abs(predicted[index] - labels[:, index]))
                axes.text(0.03, 0.92, f"MAE {mean_absolute_error:.3g}", transform=axes.transAxes, fontsize=8)
            figure.suptitle(f"Validation, step {evaluation.step}: predicted vs true distortion parameters")
            figure.tight_layout()
            written.append(directory / "parameters.png")
            figure.savefig(written[-1], dpi=90)

        figure = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        epe = per_sample["loss"]
        bins = np.linspace(0, max(float(np.max(epe)), 1e-9) * 1.05, 50)
        axes.hist(epe, bins=bins, alpha=0.7, label=f"model (mean {epe.mean():.4g})")
        for name in sorted(per_sample):
            if name.startswith("baseline_"):
                axes.axvline(per_sample[name].mean(), ls="--", color="k" if "no_distortion" in name else "0.5",
                             label=f"{name} (mean {per_sample[name].mean():.4g})")
        axes.set(xlabel="EPE of the adjusted distortion field (fraction of the image width)", ylabel="images",
                 title=f"Validation EPE, step {evaluation.step}")
        axes.legend(fontsize=8)
        figure.tight_layout()
        written.append(directory / "epe_histogram.png")
        figure.savefig(written[-1], dpi=90)
        return written
