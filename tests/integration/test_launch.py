"""The one process launcher (``factorywatch.launch``) with real child processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from factorywatch.launch import Launched, LaunchError

SCRIPT = """
import time
print("starting", flush=True)
print("ready port=1234", flush=True)
time.sleep(60)
"""


def test_wait_log_returns_the_line_as_soon_as_it_is_printed(tmp_path: Path) -> None:
    """The awaited line comes back from memory and is also in the log file; SIGTERM ends it."""
    proc = Launched([sys.executable, "-c", SCRIPT], tmp_path / "child.log", name="child")
    try:
        started = time.monotonic()
        line = proc.wait_log("ready", timeout=30)
        assert line.strip() == "ready port=1234"
        assert time.monotonic() - started < 30
        assert "starting" in proc.log()
        assert "ready port=1234" in (tmp_path / "child.log").read_text()
        assert proc.running()
    finally:
        code = proc.terminate(timeout=10)
    assert code == -15  # stopped by our SIGTERM
    assert not proc.running()


def test_wait_log_fails_with_the_log_tail_when_the_process_exits_first(tmp_path: Path) -> None:
    """A child that exits without the line fails the wait at once, quoting what it printed."""
    command = [sys.executable, "-c", "print('boom: no model', flush=True); raise SystemExit(2)"]
    proc = Launched(command, tmp_path / "dies.log", name="dies")
    with pytest.raises(LaunchError, match="boom: no model") as info:
        proc.wait_log("never printed", timeout=60)
    assert "exited" in str(info.value)
    assert proc.wait(10) == 2


def test_wait_log_times_out_with_a_clear_error(tmp_path: Path) -> None:
    """A child that stays silent fails the wait after the timeout, not before."""
    proc = Launched([sys.executable, "-c", SCRIPT], tmp_path / "quiet.log", name="quiet")
    try:
        started = time.monotonic()
        with pytest.raises(LaunchError, match=r"within 0\.5 s"):
            proc.wait_log("never printed", timeout=0.5)
        assert time.monotonic() - started >= 0.5
    finally:
        proc.kill()
    assert not proc.running()
