# lib.sh: helpers shared by scripts/slurm-local.sh and scripts/tracking-server.sh (sourced, not run).
#
# The sourcing script sets, before calling them:
#   LIB_NAME   the prefix of every message (the script's name)
#   LOG        the folder of its logs (apt-get's output goes to $LOG/apt.log)
#   PACKAGES   (an array) the Debian packages install_packages makes sure of

log() { printf '%s: %s\n' "$LIB_NAME" "$*" >&2; }

# die MESSAGE [LOGFILE]: the message, the log's last lines, exit 1.
die() {
  log "ERROR: $1"
  if [[ -n "${2:-}" ]]; then
    log "read the log: $2"
    [[ -r "$2" ]] && tail -n 15 "$2" | sed 's/^/    | /' >&2
  fi
  exit 1
}

# wait_for SECONDS DESCRIPTION LOGFILE CMD...: poll CMD every 0.1 s; die naming LOGFILE on timeout.
wait_for() {
  local secs="$1" what="$2" logf="$3"
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what" "$logf"
    sleep 0.1
  done
}

# install_packages: apt-get install whichever of PACKAGES is missing (nothing when none is).
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]} (apt log: $LOG/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >>"$LOG/apt.log" 2>&1 || die "apt-get update failed" "$LOG/apt.log"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
    || die "apt-get install failed" "$LOG/apt.log"
}
