#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for integration tests of slurm/*.sbatch.
#
#   slurm/local-cluster.sh up      install slurm-wlm + munge if missing, start munged, slurmctld and
#                                  two slurmd (n1, n2) from a fresh state; wait until both are idle
#   slurm/local-cluster.sh down    cancel jobs, stop the daemons, remove the cluster's state
#   slurm/local-cluster.sh status  sinfo -N
#
# Needs root. The config goes to /etc/slurm/slurm.conf, the path the Debian binaries read by
# default, so plain sbatch/srun/scontrol work without SLURM_CONF. Both nodes run on the same
# cores (CPUs=2 each on a 2-core machine): overcommitted on purpose, it is a test cluster.
# Every wait is bounded; `up` always leaves exactly one freshly started cluster (it stops a
# previous one first), so running it twice is safe. See slurm/README.md.
set -euo pipefail

CLUSTER_NAME=segdist-local
BASE=/var/lib/segdist-slurm          # state, pid files, logs, our marker files
STATE_DIR=$BASE/state                # StateSaveLocation (dedicated: one cluster name only)
RUN_DIR=$BASE/run
LOG_DIR=$BASE/log
SPOOL_ROOT=/var/spool/slurmd         # SlurmdSpoolDir=$SPOOL_ROOT/%n
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
CONF_MARK="# managed by segdist slurm/local-cluster.sh"
HOSTS_MARK="# segdist local slurm cluster"
NODES=(n1 n2)
PORTS=(17001 17002)
NODE_CPUS=${SEGDIST_SLURM_NODE_CPUS:-2}
UP_TIMEOUT=${SEGDIST_SLURM_UP_TIMEOUT:-60}
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MUNGE_OURS=$BASE/munged.started-by-us   # down stops munged only if this exists

log() { echo "local-cluster: $*" >&2; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------------------------------------
# helpers

# pid_alive PIDFILE -> prints the pid and succeeds when the pid file names a live process
pid_alive() {
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# stop_pidfiles SECONDS PIDFILE...: SIGTERM to all at once, wait up to SECONDS, then SIGKILL
stop_pidfiles() {
    local secs=$1 f pid i cmd
    local -a left
    shift
    local -a pids=()
    for f in "$@"; do
        if pid=$(pid_alive "$f"); then
            cmd=$(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null || true)
            log "stopping ${cmd% } (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < secs * 5; i++)); do
        left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        pids=("${left[@]}")
        [[ ${#pids[@]} -eq 0 ]] && break
        sleep 0.2
    done
    if [[ ${#pids[@]} -gt 0 ]]; then
        log "pids ${pids[*]} ignored SIGTERM for ${secs}s; sending SIGKILL"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$@"
}

packages_installed() {
    local p st
    for p in munge slurmctld slurmd slurm-client; do
        st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || return 1
        [[ $st == "install ok installed" ]] || return 1
    done
}

install_packages() {
    if packages_installed && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    local apt_log=/tmp/segdist-slurm-apt.log
    timeout 300 apt-get update -qq >"$apt_log" 2>&1 \
        || die "apt-get update failed:$(echo; tail -n 20 "$apt_log")"
    timeout 900 apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$apt_log" 2>&1 \
        || die "apt-get install slurm-wlm munge failed:$(echo; tail -n 20 "$apt_log")"
    packages_installed || die "slurm-wlm/munge still not installed after apt-get install"
}

munge_works() { timeout 10 munge -n </dev/null 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    # munged refuses a key that is readable by others or not owned by its user
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    if munge_works; then
        return 0
    fi
    # a stale munged of ours (pid file alive but not answering): restart it
    if [[ -e $MUNGE_OURS ]]; then stop_pidfiles 10 "$MUNGE_PID"; fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    log "starting munged"
    # munged's own checks: it runs as the munge user, as the Debian service does
    runuser -u munge -- /usr/sbin/munged --force 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
    mkdir -p "$BASE"
    touch "$MUNGE_OURS"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_works && return 0
        sleep 0.2
    done
    die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

hosts_entries() {
    local want="127.0.0.1 ${NODES[*]}" host
    host=$(hostname -s)
    # SlurmctldHost / NodeHostname must resolve too; most images already list it
    if ! getent hosts "$host" >/dev/null; then want="$want $host"; fi
    if grep -qF "$HOSTS_MARK" /etc/hosts; then
        # rewrite our line in place (keeps the file's inode: /etc/hosts may be a bind mount)
        local tmp
        tmp=$(grep -vF "$HOSTS_MARK" /etc/hosts)
        printf '%s\n%s %s\n' "$tmp" "$want" "$HOSTS_MARK" >/etc/hosts
    else
        printf '%s %s\n' "$want" "$HOSTS_MARK" >>/etc/hosts
    fi
}

write_conf() {
    local host i
    host=$(hostname -s)
    mkdir -p "$CONF_DIR"
    if [[ -e $CONF ]] && ! grep -qF "$CONF_MARK" "$CONF"; then
        log "keeping a copy of the existing $CONF as $CONF.segdist-backup"
        cp -p "$CONF" "$CONF.segdist-backup"
    fi
    {
        echo "$CONF_MARK (regenerated by every 'up')"
        cat <<EOF
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# slurmd reports the configured CPUs instead of the detected ones: both nodes share the
# machine's cores (overcommit), and a 1-core machine would otherwise drain the nodes.
SlurmdParameters=config_overrides
ReturnToService=2
# batch jobs are requeueable by default (scontrol requeue, node failure); --no-requeue opts out
JobRequeue=1
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_ROOT/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
SlurmctldPort=6817
SchedulerType=sched/backfill
# seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or hits its time limit
KillWait=30
# finished jobs stay visible to scontrol/squeue for 5 minutes
MinJobAge=300
EOF
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$NODE_CPUS RealMemory=10000 State=UNKNOWN"
        done
        local IFS=,
        echo "PartitionName=debug Nodes=${NODES[*]} Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    chmod 0644 "$CONF"
}

# ---------------------------------------------------------------------------------------------
# commands

stop_daemons() {
    local n
    if [[ -e $CONF ]] && grep -qF "$CONF_MARK" "$CONF" && pid_alive "$RUN_DIR/slurmctld.pid" >/dev/null; then
        # cancel every job so no job step outlives its slurmd (proctrack/linuxproc does not)
        local jobs i
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            timeout 10 scancel --full $jobs 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [[ -z $(timeout 10 squeue -h -t R,CG -o %i 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    local -a pidfiles=("$RUN_DIR/slurmctld.pid")
    for n in "${NODES[@]}"; do pidfiles+=("$RUN_DIR/slurmd.$n.pid"); done
    stop_pidfiles 15 "${pidfiles[@]}"
}

wipe_state() {
    local n
    rm -rf "$STATE_DIR"
    for n in "${NODES[@]}"; do rm -rf "${SPOOL_ROOT:?}/$n"; done
}

cmd_up() {
    local t0=$SECONDS n i
    install_packages
    mkdir -p "$BASE"
    # one `up`/`down` at a time; the daemons are started with fd 9 closed, else they would
    # inherit the lock and hold it for as long as they run
    exec 9>"$BASE/lock"
    flock -w 120 9 || die "another local-cluster.sh holds $BASE/lock"

    stop_daemons          # idempotence: a previous cluster of ours goes first
    start_munge
    hosts_entries
    wipe_state            # stale state from another cluster name stops slurmctld (CLUSTER NAME MISMATCH)
    mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
    for n in "${NODES[@]}"; do mkdir -p "$SPOOL_ROOT/$n"; done
    : >"$LOG_DIR/slurmctld.log"
    for n in "${NODES[@]}"; do : >"$LOG_DIR/slurmd.$n.log"; done
    write_conf

    log "starting slurmctld"
    slurmctld 9>&- || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
    for ((i = 0; i < 100; i++)); do
        timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
        pid_alive "$RUN_DIR/slurmctld.pid" >/dev/null || [[ $i -lt 10 ]] \
            || die "slurmctld exited; last lines of $LOG_DIR/slurmctld.log:$(echo; tail -n 15 "$LOG_DIR/slurmctld.log")"
        sleep 0.2
    done
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' \
        || die "slurmctld does not answer after 20s; see $LOG_DIR/slurmctld.log"

    for n in "${NODES[@]}"; do
        log "starting slurmd -N $n"
        slurmd -N "$n" 9>&- || die "slurmd -N $n did not start; see $LOG_DIR/slurmd.$n.log"
    done

    local deadline=$((SECONDS + UP_TIMEOUT)) states
    while :; do
        states=$(timeout 10 sinfo -N -h -o '%N %t' 2>/dev/null | sort -u || true)
        if [[ $(grep -c ' idle$' <<<"$states") -eq ${#NODES[@]} ]]; then break; fi
        if ((SECONDS >= deadline)); then
            echo "local-cluster: error: nodes not idle after ${UP_TIMEOUT}s (run '$0 down' to clean up):" >&2
            echo "$states" >&2
            for n in "${NODES[@]}"; do
                echo "--- $LOG_DIR/slurmd.$n.log" >&2; tail -n 10 "$LOG_DIR/slurmd.$n.log" >&2 || true
            done
            echo "--- $LOG_DIR/slurmctld.log" >&2; tail -n 10 "$LOG_DIR/slurmctld.log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "cluster $CLUSTER_NAME up in $((SECONDS - t0))s"
    timeout 10 sinfo -N
}

cmd_down() {
    mkdir -p "$BASE"
    exec 9>"$BASE/lock"
    flock -w 120 9 || die "another local-cluster.sh holds $BASE/lock"
    stop_daemons
    if [[ -e $MUNGE_OURS ]]; then
        stop_pidfiles 10 "$MUNGE_PID"
        rm -f "$MUNGE_OURS"
    fi
    wipe_state
    rm -rf "$RUN_DIR"
    log "cluster down (logs kept in $LOG_DIR until the next 'up')"
}

cmd_status() {
    command -v sinfo >/dev/null || die "slurm is not installed; run: $0 up"
    # sinfo retries for ~10 s when no controller answers: say so at once instead
    pid_alive "$RUN_DIR/slurmctld.pid" >/dev/null || die "the local cluster is not running; run: $0 up"
    timeout 10 sinfo -N
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
