#!/bin/sh
# pip of the image build: from wheelhouse/ (no network) when it holds wheels, else PyPI.
set -eu
if ls /wheels/*.whl >/dev/null 2>&1; then
    exec /opt/pip/bin/pip "$@" --no-index --find-links /wheels
fi
exec /opt/pip/bin/pip "$@"
