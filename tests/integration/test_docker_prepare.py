"""`make docker-prepare` makes `docker compose` work where the engine came without Compose."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import PROJECT_DIR

pytestmark = pytest.mark.integration


def test_ensure_compose_links_compose_v2_as_the_docker_cli_plugin(tmp_path: Path) -> None:
    """With no Compose plugin configured, the script makes `docker compose version` answer."""
    if shutil.which("docker") is None:
        pytest.fail("no docker CLI: install docker.io (`make docker-prepare` does)")
    config = tmp_path / "docker-config"
    env = {**os.environ, "DOCKER_CONFIG": str(config), "HOME": str(tmp_path)}
    before = subprocess.run(
        ["docker", "compose", "version"], env=env, capture_output=True, text=True, check=False
    )
    script = PROJECT_DIR / "scripts" / "ensure-compose.sh"
    done = subprocess.run(
        [str(script)],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    after = subprocess.run(
        ["docker", "compose", "version"], env=env, capture_output=True, text=True, check=False
    )
    assert after.returncode == 0, after.stderr
    assert "Docker Compose version v2" in after.stdout
    if before.returncode != 0:  # it had no plugin: the script linked one into DOCKER_CONFIG
        assert (config / "cli-plugins" / "docker-compose").exists()


def test_an_engine_that_refuses_the_user_is_named_as_such(tmp_path: Path) -> None:
    """A running engine whose socket the user may not open (not in the `docker` group) gets
    the remedy, not "no Docker engine answers ... start Docker yourself", and no install."""
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\necho 'permission denied while trying to connect to the Docker daemon "
        "socket at unix:///var/run/docker.sock' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    done = subprocess.run(
        [str(PROJECT_DIR / "scripts" / "ensure-docker.sh")],
        env={
            **os.environ,
            "PATH": f"{fake.parent}:{os.environ['PATH']}",
            # were it to try anyway: nowhere near the real engine's data and log
            "FACTORYWATCH_DOCKER_DATA_ROOT": str(tmp_path / "data-root"),
            "FACTORYWATCH_DOCKER_LOG": str(tmp_path / "dockerd.log"),
            "FACTORYWATCH_DOCKER_WAIT_S": "5",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 1
    assert "usermod -aG docker" in done.stderr
    assert "starting dockerd" not in done.stderr
    assert "installing" not in done.stderr
