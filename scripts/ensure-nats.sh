#!/usr/bin/env bash
# Make sure nats-server (the clustered engine's broker) is installed, or fail loudly.
# The cluster tests and `make scale` never skip: they need the real server.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have nats-server; then
  exit 0
fi
echo "nats-server missing: installing with apt-get" >&2
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ERROR: cannot install nats-server here. Install it (Debian: apt-get install -y" \
       "nats-server) and run again." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq nats-server >/dev/null
have nats-server || { echo "ERROR: nats-server install failed" >&2; exit 1; }
