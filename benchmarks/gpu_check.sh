#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): trains the demo in fp32, bf16, fp16 and compiled bf16 on this machine's
# GPU, checks SIGKILL + resume bit for bit, runs the test phase and a prediction, and compares hpctrain's step with
# a raw PyTorch loop and the loader with the GPU; results in runs/gpu_check/gpu_check.json (--out DIR elsewhere).
# Installs nothing. Without a CUDA device it says "skipped" and exits 0.
#   bash benchmarks/gpu_check.sh [--out DIR] [--steps N]
# Python: $PYTHON, else the checkout's .venv (launch/install.sh), else python3 on the PATH.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$repo/benchmarks/gpu_check.py" "$@"
