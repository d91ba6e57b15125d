"""detector.sparkplug: births, data, deaths, gaps, wraps and bad payloads, on Tahu's payloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from sparkplub_b_packets.core import sparkplug_b as tahu
from sparkplub_b_packets.core.sparkplug_b import MetricDataType as T

from factorywatch.contracts import AI4I_CHANNELS, Telemetry
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.checkpoint import FileCheckpoint
from factorywatch.detector.ingest import Reading
from factorywatch.detector.sparkplug import (
    SparkplugIngest,
    SparkplugSettings,
    channel_name,
    machine_id,
)
from factorywatch.errors import PayloadError
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import parse_sparkplug, sparkplug_filters, sparkplug_topic
from tests.sparkplug_edge import TahuEdgeNode, decode

T0 = 1_800_000_000.0
MS = int(T0 * 1000)


def _msg(topic_payload: tuple[str, bytes], at: float = T0) -> Received:
    topic, payload = topic_payload
    return Received(topic, payload, at, 0.0)


def _reading(items: list[Reading | PayloadError]) -> Reading:
    assert len(items) == 1, items
    item = items[0]
    assert isinstance(item, Reading), item
    return item


def _error(items: list[Reading | PayloadError]) -> PayloadError:
    assert len(items) == 1, items
    item = items[0]
    assert isinstance(item, PayloadError), item
    return item


@pytest.fixture
def sim() -> MachineSimulator:
    """A machine whose readings the edge node publishes."""
    return MachineSimulator("x", "y", seed=3)


def _born(
    sim: MachineSimulator, devices: tuple[str, ...] = ("mill",)
) -> tuple[SparkplugIngest, TahuEdgeNode]:
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=2.0, rebirth_backoff_s=5.0))
    edge = TahuEdgeNode("plant1", "edge1", bd_seq=7)
    assert ingest.decode(_msg(edge.nbirth(int(T0 * 1000)))) == []
    for device in devices:
        _reading(ingest.decode(_msg(edge.dbirth(device, sim.next(T0), int(T0 * 1000)))))
    return ingest, edge


def test_channel_and_machine_mapping() -> None:
    """Metric names map to channel names and devices to valid machine ids, as documented."""
    assert channel_name("Pump/Flow Rate") == "pump_flow_rate"
    assert channel_name("Air temperature [K]") == "air_temperature_k"
    assert channel_name("Vibration1RMS") == "vibration1_rms"
    assert channel_name("torque_nm") == "torque_nm"
    assert channel_name("3 Phase %") == "ch_3_phase_pct"
    assert len(channel_name("x" * 100)) <= 64
    assert machine_id("edge1", "mill") == "edge1.mill"
    assert machine_id("edge 1", "mill#2") == "edge_1.mill_2"
    assert machine_id("edge1", None) == "edge1"
    with pytest.raises(PayloadError, match="valid machine id"):
        machine_id("-edge", "x")


def test_topics_build_parse_and_filter() -> None:
    """Sparkplug topics round-trip; the host's filters cover births, deaths and data only."""
    topic = sparkplug_topic("g", "DDATA", "n", "d")
    assert topic == "spBv1.0/g/DDATA/n/d"
    parsed = parse_sparkplug(topic)
    assert (parsed.group, parsed.kind, parsed.node, parsed.device) == ("g", "DDATA", "n", "d")
    with pytest.raises(PayloadError):
        parse_sparkplug("spBv1.0/g/DDATA/n")  # a device type needs a device
    with pytest.raises(ValueError, match="node"):
        sparkplug_topic("g", "NDATA", "n", "d")
    filters = sparkplug_filters(["g"])
    assert "spBv1.0/g/DDATA/+/+" in filters
    assert "spBv1.0/g/NBIRTH/+" in filters
    assert not any("CMD" in f for f in filters)


def test_birth_is_a_reading_of_the_device(sim: MachineSimulator) -> None:
    """A DBIRTH declares the metrics and is the device's first reading, mapped as documented."""
    ingest = SparkplugIngest()
    edge = TahuEdgeNode("plant1", "edge1", bd_seq=3)
    ingest.decode(_msg(edge.nbirth(int(T0 * 1000))))
    first = sim.next(T0)
    reading = _reading(ingest.decode(_msg(edge.dbirth("mill", first, int(T0 * 1000)))))
    telemetry = reading.telemetry
    assert telemetry.machine_id == "edge1.mill"
    assert telemetry.line == "plant1"
    assert telemetry.product_type == first.product_type
    assert telemetry.readings == {c: first.readings[c] for c in AI4I_CHANNELS}
    assert telemetry.ts == T0
    assert reading.identity == f"spb:plant1/edge1/mill:3:{int(T0 * 1000)}:1"


def test_data_by_alias_updates_only_what_changed(sim: MachineSimulator) -> None:
    """A DDATA with one metric (by alias) gives a reading with every last-known value."""
    ingest, edge = _born(sim)
    before = ingest.nodes["plant1/edge1"].devices["mill"].values.copy()
    reading = _reading(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 55.5}, MS + 1))))
    assert reading.telemetry.readings == {**before, "torque_nm": 55.5}
    by_name = edge.ddata("mill", {"tool_wear_min": 12.0}, MS + 2, by_alias=False)
    assert _reading(ingest.decode(_msg(by_name))).telemetry.readings["tool_wear_min"] == 12.0


def test_data_before_birth_requests_rebirth_instead_of_guessing(sim: MachineSimulator) -> None:
    """DDATA from a node never born is dead-lettered no_birth and one NCMD rebirth is asked."""
    ingest = SparkplugIngest(SparkplugSettings(rebirth_backoff_s=5.0))
    edge = TahuEdgeNode("plant1", "edge1")
    edge.aliases["mill/Torque [Nm]"] = 4
    assert _error(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 40.0}, MS + 1)))).reason == (
        "no_birth"
    )
    again = ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 41.0}, MS + 2), at=T0 + 1))
    assert _error(again).reason == "no_birth"
    effects = ingest.take_effects(T0 + 1)
    assert [c.topic for c in effects.commands] == ["spBv1.0/plant1/NCMD/edge1"]  # backoff
    metric = decode(effects.commands[0].payload).metrics[0]
    assert (metric.name, metric.boolean_value) == ("Node Control/Rebirth", True)
    del sim


def test_unknown_alias_and_unborn_device_request_rebirth(sim: MachineSimulator) -> None:
    """An alias no birth declared, or a device without DBIRTH, is never guessed."""
    ingest, edge = _born(sim)
    edge.aliases["pump/Torque [Nm]"] = 999
    assert _error(ingest.decode(_msg(edge.ddata("pump", {"torque_nm": 1.0}, MS + 1)))).reason == (
        "no_birth"
    )
    edge.aliases["mill/Torque [Nm]"] = 998
    assert _error(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 1.0}, MS + 2)))).reason == (
        "no_birth"
    )
    assert len(ingest.take_effects(T0).commands) == 1


def test_gap_not_filled_in_time_requests_rebirth(sim: MachineSimulator) -> None:
    """A skipped seq is missing; unfilled after the reorder timeout, a rebirth is requested."""
    ingest, edge = _born(sim)
    edge.seq += 1  # seq 2 is lost
    _reading(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 50.0}, MS + 1), at=T0)))
    assert ingest.take_effects(T0 + 1.9).commands == []
    assert [c.topic for c in ingest.take_effects(T0 + 2.0).commands] == [
        "spBv1.0/plant1/NCMD/edge1"
    ]
    assert ingest.take_effects(T0 + 10).commands == []  # asked once per gap


def test_gap_filled_by_a_late_message_needs_no_rebirth(sim: MachineSimulator) -> None:
    """A late message fills its gap and is read as it was; the newer value stays the last."""
    ingest, edge = _born(sim)
    late = edge.ddata("mill", {"torque_nm": 10.0}, MS + 1)
    newer = edge.ddata("mill", {"torque_nm": 20.0}, MS + 2)
    _reading(ingest.decode(_msg(newer)))
    filled = _reading(ingest.decode(_msg(late)))
    assert filled.telemetry.readings["torque_nm"] == 10.0  # the late reading as it was
    assert ingest.nodes["plant1/edge1"].devices["mill"].values["torque_nm"] == 20.0
    assert ingest.take_effects(T0 + 60).commands == []


def test_sequence_wraps_at_255_and_identities_stay_unique(sim: MachineSimulator) -> None:
    """600 messages (seq wraps twice) get extended seqs 2..601 and 600 distinct identities."""
    ingest, edge = _born(sim)
    identities = []
    for i in range(600):
        reading = _reading(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 40.0 + i}, MS + i))))
        identities.append(reading.identity)
        assert reading.telemetry.seq == i + 2
    assert len(set(identities)) == 600
    assert ingest.take_effects(T0 + 60).commands == []


def test_redelivery_has_the_same_identity_and_digest(sim: MachineSimulator) -> None:
    """A message delivered again (after a restart) is the same reading to the engine."""
    ingest, edge = _born(sim)
    message = edge.ddata("mill", {"torque_nm": 42.0}, MS + 5)
    first = _reading(ingest.decode(_msg(message)))
    _reading(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 43.0}, MS + 6))))
    again = _reading(ingest.decode(_msg(message)))
    assert (again.identity, again.digest) == (first.identity, first.digest)


def test_node_death_with_its_bdseq_marks_devices_offline(sim: MachineSimulator) -> None:
    """NDEATH of the living session: every device offline and stale; data needs a rebirth."""
    ingest, edge = _born(sim, ("mill", "lathe"))
    assert ingest.decode(_msg(edge.ndeath(bd_seq=6))) == []  # an older session's will
    assert ingest.take_effects(T0).offline == []
    assert ingest.decode(_msg(edge.ndeath())) == []
    # the node's own metrics too (ignored by the engine: never a reading, no record)
    assert sorted(ingest.take_effects(T0).offline) == ["edge1", "edge1.lathe", "edge1.mill"]
    stale = ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 1.0}, MS + 1)))
    assert _error(stale).reason == "no_birth"


def test_device_death_and_rebirth(sim: MachineSimulator) -> None:
    """DDEATH takes one device offline; its next DBIRTH brings it back with fresh values."""
    ingest, edge = _born(sim, ("mill", "lathe"))
    assert ingest.decode(_msg(edge.ddeath("mill", MS + 1))) == []
    assert ingest.take_effects(T0).offline == ["edge1.mill"]
    _reading(ingest.decode(_msg(edge.ddata("lathe", {"torque_nm": 2.0}, MS + 2))))
    reborn = ingest.decode(_msg(edge.dbirth("mill", sim.next(T0 + 1), MS + 3)))
    assert _reading(reborn).telemetry.machine_id == "edge1.mill"


def test_malformed_protobuf_is_rejected_and_nothing_else_changes(sim: MachineSimulator) -> None:
    """Garbage bytes: invalid_protobuf; the next message still decodes (its gap heals)."""
    ingest, edge = _born(sim)
    with pytest.raises(PayloadError) as bad:
        ingest.decode(Received("spBv1.0/plant1/DDATA/edge1/mill", b"\xff\xff\xff", T0, 0.0))
    assert bad.value.reason == "invalid_protobuf"
    _reading(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 3.0}, MS + 1))))


def test_missing_channel_is_told_once_per_birth(sim: MachineSimulator) -> None:
    """A device that lacks a channel the model needs is dead-lettered once, then silent."""
    ingest, edge = _born(sim)
    ingest.bind([*AI4I_CHANNELS, "vibration_rms"])
    first = ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 3.0}, MS + 1)))
    assert _error(first).reason == "missing_channel"
    assert ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 4.0}, MS + 2))) == []


def test_snapshot_restore_continues_the_stream(sim: MachineSimulator) -> None:
    """A restored ingest builds the same reading from the next DDATA as the original."""
    ingest, edge = _born(sim)
    copy = SparkplugIngest()
    copy.restore(ingest.snapshot())
    message = _msg(edge.ddata("mill", {"torque_nm": 61.0}, MS + 9))
    assert _reading(copy.decode(message)) == _reading(ingest.decode(message))


def test_signed_integers_decode_from_twos_complement() -> None:
    """Int16 -5 (sent as 65531 by Tahu) is read back as -5.0."""
    ingest = SparkplugIngest()
    ingest.bind(["delta"])
    edge = TahuEdgeNode("g", "n")
    ingest.decode(_msg(edge.nbirth(1)))
    from sparkplub_b_packets.core import sparkplug_b as tahu  # noqa: PLC0415

    payload = tahu.sparkplug_b_pb2.Payload()
    payload.timestamp = int(T0 * 1000)
    payload.seq = edge.seq
    tahu.addMetric(payload, "Delta", 1, tahu.MetricDataType.Int16, -5, int(T0 * 1000))
    tahu.addMetric(payload, "Product Type", 2, tahu.MetricDataType.String, "M", int(T0 * 1000))
    reading = _reading(ingest.decode(_msg(("spBv1.0/g/DBIRTH/n/d", payload.SerializeToString()))))
    assert reading.telemetry == Telemetry(
        machine_id="n.d",
        line="g",
        seq=1,
        ts=T0,
        attributes={"product_type": "M"},
        readings={"delta": -5.0},
    )


def test_journaled_changes_restore_the_newest_state(sim: MachineSimulator, tmp_path: Path) -> None:
    """Changed nodes journaled per turn (no snapshot since) restore the stream's position."""
    ingest, edge = _born(sim)
    checkpoint = FileCheckpoint(tmp_path, "det", 100)
    checkpoint.load()
    checkpoint.write_ingest({"sparkplug": ingest.changes()})
    _reading(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 70.0}, MS + 1))))
    checkpoint.write_ingest({"sparkplug": ingest.changes()})
    assert ingest.changes() == {}  # nothing changed since
    checkpoint.close()
    reopened = FileCheckpoint(tmp_path, "det", 100)
    restored = reopened.load()
    reopened.close()
    copy = SparkplugIngest()
    copy.restore_changes(restored.ingest["sparkplug"])
    message = _msg(edge.ddata("mill", {"tool_wear_min": 9.0}, MS + 2))
    assert _reading(copy.decode(message)) == _reading(ingest.decode(message))


def test_any_machine_metrics_need_no_product_type() -> None:
    """A device with plant metric names and no product type is read for a generic model."""
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=2.0, rebirth_backoff_s=5.0))
    ingest.bind(["pump_flow_rate", "vibration1_rms"])
    edge = TahuEdgeNode("plant1", "edge1", bd_seq=7)
    assert ingest.decode(_msg(edge.nbirth(MS))) == []
    payload = edge._payload(MS)
    tahu.addMetric(payload, "Pump/Flow Rate", 1, T.Double, 32.5, MS)
    tahu.addMetric(payload, "Vibration1RMS", 2, T.Double, 0.21, MS)
    topic = edge._topic("DBIRTH", "pump")
    reading = _reading(ingest.decode(_msg((topic, payload.SerializeToString()))))
    assert reading.telemetry.readings == {"pump_flow_rate": 32.5, "vibration1_rms": 0.21}
    assert reading.telemetry.product_type is None
