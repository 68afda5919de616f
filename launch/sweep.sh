#!/usr/bin/env bash
# A 2 x 2 sweep submitted as one SLURM job array; run it again to resume unfinished points.
# Follow it with `.venv/bin/python -m hpctrain.inspect runs/sweep_lr_width`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m hpctrain.launch -m optim.lr=1e-3,3e-4 model.width=16,32 launcher=slurm \
    run_name=sweep_lr_width "$@"
