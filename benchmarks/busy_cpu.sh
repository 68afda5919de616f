#!/usr/bin/env bash
# Wall time and machine-wide busy CPU seconds (from /proc/stat) of a command:
#   bash benchmarks/busy_cpu.sh .venv/bin/python -m pytest -m "not slurm" -n 2
# The test suite's own CPU profile (HPCTRAIN_CPU_PROFILE, tests/conftest.py) counts a test's process, the
# children it waited for and the commands forked by tests/zygote.py, not the SLURM jobs (slurmd runs them). This
# counts everything the machine did meanwhile, so run it on an otherwise idle machine.
set -uo pipefail
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
ticks=$(getconf CLK_TCK)
b0=$(busy); t0=$(date +%s.%N)
"$@"; rc=$?
b1=$(busy); t1=$(date +%s.%N)
awk -v t0="$t0" -v t1="$t1" -v b0="$b0" -v b1="$b1" -v hz="$ticks" -v rc="$rc" \
    'BEGIN {printf "busy_cpu: wall %.1f s, busy CPU %.1f s, exit %d\n", t1 - t0, (b1 - b0) / hz, rc > "/dev/stderr"}'
exit "$rc"
