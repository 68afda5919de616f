#!/usr/bin/env bash
# Two DDP ranks on this machine (gloo on CPU, NCCL on GPUs): a quick check of distributed training.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m hpctrain.launch launcher.num_processes=2 run_name=local_ddp "$@"
