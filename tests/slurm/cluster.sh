#!/usr/bin/env bash
# A throwaway single-node SLURM 22.05 cluster for the SLURM tests (Debian 12, root, no systemd).
#
#   cluster.sh up      start munged, MariaDB + slurmdbd, slurmctld, slurmd (fresh state)
#   cluster.sh down    stop every daemon this script started, remove its /etc/slurm links
#   cluster.sh status  print key=value lines (exit 1 when the cluster is not usable)
#
# Settings (environment):
#   AT_SLURM_PREFIX     where all state, logs, configs and pid files live  [/tmp/at-slurm]
#   AT_SLURM_GPUS       fake GPUs on the node (gres gpu, Type=fake)         [4]
#   AT_SLURM_CPUS       CPUs the node advertises (may exceed the real ones) [8]
#   AT_SLURM_PARTITION  name of the single, default partition              [debug]
#   AT_SLURM_DB_PORT    MariaDB TCP port (not 3306, to leave a system DB alone) [3307]
#   AT_SLURM_PREEMPT    off | requeue | cancel: with requeue/cancel a second partition
#                       <partition>-urgent (higher PriorityTier, same node) preempts jobs of the
#                       default partition with that PreemptMode, after GraceTime=10 s   [off]
#
# Why it looks like this (measured, see the project's SLURM notes):
# - No systemd: daemons are started by hand and stopped by their pid files.
# - The slurm-jobstep executor strips SLURM_CONF before its inner `srun`, so the config must be
#   readable at the compiled-in path /etc/slurm/slurm.conf: we symlink it there, and refuse to
#   touch /etc/slurm when it holds anything that is not ours (a real cluster's config).
# - Snakemake's SLURM executor polls `sacct`, which in 22.05 needs slurmdbd (+ MariaDB).
# - Fake GPUs are character devices (1:3, like /dev/null): with them SLURM sets
#   CUDA_VISIBLE_DEVICES; plain files schedule but do not.
# - `up` on a machine where a previous run left daemons or state behind stops those daemons
#   (identified by our pid files, or by our prefix in their command line/environment) and starts
#   from empty state, so every run sees the same cluster (job ids restart at 1).
set -euo pipefail

PREFIX=${AT_SLURM_PREFIX:-/tmp/at-slurm}
NGPUS=${AT_SLURM_GPUS:-4}
NCPUS=${AT_SLURM_CPUS:-8}
PART=${AT_SLURM_PARTITION:-debug}
DB_PORT=${AT_SLURM_DB_PORT:-3307}
PREEMPT=${AT_SLURM_PREEMPT:-off}
SLURM_PORTS="6817 6818 6819"
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
ETC_LINKS="/etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf"
RUN=$PREFIX/run
LOG=$PREFIX/log
MUNGED_PID=/run/munge/at-slurm-munged.pid   # outside PREFIX: munged's run dir must be its own

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh [${SECONDS}s]: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (it starts system daemons and writes /etc/slurm)"
case "$PREFIX" in /*) ;; *) die "AT_SLURM_PREFIX must be an absolute path, got '$PREFIX'" ;; esac
for v in NGPUS NCPUS DB_PORT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
[[ $PART =~ ^[A-Za-z0-9_-]+$ ]] || die "AT_SLURM_PARTITION must match [A-Za-z0-9_-]+, got '$PART'"
case "$PREEMPT" in off|requeue|cancel) ;; *) die "AT_SLURM_PREEMPT must be off, requeue or cancel, got '$PREEMPT'" ;; esac

# ------------------------------------------------------------------------------------------
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pids() {  # pids...: SIGTERM all at once, wait up to 15 s for all, then SIGKILL the rest
  local pid i alive
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for i in $(seq 75); do
    alive=""
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && return 0
    sleep 0.2
  done
  log "pids$alive ignored SIGTERM for 15 s, sending SIGKILL"
  for pid in $alive; do kill -9 "$pid" 2>/dev/null || true; done
}

stop_pidfiles() {  # pid files...: stop their daemons together, remove the files
  local f pids=""
  for f in "$@"; do [ -s "$f" ] && pids="$pids $(cat "$f")"; done
  [ -n "$pids" ] && stop_pids $pids
  rm -f "$@"
}

# Daemons from an earlier run whose pid files are gone: only those that are provably ours,
# i.e. whose command line or environment names our config file, database or munged pid file.
stop_orphans() {
  local p exe
  for p in /proc/[0-9]*; do
    exe=$(basename "$(readlink "$p/exe" 2>/dev/null)" 2>/dev/null) || continue
    # (Debian installs them as slurmctld-wlm, slurmd-wlm, ... via alternatives)
    case "$exe" in slurmctld*|slurmd*|slurmstepd*|mariadbd|munged) ;; *) continue ;; esac
    # (grep reads the NUL-separated files directly: `tr | grep -q` fails under pipefail)
    if grep -qaF -e "$PREFIX/etc/slurm.conf" -e "--datadir=$PREFIX/mysql" -e "$MUNGED_PID" \
         "$p/cmdline" 2>/dev/null ||
       grep -qaF "SLURM_CONF=$PREFIX/etc/slurm.conf" "$p/environ" 2>/dev/null; then
      log "stopping leftover $exe (pid ${p#/proc/}) of an earlier run"
      stop_pids "${p#/proc/}"
    fi
  done
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

our_link() {  # is $1 absent, or a symlink into our prefix?
  [ ! -e "$1" ] && [ ! -L "$1" ] && return 0
  [ -L "$1" ] && [[ $(readlink "$1") == "$PREFIX/"* ]]
}

prefix_is_ours() {  # absent, empty, or marked by an earlier `up`
  [ ! -e "$PREFIX" ] || [ -e "$PREFIX/.at-slurm-prefix" ] || [ -z "$(ls -A "$PREFIX")" ]
}

# ------------------------------------------------------------------------------------------
cmd_down() {
  prefix_is_ours || die "$PREFIX was not made by this script (no .at-slurm-prefix): not touching it"
  # SLURM first (slurmctld flushes accounting records to slurmdbd when it stops), then the DB.
  stop_pidfiles "$RUN/slurmd.pid" "$RUN/slurmctld.pid"
  stop_pidfiles "$RUN/slurmdbd.pid" "$RUN/mariadbd.pid"
  # munged is shared with anything else on the machine: stop it only if we started it
  # (then it runs with our own pid file name, also matched by stop_orphans).
  stop_pidfiles "$MUNGED_PID"
  stop_orphans
  local f
  for f in $ETC_LINKS; do
    if [ -L "$f" ] && [[ $(readlink "$f") == "$PREFIX/"* ]]; then rm -f "$f"; fi
  done
  rmdir /etc/slurm 2>/dev/null || true
  log "down"
}

cmd_status() {
  local ok=1
  for d in slurmctld slurmd slurmdbd mariadbd; do
    pid_alive "$RUN/$d.pid" || { echo "$d=down"; ok=0; }
  done
  if [ $ok = 1 ] && sinfo -h -p "$PART" -o %T 2>/dev/null | grep -qx idle; then
    echo "prefix=$PREFIX"
    echo "partition=$PART"
    echo "gpus=$NGPUS"
    echo "cpus=$NCPUS"
    echo "preempt=$PREEMPT"
    echo "slurm_conf=$PREFIX/etc/slurm.conf"
    return 0
  fi
  echo "state=not-ready"
  return 1
}

install_packages() {
  if dpkg -s $PKGS >/dev/null 2>&1; then return 0; fi
  command -v apt-get >/dev/null || die "packages missing ($PKGS) and no apt-get to install them"
  log "installing $PKGS"
  apt-get update -qq >"$LOG/apt.log" 2>&1 || die "apt-get update failed, see $LOG/apt.log"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS \
    >>"$LOG/apt.log" 2>&1 || die "apt-get install failed, see $LOG/apt.log"
}

wait_for() {  # $1 = tries (0.2 s each), rest = command
  local n=$1 i; shift
  for i in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

start_munge() {
  [ -s /etc/munge/munge.key ] || {
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  }
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # someone's munged works
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force --pid-file="$MUNGED_PID"
  wait_for 50 test -s "$MUNGED_PID" || die "munged did not start"
  wait_for 50 sh -c 'munge -n | unmunge' || die "munged does not answer"
}

settings() {  # what `up` was asked for: a running cluster is reused only if this matches
  printf 'AT_SLURM_GPUS=%s\nAT_SLURM_CPUS=%s\nAT_SLURM_PARTITION=%s\nAT_SLURM_PREEMPT=%s\n' \
    "$NGPUS" "$NCPUS" "$PART" "$PREEMPT"
}

write_configs() {
  local host mem gres_node=""
  host=$(hostname -s)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem * 95 / 100))
  : >"$PREFIX/etc/gres.conf"
  echo "AutoDetect=off" >>"$PREFIX/etc/gres.conf"
  if [ "$NGPUS" -gt 0 ]; then
    local i
    for i in $(seq 0 $((NGPUS - 1))); do mknod "$PREFIX/fakegpu/gpu$i" c 1 3; done
    gres_node="Gres=gpu:fake:$NGPUS"
    echo "NodeName=$host Name=gpu Type=fake File=$PREFIX/fakegpu/gpu[0-$((NGPUS - 1))]" \
      >>"$PREFIX/etc/gres.conf"
  fi
  cat >"$PREFIX/etc/slurm.conf" <<CONF
# generated by tests/slurm/cluster.sh; removed by 'cluster.sh down'
ClusterName=atlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/state/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
ReturnToService=2
# the node advertises AT_SLURM_CPUS even on a 2-core machine (tests run tiny jobs)
SlurmdParameters=config_overrides
# a job killed at its time limit or by scancel gets SIGTERM, then SIGKILL after KillWait s
KillWait=5
MinJobAge=600
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$mem $gres_node State=UNKNOWN
CONF
  if [ "$PREEMPT" = off ]; then
    echo "PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$PREFIX/etc/slurm.conf"
  else
    cat >>"$PREFIX/etc/slurm.conf" <<CONF
PreemptType=preempt/partition_prio
PreemptMode=${PREEMPT^^}
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=$PART-urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
  fi
  cat >"$PREFIX/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpass
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
CONF
  chmod 600 "$PREFIX/etc/slurmdbd.conf"
  settings >"$PREFIX/settings"
}

check_etc() {  # before anything is started: never overwrite a real SLURM configuration
  local f
  for f in $ETC_LINKS; do
    our_link "$f" || [ -L "$f" ] ||
      die "$f exists and is not a symlink: refusing to touch what looks like a real SLURM setup"
  done
}

link_etc() {
  mkdir -p /etc/slurm
  ln -sfn "$PREFIX/etc/slurm.conf" /etc/slurm/slurm.conf
  ln -sfn "$PREFIX/etc/gres.conf" /etc/slurm/gres.conf
  ln -sfn "$PREFIX/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf
}

start_db() {
  mariadb-install-db --user=root --datadir="$PREFIX/mysql" --skip-test-db --auth-root-authentication-method=socket \
    >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$PREFIX/mysql" \
    --socket="$RUN/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadbd.err" \
    --innodb-buffer-pool-size=64M --skip-log-bin </dev/null >/dev/null 2>&1 &
  wait_for 150 mariadb-admin --socket="$RUN/mysqld.sock" ping ||
    die "MariaDB did not start, see $LOG/mariadbd.err"
  mariadb --socket="$RUN/mysqld.sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  SLURM_CONF=$PREFIX/etc/slurm.conf /usr/sbin/slurmdbd
  wait_for 150 sacctmgr -n list cluster || die "slurmdbd does not answer, see $LOG/slurmdbd.log"
}

start_slurm() {
  /usr/sbin/slurmctld -f "$PREFIX/etc/slurm.conf"
  /usr/sbin/slurmd -f "$PREFIX/etc/slurm.conf"
  wait_for 150 sh -c "sinfo -h -p '$PART' -o %T | grep -qx idle" || {
    sinfo -N -l >&2 || true
    tail -20 "$LOG/slurmctld.log" >&2 || true
    die "node did not become idle"
  }
  # "idle" can show before slurmd has registered: probe the whole path with a real step.
  timeout 60 srun -p "$PART" -n1 -t 1 true ||
    { tail -20 "$LOG/slurmd.log" >&2 || true; die "srun probe failed"; }
  wait_for 100 sh -c "sacctmgr -n list cluster format=cluster | grep -qw atlocal" ||
    die "slurmctld did not register with slurmdbd"
}

cmd_up() {
  if [ -s "$PREFIX/settings" ] &&
     [ "$(cat "$PREFIX/settings")" = "$(settings)" ] &&
     cmd_status >/dev/null 2>&1 && timeout 30 srun -p "$PART" -n1 -t 1 true >/dev/null 2>&1; then
    log "already up (prefix $PREFIX)"
    cmd_status
    return 0
  fi
  # The prefix is wiped below, so it must be ours or empty: a slip such as AT_SLURM_PREFIX=/tmp
  # must not delete (or stop) anything else.
  prefix_is_ours || die "$PREFIX is not empty and was not made by this script; choose another AT_SLURM_PREFIX"
  check_etc
  cmd_down
  local p
  for p in $SLURM_PORTS $DB_PORT; do
    port_busy "$p" && die "TCP port $p is in use by a process this script did not start: $(ss -Hltnp "sport = :$p" | head -1)"
  done
  # Fresh state every time: no half-recovered jobs or nodes from an earlier run.
  rm -rf "$PREFIX"
  mkdir -p "$PREFIX"/{etc,state/ctld,state/d,fakegpu,mysql} "$RUN" "$LOG"
  touch "$PREFIX/.at-slurm-prefix"
  # If anything below fails, stop what was started so no daemon outlives a failed `up`.
  trap 'rc=$?; if [ $rc != 0 ]; then log "up failed, stopping what was started"; cmd_down; fi' EXIT
  install_packages
  start_munge
  write_configs
  link_etc
  start_db
  start_slurm
  trap - EXIT
  log "up: partition=$PART fake_gpus=$NGPUS cpus=$NCPUS prefix=$PREFIX"
  cmd_status
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: cluster.sh up|down|status" ;;
esac
