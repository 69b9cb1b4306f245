#!/usr/bin/env bash
# browser-local.sh install|status
#
# Headless Chromium for the browser tests (tests/test_ui.py): Debian's `chromium`
# package at /usr/bin/chromium, driven by Playwright's Python client through
# `executable_path` (Playwright's own browser download is not used: CI reaches only
# PyPI and Debian). Idempotent: `install` does nothing when chromium already runs.
# Must run as root (apt-get).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
log() { printf 'browser-local: %s\n' "$*" >&2; }

# Prints the version when the binary starts headless; fails otherwise.
check() {
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --version 2>/dev/null | head -n1
}

case "${1:-}" in
  install)
    if [[ -x "$CHROMIUM" ]] && check >/dev/null; then
      log "already installed: $(check)"
      exit 0
    fi
    log "installing Debian's chromium (apt-get, a few minutes on a fresh machine)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
    check >/dev/null || { log "ERROR: $CHROMIUM does not start"; exit 1; }
    log "installed: $(check)"
    ;;
  status)
    if [[ -x "$CHROMIUM" ]] && check; then exit 0; fi
    log "not installed: bash scripts/browser-local.sh install"
    exit 1
    ;;
  *)
    echo "usage: $0 install|status" >&2
    exit 2
    ;;
esac
