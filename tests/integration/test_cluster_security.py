"""The cluster with users (the Mosquitto ACL's roles, one user per machine) and TLS."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from factorywatch.broker import free_port
from factorywatch.cluster import (
    LocalNatsCluster,
    MqttDevice,
    NodePorts,
    TlsFiles,
    generate_passwords,
    nats_server_binary,
    render_node_config,
)
from factorywatch.contracts import Verdict
from factorywatch.credentials import make_certificates
from factorywatch.errors import BrokerError
from factorywatch.launch import Launched
from factorywatch.partitions import ClusterLayout
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import (
    MosquittoSub,
    read_subjects,
    retained_messages,
    run_js,
    start_detector,
    wait_verdicts,
)
from tests.support import Proc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MACHINES = ("m1", "m2")


@pytest.fixture
def secure_cluster(tmp_path: Path, topic_root: str) -> Iterator[LocalNatsCluster]:
    """A 3-node cluster that authenticates every client, speaks only TLS to clients and
    mutual TLS on the routes between its nodes."""
    make_certificates(tmp_path / "secrets" / "certs")
    tls = TlsFiles.from_secrets(tmp_path / "secrets")
    cluster = LocalNatsCluster(
        tmp_path / "nats",
        layouts=(ClusterLayout(topic_root, partitions=2),),
        passwords=generate_passwords(MACHINES),
        machines=MACHINES,
        tls=tls,
        route_tls=tls,
    ).start()
    yield cluster
    cluster.stop()


def _device(cluster: LocalNatsCluster, user: str, password: str | None = None) -> MqttDevice:
    assert cluster.passwords is not None
    assert cluster.tls is not None
    return MqttDevice(
        f"dev-{user}",
        cluster.nodes[1].ports.mqtt,
        user=user,
        password=password or cluster.passwords[user],
        tls_ca=cluster.tls.ca,
    )


def test_machines_publish_only_their_own_readings_over_tls(
    secure_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
    tmp_path: Path,
) -> None:
    """Over TLS, machine m1 publishes its readings and gets verdicts; its publish to m2's
    topic is refused and lands nowhere; a wrong password is refused at CONNECT; the viewer
    reads verdicts with mosquitto_sub and, connecting later, m1's retained state; the detector
    logs in as `detector` (NATS and MQTT)."""
    cluster = secure_cluster
    assert cluster.passwords is not None
    assert cluster.tls is not None
    topics = Topics(topic_root)
    secret = tmp_path / "detector.password"
    secret.write_text(cluster.passwords["detector"])
    start_detector(spawn, cluster, model_dir, user="detector", password_file=secret)
    sub = MosquittoSub(
        cluster.nodes[2].ports.mqtt,
        f"{topic_root}/alerts/+/+/verdict",
        tmp_path / "viewer.txt",
        user="viewer",
        password=cluster.passwords["viewer"],
        ca=cluster.tls.ca,
    )
    # a refused device is closed too: left open, its TLS reconnects go on for the worker's life
    with (
        _device(cluster, "m1", "wrong-password") as refused,
        pytest.raises(BrokerError, match="refused"),
    ):
        refused.wait_connected()

    with _device(cluster, "m1") as m1:
        m1.wait_connected()
        sim = MachineSimulator("m1", "line1", seed=1)
        for _ in range(10):
            reading = sim.next(time.time())
            m1.publish(topics.telemetry("line1", "m1"), reading.encode(), f"m1:{reading.seq}")
        assert m1.wait_acked(10)
        assert len(m1.acked) == 10
        verdicts = wait_verdicts(cluster, 10, timeout_s=30)
        assert {v.machine_id for v in verdicts} == {"m1"}
        assert len(verdicts) == 10

        forged = MachineSimulator("m2", "line1", seed=2).next(time.time())
        m1.publish(topics.telemetry("line1", "m2"), forged.encode(), "forged")
        m1.wait_acked(11, timeout_s=5)  # NATS may PUBACK a refused publish or drop the link

        async def stored(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
            return await read_subjects(js, cluster.layout.input_stream, "$MQTT.msgs.>")

        assert all(".m2" not in subject for subject, _ in run_js(cluster, stored))
        assert wait_until(lambda: len(sub.lines("/verdict")) >= 10, 10)
        seen = [Verdict.model_validate_json(line) for line in sub.lines("/verdict")]
        assert {v.machine_id for v in seen} == {"m1"}
        assert len(wait_verdicts(cluster, 11, timeout_s=3)) == 10  # the forged one got none
        late = retained_messages(
            cluster.nodes[0].ports.mqtt,
            f"{topic_root}/alerts/+/+/state",
            1,
            user="viewer",
            password=cluster.passwords["viewer"],
            ca=cluster.tls.ca,
        )
        assert list(late) == [topics.state("line1", "m1")]  # the detector's retained state, TLS
    sub.close()


def _monitor(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def test_routes_are_mutual_tls_and_a_plaintext_route_peer_is_refused(
    secure_cluster: LocalNatsCluster, tmp_path: Path
) -> None:
    """The three nodes route to each other over verified TLS (JetStream R3 runs over those
    routes); a nats-server offering a plain-TCP route to a node is refused at the handshake
    and never joins."""
    cluster = secure_cluster
    for node in cluster.nodes:
        routing = _monitor(node.ports.http, "varz")["cluster"]
        assert routing["tls_required"] is True
        assert routing["tls_verify"] is True
        assert _monitor(node.ports.http, "routez")["num_routes"] == 2
    target = cluster.nodes[0]
    ports = NodePorts(free_port(), free_port(), free_port(), free_port())
    workdir = tmp_path / "rogue"
    workdir.mkdir()
    config = workdir / "nats.conf"
    config.write_text(
        render_node_config(
            name="rogue",
            cluster_name=cluster.cluster_name,
            ports=ports,
            routes=[f"nats-route://127.0.0.1:{target.ports.cluster}"],
            store_dir=workdir / "js",
            layouts=cluster.layouts,
        )
    )
    rogue = Launched([nats_server_binary(), "-c", str(config)], workdir / "nats.log")
    try:
        rogue.wait_log("Route connection created", timeout=20)  # it tried, in plain TCP
        refused = "TLS route handshake error"
        assert wait_until(lambda: refused in target.log_file.read_text(errors="replace"), 20)
        assert _monitor(ports.http, "routez")["num_routes"] == 0
        assert _monitor(target.ports.http, "routez")["num_routes"] == 2
    finally:
        rogue.kill()
