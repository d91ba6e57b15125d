"""One scenario through both real transports (Mosquitto and NATS JetStream): same verdicts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from factorywatch.broker import LocalBroker
from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.contracts import AlertEvent, Telemetry, Verdict
from factorywatch.partitions import ClusterLayout
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import (
    MosquittoSub,
    provision_layout,
    start_detector,
    stored_events,
    wait_verdicts,
)
from tests.support import Collector, Proc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MACHINES = ("par-1", "par-2", "par-3")
#: per machine: normal, then faulty (an alert is raised), then normal again (it clears)
PHASES = ((6, False), (6, True), (8, False))
READINGS = len(MACHINES) * sum(count for count, _ in PHASES)
#: the same knobs for both detectors: a short alert window and a 1 s heartbeat
ENV = {
    "FACTORYWATCH_DETECTOR_ALERT_K": "2",
    "FACTORYWATCH_DETECTOR_ALERT_N": "3",
    "FACTORYWATCH_DETECTOR_ALERT_M": "3",
    "FACTORYWATCH_DETECTOR_HEARTBEAT_S": "1",
}
HEARTBEATS = 3


@pytest.fixture
def parity_cluster(tmp_path: Path, topic_root: str) -> Iterator[LocalNatsCluster]:
    """A fresh 3-node JetStream cluster with the MQTT listener, open (no auth)."""
    cluster = LocalNatsCluster(
        tmp_path / "nats", layouts=(ClusterLayout(topic_root, partitions=2),)
    ).start()
    yield cluster
    cluster.stop()


def _scenario() -> list[Telemetry]:
    """Every reading of the scenario, machine by machine in event-time order."""
    start = time.time() - 100  # recent: inside the clock-skew window
    readings = []
    for index, machine in enumerate(MACHINES):
        sim = MachineSimulator(machine, "line1", seed=index)
        ts = start
        for count, faulty in PHASES:
            for _ in range(count):
                ts += 1.0
                readings.append(sim.next(ts, inject="heat_dissipation" if faulty else None))
    return readings


def _publish(device: MqttDevice, topics: Topics, readings: list[Telemetry]) -> None:
    device.wait_connected()
    for r in readings:
        device.publish(
            topics.telemetry(r.line, r.machine_id), r.encode(), f"{r.machine_id}:{r.seq}"
        )
    assert device.wait_acked(len(readings), timeout_s=60)


def _by_reading(verdicts: list[Verdict]) -> dict[tuple[str, int], tuple[str, float, float, str]]:
    return {
        (v.machine_id, v.seq): (v.status, v.score, v.threshold, v.model_version) for v in verdicts
    }


def _kinds(events: list[AlertEvent]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for event in events:
        kinds.setdefault(event.machine_id, []).append(event.event)
    return kinds


def test_one_scenario_gives_the_same_verdicts_events_and_heartbeat_on_both_transports(
    broker: LocalBroker,
    collector: Callable[..., Collector],
    detector: Callable[..., Proc],
    parity_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
    tmp_path: Path,
) -> None:
    """Both detectors score every reading bit-identically, raise and clear the same alerts
    and send the heartbeat at the period the settings give."""
    topics = Topics(topic_root)
    readings = _scenario()

    # Mosquitto: the detector process on the test's broker, a collector on its outputs.
    col = collector(f"{topic_root}/alerts/#", f"{topic_root}/status/#")
    detector(env=ENV)
    _publish(MqttDevice("parity-device", broker.port), topics, readings)
    verdict_msgs = col.wait_for(lambda m: m.topic.endswith("/verdict"), READINGS, timeout=60)
    mosquitto_verdicts = [Verdict.model_validate_json(m.payload) for m in verdict_msgs]
    mosquitto_events = [
        AlertEvent.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith("/event"))
    ]

    # NATS JetStream: the same readings through the cluster's MQTT listener.
    cluster = parity_cluster
    provision_layout(cluster)
    status_sub = MosquittoSub(
        cluster.nodes[1].ports.mqtt, f"{topic_root}/status/#", tmp_path / "status.txt"
    )
    start_detector(spawn, cluster, model_dir, env=ENV)
    _publish(MqttDevice("parity-device", cluster.nodes[0].ports.mqtt), topics, readings)
    jetstream_verdicts = wait_verdicts(cluster, READINGS, timeout_s=60)
    wait_until(
        lambda: _kinds(stored_events(cluster)) == _kinds(mosquitto_events),
        30,
        "the cluster's alert events to match Mosquitto's",
        poll_s=0.5,
    )

    assert len(mosquitto_verdicts) == len(jetstream_verdicts) == READINGS
    assert _by_reading(mosquitto_verdicts) == _by_reading(jetstream_verdicts)
    statuses = {v.status for v in mosquitto_verdicts}
    assert statuses == {"NORMAL", "ALERT"}
    kinds = _kinds(mosquitto_events)
    assert all(kinds[m][:1] == ["ALERT_RAISED"] for m in MACHINES), kinds
    assert all("ALERT_CLEARED" in kinds[m] for m in MACHINES), kinds

    # The heartbeat: "online" statuses keep coming at the configured period (1 s) on both;
    # at the default 15 s neither would send three more within the wait.
    status_topic = topics.status("detector", "detector-under-test")

    def mosquitto_beats() -> int:
        return len(col.matching(lambda m: m.topic == status_topic and b'"online"' in m.payload))

    def jetstream_beats() -> int:
        return len([line for line in status_sub.lines("/detector-a") if '"online"' in line])

    before = mosquitto_beats(), jetstream_beats()
    wait_until(
        lambda: mosquitto_beats() >= before[0] + HEARTBEATS,
        HEARTBEATS * 3,
        "Mosquitto detector heartbeats",
    )
    wait_until(
        lambda: jetstream_beats() >= before[1] + HEARTBEATS,
        HEARTBEATS * 3,
        "JetStream detector heartbeats",
    )
    status_sub.close()
    col.close()
