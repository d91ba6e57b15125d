"""The compose cluster's commands on a real 3-node cluster: bootstrap, and the sensor on 3.1.1.

The cluster logs users in with the passwords `broker init` made (``clusterdeploy``), as the
compose profile does; the sensor CLI publishes with ``--mqtt-protocol 3.1.1`` (NATS 2.9's MQTT
listener refuses MQTT 5, and says so).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from factorywatch.cluster import LocalNatsCluster
from factorywatch.clusterdeploy import cluster_passwords
from factorywatch.contracts import Telemetry
from factorywatch.credentials import init_secrets
from factorywatch.partitions import ClusterLayout, partition_of
from tests.integration.cluster_helpers import read_subjects, run_js
from tests.support import CLI, PROJECT_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MACHINES = ("press-1", "mill-3")
PARTITIONS = 6


@pytest.fixture
def secured(tmp_path: Path, topic_root: str) -> Iterator[tuple[LocalNatsCluster, Path]]:
    """A 3-node cluster whose users are `broker init`'s, and that secrets folder."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, MACHINES)
    cluster = LocalNatsCluster(
        tmp_path / "nats",
        layouts=(ClusterLayout(topic_root, partitions=PARTITIONS),),
        passwords=cluster_passwords(secrets, MACHINES),
        machines=MACHINES,
    ).start()
    yield cluster, secrets
    cluster.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROJECT_DIR,
    )


def test_bootstrap_then_sensor_cli_publishes_mqtt311_qos1_to_the_cluster(
    secured: tuple[LocalNatsCluster, Path], topic_root: str
) -> None:
    """`cluster bootstrap` creates every partition's consumer, the output stream and the bucket;
    `factorywatch sensor --mqtt-protocol 3.1.1` (logged in as each machine) gets every reading
    PUBACKed, stored under its machine's partition; MQTT 5 is refused with the remedy."""
    cluster, secrets = secured
    layout = cluster.layout
    mqtt = ["--port", str(cluster.nodes[1].ports.mqtt), "--topic-root", topic_root]
    mqtt += ["--secrets-dir", str(secrets)]
    booted = _cli(
        "cluster", "bootstrap", *mqtt, "--nats-servers", ",".join(cluster.servers),
        "--partition-count", str(PARTITIONS),
    )  # fmt: skip
    assert booted.returncode == 0, booted.stderr

    async def provisioned(_nc: NatsClient, js: JetStreamContext) -> tuple[list[str], str, str]:
        consumers = [
            (await js.consumer_info(layout.input_stream, layout.consumer(p))).name
            for p in range(PARTITIONS)
        ]
        output = (await js.stream_info(layout.output_stream)).config.name or ""
        bucket = await (await js.key_value(layout.state_bucket)).status()
        return consumers, output, bucket.bucket

    consumers, output, bucket = run_js(cluster, provisioned, user="detector")
    assert consumers == [layout.consumer(p) for p in range(PARTITIONS)]
    assert (output, bucket) == (layout.output_stream, layout.state_bucket)

    sensor = ["sensor", *mqtt, "--machine-id", ",".join(MACHINES), "--count", "10"]
    sensor += ["--rate", "50", "--seq-start", "1000"]
    sent = _cli(*sensor, "--mqtt-protocol", "3.1.1")
    assert sent.returncode == 0, sent.stderr
    assert "sent 20, acknowledged 20, refused 0, buffer full 0" in sent.stdout

    async def stored(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, layout.input_stream, layout.input_filter)

    readings: dict[str, list[int]] = {m: [] for m in MACHINES}
    for subject, data in run_js(cluster, stored):
        partition, topic = layout.unpartition(subject)
        if "/telemetry/" not in topic:
            continue  # the sensors' online/offline status
        reading = Telemetry.model_validate_json(data)
        assert partition == partition_of(reading.machine_id, PARTITIONS), subject
        readings[reading.machine_id].append(reading.seq)
    assert readings == {m: list(range(1000, 1010)) for m in MACHINES}

    refused = _cli(*sensor, "--mqtt-protocol", "5")
    assert refused.returncode != 0
    assert "does not speak MQTT 5" in refused.stderr
    assert "--mqtt-protocol 3.1.1" in refused.stderr


def _granted(
    cluster: LocalNatsCluster, secrets: Path, user: str, topics: list[str], qos: int
) -> list[int]:
    """The SUBACK return code of each topic filter ``user`` subscribes to (0x80: refused)."""
    granted: list[int] = []
    subacked = threading.Condition()

    def on_subscribe(_c: object, _u: object, _mid: int, codes: list[Any], _p: object) -> None:
        with subacked:
            granted.extend(c.value for c in codes)
            subacked.notify_all()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"spy-{user}", protocol=MQTTProtocolVersion.MQTTv311
    )
    client.username_pw_set(user, (secrets / f"{user}.password").read_text().strip())
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", cluster.nodes[0].ports.mqtt)
    client.loop_start()
    try:
        for topic in topics:
            client.subscribe(topic, qos=qos)
        with subacked:
            assert subacked.wait_for(lambda: len(granted) == len(topics), 10), granted
    finally:
        client.disconnect()
        client.loop_stop()
    return granted


def test_subscriptions_match_the_mosquitto_acl(secured: tuple[LocalNatsCluster, Path]) -> None:
    """A machine may subscribe to its own dead letters and verdicts only (`#`, another
    machine's readings or verdicts are refused in the SUBACK, 0x80), as in the Mosquitto ACL;
    `viewer` may subscribe to the README's `<root>/alerts/#` (a filter NATS also checks
    against `<root>.alerts` itself)."""
    cluster, secrets = secured
    root = cluster.layout.topic_root
    machine = [
        "#",
        f"{root}/telemetry/line1/mill-3",
        f"{root}/deadletter/+/press-1",
        f"{root}/alerts/+/press-1/verdict",
        f"{root}/alerts/+/mill-3/verdict",
    ]
    granted = _granted(cluster, secrets, "press-1", machine, qos=0)  # at QoS 0, as sensors
    assert granted == [0x80, 0x80, 0, 0, 0x80]
    viewer = [f"{root}/alerts/#", f"{root}/status/#", f"{root}/telemetry/#"]
    assert _granted(cluster, secrets, "viewer", viewer, qos=1) == [1, 1, 0x80]
