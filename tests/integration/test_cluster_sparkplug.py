"""Sparkplug B edge nodes against the 3-node NATS JetStream cluster (issue 22).

NATS 2.9's MQTT layer refuses every topic holding a '.', and every Sparkplug topic starts
with ``spBv1.0/``: the server closes the edge node's connection on its first PUBLISH and
stores nothing, so no Sparkplug message can reach a JetStream detector (nats-server 2.10
maps '.' to '//' in the subject instead; the cluster here runs Debian's 2.9). This test pins
that with real components, an edge node whose payloads come from Eclipse Tahu's reference
client (tests/sparkplug_edge.py) publishing MQTT 3.1.1 QoS 1, so the documented limit and the
CLI's refusal (``detect --engine jetstream --sparkplug``) are revisited the day the server
accepts these topics.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from factorywatch.cluster import LocalNatsCluster, MqttDevice, nats_server_binary
from factorywatch.partitions import MQTT_STREAM, partition_of
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import provision_layout, read_subjects, run_js
from tests.sparkplug_edge import TahuEdgeNode
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4
REFUSAL = "characters ' ' and '.' not supported for MQTT topics"


def _stored_subjects(cluster: LocalNatsCluster) -> list[str]:
    async def action(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, MQTT_STREAM, "$MQTT.msgs.>")

    return [subject for subject, _ in run_js(cluster, action)]


def test_a_sparkplug_edge_node_is_disconnected_by_the_cluster_and_nothing_is_stored(
    nats_cluster: LocalNatsCluster, topic_root: str
) -> None:
    """NBIRTH, DBIRTH and DDATA at QoS 1 from a Tahu edge node get no PUBACK, the node that
    received them logs the refusal, and the MQTT message stream holds none of them, while a
    JSON reading published to the same node beside them is acknowledged and partitioned."""
    cluster = nats_cluster
    provision_layout(cluster)  # the partitions' durable consumers, as a detector makes them
    version = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    node = cluster.nodes[0]

    sim = MachineSimulator("press-1", "line1", seed=1)
    edge = TahuEdgeNode(group="line1", node="edge1")
    now_ms = int(time.time() * 1000)
    reading = sim.next(now_ms / 1000)
    messages = [
        edge.nbirth(now_ms),
        edge.dbirth("press-1", reading, now_ms),
        edge.reading_data("press-1", sim.next(now_ms / 1000 + 1), now_ms + 1000),
    ]
    assert all(topic.startswith("spBv1.0/line1/") for topic, _ in messages)

    edge_client = MqttDevice("edge1", node.ports.mqtt)
    json_device = MqttDevice("press-2", node.ports.mqtt)
    try:
        edge_client.wait_connected(30.0)
        json_device.wait_connected(30.0)
        for topic, payload in messages:
            edge_client.publish(topic, payload, topic)
        control = MachineSimulator("press-2", "line1", seed=2).next(time.time())
        json_device.publish(Topics(topic_root).telemetry("line1", "press-2"), control.encode(), "j")

        assert json_device.wait_acked(1, 30.0), "the cluster took no MQTT input at all"
        assert json_device.acked == ["j"]
        wait_until(lambda: REFUSAL in node.log_file.read_text(), 30.0, poll_s=0.2)
        # paho resends the unacknowledged NBIRTH on each reconnect: refused every time
        assert not edge_client.wait_acked(1, 5.0), (
            f"{version} acknowledged a Sparkplug topic: its MQTT layer now takes '.', so "
            "Sparkplug on the JetStream engine can be built (issue 22)"
        )
        assert edge_client.acked == []
        assert edge_client.refused == []
    finally:
        edge_client.close()
        json_device.close()

    subjects = _stored_subjects(cluster)
    assert not [s for s in subjects if "spBv1" in s], subjects
    layout = cluster.layout
    part = partition_of("press-2", PARTITIONS)
    assert f"$MQTT.msgs.fwpart.{part}.{layout.root}.telemetry.line1.press-2" in subjects
