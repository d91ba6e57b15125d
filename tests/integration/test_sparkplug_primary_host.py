"""The detector as a Sparkplug primary host through a real Mosquitto: STATE and store-and-forward.

The detector is the real ``factorywatch detect --sparkplug --primary-host-id`` process; the
edge node is tests/spec_edge.py's, hand-encoded from the specification, publishing data at
QoS 0 only while the host's STATE says online and replaying what it stored with
``is_historical`` once it is back.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import Verdict
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.spec_edge import SpecEdgeNode, StoreAndForwardEdge
from tests.support import Collector, Message, Proc, wait_until

pytestmark = pytest.mark.integration

SPARKPLUG_ENV = {
    "FACTORYWATCH_DETECTOR_SPARKPLUG": "true",
    "FACTORYWATCH_DETECTOR_SPARKPLUG_REORDER_TIMEOUT_S": "0.5",
    "FACTORYWATCH_DETECTOR_SPARKPLUG_REBIRTH_BACKOFF_S": "0",
}


def _retained(settings: BrokerSettings, topic: str, timeout: float = 10.0) -> tuple[Any, bool, int]:
    """What a new subscriber to ``topic`` gets: (JSON payload, retain flag, QoS)."""
    got: list[mqtt.MQTTMessage] = []
    arrived = threading.Event()
    client = fwmqtt.new_client(settings, f"probe-{uuid.uuid4().hex[:8]}")
    waiter = fwmqtt.ConnectWaiter()

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        waiter.record(rc)
        c.subscribe(topic, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(msg)
        arrived.set()

    client.on_connect = on_connect
    client.on_message = on_message
    fwmqtt.connect(client, settings, waiter)
    try:
        assert arrived.wait(timeout), f"nothing retained on {topic}"
        msg = got[0]
        return json.loads(msg.payload), bool(msg.retain), int(msg.qos)
    finally:
        client.disconnect()
        client.loop_stop()


def _retained_state(settings: BrokerSettings, topic: str, online: bool) -> tuple[Any, bool, int]:
    """The retained STATE once it says ``online`` (the broker fires a will asynchronously)."""

    def probe() -> tuple[Any, bool, int] | None:
        found = _retained(settings, topic)
        return found if found[0]["online"] is online else None

    found = wait_until(probe, what=f"a retained STATE online={online}")
    assert found is not None  # wait_until returns only a truthy value
    return found


def _verdicts(col: Collector, machine: str) -> list[Verdict]:
    return [
        Verdict.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith(f"/{machine}/verdict"))
    ]


def test_state_birth_and_will_are_retained_qos1_json_with_the_connect_timestamp(
    detector: Callable[..., Proc], settings: BrokerSettings
) -> None:
    """tck-id-host-topic-phid-*: STATE is retained, QoS 1, {online, timestamp}; the will a
    kill -9 fires repeats the birth's timestamp and the next detector answers it; a clean
    stop publishes offline itself."""
    host = f"fw{uuid.uuid4().hex[:6]}"
    topic = f"spBv1.0/STATE/{host}"
    env = {**SPARKPLUG_ENV, "FACTORYWATCH_DETECTOR_SPARKPLUG_PRIMARY_HOST_ID": host}
    before = int(time.time() * 1000)
    first = detector(env=env)
    birth, retain, qos = _retained_state(settings, topic, online=True)
    assert (retain, qos) == (True, 1)
    assert set(birth) == {"online", "timestamp"}
    assert birth["online"] is True
    assert before <= birth["timestamp"] <= int(time.time() * 1000)
    log = first.log()
    assert log.index("telemetry_subscribed") < log.index("sparkplug_primary_host_online")
    # mqtt5 is the default transport; a primary host runs on paho (its will is per connect)
    assert json.loads(first.wait_log('"broker_connected"'))["transport"] == "paho"

    first.kill()  # the broker publishes the will registered at connect
    will, retain, qos = _retained_state(settings, topic, online=False)
    assert will == {"online": False, "timestamp": birth["timestamp"]}
    assert (retain, qos) == (True, 1)

    second = detector(env=env)
    # the retained will it finds on subscribing is answered with online at once
    second.wait_log("sparkplug_primary_host_offline_answered")
    rebirth, _, _ = _retained_state(settings, topic, online=True)
    assert rebirth["timestamp"] > birth["timestamp"]  # a new connection, a new timestamp
    assert second.terminate() == 0
    death, retain, qos = _retained_state(settings, topic, online=False)
    assert (retain, qos) == (True, 1)
    assert death["online"] is False
    assert death["timestamp"] >= rebirth["timestamp"]


@pytest.mark.slow
def test_kill_9_with_a_store_and_forward_edge_node_at_qos0_loses_nothing(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """A QoS 0 edge node stores while the detector is kill -9ed and replays after the
    restart: every reading gets exactly one verdict, the replayed ones historical."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    host = f"fw{uuid.uuid4().hex[:6]}"
    env = {**SPARKPLUG_ENV, "FACTORYWATCH_DETECTOR_SPARKPLUG_PRIMARY_HOST_ID": host}
    first = detector(env=env)
    group = f"g{uuid.uuid4().hex[:8]}"
    edge = StoreAndForwardEdge(settings, SpecEdgeNode(group, "edge1", bd_seq=0), host)
    sim = MachineSimulator("mill", group, seed=31)
    base_ms = int(time.time() * 1000) - 600_000
    count = 0

    def read() -> bool:
        nonlocal count
        count += 1
        return edge.reading("mill", dict(sim.next(time.time()).readings), base_ms + count)

    try:
        edge.wait_state(online=True)
        edge.births({"mill": dict(sim.next(time.time()).readings)}, base_ms)
        assert all(read() for _ in range(80))  # live, QoS 0
        # mid-stream: the readings so far are answered, then the detector dies
        assert len(col.wait_for(lambda m: m.topic.endswith("/verdict"), 81, 60)) == 81
        first.kill()
        edge.wait_state(online=False)  # the broker delivered the detector's STATE will
        assert not any(read() for _ in range(80))  # stored while nobody listens
        detector(env=env)
        edge.wait_state(online=True)  # the replay went out before this returns
        assert all(read() for _ in range(40))
        found = col.wait_for(lambda m: m.topic.endswith("/verdict"), 201, 90)
        assert len(found) == 201  # the DBIRTH and 200 readings
        verdicts = _verdicts(col, "edge1.mill")
        stamps = [round(v.reading_ts * 1000) - base_ms for v in verdicts]
        assert sorted(stamps) == list(range(201))  # each reading exactly once: 0 lost
        historical = sorted(round(v.reading_ts * 1000) - base_ms for v in verdicts if v.historical)
        assert historical == list(range(81, 161))
        assert [round(ts) - base_ms for ts in edge.replayed] == historical
        assert not col.matching(lambda m: "/deadletter/" in m.topic)
    finally:
        edge.close()


@pytest.mark.slow
def test_kill_9_at_any_moment_loses_only_what_was_in_flight(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """A free-running QoS 0 edge node and a kill -9 at an arbitrary moment: no reading is
    answered twice, nothing stored is lost; the only losses are QoS 0 readings sent after the
    last answered one and before the edge node saw the will (prints the count)."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    host = f"fw{uuid.uuid4().hex[:6]}"
    env = {**SPARKPLUG_ENV, "FACTORYWATCH_DETECTOR_SPARKPLUG_PRIMARY_HOST_ID": host}
    first = detector(env=env)
    group = f"g{uuid.uuid4().hex[:8]}"
    edge = StoreAndForwardEdge(settings, SpecEdgeNode(group, "edge1"), host)
    sim = MachineSimulator("mill", group, seed=32)
    base_ms = int(time.time() * 1000) - 600_000
    total = 1500
    done = threading.Event()

    def stream() -> None:
        for i in range(1, total + 1):
            edge.reading("mill", dict(sim.next(time.time()).readings), base_ms + i)
            done.wait(0.005)  # the edge node's publishing rate (about 200/s), not a wait

    def is_verdict(m: Message) -> bool:
        return m.topic.endswith("/verdict")

    try:
        edge.wait_state(online=True)
        edge.births({"mill": dict(sim.next(time.time()).readings)}, base_ms)
        streamer = threading.Thread(target=stream)
        streamer.start()
        col.wait_for(is_verdict, 200, 60)
        answered = max(
            round(Verdict.model_validate_json(m.payload).reading_ts * 1000) - base_ms
            for m in col.matching(is_verdict)
        )
        first.kill()
        edge.wait_state(online=False)
        detector(env=env)
        edge.wait_state(online=True)
        streamer.join(120)
        assert not streamer.is_alive()
        replayed = [ts - base_ms for ts in edge.replayed]
        assert replayed, "nothing was stored: the kill came after the stream"
        in_flight = {ts - base_ms for ts in edge.live} & set(range(answered + 1, replayed[0]))
        expected = total + 1 - len(in_flight)
        col.wait_for(is_verdict, expected, 90)
        verdicts = _verdicts(col, "edge1.mill")
        stamps = [round(v.reading_ts * 1000) - base_ms for v in verdicts]
        assert len(stamps) == len(set(stamps))  # nothing answered twice
        lost = set(range(total + 1)) - set(stamps)
        assert lost <= in_flight  # only QoS 0 data already on its way when the detector died
        assert sorted(s for v, s in zip(verdicts, stamps, strict=True) if v.historical) == replayed
        print(  # the figure the report quotes (run with -s)
            f"\nreadings {total + 1}, lost {len(lost)} (in flight at the kill: "
            f"{len(in_flight)}), stored and replayed {len(replayed)}, duplicates 0"
        )
    finally:
        done.set()
        edge.close()
