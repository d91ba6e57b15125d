"""``python -m bench.profile`` samples a real detector under load with py-spy and reports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DatasetChoice
from tests.support import PROJECT_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timing]


@pytest.mark.timeout(600)
def test_profile_reports_where_the_detector_spends_its_time(
    tmp_path: Path, test_data: DatasetChoice
) -> None:
    """The report splits real samples between the transport (the default mqtt5 driver) and
    our code and names our functions."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.profile",
            "--messages",
            "3000",
            "--out",
            str(tmp_path),
            *test_data.args,
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = (tmp_path / "profile.md").read_text()
    assert "lost 0" in text
    assert "| mqtt5 driver |" in text
    assert "| factorywatch |" in text
    assert "(factorywatch/detector/" in text  # a row for one of the detector's functions
    assert (tmp_path / "profile-detector.txt").stat().st_size > 0
