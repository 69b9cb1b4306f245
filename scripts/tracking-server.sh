#!/usr/bin/env bash
# tracking-server.sh start|stop|status [--auth]
#
# A tracking server for cluster jobs: PostgreSQL (Debian's packages, its own
# data folder, no systemd, not the system cluster) with one database for MLflow
# and one for Optuna, and `mlflow server` on top with that backend store and a
# served artifact store. Must run as root (postgres itself runs as the
# `postgres` user). All state, logs and pid files live under TRACKING_DIR.
#
# `start` and `status` print the exports jobs need (MLFLOW_TRACKING_URI, the Optuna
# storage URL). `start --auth` puts MLflow behind its basic auth (`--app-name
# basic-auth`); the admin's credentials are then exported as MLFLOW_TRACKING_USERNAME /
# MLFLOW_TRACKING_PASSWORD. Switching --auth on or off restarts mlflow only.
# No secret is printed or put on a command line (CI logs the output, `ps` shows
# argv): the printed passwords are `"$(cat FILE)"` of the 0600 files here.
#
# Environment knobs (all optional):
#   TRACKING_DIR        state folder                                [/tmp/tracking-server]
#   TRACKING_HOST       address mlflow server binds to              [127.0.0.1]
#   TRACKING_PORT       mlflow server port                          [5005]
#   TRACKING_PG_HOST    address PostgreSQL listens on               [127.0.0.1]
#   TRACKING_PG_PORT    PostgreSQL port                             [first free from 5433]
#   TRACKING_WORKERS    mlflow server worker processes              [1]
#   TRACKING_PYTHON     python with mlflow + psycopg 3              [<repo>/.venv/bin/python]
#   TRACKING_TIMEOUT    seconds to wait for each step               [90]
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (8 huey processes;
#                       the harness does not use it)                [false]
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
D="${TRACKING_DIR:-/tmp/tracking-server}"
HOST="${TRACKING_HOST:-127.0.0.1}"
PORT="${TRACKING_PORT:-5005}"
PG_HOST="${TRACKING_PG_HOST:-127.0.0.1}"
WORKERS="${TRACKING_WORKERS:-1}"
PY="${TRACKING_PYTHON:-$REPO/.venv/bin/python}"
TIMEOUT="${TRACKING_TIMEOUT:-90}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
ROLE=harness
PACKAGES=(postgresql postgresql-client)

RUN="$D/run"   # mlflow.pid, postgres' unix socket (postgres owns this folder)
LOG="$D/log"
PGDATA="$D/pgdata"
ARTIFACTS="$D/artifacts"

LIB_NAME=tracking-server
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"  # log, die, wait_for, install_packages

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- install
pg_bin() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  [[ -x "$dir/postgres" ]] || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
  echo "$dir"
}

# ---------------------------------------------------------------- postgres
# pg_pid: the postmaster's pid from postmaster.pid if that process lives and is postgres.
pg_pid() {
  local pid
  [[ -r "$PGDATA/postmaster.pid" ]] || return 1
  pid="$(head -n1 "$PGDATA/postmaster.pid" | tr -dc '0-9')"
  [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == postgres ]] || return 1
  echo "$pid"
}
pg_port() { cat "$D/pg_port" 2>/dev/null; }
as_pg() { runuser -u postgres -- "$@"; }
psql_admin() { as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$RUN" -p "$(pg_port)" -U postgres -d postgres "$@"; }
pg_ready() { as_pg "$BIN/pg_isready" -q -h "$RUN" -p "$(pg_port)"; }

start_postgres() {
  BIN="$(pg_bin)"
  id postgres >/dev/null 2>&1 || die "no 'postgres' user (the postgresql package creates it)"
  install -d -o postgres -g postgres -m 0700 "$RUN" "$PGDATA"
  chown postgres:postgres "$LOG/postgres.log" 2>/dev/null || true
  if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    log "initdb in $PGDATA"
    as_pg "$BIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >>"$LOG/initdb.log" 2>&1 || die "initdb failed" "$LOG/initdb.log"
  fi
  if pg_pid >/dev/null; then
    return 0
  fi
  if [[ -n "${TRACKING_PG_PORT:-}" ]]; then
    echo "$TRACKING_PG_PORT" >"$D/pg_port"
  else
    local p=5433
    while port_in_use "$p"; do p=$((p + 1)); done
    echo "$p" >"$D/pg_port"
  fi
  port_in_use "$(pg_port)" && die "port $(pg_port) is taken (TRACKING_PG_PORT)"
  # Local socket: trust (only postgres and root reach $RUN); TCP: passwords. Other nodes reach it
  # only when TRACKING_PG_HOST is not loopback.
  {
    echo "local all all trust"
    echo "host all all 127.0.0.1/32 scram-sha-256"
    [[ "$PG_HOST" != 127.0.0.1 ]] && echo "host all all 0.0.0.0/0 scram-sha-256"
    true
  } >"$PGDATA/pg_hba.conf"
  chown postgres:postgres "$PGDATA/pg_hba.conf"
  log "starting PostgreSQL on $PG_HOST:$(pg_port)"
  touch "$LOG/postgres.log" && chown postgres:postgres "$LOG/postgres.log"
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$LOG/postgres.log" -w -t "$TIMEOUT" start \
    -o "-h $PG_HOST -p $(pg_port) -k $RUN -c max_connections=300 -c shared_buffers=128MB" \
    >>"$LOG/pg_ctl.log" 2>&1 9>&- || die "PostgreSQL did not start" "$LOG/postgres.log"
  wait_for "$TIMEOUT" PostgreSQL "$LOG/postgres.log" pg_ready
}

create_databases() {
  if [[ ! -s "$D/db_pass" ]]; then
    (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/db_pass")
  fi
  local pass db
  pass="$(cat "$D/db_pass")"
  psql_admin >>"$LOG/psql.log" 2>&1 <<EOF || die "could not create the role $ROLE" "$LOG/psql.log"
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN CREATE ROLE $ROLE LOGIN; END IF;
END \$\$;
ALTER ROLE $ROLE PASSWORD '$pass';
EOF
  for db in mlflow optuna mlflow_auth; do
    if [[ -z "$(psql_admin -tA -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
      psql_admin -c "CREATE DATABASE $db OWNER $ROLE" >>"$LOG/psql.log" 2>&1 \
        || die "could not create the database $db" "$LOG/psql.log"
    fi
  done
  write_pgpass
}

# The URLs carry no password, so that `ps` and /proc/PID/cmdline show no secret to other local users:
# the server's libpq reads it from $D/pgpass (root's, mode 0600, named by PGPASSFILE), jobs' libpq from
# PGPASSWORD (print_urls).
server_db_url() { echo "postgresql://$ROLE@$PG_HOST:$(pg_port)/$1"; }
write_pgpass() {
  (umask 077 && echo "*:$(pg_port):*:$ROLE:$(cat "$D/db_pass")" >"$D/pgpass.tmp" && mv -f "$D/pgpass.tmp" "$D/pgpass")
}
# shows_password: the running server's command line holds the database password (started by an older
# version of this script): it is restarted with the password moved out. (grep reads the password from its
# file: on grep's own command line it would show in `ps`.)
shows_password() {
  [[ -s "$D/db_pass" ]] && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qFf "$D/db_pass"
}

# ---------------------------------------------------------------- mlflow
# mlflow_pid: the pid of our `mlflow server` (a python process whose command line says so).
mlflow_pid() {
  local pid
  [[ -r "$RUN/mlflow.pid" ]] || return 1
  pid="$(tr -dc '0-9' <"$RUN/mlflow.pid")"
  [[ -n "$pid" ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q 'mlflow server' || return 1
  [[ "$(awk '/^State:/{print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ]] || return 1
  echo "$pid"
}
tracking_uri() { echo "http://$(cat "$D/mlflow_host" 2>/dev/null || echo "$HOST"):$(cat "$D/mlflow_port" 2>/dev/null || echo "$PORT")"; }
healthy() { "$PY" - "$(tracking_uri)/health" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

start_mlflow() {
  local auth="$1" want_mode have_mode pid
  want_mode="$([[ "$auth" == 1 ]] && echo auth || echo open)"
  have_mode="$(cat "$D/mlflow_mode" 2>/dev/null || echo open)"
  if pid="$(mlflow_pid)"; then
    if shows_password "$pid"; then
      log "restarting mlflow server: its command line shows the database password"
    else
      [[ "$want_mode" == "$have_mode" ]] && return 0
      log "switching mlflow server to '$want_mode': restarting it"
    fi
    stop_mlflow
  fi
  [[ -x "$PY" ]] || die "no python at $PY (TRACKING_PYTHON): create the venv first (pip install -e '.[dev]')"
  "$PY" -c 'import mlflow, psycopg' 2>>"$LOG/mlflow.out" \
    || die "$PY lacks mlflow or psycopg 3 (SQLAlchemy's postgresql:// driver): pip install -e '.[dev]'" "$LOG/mlflow.out"
  port_in_use "$PORT" && die "port $PORT is taken (TRACKING_PORT)"
  mkdir -p "$ARTIFACTS"
  local args=(-m mlflow server --backend-store-uri "$(server_db_url mlflow)"
    --serve-artifacts --artifacts-destination "$ARTIFACTS"
    --host "$HOST" --port "$PORT" --workers "$WORKERS")
  if [[ "$auth" == 1 ]]; then
    if [[ ! -s "$D/auth_pass" ]]; then
      (umask 077 && head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/auth_pass")
    fi
    (umask 077 && cat >"$D/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $(server_db_url mlflow_auth)
admin_username = admin
admin_password = $(cat "$D/auth_pass")
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    )
    if [[ ! -s "$D/flask_secret" ]]; then  # CSRF tokens: the same key in every worker and restart
      (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/flask_secret")
    fi
    args+=(--app-name basic-auth)
  fi
  if [[ "$HOST" != 127.0.0.1 && "$HOST" != localhost ]]; then
    args+=(--allowed-hosts "*")  # reached by other nodes under names we cannot list here
  fi
  echo "$HOST" >"$D/mlflow_host"
  echo "$PORT" >"$D/mlflow_port"
  echo "$want_mode" >"$D/mlflow_mode"
  log "starting mlflow server on $HOST:$PORT ($want_mode)"
  # The server's environment is set in a subshell, not as `env NAME=VALUE` arguments: the Flask key
  # would show in `ps`. setsid (not a group leader here) and exec keep $! the server's pid.
  (
    unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
    export PGPASSFILE="$D/pgpass"
    if [[ "$auth" == 1 ]]; then
      export MLFLOW_AUTH_CONFIG_PATH="$D/basic_auth.ini"
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$D/flask_secret")"
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    exec setsid "$PY" "${args[@]}" </dev/null >>"$LOG/mlflow.out" 2>&1 9>&-
  ) &
  echo $! >"$RUN/mlflow.pid"
  local deadline=$((SECONDS + TIMEOUT))
  until healthy >/dev/null 2>&1; do
    mlflow_pid >/dev/null || die "mlflow server exited" "$LOG/mlflow.out"
    ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for mlflow server /health" "$LOG/mlflow.out"
    sleep 0.5
  done
}

# stop_mlflow: TERM our server's process group (it forks uvicorn and job runners), KILL after 5 s
# (its state is in PostgreSQL and the artifact folder: nothing to flush).
stop_mlflow() {
  local pid i
  pid="$(mlflow_pid)" || {
    rm -f "$RUN/mlflow.pid"
    return 0
  }
  log "stopping mlflow server (pid $pid, its process group)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pgrep -g "$pid" >/dev/null 2>&1 || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$RUN/mlflow.pid"
}

stop_postgres() {
  local pid
  pid="$(pg_pid)" || return 0
  log "stopping PostgreSQL (pid $pid)"
  BIN="$(pg_bin)"
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >>"$LOG/pg_ctl.log" 2>&1 \
    || { log "pg_ctl stop failed: SIGQUIT"; kill -QUIT "$pid" 2>/dev/null || true; }
}

# ---------------------------------------------------------------- commands
# print_urls: the exports jobs need, for `eval "$(... start|status)"`. No secret in the text (CI logs it):
# each password is `"$(cat FILE)"` of its 0600 file, read by the shell that evals it (`sudo cat` when this
# runs under sudo: the user who evals it cannot read root's files). The values then travel in the
# environment, as SLURM hands it to jobs on every node; libpq reads PGPASSWORD.
print_urls() {
  local read=cat
  [[ -n "${SUDO_USER:-}" ]] && read="sudo cat"
  echo "export MLFLOW_TRACKING_URI=$(tracking_uri)"
  if [[ "$(cat "$D/mlflow_mode" 2>/dev/null)" == auth ]]; then
    echo "export MLFLOW_TRACKING_USERNAME=admin"
    echo "export MLFLOW_TRACKING_PASSWORD=\"\$($read $(printf '%q' "$D/auth_pass"))\""
  fi
  echo "export OPTUNA_STORAGE=$(server_db_url optuna)"
  echo "export PGPASSWORD=\"\$($read $(printf '%q' "$D/db_pass"))\""
}

cmd_start() {
  local auth=0
  [[ "${1:-}" == --auth ]] && auth=1
  [[ $EUID -eq 0 ]] || die "must run as root"
  mkdir -p "$D" "$LOG"
  chmod 0755 "$D"
  exec 9>"$D/.lock"
  flock -w 300 9 || die "another tracking-server.sh holds $D/.lock"
  local t0=$SECONDS
  install_packages
  start_postgres
  create_databases
  start_mlflow "$auth"
  log "up in $((SECONDS - t0))s (state and logs in $D)"
  print_urls
}

cmd_stop() {
  [[ $EUID -eq 0 ]] || die "must run as root"
  [[ -d "$D" ]] || {
    log "not running"
    return 0
  }
  exec 9>"$D/.lock"
  flock -w 300 9 || die "another tracking-server.sh holds $D/.lock"
  stop_mlflow
  stop_postgres
  log "stopped"
}

cmd_status() {
  local ok=0 pid
  if pid="$(pg_pid)"; then printf '%-10s up (pid %s, port %s)\n' postgres "$pid" "$(pg_port)"; else
    printf '%-10s down\n' postgres
    ok=1
  fi
  if pid="$(mlflow_pid)" && healthy >/dev/null 2>&1; then
    printf '%-10s up (pid %s, %s, %s)\n' mlflow "$pid" "$(tracking_uri)" "$(cat "$D/mlflow_mode")"
  else
    printf '%-10s down\n' mlflow
    ok=1
  fi
  ((ok == 0)) && print_urls
  return "$ok"
}

case "${1:-}" in
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start [--auth]|stop|status" >&2
    exit 2
    ;;
esac
