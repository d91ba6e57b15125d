"""The `factorywatch` command as a process: what its stderr shows when a command fails (the
process's own logging setup, which an in-process main() cannot show)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import CLI


def test_an_error_is_printed_once(tmp_path: Path) -> None:
    """A failing command prints one `error:` line and no log event repeating it."""
    done = subprocess.run(
        [*CLI, "--log-format", "json", "train", "--csv", str(tmp_path / "nope.csv")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    mentions = [ln for ln in done.stderr.splitlines() if "nope.csv" in ln]
    assert len(mentions) == 1, done.stderr
    assert mentions[0].startswith("error: ")
