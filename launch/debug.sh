#!/usr/bin/env bash
# Debug mode: one local process (CPU, or one GPU if present) trains the built-in CBED task, generating a small
# dataset on first use. Extra arguments are Hydra overrides, e.g. `launch/debug.sh trainer.max_steps=60`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m hpctrain.launch "$@"
