"""Sparkplug B through a real Mosquitto: Eclipse Tahu's reference client as the edge node.

The detector is the real ``factorywatch detect`` process with Sparkplug enabled; the edge
node's payloads come from Tahu's ``sparkplug_b.py`` (tests/sparkplug_edge.py), not from the
ingest's code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.contracts import AlertEvent, DeadLetter, Verdict
from factorywatch.credentials import init_secrets
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.sparkplug_edge import LiveEdge, TahuEdgeNode, decode
from tests.spec_edge import SpecEdgeNode
from tests.support import (
    Collector,
    Message,
    Proc,
    add_account,
    login_settings,
    metric_value,
    scrape,
)

pytestmark = pytest.mark.integration

SPARKPLUG_ENV = {
    "FACTORYWATCH_DETECTOR_SPARKPLUG": "true",
    "FACTORYWATCH_DETECTOR_SPARKPLUG_REORDER_TIMEOUT_S": "0.5",
    "FACTORYWATCH_DETECTOR_SPARKPLUG_REBIRTH_BACKOFF_S": "0",
}


def _verdicts(col: Collector, machine: str) -> list[Verdict]:
    return [
        Verdict.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith(f"/{machine}/verdict"))
    ]


def _is_verdict(machine: str, seq: int | None = None) -> Callable[[Message], bool]:
    def match(m: Message) -> bool:
        if not m.topic.endswith(f"/{machine}/verdict"):
            return False
        return seq is None or Verdict.model_validate_json(m.payload).seq == seq

    return match


def _is_event(machine: str, kind: str) -> Callable[[Message], bool]:
    def match(m: Message) -> bool:
        return (
            m.topic.endswith(f"/{machine}/event")
            and AlertEvent.model_validate_json(m.payload).event == kind
        )

    return match


def _is_dead_letter(reason: str) -> Callable[[Message], bool]:
    def match(m: Message) -> bool:
        return "/deadletter/" in m.topic and DeadLetter.model_validate_json(m.payload).reason == (
            reason
        )

    return match


def _on_topic(topic: str) -> Callable[[Message], bool]:
    return lambda m: m.topic == topic


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_edge_node_births_data_gaps_deaths_and_bad_payloads(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """Birth, 300 DDATA (seq wraps), garbage, a gap (rebirth asked), DDEATH and NDEATH."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    detector(env=SPARKPLUG_ENV)
    group = f"g{uuid.uuid4().hex[:8]}"
    node = TahuEdgeNode(group, "edge1", bd_seq=1)
    edge = LiveEdge(settings, node)
    sim = MachineSimulator("mill", group, seed=11)
    try:
        edge.send(node.nbirth(_now_ms()))  # seq 0
        edge.send(node.dbirth("mill", sim.next(time.time()), _now_ms()))  # seq 1
        edge.send(node.dbirth("lathe", sim.next(time.time()), _now_ms()))  # seq 2
        for _ in range(300):  # seq 3 .. 302: wraps past 255 once
            edge.send(node.reading_data("mill", sim.next(time.time()), _now_ms()))
        found = col.wait_for(_is_verdict("edge1.mill"), count=301, timeout=60)
        assert len(found) == 301
        assert col.wait_for(_is_verdict("edge1.lathe", 2))
        assert sorted(v.seq for v in _verdicts(col, "edge1.mill")) == [1, *range(3, 303)]
        assert {v.line for v in _verdicts(col, "edge1.mill")} == {group}

        # Garbage where a DDATA belongs: dead-lettered; the stream goes on.
        edge.send((f"spBv1.0/{group}/DDATA/edge1/mill", b"\x0a\xff\xff\xff\x01"))
        garbage = col.wait_for(_is_dead_letter("invalid_protobuf"))
        assert garbage[0].topic == f"{topics.deadletter(group, 'edge1.mill')}"
        edge.send(node.ddata("mill", {"torque_nm": 45.0}, _now_ms()))  # seq 303
        assert col.wait_for(_is_verdict("edge1.mill", 303))

        # A lost message (seq 304): the next is scored; after the reorder timeout the
        # detector asks the node for a rebirth, and the rebirth's births are readings again.
        node.seq += 1
        edge.send(node.ddata("mill", {"torque_nm": 46.0}, _now_ms()))  # seq 305
        assert col.wait_for(_is_verdict("edge1.mill", 305))
        assert edge.wait_rebirth_requests(1) == 1
        assert edge.requests[0].metrics[0].name == "Node Control/Rebirth"
        edge.send(node.nbirth(_now_ms()))
        edge.send(node.dbirth("mill", sim.next(time.time()), _now_ms()))
        edge.send(node.dbirth("lathe", sim.next(time.time()), _now_ms()))
        edge.send(node.ddata("mill", {"torque_nm": 47.0}, _now_ms()))  # seq 3 of the rebirth
        assert len(col.wait_for(_is_verdict("edge1.mill"), count=305, timeout=30)) == 305

        # Deaths: DDEATH takes one device offline, NDEATH (this bdSeq) the rest.
        edge.send(node.ddeath("lathe", _now_ms()))
        assert col.wait_for(_is_event("edge1.lathe", "MACHINE_OFFLINE"))
        edge.send(node.ndeath())
        assert col.wait_for(_is_event("edge1.mill", "MACHINE_OFFLINE"))

        # Data after the death is not guessed: dead-lettered and a rebirth is asked.
        edge.send(node.ddata("mill", {"torque_nm": 48.0}, _now_ms()))
        assert col.wait_for(_is_dead_letter("no_birth"))
        assert edge.wait_rebirth_requests(2) == 2
        # Every reading was answered exactly once (nothing duplicated, nothing extra).
        assert len(_verdicts(col, "edge1.mill")) == 305
        assert not col.matching(_is_dead_letter("missing_channel"))
    finally:
        edge.close()


@pytest.mark.slow
@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "kill-9"])
def test_detector_restart_mid_stream_loses_nothing_and_duplicates_nothing(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    crash: bool,
) -> None:
    """Readings before, during and after a detector restart (or kill -9): none lost.

    After SIGTERM each is answered exactly once. After kill -9 a verdict whose PUBACK the
    crash cut off may be published again (at-least-once), always for the same reading;
    the journaled Sparkplug state means no rebirth is needed and nothing is dead-lettered.
    """
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    first = detector(env=SPARKPLUG_ENV)
    group = f"g{uuid.uuid4().hex[:8]}"
    node = TahuEdgeNode(group, "edge1", bd_seq=4)
    edge = LiveEdge(settings, node)
    sim = MachineSimulator("mill", group, seed=12)
    sent = 0
    try:
        edge.send(node.nbirth(_now_ms()))
        edge.send(node.dbirth("mill", sim.next(time.time()), _now_ms()))
        sent += 1
        for _ in range(150):
            edge.send(node.reading_data("mill", sim.next(time.time()), _now_ms()))
            sent += 1
        col.wait_for(_is_verdict("edge1.mill"), count=20, timeout=30)
        if crash:
            first.kill()
        else:
            assert first.terminate() == 0  # mid-stream: the rest waits in its session
        for _ in range(150):  # while no detector runs
            edge.send(node.reading_data("mill", sim.next(time.time()), _now_ms()))
            sent += 1
        detector(env=SPARKPLUG_ENV)
        for _ in range(50):
            edge.send(node.reading_data("mill", sim.next(time.time()), _now_ms()))
            sent += 1
        last_seq = sent  # the extended seq of the last DDATA (the DBIRTH was 1)
        assert col.wait_for(_is_verdict("edge1.mill", last_seq), timeout=60)
        verdicts = _verdicts(col, "edge1.mill")
        seqs = [v.seq for v in verdicts]
        assert sorted(set(seqs)) == list(range(1, last_seq + 1))  # loss 0 (seq wrapped)
        readings = {(v.seq, v.reading_ts, v.score) for v in verdicts}
        assert len(readings) == sent  # a repeated verdict is the same reading's
        if not crash:
            assert len(seqs) == sent  # no duplicates
        assert edge.requests == []  # the restored state needed no rebirth
        assert not col.matching(lambda m: "/deadletter/" in m.topic)
    finally:
        edge.close()


def test_sensor_cli_simulates_an_edge_node_the_detector_scores(
    detector: Callable[..., Proc],
    spawn: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """`factorywatch sensor --sparkplug`: two devices x 30 readings give 2 x 31 verdicts."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    detector(env=SPARKPLUG_ENV)
    group = f"g{uuid.uuid4().hex[:8]}"
    sensors = spawn(
        "sensor",
        "--sparkplug",
        "--edge-node",
        "press7",
        "--line",
        group,
        "--machine-id",
        "m1,m2",
        "--count",
        "30",
        "--rate",
        "50",
        "--seed",
        "5",
        *mqtt_args,
    )
    assert sensors.process.wait(60) == 0, sensors.log()
    for machine in ("press7.m1", "press7.m2"):  # the birth and 30 data messages each
        assert len(col.wait_for(_is_verdict(machine), count=31, timeout=30)) == 31
        assert col.wait_for(_is_event(machine, "MACHINE_OFFLINE"))  # its NDEATH at exit
    assert not col.matching(lambda m: "/deadletter/" in m.topic)
    assert "refused 0" in sensors.log()


def test_spec_edge_node_without_datatypes_wraps_gaps_and_dies(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """An edge node written from the spec (no data types in DATA, by exception, seq wrapping):
    2 x 200 DDATA give 400 verdicts; a gap of 200 is one gap (a rebirth, counted), never
    duplicates; an explicit NDEATH is MACHINE_OFFLINE reason ndeath."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    proc = detector(env=SPARKPLUG_ENV)
    group = f"g{uuid.uuid4().hex[:8]}"
    node = SpecEdgeNode(group, "edge1", bd_seq=2)
    edge = LiveEdge(settings, node)
    sim = MachineSimulator("mill", group, seed=21)
    devices = ("mill", "lathe")
    try:
        edge.send(node.nbirth(_now_ms()))
        for device in devices:
            first = sim.next(time.time())
            edge.send(node.dbirth(device, dict(first.readings), "L", _now_ms()))
        for i in range(200):  # seq 3 .. 402: wraps once; one changed metric each
            for device in devices:
                channel = "torque_nm" if i % 2 else "tool_wear_min"
                value = sim.next(time.time()).readings[channel]
                edge.send(node.ddata(device, {channel: float(round(value))}, _now_ms()))
        for device in devices:
            found = col.wait_for(_is_verdict(f"edge1.{device}"), count=201, timeout=60)
            assert len(found) == 201  # the birth and every DDATA
        node.skip(200)  # lost while nobody listened: seq 403 .. 602
        edge.send(node.ddata("mill", {"torque_nm": 50.0}, _now_ms()))
        assert col.wait_for(_is_verdict("edge1.mill", 603))
        assert edge.wait_rebirth_requests(1) >= 1
        assert edge.requests[0].metrics[0].name == "Node Control/Rebirth"
        assert proc.metrics_port is not None
        _, text = scrape(proc.metrics_port, "/metrics")
        counters = {
            event: metric_value(text, "factorywatch_sparkplug_events_total", event=event)
            for event in ("births", "gaps", "rebirth_requests_sent")
        }
        assert counters == {"births": 3, "gaps": 1, "rebirth_requests_sent": 1}
        edge.send(node.ndeath())  # an explicit death certificate
        for device in devices:
            [offline] = col.wait_for(_is_event(f"edge1.{device}", "MACHINE_OFFLINE"))
            assert AlertEvent.model_validate_json(offline.payload).reason == "ndeath"
        assert not col.matching(lambda m: "/deadletter/" in m.topic)  # no duplicate_id
    finally:
        edge.close()


def test_acl_an_edge_node_writes_only_its_own_node_topics(tmp_path: Path, topic_root: str) -> None:
    """With the project's ACL a registered edge node (user = its id) publishes only its own
    node's topics in its own group and reads only its own commands; a viewer, a machine and
    an edge node in another group publish no Sparkplug at all."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    add_account(secrets, "edge1", "edge-node", line="g")
    add_account(secrets, "edge2", "edge-node", line="g")
    # A login is a client id (one connection per account): the host listens as a second
    # detector account while `detector` publishes.
    add_account(secrets, "detector-host", "detector")
    broker = LocalBroker(tmp_path / "sbroker", secrets_dir=secrets, topic_root=topic_root).start()
    made: list[Collector] = []

    def login(user: str) -> BrokerSettings:
        return login_settings(broker.port, topic_root, secrets, user, connect_retries=0)

    def subscriber(user: str, *filters: str) -> Collector:
        made.append(Collector(login(user), filters, f"sub-{user}-{uuid.uuid4().hex[:6]}"))
        return made[-1]

    def publish(user: str, topic: str) -> None:
        """Publish at QoS 1 and wait for the PUBACK (a refusal too: MQTT 5 says 0x87)."""
        client = fwmqtt.connected_client(login(user), f"pub-{user}-{uuid.uuid4().hex[:6]}")
        try:
            client.publish(topic, b"\x08\x01", qos=1).wait_for_publish(timeout=10)
        finally:
            client.disconnect()
            client.loop_stop()

    try:
        host = subscriber("detector-host", "spBv1.0/#")
        own_commands = subscriber("edge2", "spBv1.0/g/NCMD/edge2", "spBv1.0/g/NCMD/edge1")
        publish("edge1", "spBv1.0/g/DDATA/edge1/mill")
        publish("edge1", "spBv1.0/g/NBIRTH/edge1")
        assert host.wait_for(lambda m: m.topic == "spBv1.0/g/NBIRTH/edge1")
        # Another node's topics: the broker drops the publish (the host never sees it).
        denied = ["spBv1.0/g/DDATA/edge2/mill", "spBv1.0/g/NDEATH/edge2", "spBv1.0/g/NCMD/edge1"]
        for topic in denied:
            publish("edge1", topic)
        # Sparkplug write rights are the edge nodes' alone, in their own group (issue 25).
        refused = [
            ("viewer", "spBv1.0/g/NBIRTH/viewer"),
            ("press-1", "spBv1.0/g/NBIRTH/press-1"),
            ("edge1", "spBv1.0/other/NBIRTH/edge1"),
        ]
        for user, topic in refused:
            publish(user, topic)
            denied.append(topic)
        # The detector may command a node; a node reads only the commands addressed to it.
        publish("detector", "spBv1.0/g/NCMD/edge1")
        publish("detector", "spBv1.0/g/NCMD/edge2")
        assert own_commands.wait_for(lambda m: m.topic == "spBv1.0/g/NCMD/edge2")
        assert host.wait_for(lambda m: m.topic == "spBv1.0/g/NCMD/edge2")
        # Everything above was delivered in order before these last messages arrived.
        assert [m.topic for m in own_commands.messages] == ["spBv1.0/g/NCMD/edge2"]
        seen = [m.topic for m in host.messages]
        assert "spBv1.0/g/DDATA/edge1/mill" in seen
        assert not {*denied[:2], *denied[3:]} & set(seen)
        assert seen.count("spBv1.0/g/NCMD/edge1") == 1  # the detector's, not edge1's
    finally:
        for col in made:
            col.close()
        broker.stop()


def _names(payload: bytes) -> dict[str, Any]:
    return {m.name: getattr(m, m.WhichOneof("value")) for m in decode(payload).metrics}


def test_verdicts_out_as_sparkplug_tags_with_births_rebirth_and_death(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """With Sparkplug out, each machine is a device of the detector's edge node: DBIRTH with
    its tags, DDATA as verdicts come, births again on NCMD, and NDEATH when it dies."""
    topics = Topics(settings.topic_root)
    col = collector("spBv1.0/factorywatch/#", topics.deadletter_filter)
    det = detector(env={**SPARKPLUG_ENV, "FACTORYWATCH_DETECTOR_SPARKPLUG_OUT": "true"})
    out = "spBv1.0/factorywatch"
    node_id = "detector-under-test"
    assert col.wait_for(lambda m: m.topic == f"{out}/NBIRTH/{node_id}")
    group = f"g{uuid.uuid4().hex[:8]}"
    node = TahuEdgeNode(group, "edge1", bd_seq=1)
    edge = LiveEdge(settings, node)
    sim = MachineSimulator("mill", group, seed=13)
    try:
        edge.send(node.nbirth(_now_ms()))
        edge.send(node.dbirth("mill", sim.next(time.time()), _now_ms()))
        device = f"{node_id}/edge1.mill"
        (birth,) = col.wait_for(lambda m: m.topic == f"{out}/DBIRTH/{device}")
        tags = _names(birth.payload)
        assert tags["Line"] == group
        assert tags["Alert State"] == "NORMAL"
        assert 0.0 < tags["Score"] <= 1.0
        for _ in range(5):
            edge.send(node.reading_data("mill", sim.next(time.time()), _now_ms()))
        assert col.wait_for(lambda m: m.topic == f"{out}/DDATA/{device}")

        rebirth = decode(b"")
        metric = rebirth.metrics.add()
        metric.name, metric.datatype, metric.boolean_value = "Node Control/Rebirth", 11, True
        edge.send((f"{out}/NCMD/{node_id}", rebirth.SerializeToString()))
        births = col.wait_for(lambda m: m.topic == f"{out}/NBIRTH/{node_id}", count=2)
        assert len(births) == 2
        assert len(col.wait_for(lambda m: m.topic == f"{out}/DBIRTH/{device}", count=2)) == 2

        bd_seq = _names(births[-1].payload)["bdSeq"]
        det.kill()  # the broker sends the will of its Sparkplug connection
        (death,) = col.wait_for(lambda m: m.topic == f"{out}/NDEATH/{node_id}")
        assert _names(death.payload)["bdSeq"] == bd_seq
        assert not col.matching(lambda m: "/deadletter/" in m.topic)  # its own tags: no input
    finally:
        edge.close()


def test_authenticating_broker_edge_node_accounts_and_sparkplug_out_account(
    tmp_path: Path, topic_root: str, spawn: Callable[..., Proc], model_dir: Path
) -> None:
    """On an authenticating broker: a registered edge node is scored, `sensor --sparkplug`
    logged in as the viewer is not (issue 25), and Sparkplug out runs with its own
    edge-node account (it exited 2 before)."""
    group = f"g{uuid.uuid4().hex[:8]}"
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ())
    add_account(secrets, "press7", "edge-node", line=group, machines=("m1", "m2"))
    add_account(secrets, "detector-spb", "edge-node", line="factorywatch")
    add_account(secrets, "detector-host", "detector")  # the test's own Sparkplug observer
    broker = LocalBroker(tmp_path / "sbroker", secrets_dir=secrets, topic_root=topic_root).start()
    common = ["--port", str(broker.port), "--topic-root", topic_root, "--secrets-dir", str(secrets)]
    topics = Topics(topic_root)
    monitor = Collector(
        login_settings(broker.port, topic_root, secrets, "monitor"),
        [topics.alerts_filter, topics.deadletter_filter],
        "spb-monitor",
    )
    host = Collector(
        login_settings(broker.port, topic_root, secrets, "detector-host"),
        ["spBv1.0/factorywatch/#"],
        "spb-host",
    )
    try:
        det = spawn(
            "detect",
            *common,
            "--model-dir",
            str(model_dir),
            "--state-dir",
            str(tmp_path / "st"),
            env={
                **SPARKPLUG_ENV,
                "FACTORYWATCH_DETECTOR_SPARKPLUG_OUT": "true",
                "FACTORYWATCH_DETECTOR_SPARKPLUG_OUT_USERNAME": "detector-spb",
            },
        )
        det.wait_log("telemetry_subscribed")
        assert host.wait_for(lambda m: m.topic == "spBv1.0/factorywatch/NBIRTH/detector-spb")
        for node, machines in (("press7", "m1,m2"), ("viewer", "m1")):
            sensor = spawn(
                "sensor",
                "--sparkplug",
                "--edge-node",
                node,
                "--line",
                group,
                "--machine-id",
                machines,
                "--count",
                "10",
                "--rate",
                "50",
                *common,
                name=f"sensor-{node}",
            )
            sensor.process.wait(60)
        for machine in ("press7.m1", "press7.m2"):
            assert len(monitor.wait_for(_is_verdict(machine), count=11, timeout=30)) == 11
            birth = f"spBv1.0/factorywatch/DBIRTH/detector-spb/{machine}"
            assert host.wait_for(_on_topic(birth))
        # The viewer's births and data were refused by the broker: no machine, no verdict.
        assert not monitor.matching(lambda m: "/viewer" in m.topic)
        assert not host.matching(lambda m: "viewer" in m.topic)
    finally:
        monitor.close()
        host.close()
        broker.stop()
