"""The detector on a 3-node NATS JetStream cluster started here on loopback (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from factorywatch.broker import free_port
from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.contracts import AckCommand, AlertEvent, MachineState, Verdict
from factorywatch.partitions import assign, partition_of
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import (
    MosquittoSub,
    Stream,
    provision_layout,
    read_subjects,
    retained_messages,
    run_js,
    start_detector,
    stored_events,
    wait_verdicts,
)
from tests.support import Proc, metric_value, scrape, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4


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
    scores each once, mosquitto_sub on another node sees every verdict, and an MQTT
    subscriber connecting afterwards gets each machine's state retained."""
    cluster = nats_cluster
    layout = cluster.layout
    topics = Topics(topic_root)
    provision_layout(cluster)  # every partition's durable consumer: the stream keeps input
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
    assert info.state.messages == 100  # PUBACKed means stored (R3) before any detector ran

    async def subjects(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, layout.input_stream, layout.input_filter)

    stored = run_js(cluster, subjects)
    assert len(stored) == 100
    for subject, _ in stored:
        partition, topic = layout.unpartition(subject)
        _, machine = topics.parse_telemetry(topic)
        assert partition == partition_of(machine, PARTITIONS)  # our hash == the server's

    detector = start_detector(spawn, cluster, model_dir, metrics_port=free_port())
    verdicts = wait_verdicts(cluster, 100, timeout_s=30)
    assert len(verdicts) == 100
    assert _keys(verdicts) == set(device.acked)
    assert wait_until(lambda: len(sub.lines("/verdict")) >= 100, 10)
    mqtt_verdicts = [Verdict.model_validate_json(line) for line in sub.lines("/verdict")]
    assert _keys(mqtt_verdicts) == set(device.acked)
    assert detector.metrics_port is not None
    status, body = scrape(detector.metrics_port, "/metrics")
    assert status == 200
    assert metric_value(body, "factorywatch_readings_received_total") == 100
    status, health = scrape(detector.metrics_port, "/healthz")
    assert status == 200
    assert json.loads(health)["partitions"] == list(range(PARTITIONS))
    for node in (cluster.nodes[1], cluster.nodes[2]):  # any node serves the retained store
        retained = retained_messages(node.ports.mqtt, f"{topic_root}/alerts/+/+/state", 5)
        assert set(retained) == {topics.state("line1", m) for m in machines}
        states = [MachineState.model_validate_json(p) for p in retained.values()]
        assert sorted(s.machine_id for s in states) == machines
    status_topic = topics.status("detector", "detector-a")
    online = retained_messages(cluster.nodes[2].ports.mqtt, status_topic, 1)
    assert b'"online"' in online[status_topic]
    sub.close()
    device.close()


def test_detector_kill9_and_restart_loses_no_reading(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
) -> None:
    """kill -9 of the detector mid-stream, then a restart: every acknowledged reading gets
    exactly one verdict in the output stream (redeliveries are de-duplicated by reading id)."""
    cluster = nats_cluster
    topics = Topics(topic_root)
    detector = start_detector(spawn, cluster, model_dir)
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    stream = Stream(device, topics, ["m1", "m2", "m3", "m4"], per_machine=150, rate_hz=200)
    stream.start()
    assert wait_until(lambda: stream.published >= 200, 30)
    detector.kill()  # SIGKILL mid-stream: unacknowledged batches are redelivered
    killed_at = stream.published
    restarted = start_detector(spawn, cluster, model_dir)
    stream.join(60)
    assert device.wait_acked(600)
    assert len(device.acked) == 600
    verdicts = wait_verdicts(cluster, 600, timeout_s=60)
    assert 0 < killed_at < 600
    assert len(verdicts) == 600  # no reading lost, none answered twice in the stream
    assert _keys(verdicts) == set(device.acked)
    restarted.terminate()
    device.close()


@pytest.mark.timing
def test_node_kill9_mid_stream_loses_no_reading(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
) -> None:
    """kill -9 of the node leading the input stream mid-stream (Mosquitto's fatal case): the
    devices on another node and the detector carry on, and every acknowledged reading gets
    exactly one verdict."""
    cluster = nats_cluster
    layout = cluster.layout
    topics = Topics(topic_root)
    provision_layout(cluster)
    leader = _stream_info(cluster, layout.input_stream).cluster
    assert leader is not None
    victim = next(n for n in cluster.nodes if n.name == leader.leader)
    device_node = next(n for n in cluster.nodes if n is not victim)
    detector = start_detector(spawn, cluster, model_dir)
    device = MqttDevice("device-1", device_node.ports.mqtt)
    device.wait_connected()
    stream = Stream(device, topics, ["m1", "m2", "m3", "m4"], per_machine=150, rate_hz=150)
    stream.start()
    assert wait_until(lambda: stream.published >= 200, 30)
    cluster.kill(victim)
    killed_at = time.monotonic()
    acked_before = len(device.acked)
    assert wait_until(lambda: len(device.acked) > acked_before + 20, 30)
    recovered_s = time.monotonic() - killed_at
    stream.join(60)
    assert device.wait_acked(600, timeout_s=60)
    assert len(device.acked) == 600, f"refused {len(device.refused)}"
    verdicts = wait_verdicts(cluster, 600, timeout_s=60)
    assert len(verdicts) == 600
    assert _keys(verdicts) == set(device.acked)
    assert recovered_s < 30
    cluster.start_node(victim)  # it rejoins and catches up from the others
    cluster.wait_ready(victim)
    detector.terminate()
    device.close()


class _Machine:
    """One simulated machine publishing through a device at 1 Hz of event time."""

    def __init__(self, machine_id: str, seed: int) -> None:
        self.sim = MachineSimulator(machine_id, "line1", seed=seed)
        self.clock = time.time() - 100

    def publish(self, device: MqttDevice, topics: Topics, count: int, *, faulty: bool) -> None:
        """``count`` readings (forced heat-dissipation faults when ``faulty``)."""
        for _ in range(count):
            self.clock += 1.0
            reading = self.sim.next(self.clock, inject="heat_dissipation" if faulty else None)
            key = f"{reading.machine_id}:{reading.seq}"
            device.publish(
                topics.telemetry(reading.line, reading.machine_id), reading.encode(), key
            )


def test_partition_move_resumes_machine_alert_state_from_the_bucket(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
) -> None:
    """Two detectors split the partitions; a machine's open alert survives moving its
    partition to a new detector (state read back from the KV bucket): the operator's ack
    reaches the same alert and more spikes raise no second alert."""
    cluster = nats_cluster
    layout = cluster.layout
    topics = Topics(topic_root)
    mine, theirs = assign(PARTITIONS, 2, 0), assign(PARTITIONS, 2, 1)
    names = [f"press-{i}" for i in range(40)]
    machine = next(m for m in names if partition_of(m, PARTITIONS) in mine)
    other = next(m for m in names if partition_of(m, PARTITIONS) in theirs)
    parts_a = ",".join(map(str, mine))
    first = start_detector(spawn, cluster, model_dir, partitions=parts_a, client_id="det-a")
    second = start_detector(
        spawn, cluster, model_dir, partitions=",".join(map(str, theirs)), client_id="det-b"
    )
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    sim, other_sim = _Machine(machine, 3), _Machine(other, 4)
    sim.publish(device, topics, 5, faulty=False)
    other_sim.publish(device, topics, 10, faulty=False)
    sim.publish(device, topics, 8, faulty=True)
    assert device.wait_acked(23)

    def raised() -> list[AlertEvent]:
        return [
            e
            for e in stored_events(cluster)
            if e.event == "ALERT_RAISED" and e.machine_id == machine
        ]

    assert wait_until(lambda: len(raised()) == 1, 30)
    alert_id = raised()[0].alert_id
    assert alert_id is not None
    assert len(wait_verdicts(cluster, 23, timeout_s=30)) == 23

    async def stored_state(_nc: NatsClient, js: JetStreamContext) -> dict[str, Any]:
        kv = await js.key_value(layout.state_bucket)
        entry = await kv.get(layout.state_key(partition_of(machine, PARTITIONS), machine))
        assert entry.value is not None
        state: dict[str, Any] = json.loads(entry.value)
        return state

    assert run_js(cluster, stored_state)["alert_id"] == alert_id

    assert first.terminate() == 0  # the partition moves: old owner stops, new one takes over
    moved = start_detector(spawn, cluster, model_dir, partitions=parts_a, client_id="det-c")
    assert '"machines": 1' in moved.log() or '"machines":1' in moved.log().replace(" ", "")
    ack = AckCommand(machine_id=machine, by="operator-1", alert_id=alert_id)
    device.publish(topics.ack("line1", machine), ack.encode(), "ack")
    sim.publish(device, topics, 5, faulty=True)
    assert device.wait_acked(29)

    def acknowledged() -> list[AlertEvent]:
        return [
            e
            for e in stored_events(cluster)
            if e.event == "ALERT_ACKNOWLEDGED" and e.machine_id == machine
        ]

    assert wait_until(lambda: len(acknowledged()) == 1, 30)
    assert acknowledged()[0].alert_id == alert_id  # the new owner knew the open alert
    assert len(wait_verdicts(cluster, 28, timeout_s=30)) == 28
    assert len(raised()) == 1  # the spikes after the move continue the same alert
    assert second.terminate() == 0
    stopped = [line for line in second.log().splitlines() if "jetstream_detector_stopped" in line]
    assert stopped
    assert json.loads(stopped[-1])["received"] == 10  # only its own machine
    moved.terminate()
    device.close()


def _per_partition(prefix: str, each: int) -> list[str]:
    """Machine ids, ``each`` of them filed under every partition."""
    chosen: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    i = 0
    while any(len(ids) < each for ids in chosen.values()):
        name = f"{prefix}{i}"
        ids = chosen[partition_of(name, PARTITIONS)]
        if len(ids) < each:
            ids.append(name)
        i += 1
    return [m for ids in chosen.values() for m in ids]


def _acquired(proc: Proc) -> set[int]:
    """The partitions a detector took over from another one (its log says so)."""
    return {
        int(json.loads(line)["partition"])
        for line in proc.log().splitlines()
        if "partition_lease_acquired" in line
    }


def _health(proc: Proc) -> dict[str, Any]:
    assert proc.metrics_port is not None
    status, body = scrape(proc.metrics_port, "/healthz")
    assert status == 200
    health: dict[str, Any] = json.loads(body)
    return health


@pytest.mark.timing
def test_overlapping_detectors_never_share_a_partition_and_a_standby_takes_over_after_kill9(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
    tmp_path: Path,
) -> None:
    """Detectors started with overlapping --partitions: each partition is served by the one
    holding its lease (every reading exactly one verdict, even as seen live on MQTT); kill -9
    of the owner: its retained status turns offline (last will), the standby takes its
    partitions within the lease TTL and loses nothing; a paused owner is fenced on resuming:
    it drops the partitions it lost (their machines too) and stands by, still running."""
    cluster = nats_cluster
    topics = Topics(topic_root)
    ttl = 3.0
    first = start_detector(
        spawn,
        cluster,
        model_dir,
        partitions="0,1",
        client_id="det-a",
        lease_ttl_s=ttl,
        metrics_port=free_port(),
    )
    second = start_detector(
        spawn,
        cluster,
        model_dir,
        partitions="all",
        client_id="det-b",
        lease_ttl_s=ttl,
        metrics_port=free_port(),
    )
    assert _health(first)["partitions"] == [0, 1]
    assert _health(second)["partitions"] == [2, 3]
    assert _health(second)["standby"] == [0, 1]
    sub = MosquittoSub(
        cluster.nodes[1].ports.mqtt, f"{topic_root}/alerts/+/+/verdict", tmp_path / "live.txt"
    )
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    before = Stream(device, topics, _per_partition("a", 2), per_machine=25, rate_hz=400)
    before.start().join(30)
    assert device.wait_acked(200)
    assert len(wait_verdicts(cluster, 200, timeout_s=30)) == 200
    assert wait_until(lambda: len(sub.lines("/verdict")) >= 200, 10)
    live = [Verdict.model_validate_json(line) for line in sub.lines("/verdict")]
    assert len(live) == 200  # no partition served twice: no second verdict even on MQTT
    assert _keys(live) == set(device.acked)
    served = {
        name: metric_value(
            scrape(p.metrics_port or 0, "/metrics")[1], "factorywatch_readings_received_total"
        )
        for name, p in (("a", first), ("b", second))
    }
    assert served["a"] > 0
    assert served["b"] > 0
    assert served["a"] + served["b"] == 200

    after = Stream(device, topics, _per_partition("b", 2), per_machine=50, rate_hz=100)
    after.start()
    assert wait_until(lambda: after.published >= 100, 30)
    first.kill()  # SIGKILL: its leases are not released, they expire
    killed_at = time.monotonic()
    assert wait_until(lambda: _acquired(second) == {0, 1}, ttl + 10, poll_s=0.05)
    takeover_s = time.monotonic() - killed_at
    status_topic = topics.status("detector", "det-a")

    def killed_status() -> bytes:  # its MQTT connection's last will, retained
        found = retained_messages(cluster.nodes[2].ports.mqtt, status_topic, 1, timeout_s=2)
        return found.get(status_topic, b"")

    assert wait_until(lambda: b'"offline"' in killed_status(), 10)
    after.join(60)
    assert device.wait_acked(600)
    assert len(device.acked) == 600
    verdicts = wait_verdicts(cluster, 600, timeout_s=60)
    assert len(verdicts) == 600  # exactly one verdict per acknowledged reading in the stream
    assert _keys(verdicts) == set(device.acked)
    assert _health(second)["partitions"] == [0, 1, 2, 3]
    # within the lease TTL (plus one standby poll) of the kill
    assert takeover_s < ttl + 1.5, takeover_s
    print(f"takeover after kill -9: {takeover_s:.2f} s (lease TTL {ttl} s)")

    # A paused owner (SIGSTOP) loses its leases; resumed, it is fenced: it drops those
    # partitions' machines and stands by, without publishing or acknowledging anything, and
    # the new owner answers every reading once.
    third = start_detector(
        spawn, cluster, model_dir, client_id="det-c", lease_ttl_s=ttl, metrics_port=free_port()
    )
    assert _health(third)["standby"] == [0, 1, 2, 3]
    os.kill(second.process.pid, signal.SIGSTOP)
    assert wait_until(lambda: _acquired(third) == {0, 1, 2, 3}, ttl + 10, poll_s=0.05)
    late = _per_partition("c", 2)
    Stream(device, topics, late, per_machine=10, rate_hz=200).start().join(30)
    assert device.wait_acked(680)
    assert len(wait_verdicts(cluster, 680, timeout_s=30)) == 680
    os.kill(second.process.pid, signal.SIGCONT)

    def lost() -> list[int]:
        lines = second.log().splitlines()
        return sorted(json.loads(x)["partition"] for x in lines if "partition_lease_lost" in x)

    assert wait_until(lambda: lost() == [0, 1, 2, 3], 30), second.log()
    health = _health(second)
    # fenced: it dropped those partitions' machines and stands by, still running
    assert (health["partitions"], health["standby"], health["machines"]) == ([], [0, 1, 2, 3], 0)
    assert second.process.poll() is None

    def late_verdicts() -> list[Verdict]:
        seen = (Verdict.model_validate_json(line) for line in sub.lines("/verdict"))
        return [v for v in seen if v.machine_id in late]

    assert wait_until(lambda: len(late_verdicts()) >= 80, 10)
    assert len(late_verdicts()) == 80  # the resumed zombie published no second verdict
    assert second.terminate() == 0
    third.terminate()
    sub.close()
    device.close()


def test_jetstream_detector_reports_drift_like_the_mosquitto_one(
    nats_cluster: LocalNatsCluster,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
) -> None:
    """A stream of mostly faulty readings moves the ALERT share away from training: the
    cluster detector logs drift_started and its metrics say so (the Mosquitto shell's drift
    code)."""
    cluster = nats_cluster
    detector = start_detector(
        spawn,
        cluster,
        model_dir,
        metrics_port=free_port(),
        env={"FACTORYWATCH_DETECTOR_DRIFT_WINDOW": "20"},
    )
    assert detector.metrics_port is not None
    _, body = scrape(detector.metrics_port, "/metrics")
    assert metric_value(body, "factorywatch_drifting") == 0
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    machine = _Machine("drifty-1", 5)
    machine.publish(device, Topics(topic_root), 5, faulty=False)
    machine.publish(device, Topics(topic_root), 25, faulty=True)
    assert device.wait_acked(30)
    detector.wait_log('"drift_started"', timeout=30)
    _, body = scrape(detector.metrics_port, "/metrics")
    assert metric_value(body, "factorywatch_drifting") == 1
    assert metric_value(body, "factorywatch_recent_alert_rate") >= 0.5
    assert 0 < metric_value(body, "factorywatch_training_alert_rate") < 0.1
    detector.terminate()
    device.close()
