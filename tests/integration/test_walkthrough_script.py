"""scripts/newcomer-walkthrough.sh, the timed walkthrough of docs/getting-started.md, runs the
README's commands: `make demo`, then exactly the lines of its Docker block, in order."""

from __future__ import annotations

import subprocess

from tests.support import PROJECT_DIR
from tests.unit.test_readme import docker_commands


def test_the_walkthrough_script_runs_the_readme_commands_in_order() -> None:
    """What `--list` prints is what the README prints (continuations joined, comments cut)."""
    listed = subprocess.run(
        [str(PROJECT_DIR / "scripts" / "newcomer-walkthrough.sh"), "--list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    assert listed == ["make demo", *docker_commands()]
