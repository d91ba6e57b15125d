"""The NATS cluster in containers: node configs from a secrets folder, and the bootstrap.

``factorywatch cluster config`` renders every node's nats-server config with
``cluster.render_node_config`` (JetStream, routes to the other nodes, the MQTT listener, the
partition mappings, one user per role and per machine with the passwords `broker init` made);
``factorywatch cluster bootstrap`` connects one MQTT 3.1.1 client, so the MQTT layer creates
its streams (``$MQTT_msgs`` among them), then creates every partition's durable consumer, the
output stream and the state bucket (``detector.jetstream.provision``). The compose profile
``cluster`` runs both before the detectors and the sensors start (docker-compose.yml).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets as _random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from factorywatch.cli_common import broker_options, broker_settings
from factorywatch.cluster import NodePorts, cluster_users, render_node_config
from factorywatch.credentials import read_password
from factorywatch.errors import FactorywatchError
from factorywatch.partitions import DEFAULT_PARTITIONS, ClusterLayout
from factorywatch.topics import DEFAULT_ROOT, check_id

#: The ports every node listens on inside its container (the compose file publishes some).
CONTAINER_PORTS: Final = NodePorts(client=4222, cluster=6222, mqtt=1883, http=8222)
#: Where a node keeps its JetStream store (a volume of its own).
CONTAINER_STORE: Final = Path("/data/jetstream")
#: The roles the cluster's users are made for (``cluster.cluster_users``), besides machines.
SERVICE_ROLES: Final = ("detector", "viewer", "operator", "monitor")
#: ``admin`` (every subject, for the ``nats`` CLI) has a password only if one is provided.
ADMIN: Final = "admin"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One node's rendered config and the file name it is written under."""

    node: str
    text: str

    @property
    def filename(self) -> str:
        """``<node>.conf``."""
        return f"{self.node}.conf"


def cluster_passwords(secrets_dir: Path, machines: Sequence[str]) -> dict[str, str]:
    """Every user's password from ``secrets_dir`` (``<user>.password``); a clear error if one
    is missing. ``admin`` gets a random one nobody knows unless ``admin.password`` exists."""
    passwords: dict[str, str] = {}
    missing: list[str] = []
    for user in (*SERVICE_ROLES, *machines):
        password = read_password(secrets_dir, user)
        if password is None:
            missing.append(user)
        else:
            passwords[user] = password
    if missing:
        raise FactorywatchError(
            f"no password in {secrets_dir} for {', '.join(missing)}: run `factorywatch broker "
            f"init --machines {','.join(machines) or '<ids>'}` (or `broker add-user <id>`) first"
        )
    passwords[ADMIN] = read_password(secrets_dir, ADMIN) or _random.token_urlsafe(18)
    return passwords


def node_configs(
    nodes: Sequence[str],
    *,
    passwords: dict[str, str],
    machines: Sequence[str],
    layout: ClusterLayout,
    cluster_name: str = "factorywatch",
) -> list[NodeConfig]:
    """The config of each node of a cluster whose nodes reach each other by these names."""
    if len(nodes) < 1 or len(set(nodes)) != len(nodes):
        raise FactorywatchError(f"--nodes {','.join(nodes)!r}: distinct host names, at least one")
    for node in nodes:
        check_id(node, "node name")
    users = cluster_users(layout, passwords, machines)
    return [
        NodeConfig(
            node,
            render_node_config(
                name=node,
                cluster_name=cluster_name,
                ports=CONTAINER_PORTS,
                routes=[
                    f"nats-route://{other}:{CONTAINER_PORTS.cluster}"
                    for other in nodes
                    if other != node
                ],
                store_dir=CONTAINER_STORE,
                layouts=[layout],
                users=users,
                host="0.0.0.0",  # noqa: S104 - inside a container, reached over its network
            ),
        )
        for node in nodes
    ]


def write_configs(configs: Sequence[NodeConfig], out_dir: Path) -> list[Path]:
    """Write each config as ``out_dir/<node>.conf``, readable by its owner only (passwords)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for config in configs:
        path = out_dir / config.filename
        tmp = path.with_suffix(".tmp")
        tmp.write_text(config.text)
        tmp.chmod(0o600)
        tmp.replace(path)
        written.append(path)
    return written


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# -- CLI ----------------------------------------------------------------------------------------
def add_cluster(sub: Any) -> None:
    """``factorywatch cluster config|bootstrap``."""

    p = sub.add_parser("cluster", help="NATS cluster deployment: node configs, bootstrap")
    verbs = p.add_subparsers(dest="cluster_command", required=True, metavar="VERB")

    cfg = verbs.add_parser("config", help="render each node's nats-server config")
    cfg.add_argument("--nodes", required=True, help="comma-separated node host names")
    cfg.add_argument("--secrets-dir", type=Path, required=True, help="what `broker init` made")
    cfg.add_argument("--machines", required=True, help="comma-separated machine ids (a user each)")
    cfg.add_argument("--out", type=Path, required=True, help="folder for <node>.conf files")
    cfg.add_argument("--topic-root", default=DEFAULT_ROOT, help="topic prefix (factory)")
    cfg.add_argument("--partition-count", type=int, default=DEFAULT_PARTITIONS)
    cfg.set_defaults(func=cmd_config)

    boot = verbs.add_parser(
        "bootstrap", help="create the MQTT layer's streams, consumers, output stream, bucket"
    )
    broker_options(boot)  # the MQTT listener to connect to once (as `monitor`)
    boot.add_argument("--nats-servers", required=True, help="comma-separated NATS URLs")
    boot.add_argument("--partition-count", type=int, default=DEFAULT_PARTITIONS)
    boot.add_argument("--wait", type=float, default=120.0, help="give up after (s)")
    boot.set_defaults(func=cmd_bootstrap)


def cmd_config(args: argparse.Namespace) -> int:
    """``factorywatch cluster config``."""
    machines = [check_id(m, "machine id") for m in _csv(args.machines)]
    try:
        layout = ClusterLayout(topic_root=args.topic_root, partitions=args.partition_count)
    except ValueError as exc:
        raise FactorywatchError(str(exc)) from None
    passwords = cluster_passwords(args.secrets_dir, machines)
    configs = node_configs(_csv(args.nodes), passwords=passwords, machines=machines, layout=layout)
    for path in write_configs(configs, args.out):
        print(f"wrote {path}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """``factorywatch cluster bootstrap``: idempotent, so every ``up`` may run it."""
    from factorywatch import mqtt as fwmqtt  # noqa: PLC0415

    broker = broker_settings(args).with_overrides(protocol="3.1.1")
    if broker.secrets_dir is not None and broker.username is None:
        broker = broker.with_overrides(username="monitor")
    # The MQTT layer creates its streams on an account's first MQTT CONNECT.
    client = fwmqtt.connected_client(broker, "fw-cluster-bootstrap", timeout_s=args.wait)
    client.disconnect()
    client.loop_stop()
    print(f"MQTT listener {broker.host}:{broker.port} answered: the MQTT streams exist")
    try:
        layout = ClusterLayout(topic_root=broker.topic_root, partitions=args.partition_count)
    except ValueError as exc:
        raise FactorywatchError(str(exc)) from None
    password = None
    if broker.secrets_dir is not None:
        password = read_password(broker.secrets_dir, "detector")
    asyncio.run(
        _provision(
            _csv(args.nats_servers),
            layout,
            user="detector" if password is not None else None,
            password=password,
            wait_s=args.wait,
        )
    )
    print(
        f"provisioned {layout.partitions} partition consumers on {layout.input_stream}, "
        f"{layout.output_stream}, {layout.state_bucket} (R{layout.replicas})"
    )
    return 0


async def _provision(
    servers: list[str], layout: ClusterLayout, *, user: str | None, password: str | None,
    wait_s: float,
) -> None:  # fmt: skip
    from factorywatch.detector.jetstream import connect, provision  # noqa: PLC0415

    nc = await connect(servers, name="fw-cluster-bootstrap", user=user, password=password)
    try:
        await provision(nc.jetstream(timeout=10), layout, wait_s=wait_s)
    finally:
        await nc.close()
