#!/usr/bin/env bash
# Fill wheelhouse/ with wheels of every dependency (core, `train`, `web` and `cluster` extras)
# on this host.
#
# The image build then installs from wheelhouse/ with `pip --no-index`: no network for pip
# inside the build, so it works behind a TLS-inspecting proxy (pip on the host already trusts
# its CA and mirrors) and in air-gapped plants (copy wheelhouse/ along with the repository).
# Without a wheelhouse the build installs from PyPI instead. Re-made only when
# pyproject.toml or this script changes (a stamp holds their sha256).
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
HOUSE=wheelhouse
stamp="$HOUSE/.pyproject.sha256"
want=$(cat pyproject.toml "$self" | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "docker-wheels: building $HOUSE/ from pyproject.toml" >&2
find "$HOUSE" -name '*.whl' -delete 2>/dev/null || true
mkdir -p "$HOUSE"
# setuptools: the build backend, so the image can build factorywatch itself with --no-index.
"$PYTHON" -m pip wheel -q --wheel-dir "$HOUSE" ".[train,web,cluster]" "setuptools>=77" \
    2> >(grep -v "^WARNING: Location" >&2)
# factorywatch itself is built from the sources in the image, never from a stale wheel.
rm -f "$HOUSE"/factorywatch-*.whl
echo "$want" >"$stamp"
echo "docker-wheels: $(find "$HOUSE" -name '*.whl' | wc -l) wheels" >&2
