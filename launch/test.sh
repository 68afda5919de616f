#!/usr/bin/env bash
# Install with the test tools and run the whole suite. The SLURM tests start the project's test cluster
# (slurm/cluster-up.sh) when run as root on Debian/Ubuntu; elsewhere they skip loudly (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh test
# Three pytest-xdist workers on 2 cores: the SLURM tests (one group, in order, on the shared test cluster) mostly
# wait on the cluster, and two workers run the rest meanwhile (docs/development.md).
exec .venv/bin/python -m pytest -n 3 --dist loadgroup "$@"
