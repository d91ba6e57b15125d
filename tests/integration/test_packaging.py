"""Building the package: no setuptools deprecation warnings, the licence as an SPDX expression."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import PROJECT_DIR, source_tree_build

pytestmark = pytest.mark.slow


def test_wheel_builds_without_a_license_deprecation_warning(tmp_path: Path) -> None:
    """`pip wheel .` (isolated build, setuptools >= 77) warns about nothing and says Apache-2.0."""
    with source_tree_build():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), "."],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=PROJECT_DIR,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for needle in ("SetuptoolsDeprecationWarning", "License classifiers", "project.license"):
        assert needle not in output
    [wheel] = tmp_path.glob("factorywatch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
