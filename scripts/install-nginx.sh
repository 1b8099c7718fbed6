#!/usr/bin/env bash
# Make nginx available to `make bench-overhead`, which measures it as the native floor of a proxy hop.
#
# Usage: scripts/install-nginx.sh
#
# nginx is only ever started by the benchmark, on loopback ports with its own config; this script never
# starts, enables or configures the system's nginx service. Where nginx is missing and this is a Debian
# machine run as root, Debian's `nginx-light` (HTTP/2 and gRPC proxying included) is installed with
# apt-get. Anywhere else it says how to install it and exits 0: the benchmark then skips the nginx column.

set -euo pipefail

log() { printf '[install-nginx] %s\n' "$*"; }

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "nginx is not installed and cannot be installed here (needs root and apt-get);"
    log "the benchmark runs without its nginx column. Debian: sudo apt-get install nginx-light"
    exit 0
fi
log "installing nginx-light with apt-get (the benchmark's native floor)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq nginx-light >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq nginx-light >/dev/null || { log "apt-get could not install nginx-light; skipping"; exit 0; }
fi
# Debian's package may start the system service where an init system runs; the benchmark needs none of it.
if command -v service >/dev/null 2>&1; then
    service nginx stop >/dev/null 2>&1 || true
fi
log "nginx installed: $(/usr/sbin/nginx -v 2>&1)"
