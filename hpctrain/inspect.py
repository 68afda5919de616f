"""`python -m hpctrain.inspect DIR`: a summary of a run, a sweep or a study.

The command's entry point only; its arguments and what it does are documented in hpctrain.use.inspect."""

import sys

from hpctrain.use.inspect import main

if __name__ == "__main__":
    sys.exit(main())
