"""`python -m hpctrain.test RUN_DIR [...]`: the test phase, one checkpoint over the whole test set.

The command's entry point only; its arguments and what it does are documented in hpctrain.use.test."""

import sys

from hpctrain.use.test import main

if __name__ == "__main__":
    sys.exit(main())
