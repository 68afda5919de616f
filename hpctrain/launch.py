"""`python -m hpctrain.launch [OVERRIDES]` (and the `hpctrain` script): train locally, on SLURM, or sweep.

The command's entry point only: the Hydra app is hpctrain.launching.app."""

from hpctrain.launching.app import run

if __name__ == "__main__":
    run()
