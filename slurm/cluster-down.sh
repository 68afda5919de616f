#!/usr/bin/env bash
# Stop the SLURM test cluster started by slurm/cluster-up.sh (idempotent).
#
#   sudo slurm/cluster-down.sh           # stop daemons, cancel jobs, remove namespaces/bridge
#   sudo slurm/cluster-down.sh --purge   # also delete slurmctld state, spool, accounting DB and logs
#
# Stops, in order: queued/running jobs (scancel), slurmctld, both slurmd (and anything
# left in the node namespaces), slurmdbd, MariaDB, munged; then deletes the network
# namespaces, veths, bridge and the /etc/hosts block.  Packages and config files stay.
set -euo pipefail

PURGE=0
case "${1:-}" in
    "") ;;
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "cluster-down: must run as root" >&2; exit 1; }

NODES=(node1 node2)
BRIDGE=hpcbr0
LOG_DIR=/var/log/slurm-hpctrain
RUN_DIR=/run/slurm-hpctrain
SPOOL_DIR=/var/spool/slurm-hpctrain
DB_NAME=slurm_hpctrain_acct
DB_USER=slurm_hpctrain
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF=/etc/slurm/slurm.conf

T0=$(date +%s%N)
log() { local d=$(($(date +%s%N) - T0)); printf '[cluster-down +%d.%01ds] %s\n' $((d / 1000000000)) $(((d / 100000000) % 10)) "$*"; }
pid_from() { if [ -s "$1" ]; then tr -dc '0-9' <"$1"; fi; }
alive() {  # alive PIDFILE COMM -> prints the pid if it runs COMM
    local pid; pid=$(pid_from "$1")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

# 1. jobs: cancel everything still queued or running, so a later cluster-up starts clean.
if [ -n "$(alive "$RUN_DIR/slurmctld.pid" slurmctld || true)" ] && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(timeout 10 squeue -h -o %i -t PENDING,RUNNING,SUSPENDED,REQUEUED,CONFIGURING 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null | head -n1 || true)" ] && break
            sleep 0.2
        done
    fi
fi

# 2. SLURM daemons: SIGTERM to slurmctld, both slurmd and slurmdbd together (each takes ~2 s to exit).
declare -A names=()
for spec in "slurmctld.pid slurmctld slurmctld" "slurmd-node1.pid slurmd slurmd-node1" \
    "slurmd-node2.pid slurmd slurmd-node2" "slurmdbd.pid slurmdbd slurmdbd"; do
    read -r file comm name <<<"$spec"
    if pid=$(alive "$RUN_DIR/$file" "$comm"); then names[$pid]=$name; fi
done
stop_all() {  # stop_all TIMEOUT_S: TERM every pid in names, wait, KILL the rest
    local t=$1 i pid
    [ ${#names[@]} -gt 0 ] || return 0
    kill -TERM "${!names[@]}" 2>/dev/null || true
    for ((i = 0; i < t * 10; i++)); do
        for pid in "${!names[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then log "stopped ${names[$pid]} (pid $pid)"; unset "names[$pid]"; fi
        done
        [ ${#names[@]} -gt 0 ] || return 0
        sleep 0.1
    done
    for pid in "${!names[@]}"; do kill -KILL "$pid" 2>/dev/null || true; log "killed ${names[$pid]} (pid $pid) after ${t}s"; done
    names=()
    sleep 0.2
}
stop_all 20

for n in "${NODES[@]}"; do
    ns=hpctrain-$n
    if [ -e "/run/netns/$ns" ]; then
        # Whatever is left in the node's namespace: slurmstepd and job processes.
        left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${left// /}" ]; then
            log "terminating processes left in $ns: $left"
            # shellcheck disable=SC2086
            kill -TERM $left 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && break
                sleep 0.1
            done
            left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
            # shellcheck disable=SC2086
            [ -z "${left// /}" ] || kill -KILL $left 2>/dev/null || true
        fi
    fi
done

# 3. accounting database and munge.
if [ $PURGE = 1 ] && mariadb-admin --no-defaults --protocol=socket -S /run/mysqld/mysqld.sock ping >/dev/null 2>&1; then
    mariadb --no-defaults --protocol=socket -S /run/mysqld/mysqld.sock \
        -e "DROP DATABASE IF EXISTS \`$DB_NAME\`; DROP USER IF EXISTS '$DB_USER'@'localhost';" || true
    log "dropped accounting database $DB_NAME"
fi
if pid=$(alive /run/mysqld/mysqld.pid mariadbd) || pid=$(alive /run/mysqld/mysqld.pid mysqld); then
    names[$pid]=MariaDB   # SIGTERM is a clean shutdown for mariadbd; mysqld_safe then exits too
fi
if pid=$(alive /run/munge/munged.pid munged); then names[$pid]=munged; fi
stop_all 60

# 4. network: namespaces (their veth ends go with them), bridge, /etc/hosts block.
for n in "${NODES[@]}"; do
    ip link del "hpcv-$n" 2>/dev/null || true
    if [ -e "/run/netns/hpctrain-$n" ]; then ip netns del "hpctrain-$n" && log "removed netns hpctrain-$n"; fi
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" && log "removed bridge $BRIDGE"; fi
if grep -q '^# BEGIN hpctrain-slurm' /etc/hosts; then
    tmp=$(mktemp)
    sed '/^# BEGIN hpctrain-slurm/,/^# END hpctrain-slurm/d' /etc/hosts >"$tmp"
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
    log "removed node names from /etc/hosts"
fi
rm -f "$RUN_DIR"/*.pid

if [ $PURGE = 1 ]; then
    rm -rf "$SPOOL_DIR" "$LOG_DIR"
    log "purged $SPOOL_DIR and $LOG_DIR"
fi
log "SLURM test cluster is down"
