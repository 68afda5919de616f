#!/usr/bin/env bash
# Start (or confirm) a real two-node SLURM test cluster on this one machine.
#
#   sudo slurm/cluster-up.sh          # idempotent; a second run takes a few seconds
#
# What it sets up (see docs/slurm-test-cluster.md):
#   munge, MariaDB + slurmdbd (so sacct works), slurmctld on the host, and two
#   compute nodes node1/node2, each a slurmd in its own network namespace wired to
#   a host bridge.  Nodes share the host filesystem, so jobs can run anything
#   under /work (virtualenvs included).  Daemons are detached (setsid) and keep
#   running after this script exits; stop them with slurm/cluster-down.sh.
#
# Environment overrides (optional):
#   HPCTRAIN_SLURM_NET=10.77.0      first three octets of the private /24
#   HPCTRAIN_SLURM_NODE_CPUS=2      CPUs per node
#   HPCTRAIN_SLURM_NODE_MEM_MB=...  RealMemory per node (default min(4000, what fits))
#   HPCTRAIN_SLURM_WAIT_S=60        how long to wait for the nodes to become idle
set -euo pipefail

T0=$(date +%s%N)
elapsed() { local now; now=$(date +%s%N); printf '%d.%01d' $(((now - T0) / 1000000000)) $((((now - T0) / 100000000) % 10)); }
log() { printf '[cluster-up +%ss] %s\n' "$(elapsed)" "$*"; }

# ---------------------------------------------------------------- settings ---
CLUSTER=hpctrain
PARTITION=debug
NET=${HPCTRAIN_SLURM_NET:-10.77.0}
BRIDGE=hpcbr0
CTL_IP=$NET.1
NODES=(node1 node2)
declare -A NODE_IP=([node1]=$NET.11 [node2]=$NET.12)
NODE_CPUS=${HPCTRAIN_SLURM_NODE_CPUS:-2}
WAIT_S=${HPCTRAIN_SLURM_WAIT_S:-60}

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm-hpctrain
RUN_DIR=/run/slurm-hpctrain
SPOOL_DIR=/var/spool/slurm-hpctrain
DB_NAME=slurm_hpctrain_acct
DB_USER=slurm_hpctrain
MARKER="# Managed by hpctrain slurm/cluster-up.sh"
DAEMON_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF

ns_of() { echo "hpctrain-$1"; }   # network namespace of a node
veth_of() { echo "hpcv-$1"; }     # host-side veth of a node

# ----------------------------------------------------------------- helpers ---
tail_logs() {
    local f
    for f in "$@"; do
        [ -e "$f" ] || continue
        echo "---- last lines of $f ----" >&2
        tail -n 25 "$f" >&2 || true
    done
}
die() {  # die "message" [log files to show...]
    local msg=$1; shift
    echo "[cluster-up +$(elapsed)s] ERROR: $msg" >&2
    tail_logs "$@"
    exit 1
}
# shellcheck disable=SC2154  # rc is assigned inside the trap string
trap 'rc=$?; echo "[cluster-up] ERROR: command failed (rc=$rc) at line $LINENO: $BASH_COMMAND" >&2; tail_logs "$LOG_DIR"/*.log; exit $rc' ERR

pid_from() { if [ -s "$1" ]; then tr -dc '0-9' <"$1"; fi; }
# alive PIDFILE COMM -> prints pid and returns 0 if the pid in PIDFILE runs COMM
alive() {
    local pid; pid=$(pid_from "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}
stop_pid() {  # stop_pid PID [timeout_s]
    local pid=$1 t=${2:-15} i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < t * 10; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
}
wait_for() {  # wait_for TIMEOUT_S COMMAND... : poll until COMMAND succeeds
    local t=$1 i; shift
    for ((i = 0; i < t * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    return 1
}

[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)"
# shellcheck disable=SC1091
os_id=$(if . /etc/os-release 2>/dev/null; then echo "${ID:-} ${ID_LIKE:-}"; fi)
case "$os_id" in *debian* | *ubuntu*) ;; *) die "needs Debian/Ubuntu (found '${os_id:-unknown}')" ;; esac

# One cluster-up at a time (e.g. parallel test sessions calling it).  Daemons are started
# with fd 9 closed, so they do not hold the lock.
lock_dir=/run/lock; [ -d "$lock_dir" ] && [ -w "$lock_dir" ] || lock_dir=/tmp
exec 9>"$lock_dir/slurm-hpctrain-up.lock"
flock -w 300 9 || die "another cluster-up.sh holds the lock for 300s"

# --------------------------------------------------------------- packages ---
PKGS=(slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client iproute2 util-linux procps)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    # Keep package maintainer scripts from starting daemons with a default config.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"/tmp/hpctrain-slurm-apt.log" 2>&1; }
    if ! apt_install; then
        log "apt-get install failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"/tmp/hpctrain-slurm-apt.log" 2>&1 || true
        apt_install || { [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install ${missing[*]} failed" /tmp/hpctrain-slurm-apt.log; }
    fi
    if [ $made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    log "packages installed"
fi
for b in slurmctld slurmd slurmdbd munged mysqld_safe ip nsenter unshare setsid flock sacct; do
    command -v "$b" >/dev/null || die "required program '$b' not found after installing packages"
done

install -d -m 0755 "$LOG_DIR" "$RUN_DIR" "$SPOOL_DIR" "$SPOOL_DIR/ctld" "$CONF_DIR"
for n in "${NODES[@]}"; do install -d -m 0755 "$SPOOL_DIR/slurmd/$n"; done

# ---------------------------------------------------------------- /etc/hosts ---
hosts_block=$(printf '# BEGIN hpctrain-slurm (managed by slurm/cluster-up.sh)\n%s hpctrain-ctl\n' "$CTL_IP"
    for n in "${NODES[@]}"; do printf '%s %s\n' "${NODE_IP[$n]}" "$n"; done
    echo '# END hpctrain-slurm')
current_block=$(sed -n '/^# BEGIN hpctrain-slurm/,/^# END hpctrain-slurm/p' /etc/hosts)
if [ "$current_block" != "$hosts_block" ]; then
    tmp=$(mktemp)
    sed '/^# BEGIN hpctrain-slurm/,/^# END hpctrain-slurm/d' /etc/hosts >"$tmp"
    printf '%s\n' "$hosts_block" >>"$tmp"
    cat "$tmp" >/etc/hosts   # in place: /etc/hosts may be a bind mount
    rm -f "$tmp"
    log "/etc/hosts updated"
fi

# ----------------------------------------------------------------- network ---
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
ip -4 addr show dev "$BRIDGE" | grep -q "inet $CTL_IP/24" || ip addr add "$CTL_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for n in "${NODES[@]}"; do
    ns=$(ns_of "$n"); veth=$(veth_of "$n")
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip -n "$ns" link del eth0 2>/dev/null || true
        ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" -4 addr show dev eth0 | grep -q "inet ${NODE_IP[$n]}/24" || ip -n "$ns" addr add "${NODE_IP[$n]}/24" dev eth0
    ip -n "$ns" link set eth0 up
done

# ------------------------------------------------------------------- munge ---
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    if pid=$(alive /run/munge/munged.pid munged); then stop_pid "$pid" 5; fi
    (cd / && setsid "${DAEMON_ENV[@]}" runuser -u munge -- munged --force 9>&- </dev/null >>"$LOG_DIR/munged.stdout" 2>&1) \
        || die "munged failed to start" /var/log/munge/munged.log "$LOG_DIR/munged.stdout"
    wait_for 15 munge_ok || die "munge does not answer (munge -n | unmunge)" /var/log/munge/munged.log
    log "munged started"
fi

# ----------------------------------------------------------------- MariaDB ---
mariadb_ok() { mariadb-admin --no-defaults --protocol=socket -S /run/mysqld/mysqld.sock ping; }
if ! mariadb_ok >/dev/null 2>&1; then
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then
        log "initialising MariaDB data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG_DIR/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed" "$LOG_DIR/mariadb-install.log"
    fi
    touch "$LOG_DIR/mariadb.log" && chown mysql:mysql "$LOG_DIR/mariadb.log"
    (cd / && setsid -f "${DAEMON_ENV[@]}" mysqld_safe --user=mysql --skip-syslog --log-error="$LOG_DIR/mariadb.log" \
        --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
        --innodb-lock-wait-timeout=900 9>&- </dev/null >>"$LOG_DIR/mariadb-safe.log" 2>&1)
    wait_for 60 mariadb_ok || die "MariaDB did not come up" "$LOG_DIR/mariadb.log" "$LOG_DIR/mariadb-safe.log"
    log "MariaDB started"
fi

# ------------------------------------------------------------- config files ---
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
fit_mb=$(((mem_total_mb - 1024) / ${#NODES[@]}))
NODE_MEM=${HPCTRAIN_SLURM_NODE_MEM_MB:-$((fit_mb < 4000 ? fit_mb : 4000))}
[ "$NODE_MEM" -ge 256 ] || NODE_MEM=256
CTL_HOST=$(hostname -s)
[ -n "$CTL_HOST" ] || die "this machine has no hostname"

db_pass=""
if [ -r "$DBD_CONF" ]; then db_pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1); fi
[ -n "$db_pass" ] || db_pass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')

nodelist=$(IFS=,; echo "${NODES[*]}")
new_slurm_conf=$(mktemp); new_dbd_conf=$(mktemp)
{
    echo "$MARKER -- edits are overwritten."
    cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$CTL_HOST($CTL_IP)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SPOOL_DIR/ctld
SlurmdSpoolDir=$SPOOL_DIR/slurmd/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the nodes are network namespaces on one host.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Report the configured (not the detected) CPUs/memory, so the nodes never drain on small hosts.
SlurmdParameters=config_overrides
# Requeue / signals (submitit checkpoint + requeue, preemption signals).
JobRequeue=1
ReturnToService=2
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Seconds from SIGTERM to SIGKILL: a signalled job checkpoints, asks SLURM why and logs it in this time. 30 by
# default; 5 was too short for two ranks sharing the machine's 2 cores with the test suite.
KillWait=15
MinJobAge=3600
# Start jobs quickly.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,sched_min_interval=0,bf_interval=5
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
Waittime=0
# Accounting (sacct) through slurmdbd + MariaDB.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_IP
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeAddr=${NODE_IP[$n]} NodeHostname=$n CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN"
    done
    # Preemption as production clusters set it up: a job in a partition of a higher PriorityTier preempts jobs in
    # lower ones; `debug` (the default) requeues its preempted jobs (PreemptMode=REQUEUE), `scavenger` signals
    # them and cancels them after a GraceTime (PreemptMode=CANCEL), `urgent` is the preemptor.
    echo "PartitionName=$PARTITION Nodes=$nodelist Default=YES MaxTime=02:00:00 State=UP PriorityTier=1 PreemptMode=REQUEUE"
    echo "PartitionName=scavenger Nodes=$nodelist MaxTime=02:00:00 State=UP PriorityTier=1 PreemptMode=CANCEL GraceTime=30"
    echo "PartitionName=urgent Nodes=$nodelist MaxTime=02:00:00 State=UP PriorityTier=10 PreemptMode=OFF"
} >"$new_slurm_conf"
{
    echo "$MARKER -- edits are overwritten."
    cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=$CTL_IP
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$db_pass
EOF
} >"$new_dbd_conf"

CONF_CHANGED=0
DBD_CHANGED=0
install_conf() {  # install_conf NEW DEST MODE -> returns 0 if DEST changed
    if [ -e "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
    if [ -e "$2" ] && ! grep -qF "$MARKER" "$2"; then
        cp -p "$2" "$2.bak-$(date +%Y%m%d%H%M%S)"
        log "backed up foreign $2"
    fi
    install -m "$3" -o root -g root "$1" "$2"
    rm -f "$1"
    log "wrote $2"
    return 0
}
install_conf "$new_slurm_conf" "$SLURM_CONF" 0644 && CONF_CHANGED=1
install_conf "$new_dbd_conf" "$DBD_CONF" 0600 && DBD_CHANGED=1

# ---------------------------------------------------------------- slurmdbd ---
dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
pid=$(alive "$RUN_DIR/slurmdbd.pid" slurmdbd || true)
if [ -n "$pid" ] && { [ $DBD_CHANGED = 1 ] || ! dbd_ok >/dev/null 2>&1; }; then
    log "restarting slurmdbd"
    stop_pid "$pid" 15
    pid=""
fi
if [ -z "$pid" ]; then
    mariadb --no-defaults --protocol=socket -S /run/mysqld/mysqld.sock -e "
        CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$db_pass';
        ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$db_pass';
        GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'localhost';
        FLUSH PRIVILEGES;" >>"$LOG_DIR/mariadb-setup.log" 2>&1 \
        || die "could not create the accounting database" "$LOG_DIR/mariadb-setup.log" "$LOG_DIR/mariadb.log"
    (cd / && setsid "${DAEMON_ENV[@]}" slurmdbd 9>&- </dev/null >>"$LOG_DIR/slurmdbd.stdout" 2>&1) \
        || die "slurmdbd failed to start" "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmdbd.stdout"
    wait_for 45 dbd_ok || die "slurmdbd does not answer; sacctmgr list cluster says: $(dbd_ok 2>&1 | tail -n 3)" \
        "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmdbd.stdout"
    log "slurmdbd started"
fi
if ! dbd_ok 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed" "$LOG_DIR/slurmdbd.log"
    log "registered cluster '$CLUSTER' in slurmdbd"
    CONF_CHANGED=1   # slurmctld must (re)register with the accounting database
fi

# --------------------------------------------------------------- slurmctld ---
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
pid=$(alive "$RUN_DIR/slurmctld.pid" slurmctld || true)
if [ -n "$pid" ] && { [ $CONF_CHANGED = 1 ] || ! ctld_ok; }; then
    log "restarting slurmctld"
    stop_pid "$pid" 15
    pid=""
fi
if [ -z "$pid" ]; then
    (cd / && setsid "${DAEMON_ENV[@]}" slurmctld 9>&- </dev/null >>"$LOG_DIR/slurmctld.stdout" 2>&1) \
        || die "slurmctld failed to start" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmctld.stdout"
    wait_for 30 ctld_ok || die "slurmctld does not answer; scontrol ping says: $(scontrol ping 2>&1 | tail -n 3)" \
        "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmctld.stdout"
    log "slurmctld started"
fi

# ------------------------------------------------------------------ slurmd ---
for n in "${NODES[@]}"; do
    ns=$(ns_of "$n")
    want_ns=$(stat -L -c %i "/run/netns/$ns")
    pid=$(alive "$RUN_DIR/slurmd-$n.pid" slurmd || true)
    if [ -n "$pid" ]; then
        have_ns=$(readlink "/proc/$pid/ns/net" 2>/dev/null | tr -dc '0-9' || true)
        if [ $CONF_CHANGED = 1 ] || [ "$have_ns" != "$want_ns" ]; then
            log "restarting slurmd on $n"
            stop_pid "$pid" 15
            pid=""
        fi
    fi
    if [ -z "$pid" ]; then
        # nsenter --net (not 'ip netns exec', which remounts /sys and breaks slurmd's cgroup probe);
        # unshare --uts gives the node its own hostname.
        (cd / && setsid "${DAEMON_ENV[@]}" nsenter --net="/run/netns/$ns" unshare --uts \
            sh -c "hostname $n && exec slurmd -N $n" 9>&- </dev/null >>"$LOG_DIR/slurmd-$n.stdout" 2>&1) \
            || die "slurmd on $n failed to start" "$LOG_DIR/slurmd-$n.log" "$LOG_DIR/slurmd-$n.stdout"
        wait_for 15 alive "$RUN_DIR/slurmd-$n.pid" slurmd \
            || die "slurmd on $n is not running" "$LOG_DIR/slurmd-$n.log" "$LOG_DIR/slurmd-$n.stdout"
        log "slurmd $n started (netns $ns, ${NODE_IP[$n]})"
    fi
done

# ------------------------------------------------------------ wait healthy ---
resumed=" "
states=""
deadline=$(($(date +%s) + WAIT_S))
while :; do
    states=$(sinfo -N -h -p "$PARTITION" -o '%N %t' 2>/dev/null | sort -u || true)
    healthy=0
    for n in "${NODES[@]}"; do
        st=$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")
        case "$st" in
            idle | mix | alloc | comp) healthy=$((healthy + 1)) ;;
            drain | drng | down | fail | inval)   # responding but unavailable: put it back once
                if [[ "$resumed" != *" $n "* ]]; then
                    log "node $n is '$st' ($(sinfo -h -n "$n" -N -o '%E' 2>/dev/null)); resuming it"
                    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
                    resumed+="$n "
                fi ;;
        esac
    done
    [ $healthy = ${#NODES[@]} ] && break
    if [ "$(date +%s)" -ge $deadline ]; then
        echo "$states" >&2
        node_logs=()
        for n in "${NODES[@]}"; do node_logs+=("$LOG_DIR/slurmd-$n.log"); done
        die "nodes not idle after ${WAIT_S}s (sinfo -N above)" "$LOG_DIR/slurmctld.log" "${node_logs[@]}"
    fi
    sleep 0.5
done
wait_for 30 sacct -n -X -a --starttime=now-1hour -o JobID \
    || die "sacct does not answer" "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log"

summary=""
for n in "${NODES[@]}"; do
    summary+=" $n(${NODE_IP[$n]})=$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")"
done
echo "hpctrain SLURM cluster UP in $(elapsed)s: controller $CTL_HOST($CTL_IP), partition $PARTITION:$summary, sacct OK, logs $LOG_DIR"
