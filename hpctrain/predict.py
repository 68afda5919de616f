"""`python -m hpctrain.predict RUN_DIR [...]`: run a trained model over a dataset and write its outputs.

The command's entry point only; its arguments and what it does are documented in hpctrain.use.predict."""

import sys

from hpctrain.use.predict import main

if __name__ == "__main__":
    sys.exit(main())
