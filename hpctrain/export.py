"""`python -m hpctrain.export RUN_DIR [...]`: the trained model as a self-contained artefact.

The command's entry point only; its arguments and what it does are documented in hpctrain.use.export."""

import sys

from hpctrain.use.export import main

if __name__ == "__main__":
    sys.exit(main())
