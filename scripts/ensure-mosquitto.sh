#!/usr/bin/env bash
# Make sure the mosquitto broker and its command-line clients are installed, or fail loudly.
# Integration tests never skip: they need the real broker.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have mosquitto && have mosquitto_sub && have mosquitto_pub && have mosquitto_passwd; then
  exit 0
fi
echo "mosquitto (or its clients) missing: installing with apt-get" >&2
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ERROR: cannot install mosquitto here. Install 'mosquitto' and 'mosquitto-clients'" \
       "(Debian: apt-get install -y mosquitto mosquitto-clients) and run again." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq mosquitto mosquitto-clients >/dev/null
have mosquitto && have mosquitto_sub || { echo "ERROR: mosquitto install failed" >&2; exit 1; }
