#!/usr/bin/env bash
# Install with the test tools and run the whole suite. The SLURM tests start the project's test cluster
# (slurm/cluster-up.sh) when run as root on Debian/Ubuntu; elsewhere they skip loudly (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh test
# Three pytest-xdist workers on this 2-core machine: the SLURM tests (one group, in order, on the shared test
# cluster) mostly wait for the cluster, so one worker waits with them while two run the rest (12.5 min against
# 15.5 with two workers, docs/development.md).
exec .venv/bin/python -m pytest -n 3 --dist loadgroup "$@"
