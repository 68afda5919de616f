#!/usr/bin/env bash
# Set up hpctrain in ./.venv (idempotent). On a machine without an NVIDIA GPU the CPU build of torch is
# installed first, so nothing pulls the multi-GB CUDA wheels. `launch/install.sh test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch==${torch_version}"
else
    # PEP 440 ranks 2.13.0+cpu above 2.13.0, so the CPU wheel wins over PyPI's CUDA build. No retries: where the
    # PyTorch index cannot be reached (an offline mirror), pip goes on with its configured indexes at once.
    "${pip[@]}" --retries 0 --timeout 15 "torch==${torch_version}" --extra-index-url https://download.pytorch.org/whl/cpu
fi
# The rest (about 150 packages with the test extras) through uv, which fetches and installs them at once: 85 s with
# pip here, under 10 with uv. pip does it where uv cannot be installed. Either keeps the torch installed above.
# Both write the packages' bytecode now (pip by default, uv when asked): otherwise, where PYTHONDONTWRITEBYTECODE is
# set or site-packages is read-only, every Python compiles Hydra, OmegaConf, submitit, ... again at each start (0.4
# CPU-s more for each launch, rank and SLURM task; 4 s more for importing the logger libraries). So is hpctrain's.
if "${pip[@]}" uv >/dev/null 2>&1; then
    .venv/bin/python -m uv pip install --python .venv/bin/python --quiet --compile-bytecode -e ".${extras:+[$extras]}"
else
    "${pip[@]}" -e ".${extras:+[$extras]}"
fi
.venv/bin/python -m compileall -q -j 0 hpctrain hydra_plugins tests benchmarks >/dev/null
.venv/bin/python - <<'PY'
import torch, hpctrain
print(f"hpctrain ready: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
