"""hpctrain: train a scientist's own PyTorch model on SLURM clusters, from Hydra configs.

Entry points: `python -m hpctrain.launch` (train locally, on SLURM, or sweep), `python -m hpctrain.inspect RUN_DIR`.
The task contract a user's model, data and loss follow is in docs/your-own-model.md; the configs shipped with the
package are in conf/ at the repository root (installed as the package hpctrain.conf).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hpctrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
