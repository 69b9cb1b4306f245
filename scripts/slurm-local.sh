#!/usr/bin/env bash
# slurm-local.sh start|stop|status
#
# A SLURM cluster on this one host (Debian's slurm 22.05 packages) with munge and
# slurmdbd/MariaDB accounting, started by hand (no systemd), for tests and CI.
# Two nodes, two slurmd daemons (Debian builds slurmd with MULTIPLE_SLURMD):
# node 1 (named after this host) is the default partition `debug`, where every
# job without -p lands; the partition `multi` holds node 1 and node 2 (`<host>-2`,
# its slurmd on its own port) for multi-node jobs (sbatch -p multi -N 2).
# Must run as root. All state, logs and pid files live under SLURM_LOCAL_DIR
# (default /tmp/slurm-local); the config is written to /etc/slurm/.
#
# Environment knobs (all optional):
#   SLURM_LOCAL_DIR         state folder                    [/tmp/slurm-local]
#   SLURM_LOCAL_CLUSTER     cluster name                    [localcluster]
#   SLURM_LOCAL_DB_PORT     MariaDB TCP port (127.0.0.1)    [first free from 3307]
#   SLURM_LOCAL_TIMEOUT     seconds to wait for each step   [60]
#   SLURM_LOCAL_MAX_ARRAY   MaxArraySize                    [100001]
#   SLURM_LOCAL_NODE2_PORT  the second slurmd's port        [6820]
set -euo pipefail

D="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
CLUSTER="${SLURM_LOCAL_CLUSTER:-localcluster}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
MAX_ARRAY="${SLURM_LOCAL_MAX_ARRAY:-100001}"
NODE2_PORT="${SLURM_LOCAL_NODE2_PORT:-6820}"
CONF_DIR=/etc/slurm
SLURM_CONF_FILE="$CONF_DIR/slurm.conf"
DBD_CONF_FILE="$CONF_DIR/slurmdbd.conf"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
MARKER="# Managed by scripts/slurm-local.sh -- rewritten on every start."

RUN="$D/run"          # pid files (munged's is in $D/munge, which munge owns)
LOG="$D/log"
DB="$D/mariadb"       # MariaDB data directory
DB_SOCK="$RUN/mariadbd.sock"
MUNGE_DIR="$D/munge"  # owned by munge: munged's pid + log file

# The two nodes: both run here (NodeAddr 127.0.0.1), each its own `slurmd -N NAME`.
HOST="$(hostname -s)"
NODE1="$HOST"
NODE2="$HOST-2"
NODES=("$NODE1" "$NODE2")
MULTI=multi # the partition of both nodes (jobs ask for it: -p multi)

LIB_NAME=slurm-local
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"  # log, die, wait_for, install_packages

# ---------------------------------------------------------------- pid files
# pid_of NAME: prints the pid of our daemon NAME if its pid file names a live
# process whose /proc/PID/comm is NAME's program; returns 1 otherwise. The
# slurmds are named slurmd-NODE (pid file run/slurmd-NODE.pid, which slurmd
# itself writes too: SlurmdPidFile=run/slurmd-%n.pid); a bare `slurmd` is the
# single slurmd of an earlier version of this script, stopped on start/stop.
pid_file() {
  if [[ "$1" == munged ]]; then echo "$MUNGE_DIR/munged.pid"; else echo "$RUN/$1.pid"; fi
}
program_of() { if [[ "$1" == slurmd-* ]]; then echo slurmd; else echo "$1"; fi; }
pid_of() {
  local f pid
  f="$(pid_file "$1")"
  [[ -r "$f" ]] || return 1
  pid="$(tr -dc '0-9' <"$f" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] || return 1
  alive "$pid" "$(program_of "$1")" || return 1
  echo "$pid"
}
# alive PID NAME: PID is a live (not zombie) process whose comm is NAME. Zombies
# matter here: in a container, PID 1 may never reap the daemons we detached.
alive() {
  [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] || return 1
  [[ "$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null)" != Z ]]
}
is_up() { pid_of "$1" >/dev/null; }

# spawn NAME CMD...: run CMD (a daemon kept in the foreground) detached in its
# own session, output appended to $LOG/NAME.out, and record its pid.
spawn() {
  local name="$1"
  shift
  # 9>&-: the daemon must not inherit (and so keep holding) our flock on $D/.lock
  setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
  echo $! >"$RUN/$name.pid"
}

# ---------------------------------------------------------------- hostname
ensure_hostname() {
  if ! getent hosts "$HOST" >/dev/null 2>&1; then
    log "adding '127.0.0.1 $HOST' to /etc/hosts"
    printf '127.0.0.1 %s\n' "$HOST" >>/etc/hosts
  fi
}

# ---------------------------------------------------------------- munge
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then
    return 0 # ours (pid file) or someone else's: either way usable
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key --force >/dev/null
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 "$MUNGE_DIR" /var/lib/munge /var/log/munge
  rm -f "$MUNGE_DIR/munged.pid"
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    </dev/null >>"$LOG/munged.out" 2>&1 9>&- || die "munged failed to start" "$MUNGE_DIR/munged.log"
  wait_for "$TIMEOUT" munged "$MUNGE_DIR/munged.log" munge_works
}

# ---------------------------------------------------------------- mariadb
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_db_port() {
  if [[ -n "${SLURM_LOCAL_DB_PORT:-}" ]]; then
    DB_PORT="$SLURM_LOCAL_DB_PORT"
  elif [[ -s "$D/db_port" ]] && is_up mariadbd; then
    DB_PORT="$(cat "$D/db_port")" # keep the port of the running server
  else
    DB_PORT=3307
    while port_in_use "$DB_PORT"; do DB_PORT=$((DB_PORT + 1)); done
  fi
  echo "$DB_PORT" >"$D/db_port"
}

sql() { mariadb --no-defaults --socket="$DB_SOCK" -uroot -N -B "$@"; }
db_ping() { mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping; }

start_mariadb() {
  if [[ ! -d "$DB/mysql" ]]; then
    log "initialising MariaDB in $DB"
    rm -rf "$DB"
    mariadb-install-db --no-defaults --datadir="$DB" --user=root \
      --auth-root-authentication-method=socket --skip-test-db \
      >>"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed" "$LOG/mariadb-install.log"
  fi
  if ! is_up mariadbd; then
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    rm -f "$DB_SOCK"
    spawn mariadbd /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DB" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DB_SOCK" \
      --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
      --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=512M \
      --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=0
  fi
  wait_for "$TIMEOUT" mariadbd "$LOG/mariadb.log" db_ping
  if [[ ! -s "$D/db_pass" ]]; then
    (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/db_pass")
  fi
  DB_PASS="$(cat "$D/db_pass")"
  sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
          ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
          ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
          CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    || die "could not create the slurm database user" "$LOG/mariadb.log"
}

# ---------------------------------------------------------------- config
# write_if_changed FILE MODE: stdin -> FILE if the content differs; returns 0
# when the file changed.
write_if_changed() {
  local f="$1" mode="$2" tmp
  tmp="$(mktemp "$f.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [[ -f "$f" ]] && cmp -s "$tmp" "$f"; then
    rm -f "$tmp"
    return 1
  fi
  if [[ -f "$f" ]] && ! grep -qxF "$MARKER" "$f" && [[ ! -e "$f.orig" ]]; then
    log "keeping the previous $f as $f.orig"
    cp -p "$f" "$f.orig"
  fi
  mv -f "$tmp" "$f"
  return 0
}

node_hardware() {
  # "CPUs=2 Boards=1 ... RealMemory=23995" (slurmd -C without its NodeName) with RealMemory -5%.
  # Both nodes declare this host's hardware: each slurmd reports it when it registers.
  local line mem
  line="$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=')" || die "slurmd -C failed"
  line="${line#NodeName=* }"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")"
  [[ -n "$mem" ]] || mem=1000
  mem=$((mem * 95 / 100))
  ((mem > 0)) || mem=1
  sed "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$line"
}

write_configs() {
  install -d -m 0755 "$CONF_DIR"
  local hw
  hw="$(node_hardware)"
  CONF_CHANGED=0
  write_if_changed "$SLURM_CONF_FILE" 0644 <<EOF && CONF_CHANGED=1 || true
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$D/state/slurmctld
SlurmdSpoolDir=$D/state/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MaxArraySize=$MAX_ARRAY
MaxJobCount=$((MAX_ARRAY * 2))
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
NodeName=$NODE1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6818 $hw State=UNKNOWN
NodeName=$NODE2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE2_PORT $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE1 Default=YES MaxTime=INFINITE State=UP
PartitionName=$MULTI Nodes=$NODE1,$NODE2 MaxTime=INFINITE State=UP
EOF
  write_if_changed "$DBD_CONF_FILE" 0600 <<EOF || true
$MARKER
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chown root:root "$DBD_CONF_FILE"
}

# ---------------------------------------------------------------- slurm
cluster_known() {
  timeout 10 sacctmgr -n -P show cluster format=Cluster 2>/dev/null | grep -qxF "$CLUSTER"
}
dbd_answers() { timeout 5 sacctmgr -n -P show cluster format=Cluster; }
ctld_answers() { timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; }
# nodes_usable: both nodes idle (a fresh cluster) or mix/alloc/comp (jobs from before a restart).
nodes_usable() {
  local states n
  states="$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  for n in "${NODES[@]}"; do
    awk -v n="$n" '$1 == n && $2 ~ /^(idle|mix|alloc|comp)$/ {ok = 1} END {exit !ok}' <<<"$states" || return 1
  done
}

start_slurm() {
  if ! is_up slurmdbd; then
    log "starting slurmdbd"
    spawn slurmdbd /usr/sbin/slurmdbd -D
  fi
  wait_for "$TIMEOUT" slurmdbd "$LOG/slurmdbd.log" dbd_answers
  if ! cluster_known; then
    log "adding cluster '$CLUSTER' to the accounting database"
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 \
      || die "sacctmgr add cluster failed" "$LOG/slurmdbd.log"
  fi
  local n
  if is_up slurmd; then # the single slurmd of an earlier version of this script
    stop_daemon slurmd
  fi
  if ((CONF_CHANGED)) && is_up slurmctld; then
    # a restart, not `scontrol reconfigure`: SLURM 22.05 adds or removes nodes only on a restart
    # (jobs keep running: their slurmstepds do not depend on the daemons)
    log "slurm.conf changed: restarting slurmctld and the slurmds"
    for n in "${NODES[@]}"; do stop_daemon "slurmd-$n"; done
    stop_daemon slurmctld
  fi
  if ! is_up slurmctld; then
    log "starting slurmctld"
    spawn slurmctld /usr/sbin/slurmctld -D
  fi
  wait_for "$TIMEOUT" slurmctld "$LOG/slurmctld.log" ctld_answers
  for n in "${NODES[@]}"; do
    if ! is_up "slurmd-$n"; then
      log "starting slurmd -N $n"
      mkdir -p "$D/state/slurmd-$n"
      spawn "slurmd-$n" /usr/sbin/slurmd -D -N "$n"
    fi
  done
  wait_for "$TIMEOUT" "nodes ${NODES[*]} to be idle (sinfo -N)" "$LOG/slurmd-$NODE2.log" nodes_usable
}

smoke_test() {
  log "smoke test: sbatch --wait --wrap true; sbatch -p $MULTI -N 2 --wait --wrap 'srun true'"
  timeout "$TIMEOUT" sbatch --quiet --wait -o /dev/null -J slurm-local-smoke --wrap true \
    >>"$LOG/smoke.log" 2>&1 || {
    cat "$LOG/smoke.log" >&2 || true
    die "sbatch --wait --wrap true failed" "$LOG/slurmctld.log (and $LOG/slurmd-$NODE1.log)"
  }
  timeout "$TIMEOUT" sbatch --quiet --wait -o /dev/null -J slurm-local-smoke -p "$MULTI" -N 2 --wrap 'srun true' \
    >>"$LOG/smoke.log" 2>&1 || {
    cat "$LOG/smoke.log" >&2 || true
    die "a 2-node job (sbatch -p $MULTI -N 2) failed" "$LOG/slurmctld.log (and $LOG/slurmd-$NODE2.log)"
  }
}

# ---------------------------------------------------------------- commands
DAEMONS=(munged mariadbd slurmdbd slurmctld "slurmd-$NODE1" "slurmd-$NODE2") # start order

all_up() {
  local n
  for n in "${DAEMONS[@]}"; do
    if [[ "$n" == munged ]]; then munge_works || return 1; else is_up "$n" || return 1; fi
  done
}

cmd_start() {
  [[ $EUID -eq 0 ]] || die "must run as root"
  mkdir -p "$D" "$RUN" "$LOG" "$D/state/slurmctld"
  chmod 0755 "$D"
  exec 9>"$D/.lock"
  flock -w 300 9 || die "another slurm-local.sh holds $D/.lock"

  if command -v sinfo >/dev/null 2>&1 && all_up && ctld_answers && nodes_usable; then
    log "already running (state in $D)"
    return 0
  fi
  local t0=$SECONDS
  install_packages
  ensure_hostname
  start_munge
  pick_db_port
  start_mariadb
  write_configs
  start_slurm
  smoke_test
  log "cluster '$CLUSTER' up in $((SECONDS - t0))s (partition debug: node $NODE1; partition $MULTI:" \
    "nodes $NODE1,$NODE2; logs in $LOG)"
}

# stop_daemon NAME: TERM it (if it is ours and alive), wait, KILL after 30 s.
stop_daemon() {
  local name="$1" prog pid i
  prog="$(program_of "$name")"
  pid="$(pid_of "$name")" || {
    rm -f "$(pid_file "$name")"
    return 0
  }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    alive "$pid" "$prog" || break
    sleep 0.1
  done
  if alive "$pid" "$prog"; then
    log "$name did not exit in 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$(pid_file "$name")"
}

cmd_stop() {
  [[ $EUID -eq 0 ]] || die "must run as root"
  [[ -d "$D" ]] || {
    log "not running"
    return 0
  }
  exec 9>"$D/.lock"
  flock -w 300 9 || die "another slurm-local.sh holds $D/.lock"
  local any=0 n
  for n in "${DAEMONS[@]}" slurmd; do is_up "$n" && any=1; done
  if ((any == 0)); then
    log "not running"
    return 0
  fi
  # Cancel whatever is still queued or running so that no job steps outlive the cluster.
  if is_up slurmctld && ctld_answers; then
    local jobs
    jobs="$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')" || true
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null || true
      local i
      for ((i = 0; i < 100; i++)); do
        [[ -z "$(timeout 5 squeue -h -o '%A' 2>/dev/null)" ]] && break
        sleep 0.1
      done
    fi
  fi
  for n in "slurmd-$NODE2" "slurmd-$NODE1" slurmd slurmctld slurmdbd mariadbd munged; do stop_daemon "$n"; done
  log "stopped"
}

cmd_status() {
  local n pid ok=0
  for n in "${DAEMONS[@]}"; do
    if pid="$(pid_of "$n")"; then
      printf '%-14s up (pid %s)\n' "$n" "$pid"
    elif [[ "$n" == munged ]] && command -v munge >/dev/null 2>&1 && munge_works; then
      printf '%-14s up (not started by this script)\n' "$n"
    else
      printf '%-14s down\n' "$n"
      ok=1
    fi
  done
  if command -v sinfo >/dev/null 2>&1; then
    timeout 10 sinfo 2>&1 || ok=1
    nodes_usable || ok=1
  else
    echo "sinfo: not installed"
    ok=1
  fi
  return "$ok"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
