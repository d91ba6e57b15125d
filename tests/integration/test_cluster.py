"""The detector on a 3-node NATS JetStream cluster started here on loopback (issue 14)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from factorywatch.cluster import ClusterLayout, LocalNatsCluster, MqttDevice, partition_of
from factorywatch.contracts import Verdict
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import (
    MosquittoSub,
    Stream,
    read_subjects,
    run_js,
    start_detector,
    wait_until,
    wait_verdicts,
)
from tests.support import Proc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4


@pytest.fixture
def nats_cluster(tmp_path: Path, topic_root: str) -> Iterator[LocalNatsCluster]:
    """A fresh 3-node JetStream cluster with the MQTT listener, open (no auth)."""
    cluster = LocalNatsCluster(
        tmp_path / "nats", layouts=(ClusterLayout(topic_root, partitions=PARTITIONS),)
    ).start()
    yield cluster
    cluster.stop()


def _stream_info(cluster: LocalNatsCluster, name: str) -> StreamInfo:
    async def action(_nc: NatsClient, js: JetStreamContext) -> StreamInfo:
        return await js.stream_info(name)

    return run_js(cluster, action)


def _keys(verdicts: list[Verdict]) -> set[str]:
    return {f"{v.machine_id}:{v.seq}" for v in verdicts}


def test_mqtt_readings_land_in_r3_stream_and_mqtt_subscribers_see_verdicts(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
    tmp_path: Path,
) -> None:
    """MQTT 3.1.1 QoS 1 readings land, partitioned by machine, in an R3 stream; a detector
    scores each once and mosquitto_sub on another node sees every verdict."""
    cluster = nats_cluster
    layout = cluster.layout
    topics = Topics(topic_root)
    start_detector(spawn, cluster, model_dir)
    sub = MosquittoSub(
        cluster.nodes[2].ports.mqtt, f"{topic_root}/alerts/+/+/verdict", tmp_path / "sub.txt"
    )
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    machines = ["m1", "m2", "m3", "m4", "m5"]
    Stream(device, topics, machines, per_machine=20, rate_hz=500).start().join(30)
    assert device.wait_acked(100)
    assert len(device.acked) == 100

    info = _stream_info(cluster, layout.input_stream)
    assert info.cluster is not None
    assert info.config.num_replicas == 3
    assert len(info.cluster.replicas or []) == 2  # a leader and two current replicas
    assert info.state.messages == 100

    async def subjects(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, layout.input_stream, layout.input_subjects[0])

    for subject, _ in run_js(cluster, subjects):
        partition, topic = layout.unpartition(subject)
        _, machine = topics.parse_telemetry(topic)
        assert partition == partition_of(machine, PARTITIONS)  # our hash == the server's

    verdicts = wait_verdicts(cluster, 100, timeout_s=30)
    assert len(verdicts) == 100
    assert _keys(verdicts) == set(device.acked)
    assert wait_until(lambda: len(sub.lines("/verdict")) >= 100, 10)
    mqtt_verdicts = [Verdict.model_validate_json(line) for line in sub.lines("/verdict")]
    assert _keys(mqtt_verdicts) == set(device.acked)
    sub.close()
    device.close()
