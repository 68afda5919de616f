"""The density_reversion task, a plug-in like a user's own (after IRIS's Reverter training): from an observation
image, predict the top-down surface density image. Selected with `task=density_reversion` (conf/task/).

``generator`` writes synthetic (observation, density) pairs to HDF5 (``python -m hpctrain.tasks.density.generate``;
``ensure_dataset`` is the ``data.prepare`` hook), ``model`` holds the U-Net, ``objectives`` IRIS's
ScaledDensityLoss and the units-normalised residual, ``plots`` the validation plots. See docs/density-task.md.
"""

from hpctrain.tasks.density.generator import (
    DENSITY_UNITS,
    DensityGeneratorConfig,
    ensure_dataset,
    generate_dataset,
    generate_example,
)
from hpctrain.tasks.density.model import DensityUNet
from hpctrain.tasks.density.objectives import NormedResidual, ScaledDensityLoss, normed_residual
from hpctrain.tasks.density.plots import DensityPlots

__all__ = [
    "DENSITY_UNITS",
    "DensityGeneratorConfig",
    "DensityPlots",
    "DensityUNet",
    "NormedResidual",
    "ScaledDensityLoss",
    "ensure_dataset",
    "generate_dataset",
    "generate_example",
    "normed_residual",
]
