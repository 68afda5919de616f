"""`python -m hpctrain.launch [OVERRIDES]` (and the `hpctrain` script): train locally, on SLURM, or sweep.

The command's entry point only: the Hydra app is hpctrain.launching.app."""

import sys

from hpctrain.launching.early import asks_for_local_ranks, start_rank_forkserver


def run() -> None:
    """A command line that asks for local ranks starts the process they fork from first, before the Hydra app's
    imports (torch: seconds), so that both import at once (hpctrain.launching.early). Nothing runs at import: the
    ranks import this module as their __main__."""
    if asks_for_local_ranks(sys.argv[1:]):
        start_rank_forkserver()
    from hpctrain.launching.app import run as run_app

    run_app()


if __name__ == "__main__":
    run()
