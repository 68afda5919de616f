#!/usr/bin/env bash
# Install with the test tools and run the whole suite. The SLURM tests start the project's test cluster
# (slurm/cluster-up.sh) when run as root on Debian/Ubuntu; elsewhere they skip loudly (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh test
# Two pytest-xdist workers: much of the suite waits on subprocesses and SLURM, and the SLURM tests (one group,
# in order, on the shared test cluster) overlap with the rest. Three were faster (docs/development.md) but starved
# the SLURM jobs of CPU: a preempted job's stop handler missed SLURM's kill timeout once.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
