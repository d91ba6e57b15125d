"""The compose cluster's node configs: from `broker init`'s secrets, valid for nats-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorywatch.clusterdeploy import cluster_passwords, node_configs
from factorywatch.credentials import init_secrets
from factorywatch.errors import FactorywatchError
from factorywatch.partitions import ClusterLayout

NODES = ("nats-1", "nats-2", "nats-3")
MACHINES = ("press-1", "lathe-2", "mill-3")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `factorywatch broker init --machines press-1,lathe-2,mill-3` writes."""
    directory = tmp_path_factory.mktemp("secrets") / "secrets"
    init_secrets(directory, MACHINES)
    return directory


def test_each_node_routes_to_the_others_and_knows_every_user(secrets: Path) -> None:
    """Node n routes to the two other nodes (never itself) and has a user per role and machine,
    with the passwords `broker init` generated."""
    passwords = cluster_passwords(secrets, MACHINES)
    configs = node_configs(
        NODES, passwords=passwords, machines=MACHINES, layout=ClusterLayout(partitions=6)
    )
    assert [c.filename for c in configs] == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    for config in configs:
        routes = [line for line in config.text.splitlines() if "routes:" in line]
        others = [n for n in NODES if n != config.node]
        assert routes == [
            f'  routes: ["nats-route://{others[0]}:6222", "nats-route://{others[1]}:6222"]'
        ]
        assert 'listen: "0.0.0.0:1883"' in config.text  # the MQTT listener
        for user in ("detector", "viewer", "operator", "monitor", *MACHINES):
            password = (secrets / f"{user}.password").read_text().strip()
            assert f'{{user: "{user}", password: "{password}"' in config.text
    # press-1 publishes only its own readings, on the partition the server files it under.
    assert '"fwpart.4.factory.telemetry.*.press-1"' in configs[0].text


def test_a_machine_without_a_password_is_a_clear_error(secrets: Path) -> None:
    """A machine `broker init` did not make names itself and the command that makes it."""
    with pytest.raises(FactorywatchError, match=r"no password .* for probe-9: run `factorywatch"):
        cluster_passwords(secrets, (*MACHINES, "probe-9"))


def test_node_names_must_be_distinct(secrets: Path) -> None:
    """Two nodes of one name would route to themselves: refused."""
    with pytest.raises(FactorywatchError, match="distinct"):
        node_configs(
            ("nats-1", "nats-1"),
            passwords=cluster_passwords(secrets, MACHINES),
            machines=MACHINES,
            layout=ClusterLayout(),
        )
