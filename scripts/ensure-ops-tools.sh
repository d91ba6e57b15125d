#!/usr/bin/env bash
# Make sure the operator-stack test tools are installed, or fail loudly (tests never skip):
# Debian's chromium (web view test, driven by Playwright without a browser download),
# prometheus + promtool, prometheus-alertmanager + amtool, and a reachable PostgreSQL for
# the history tests (127.0.0.1:5432, db `test`, or FACTORYWATCH_TEST_PG_URL).
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
missing=()
have chromium || missing+=(chromium)
have prometheus && have promtool || missing+=(prometheus)
have prometheus-alertmanager && have amtool || missing+=(prometheus-alertmanager)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing ${missing[*]}: installing with apt-get" >&2
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ERROR: cannot install ${missing[*]} here (Debian: apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  have chromium && have promtool && have amtool || { echo "ERROR: install failed" >&2; exit 1; }
fi
