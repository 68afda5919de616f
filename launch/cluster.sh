#!/usr/bin/env bash
# One SLURM job over two nodes (one rank per node here; set tasks_per_node = gpus_per_node on GPU nodes).
# Run on a login node; returns at once with the job id. Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m hpctrain.launch launcher=slurm launcher.nodes=2 launcher.tasks_per_node=1 \
    run_name=cluster "$@"
