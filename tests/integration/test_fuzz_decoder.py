"""The decoder's fuzz target (tests/fuzz/decoder_target.py) under atheris: libFuzzer runs in a
process of its own (it exits when done). Under hypothesis: tests/property/test_decoder_fuzz.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import PROJECT_DIR


def test_coverage_guided_fuzzing_finds_no_crash(tmp_path: Path) -> None:
    """A short atheris (libFuzzer) run of the target: 20,000 inputs, no crash (exit 0)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_decoder",
            str(tmp_path / "corpus"),
            "-runs=20000",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 20000 runs" in done.stderr
