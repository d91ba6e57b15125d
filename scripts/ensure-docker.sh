#!/usr/bin/env bash
# Make a Docker engine reachable for the compose test (`make test`, `make docker-up`).
#
# Installs Debian's docker.io (dockerd, containerd, runc) and debootstrap when missing, then,
# if no engine answers on the default socket, starts dockerd (as root) with a persistent
# data root so built images stay cached between runs, and waits for it. Prints the pid of a
# dockerd it started on stdout (nothing when an engine was already running).
# Fails loudly (exit 1) when no engine can be had: the compose test never skips.
set -euo pipefail

DATA_ROOT=${FACTORYWATCH_DOCKER_DATA_ROOT:-/var/lib/docker}
LOG=${FACTORYWATCH_DOCKER_LOG:-/var/log/factorywatch-dockerd.log}
WAIT_S=${FACTORYWATCH_DOCKER_WAIT_S:-60}

say() { echo "ensure-docker: $*" >&2; }

if refused=$(docker info 2>&1 >/dev/null); then
    exit 0
fi
# An engine that runs but refuses this user (Debian: the socket is root:docker 0660) is no
# engine to start or install: say what to do instead of "start Docker yourself".
if [[ "$refused" == *"permission denied"* ]]; then
    say "a Docker engine runs, but $(id -un) may not use its socket: add yourself to the docker"
    say "group (sudo usermod -aG docker $(id -un), then log in again) or run as root"
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
    || ! command -v docker >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        say "no Docker engine: install Docker (Debian: apt-get install docker.io debootstrap)"
        exit 1
    fi
    say "installing docker.io and debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 install -y -q docker.io debootstrap >&2 \
        || { apt-get -o DPkg::Lock::Timeout=600 update -q >&2 && apt-get -o DPkg::Lock::Timeout=600 install -y -q docker.io debootstrap >&2; }
fi

if [ "$(id -u)" -ne 0 ]; then
    say "no Docker engine answers and starting dockerd needs root (or start Docker yourself)"
    exit 1
fi

mkdir -p "$DATA_ROOT" "$(dirname "$LOG")"
say "starting dockerd (data root $DATA_ROOT, log $LOG)"
# setsid: the engine outlives this script; the caller stops it by the printed pid.
setsid dockerd --data-root "$DATA_ROOT" >>"$LOG" 2>&1 </dev/null &
pid=$!
deadline=$((SECONDS + WAIT_S))
until docker info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
        say "dockerd exited at start; its log ends:"
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "dockerd did not answer within ${WAIT_S} s; its log ends:"
        tail -n 20 "$LOG" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.2
done
say "dockerd $pid is up"
echo "$pid"
