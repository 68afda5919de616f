"""hpctrain: train a scientist's own PyTorch model on SLURM clusters, from Hydra configs.

Entry points: `python -m hpctrain.launch` (train locally, on SLURM, or sweep), `python -m hpctrain.inspect RUN_DIR`,
`python -m hpctrain.predict RUN_DIR`, `python -m hpctrain.export RUN_DIR`; in Python, `hpctrain.load_model(RUN_DIR)`
and `hpctrain.load_run(RUN_DIR)`.
The task contract a user's model, data and loss follow is in docs/your-own-model.md; the configs shipped with the
package are in conf/ at the repository root (installed as the package hpctrain.conf).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hpctrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):  # noqa: ANN202
    """`hpctrain.load_model` and `hpctrain.load_run` (hpctrain.use.runs), imported on first use: importing torch here
    would slow the start of every `python -m hpctrain.*` command."""
    if name in ("load_model", "load_run"):
        from hpctrain.use import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'hpctrain' has no attribute {name!r}")


__all__ = ["__version__", "load_model", "load_run"]
