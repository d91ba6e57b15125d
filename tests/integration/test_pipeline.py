"""End to end on a real Mosquitto: sensors CLI -> broker -> detector process -> verdicts."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.contracts import ClientStatus, DeadLetter, MachineState, Telemetry, Verdict
from factorywatch.model.dataset import load
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.conftest import DatasetChoice
from tests.support import TYPICAL, Collector, Proc, await_end_marker, not_marker, reading

pytestmark = pytest.mark.integration


def _verdicts(col: Collector) -> list[Verdict]:
    return [
        Verdict.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith("/verdict") and not_marker(m))
    ]


@pytest.mark.parametrize("transport", ["paho", "mqtt5"])
def test_n_readings_from_sensor_cli_give_exactly_n_verdicts(
    detector: Callable[..., Proc],
    spawn: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    transport: str,
) -> None:
    """Three machines x 40 readings from `factorywatch sensor` yield exactly 120 verdicts
    (on each detector transport)."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector("--transport", transport)
    sensors = spawn(
        "sensor",
        "--machine-id",
        "m1,m2",
        "--machine-id",
        "m3",
        "--count",
        "40",
        "--rate",
        "40",
        "--seed",
        "1",
        *mqtt_args,
    )
    assert sensors.process.wait(60) == 0, sensors.log()
    await_end_marker(settings, col)  # every verdict, duplicates included, is in now
    verdicts = _verdicts(col)
    assert len(verdicts) == 120
    keys = {(v.machine_id, v.seq) for v in verdicts}
    assert len(keys) == 120
    assert {v.machine_id for v in verdicts} == {"m1", "m2", "m3"}
    for machine in ("m1", "m2", "m3"):
        seqs = sorted(v.seq for v in verdicts if v.machine_id == machine)
        assert seqs == list(range(seqs[0], seqs[0] + 40))
    assert all(v.model_version and v.latency_ms >= 0 for v in verdicts)
    assert "sent 120, acknowledged 120" in sensors.log()


def _publish_all(settings: BrokerSettings, readings: list[Telemetry], machine: str) -> None:
    pub = SensorPublisher(settings, machine, buffer_size=10_000)
    pub.start()
    for r in readings:
        assert pub.publish(r)
    stats = pub.close()
    assert stats.acknowledged == len(readings)


def test_prototype_scenario_normal_then_rpm_spike(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """Normal readings come back NORMAL and the prototype's 2800 rpm spike comes back ALERT."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector()
    sim = MachineSimulator("proto-1", "line1", seed=3)
    now = time.time()
    typical = reading("proto-1", 10_000, ts=now)
    spike = typical.model_copy(
        update={"seq": 10_001, "readings": {**typical.readings, "rotational_speed_rpm": 2800.0}}
    )
    # Event times in the recent past: more than 5 minutes ahead would be clock_skew.
    normal = [sim.next(now - 400 + i) for i in range(200)]
    spikes = [sim.next(now - 100 + i, inject="rpm_spike") for i in range(20)]
    _publish_all(settings, [*normal, *spikes, typical, spike], "proto-1")
    col.wait_for(lambda m: m.topic.endswith("/verdict"), count=222, timeout=30)
    by_seq = {v.seq: v for v in _verdicts(col)}
    assert by_seq[10_000].status == "NORMAL"
    assert by_seq[10_001].status == "ALERT"
    assert by_seq[10_001].explanation, "an ALERT names the features that drove it"
    false_alarms = sum(by_seq[r.seq].status == "ALERT" for r in normal)
    caught = sum(by_seq[r.seq].status == "ALERT" for r in spikes)
    print(f"\nprototype scenario: {false_alarms}/200 normal alerted, {caught}/20 spikes caught")
    assert false_alarms <= 12  # the threshold targets a 3 % false-alarm rate
    # Spikes at low torque keep power inside the safe window: the headroom features see them
    # as ordinary (measured 18/20; the prototype's model caught 0/20). See README "Detection".
    assert caught >= 18


def test_injected_anomalies_are_flagged_with_measured_precision_and_recall(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """Simulator ground truth vs verdicts end to end: precision and recall above a floor."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector()
    kinds = ["rpm_spike", "heat_dissipation", "power", "overstrain", "tool_wear", "stuck_sensor"]
    sim = MachineSimulator("pr-1", "line1", seed=11, anomaly_rate=0.1, anomalies=kinds)
    now = time.time()
    readings = [sim.next(now + i * 0.001) for i in range(1500)]
    _publish_all(settings, readings, "pr-1")
    col.wait_for(lambda m: m.topic.endswith("/verdict"), count=len(readings), timeout=60)
    by_seq = {v.seq: v for v in _verdicts(col)}
    assert len(by_seq) == len(readings)
    truth = {r.seq: r.injected for r in readings}
    tp = sum(1 for s, k in truth.items() if k and by_seq[s].status == "ALERT")
    fp = sum(1 for s, k in truth.items() if not k and by_seq[s].status == "ALERT")
    fn = sum(1 for s, k in truth.items() if k and by_seq[s].status == "NORMAL")
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    occurrences = {k: sum(1 for kk in truth.values() if kk == k) for k in kinds}
    per_kind = {  # kinds the simulator happened to inject in this stream
        k: sum(1 for s, kk in truth.items() if kk == k and by_seq[s].status == "ALERT") / n
        for k, n in occurrences.items()
        if n
    }
    print(
        f"\nend-to-end detection: precision {precision:.3f} recall {recall:.3f} "
        f"(tp={tp} fp={fp} fn={fn}) per kind {json.dumps(per_kind)}"
    )
    assert precision >= 0.6
    assert recall >= 0.7


BAD_PAYLOADS: list[tuple[str, bytes | None]] = [
    ("invalid_json", b"{not json"),
    ("not_utf8", b"\xff\xfe\xfa"),
    ("empty_payload", b""),
    ("schema", b"null"),
    ("schema", b'"a string"'),
    ("schema", b"[1, 2]"),
    ("schema", b'{"machine_id": "bad-1"}'),
    ("non_finite", None),  # filled below: NaN reading
    ("invalid_json", b"[" * 30_000 + b"]" * 30_000),  # very deep nesting, under the size cap
    ("oversize", b" " * 100_000),
]


def _reading(machine: str, seq: int, **readings: float) -> dict[str, object]:
    return {
        "machine_id": machine,
        "line": "line1",
        "seq": seq,
        "ts": time.time(),
        "product_type": "L",
        "readings": {**TYPICAL, **readings},
    }


def test_invalid_payloads_are_dead_lettered_and_the_detector_keeps_serving(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """Each bad payload yields one dead letter with its reason; good readings still get verdicts."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    proc = detector()
    topic = topics.telemetry("line1", "bad-1")
    nan_payload = json.dumps(_reading("bad-1", 1, torque_nm=float("nan"))).encode()
    cases = [(r, p if p is not None else nan_payload) for r, p in BAD_PAYLOADS]
    cases += [
        ("topic_mismatch", json.dumps(_reading("other-machine", 2)).encode()),
        (
            "clock_skew",
            json.dumps({**_reading("bad-1", 3), "ts": time.time() + 30 * 86400}).encode(),
        ),
        ("schema", json.dumps({**_reading("bad-1", 4), "seq": "12"}).encode()),
        ("schema", json.dumps({**_reading("bad-1", 5), "extra": 1}).encode()),
        (
            "missing_channel",
            json.dumps({**_reading("bad-1", 6), "readings": {"torque_nm": 1.0}}).encode(),
        ),
    ]
    good = json.dumps(_reading("bad-1", 100)).encode()
    pub = SensorPublisher(settings, "bad-1", buffer_size=1000)
    pub.start()
    for _, payload in cases:
        pub.client.publish(topic, payload, qos=1)
    pub.client.publish(topic, good, qos=1)
    pub.close()
    dead = col.wait_for(lambda m: "/deadletter/" in m.topic, count=len(cases), timeout=30)
    verdicts = col.wait_for(lambda m: m.topic.endswith("/verdict"), count=1, timeout=30)
    reasons = sorted(DeadLetter.model_validate_json(m.payload).reason for m in dead)
    assert reasons == sorted(r for r, _ in cases)
    assert [Verdict.model_validate_json(m.payload).seq for m in verdicts] == [100]
    assert proc.process.poll() is None, "the detector must survive bad input"
    assert all(m.topic == topics.deadletter("line1", "bad-1") for m in dead)


@pytest.mark.parametrize("transport", ["paho", "mqtt5"])
def test_detector_sigterm_publishes_offline_and_exits_cleanly(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    transport: str,
) -> None:
    """SIGTERM: the retained status goes online -> offline and the process exits 0 (on each
    detector transport)."""
    topics = Topics(settings.topic_root)
    status_topic = topics.status("detector", "detector-under-test")
    col = collector(status_topic)
    proc = detector("--transport", transport)
    col.wait_for(lambda m: b'"online"' in m.payload, timeout=10)
    assert proc.terminate() == 0
    offline = col.wait_for(lambda m: b'"offline"' in m.payload, timeout=10)
    assert ClientStatus.model_validate_json(offline[-1].payload).state == "offline"
    assert "detector_stopped" in proc.log()


def test_mosquitto_sub_shows_the_alerts_tree(
    detector: Callable[..., Proc],
    spawn: Callable[..., Proc],
    broker: LocalBroker,
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """The README's `mosquitto_sub -t '<root>/alerts/#' -v` line shows verdicts and state."""
    detector()
    topics = Topics(settings.topic_root)
    watch = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            topics.alerts_filter,
            "-v",
            "-W",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # A retained probe under the filter arrives right after the SUBACK: the subscription is in
    # place once mosquitto_sub prints it (-W bounds this wait).
    probe = fwmqtt.connected_client(settings, "probe")
    probe.publish(
        f"{settings.topic_root}/alerts/probe", b"ready", qos=1, retain=True
    ).wait_for_publish(5)
    probe.disconnect()
    probe.loop_stop()
    assert watch.stdout is not None
    for line in watch.stdout:
        if line.startswith(f"{settings.topic_root}/alerts/probe "):
            break
    spawn("sensor", "--machine-id", "watched-1", "--count", "5", "--rate", "20", *mqtt_args)
    lines: list[str] = []
    assert watch.stdout is not None
    try:
        for line in watch.stdout:
            if line.startswith(f"{settings.topic_root}/alerts/probe "):
                continue
            lines.append(line.strip())
            if sum(" " in ln and ln.split(" ", 1)[0].endswith("/verdict") for ln in lines) == 5:
                break
    finally:
        watch.terminate()
        watch.communicate(timeout=10)
    by_leaf: dict[str, list[str]] = {}
    for line in lines:
        topic, payload = line.split(" ", 1)
        assert topic.startswith(f"{settings.topic_root}/alerts/line1/watched-1/")
        by_leaf.setdefault(topic.rsplit("/", 1)[1], []).append(payload)
    assert len(by_leaf["verdict"]) == 5
    for payload in by_leaf["verdict"]:
        assert Verdict.model_validate_json(payload).status in {"NORMAL", "ALERT"}
    assert MachineState.model_validate_json(by_leaf["state"][0]).machine_id == "watched-1"


def test_missing_model_stops_startup_with_a_clear_error(
    spawn: Callable[..., Proc], mqtt_args: list[str], tmp_path: Path
) -> None:
    """A detector with no model exits non-zero and tells the user to train."""
    proc = spawn("detect", *mqtt_args, "--model-dir", str(tmp_path / "empty"))
    assert proc.process.wait(60) == 2
    assert "factorywatch train" in proc.log()


def test_unreachable_broker_stops_startup_after_bounded_retries(
    spawn: Callable[..., Proc], model_dir: Path
) -> None:
    """With no broker listening the detector gives up after its retries, exit code 2."""
    from factorywatch.broker import free_port  # noqa: PLC0415

    proc = spawn(
        "detect",
        "--port",
        str(free_port()),
        "--model-dir",
        str(model_dir),
        env={"FACTORYWATCH_MQTT_CONNECT_RETRIES": "2"},
    )
    assert proc.process.wait(60) == 2
    assert "unreachable" in proc.log()


def test_replay_publishes_csv_rows_with_their_labels_as_ground_truth(
    detector: Callable[..., Proc],
    spawn: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    test_data: DatasetChoice,
) -> None:
    """`factorywatch replay` turns 300 CSV rows into 300 readings and 300 verdicts."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.telemetry_filter)
    detector()
    proc = spawn(
        "replay",
        "--csv",
        str(test_data.path),
        "--machine-id",
        "replay-1",
        "--count",
        "300",
        "--rate",
        "300",
        *mqtt_args,
    )
    assert proc.process.wait(60) == 0, proc.log()
    col.wait_for(lambda m: m.topic.endswith("/verdict"), count=300, timeout=30)
    readings = [
        Telemetry.model_validate_json(m.payload)
        for m in col.matching(lambda m: "/telemetry/" in m.topic)
    ]
    assert len(readings) == 300
    rows = load(test_data.path, verify=False).frame
    assert [r.readings["rotational_speed_rpm"] for r in readings] == list(
        rows["rotational_speed_rpm"][:300]
    )
    assert len(col.matching(lambda m: m.topic.endswith("/verdict"))) == 300
