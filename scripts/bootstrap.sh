#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with everything the gateway and its tests need.
# Usage: scripts/bootstrap.sh <python3.11> <venv-dir>
#
# On a fresh Debian 12 the two system pieces a bare `python3.11` lacks are installed with apt-get when
# running as root: python3.11-venv (ensurepip, so `-m venv` works) and libpython3.11 (the shared
# library that Triton's Python-backend stub embeds).
set -euo pipefail

PY=${1:?usage: bootstrap.sh <python> <venv>}
VENV=${2:?usage: bootstrap.sh <python> <venv>}

say() { printf '[bootstrap] %s\n' "$*"; }

apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing system packages: $*; install them (e.g. sudo apt-get install -y $*) and run again" >&2
    exit 1
  fi
  say "installing system packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  say "$PY is not Python 3.11 (the embedded Triton's Python stub is built for 3.11)" >&2; exit 1; }

if ! ldconfig -p 2>/dev/null | grep -q 'libpython3\.11\.so\.1\.0'; then
  apt_install libpython3.11
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3.11-venv
    "$PY" -m venv "$VENV"
  fi
  say "created $VENV"
fi

"$VENV/bin/python" -m pip install --quiet --upgrade pip
say "installing the gateway and its test dependencies (first run downloads ~1 GB of wheels)"
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[test]"
scripts/install-perf-analyzer.sh "$VENV"
say "ready: $VENV"
