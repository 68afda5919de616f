#!/usr/bin/env bash
# Health of the SLURM test cluster started by slurm/cluster-up.sh.
#   slurm/cluster-status.sh       # prints munge/slurmctld/sinfo/squeue/sacct; exit 0 iff healthy
#   slurm/cluster-status.sh -q    # only the one-line verdict
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
QUIET=0; [ "${1:-}" = -q ] && QUIET=1
NODES=(node1 node2)
problems=()
say() { [ $QUIET = 1 ] || printf '%s\n' "$*"; }

command -v sinfo >/dev/null || { echo "UNHEALTHY: SLURM is not installed (run slurm/cluster-up.sh)"; exit 1; }

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then say "munge:     OK"; else say "munge:     FAIL"; problems+=(munge); fi

ping=$(timeout 10 scontrol ping 2>&1)
say "slurmctld: $ping"
grep -q 'is UP' <<<"$ping" || problems+=(slurmctld)

nodes=$(timeout 10 sinfo -N -h -o '%N %P %t %C %E' 2>&1)
say "nodes (name partition state cpus(A/I/O/T) reason):"
say "  ${nodes//$'\n'/$'\n'  }"
for n in "${NODES[@]}"; do
    st=$(awk -v n="$n" '$1 == n {print $3; exit}' <<<"$nodes")
    case "$st" in idle | mix | alloc | comp) ;; *) problems+=("$n=${st:-missing}") ;; esac
done

if [ $QUIET = 0 ]; then
    say "queue:"
    timeout 10 squeue -o '  %.8i %.9P %.20j %.8u %.10T %.10M %.6D %R' 2>&1
fi

if acct=$(timeout 15 sacct -n -X -a --starttime=now-1day -o JobID,JobName%20,State,Elapsed,NodeList 2>&1); then
    say "sacct:     OK ($(grep -c . <<<"$acct") jobs in the last day; last 5:)"
    [ $QUIET = 1 ] || tail -n 5 <<<"$acct" | sed 's/^/  /'
else
    say "sacct:     FAIL: $acct"
    problems+=(sacct)
fi

if [ ${#problems[@]} -eq 0 ]; then
    echo "HEALTHY: hpctrain SLURM test cluster (${NODES[*]})"
    exit 0
fi
echo "UNHEALTHY: ${problems[*]} (logs in /var/log/slurm-hpctrain; restart with slurm/cluster-up.sh)"
exit 1
