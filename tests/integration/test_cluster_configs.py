"""The compose cluster's node configs, as `factorywatch cluster config` writes them, pass the
real nats-server's own check (`nats-server -t`). What they hold:
tests/unit/test_clusterdeploy.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from factorywatch.cli import main
from factorywatch.cluster import nats_server_binary
from factorywatch.credentials import init_secrets

NODES = ("nats-1", "nats-2", "nats-3")
MACHINES = ("press-1", "lathe-2", "mill-3")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `factorywatch broker init --machines press-1,lathe-2,mill-3` writes."""
    directory = tmp_path_factory.mktemp("secrets") / "secrets"
    init_secrets(directory, MACHINES)
    return directory


def test_rendered_configs_pass_nats_servers_own_check(secrets: Path, tmp_path: Path) -> None:
    """`factorywatch cluster config` writes files (owner-only) that `nats-server -t` accepts."""
    args = ["cluster", "config", "--nodes", ",".join(NODES), "--machines", ",".join(MACHINES)]
    assert main([*args, "--secrets-dir", str(secrets), "--out", str(tmp_path)]) == 0
    for node in NODES:
        path = tmp_path / f"{node}.conf"
        assert path.stat().st_mode & 0o777 == 0o600, "it holds the users' passwords"
        checked = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        assert "is valid" in checked.stdout + checked.stderr
