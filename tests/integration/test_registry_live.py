"""Issue #26: a machine added while the detector runs is scored without a restart, and a
removed one's next reading is dead-lettered saying so. Real Mosquitto with logins and a real
`factorywatch detect`, accounts changed with the real `factorywatch broker add-user` /
`remove-user` (the functions the web view's accounts page calls); and the JetStream detector
on a real 3-node NATS cluster, through the same runner."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.contracts import DeadLetter, Verdict
from factorywatch.credentials import init_secrets, remove_user
from factorywatch.errors import BrokerError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import (
    provision_layout,
    read_subjects,
    run_js,
    start_detector,
    stored_verdicts,
    wait_verdicts,
)
from tests.support import (
    Collector,
    Message,
    Proc,
    add_account,
    login_settings,
    reading,
    run_cli,
    secure_args,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2  # the cluster fixture's (tests/integration/conftest.py)

#: the detector's reload cadence here (seconds): a removal applies within it
RELOAD_S = 1.0


def _about(machine: str, kind: str) -> Callable[[Message], bool]:
    """Messages of ``kind`` (``verdict``, ``deadletter``) about ``machine``."""
    if kind == "deadletter":
        return lambda m: "/deadletter/" in m.topic and m.topic.endswith(f"/{machine}")
    return lambda m: m.topic.endswith(f"/{machine}/{kind}")


def _seq(message: Message) -> int:
    """The reading's sequence number, from its verdict or its dead letter's excerpt."""
    if message.topic.endswith("/verdict"):
        return Verdict.model_validate_json(message.payload).seq
    excerpt = DeadLetter.model_validate_json(message.payload).payload_excerpt
    found = re.search(r'"seq":\s*(\d+)', excerpt)
    assert found, excerpt
    return int(found.group(1))


@pytest.mark.timing  # the removal applies within the reload cadence (+ 5 s)
def test_an_added_machine_is_scored_and_a_removed_one_dead_lettered_without_a_restart(
    spawn: Callable[..., Proc], model_dir: Path, tmp_path: Path, topic_root: str
) -> None:
    """weld-4, unknown when the detector started, is added with `broker add-user` (and the
    broker reloaded, as the view does): its first reading gets a verdict from the same
    detector process. Removed with `broker remove-user`, its connection still open (the
    broker not reloaded yet), its next reading is dead-lettered `unknown_machine` 'removed
    from the registry' within the detector's reload cadence; no reading is answered twice."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    broker = LocalBroker(tmp_path / "broker", secrets_dir=secrets, topic_root=topic_root).start()
    topics = Topics(topic_root)

    def login(user: str) -> BrokerSettings:
        return login_settings(broker.port, topic_root, secrets, user, connect_retries=0)

    filters = [f"{topic_root}/alerts/#", f"{topic_root}/deadletter/#"]
    monitor = Collector(login("monitor"), filters, "mon")
    weld: mqtt.Client | None = None
    try:
        det = spawn(
            "detect", *secure_args(broker.port, topic_root, secrets),
            "--model-dir", str(model_dir), "--state-dir", str(tmp_path / "state"),
            "--metrics-port", "0",
            env={"FACTORYWATCH_DETECTOR_RELOAD_INTERVAL_S": str(RELOAD_S)},
        )  # fmt: skip
        det.wait_log("telemetry_subscribed")
        pid = det.process.pid

        added = run_cli("broker", "add-user", "weld-4", "--line", "line1", "--secrets-dir",
                        str(secrets))  # fmt: skip
        assert added.returncode == 0, added.stderr
        broker.reload()
        weld = wait_until(
            lambda: fwmqtt.connected_client(login("weld-4"), "weld-4"),
            what="the reloaded broker to let weld-4 in",
            errors=(BrokerError,),
        )
        topic = topics.telemetry("line1", "weld-4")
        for seq in (1, 2, 3):
            weld.publish(topic, reading("weld-4", seq).encode(), qos=1).wait_for_publish(10)
        assert monitor.wait_for(lambda m: _about("weld-4", "verdict")(m) and _seq(m) == 3)
        verdicts = monitor.matching(_about("weld-4", "verdict"))
        assert sorted(_seq(m) for m in verdicts) == [1, 2, 3]  # each once, none dead-lettered
        assert monitor.matching(_about("weld-4", "deadletter")) == []
        assert det.process.poll() is None
        assert det.process.pid == pid
        assert det.log().count("detector_started") == 1  # the same detector, never restarted

        removed = run_cli("broker", "remove-user", "weld-4", "--secrets-dir", str(secrets))
        assert removed.returncode == 0, removed.stderr
        started = time.monotonic()
        # the detector's reload cadence reads the changed file (no restart, no signal)
        det.wait_log('"machines_removed": ["weld-4"]', timeout=30)
        assert time.monotonic() - started < RELOAD_S + 5.0
        # the old ACL still admits the open connection: the detector is the fence now
        weld.publish(topic, reading("weld-4", 4).encode(), qos=1).wait_for_publish(10)
        (letter,) = monitor.wait_for(lambda m: _about("weld-4", "deadletter")(m) and _seq(m) == 4)
        dead = DeadLetter.model_validate_json(letter.payload)
        assert dead.reason == "unknown_machine"
        assert "removed from the registry" in dead.detail
        assert sorted(_seq(m) for m in monitor.matching(_about("weld-4", "verdict"))) == [1, 2, 3]
        assert det.log().count("detector_started") == 1
    finally:
        if weld is not None:
            weld.disconnect()
            weld.loop_stop()
        monitor.close()
        broker.stop()


def _dead_letters(cluster: LocalNatsCluster) -> list[DeadLetter]:
    layout = cluster.layout

    async def action(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, layout.output_stream, f"{layout.root}.deadletter.>")

    return [DeadLetter.model_validate_json(data) for _, data in run_js(cluster, action)]


def test_the_jetstream_detector_follows_the_registry_too(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    tmp_path: Path,
    topic_root: str,
) -> None:
    """The same runner on JetStream: m2, added to the registry file while the detector runs,
    is scored from its first reading; removed, its next reading is dead-lettered saying so.
    Each reading answered once (the output stream drops a second verdict by reading id, so
    the stored count is checked against the acknowledged readings)."""
    cluster = nats_cluster
    secrets = tmp_path / "secrets"
    add_account(secrets, "m1", "machine", line="line1")
    provision_layout(cluster)
    topics = Topics(topic_root)
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    env = {
        "FACTORYWATCH_DETECTOR_REGISTRY_FILE": str(secrets / "registry.json"),
        "FACTORYWATCH_DETECTOR_RELOAD_INTERVAL_S": str(RELOAD_S),
    }
    det = start_detector(spawn, cluster, model_dir, env=env)
    try:

        def send(machine: str, seq: int) -> None:
            payload = reading(machine, seq).encode()
            device.publish(topics.telemetry("line1", machine), payload, f"{machine}:{seq}")

        send("m1", 1)
        assert [v.machine_id for v in wait_verdicts(cluster, 1, timeout_s=30)] == ["m1"]
        add_account(secrets, "m2", "machine", line="line1")  # as `broker add-user m2`
        send("m2", 1)
        send("m2", 2)
        verdicts = wait_verdicts(cluster, 3, timeout_s=30)
        assert sorted(f"{v.machine_id}:{v.seq}" for v in verdicts) == ["m1:1", "m2:1", "m2:2"]
        assert _dead_letters(cluster) == []

        remove_user(secrets, "m2")  # as `broker remove-user m2`
        det.wait_log('"machines_removed": ["m2"]', timeout=30)
        send("m2", 3)
        (dead,) = wait_until(lambda: _dead_letters(cluster), 30, what="m2's dead letter")
        assert dead.reason == "unknown_machine"
        assert "removed from the registry" in dead.detail
        assert '"seq":3' in dead.payload_excerpt
        assert device.wait_acked(4)
        assert len(stored_verdicts(cluster)) == 3
        assert det.log().count("jetstream_detector_started") == 1
    finally:
        device.close()
