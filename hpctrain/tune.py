"""`python -m hpctrain.tune [overrides]`: a hyperparameter search as an Optuna study.

The command's entry point only; its arguments and what it does are documented in hpctrain.tuning.command."""

import sys

from hpctrain.tuning.command import main

if __name__ == "__main__":
    sys.exit(main())
