"""Our Sparkplug edge node's readings sent again in a later session: the ingest's one identity
rule makes them the same readings (de-duplicated, answered), other edge nodes read as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorywatch.contracts import DeadLetter, Verdict
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine, Inbound, Outcome
from factorywatch.detector.ingest import Reading
from factorywatch.detector.sparkplug import SparkplugIngest, SparkplugSettings
from factorywatch.errors import PayloadError
from factorywatch.model import artifact
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.sensors.sparkplug import EdgeNode, answers_letter
from factorywatch.sparkplug_codec import INT64, READING_SEQ_METRIC, Message
from factorywatch.topics import Topics
from tests.sparkplug_edge import TahuEdgeNode, decode

T0 = 1_800_000_000.0
MS = int(T0 * 1000)
DEVICES = ("m1", "m2")


def _engine(model_dir: Path) -> Engine:
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=1.0, rebirth_backoff_s=0.0))
    return Engine(artifact.load(model_dir), Topics("t"), extra_ingests=[ingest])


def _in(message: Message, at: float = T0) -> Inbound:
    return Inbound(message[0], message[1], at, 0.0)


def _session(
    bd_seq: int, sims: dict[str, MachineSimulator], ms: int
) -> tuple[EdgeNode, list[Message]]:
    """A new session of the edge node (as after a reconnect): its NBIRTH and DBIRTHs."""
    edge = EdgeNode("plant1", "edge1", list(DEVICES), bd_seq=bd_seq)
    return edge, edge.births({d: sims[d].next(ms / 1000) for d in DEVICES}, ms)


def _verdicts(outcomes: list[Outcome]) -> list[Verdict]:
    return [v for o in outcomes for v in o.verdicts]


def _sims() -> dict[str, MachineSimulator]:
    return {
        d: MachineSimulator(d, "plant1", seed=i, seq_start=1000 * (i + 1))
        for i, d in enumerate(DEVICES)
    }


def test_a_reading_scored_then_sent_again_after_a_new_birth_is_answered_not_rescored(
    small_model_dir: Path,
) -> None:
    """A DDATA scored in session 1 and sent again (other Sparkplug seq, after a new NBIRTH
    with another bdSeq) is a duplicate: no second verdict, the first one's bytes again."""
    engine, sims = _engine(small_model_dir), _sims()
    edge, births = _session(1, sims, MS)
    reading = sims["m1"].next(T0 + 1)
    data = edge.data("m1", reading, MS + 1000)
    assert data is not None
    first = engine.handle([_in(m) for m in [*births, data]], T0 + 1)
    verdicts = _verdicts(first)
    assert [v.seq for v in verdicts if v.machine_id == "edge1.m1"][-1] == reading.seq
    given = next(p.payload for p in first[-1].publishes if p.topic.endswith("/verdict"))

    edge2, births2 = _session(2, sims, MS + 5000)
    next_seq = edge2.seq
    again = edge2.again(data)
    assert decode(again[1]).seq == next_seq  # the new session's next number
    later = engine.handle([_in(m, T0 + 5) for m in [*births2, again]], T0 + 5)
    assert len(_verdicts(later)) == len(DEVICES)  # the births' fresh readings only
    assert later[-1].duplicates == 1
    assert later[-1].reanswered == 1
    assert [p.payload for p in later[-1].publishes] == [given]
    assert not later[-1].rejected


def test_a_reading_lost_in_session_1_is_scored_once_in_session_2(small_model_dir: Path) -> None:
    """A reading the detector never saw, sent again as DDATA of a later session, gets one
    verdict carrying its own seq; sent once more, it is answered with that verdict."""
    engine, sims = _engine(small_model_dir), _sims()
    edge, births = _session(1, sims, MS)
    reading = sims["m2"].next(T0 + 1)
    lost = edge.data("m2", reading, MS + 1000)
    assert lost is not None
    engine.handle([_in(m) for m in births], T0)  # the DDATA never reached the detector
    edge2, births2 = _session(2, sims, MS + 5000)
    engine.handle([_in(m, T0 + 5) for m in births2], T0 + 5)
    out = engine.handle([_in(edge2.again(lost), T0 + 6)], T0 + 6)
    (verdict,) = _verdicts(out)
    assert (verdict.machine_id, verdict.seq) == ("edge1.m2", reading.seq)
    assert verdict.reading_ts == pytest.approx(T0 + 1)
    once_more = engine.handle([_in(edge2.again(lost), T0 + 7)], T0 + 7)
    assert not _verdicts(once_more)
    assert once_more[0].reanswered == 1


def test_a_birth_reading_sent_again_as_data_is_the_same_reading() -> None:
    """A DBIRTH's reading sent again as DDATA (by alias, no names or types) has the birth's
    identity and digest; the late values leave the device's present ones alone."""
    ingest, sims = SparkplugIngest(), _sims()
    _, births = _session(1, sims, MS)
    born = [ingest.decode(Received(t, p, T0, 0.0)) for t, p in births]
    (birth_reading,) = born[1]
    assert isinstance(birth_reading, Reading)
    edge2, births2 = _session(2, sims, MS + 5000)
    for topic, payload in births2:
        ingest.decode(Received(topic, payload, T0 + 5, 0.0))
    present = dict(ingest.nodes["plant1/edge1"].devices["m1"].values)
    (again,) = ingest.decode(Received(*edge2.again(births[1]), T0 + 6, 0.0))
    assert isinstance(again, Reading)
    assert (again.identity, again.digest) == (birth_reading.identity, birth_reading.digest)
    assert again.identity == f"spb:plant1/edge1/m1:r:{birth_reading.telemetry.seq}"
    assert again.telemetry == birth_reading.telemetry
    assert ingest.nodes["plant1/edge1"].devices["m1"].values == present


def test_other_edge_nodes_keep_their_session_identity() -> None:
    """An edge node that sends no reading seq (Tahu's) is known by bdSeq, birth time and its
    extended Sparkplug seq, as before; its payload's CRC is the digest."""
    ingest, edge = SparkplugIngest(), TahuEdgeNode("plant1", "edge1", bd_seq=7)
    sim = MachineSimulator("m", "l", seed=3)
    ingest.decode(Received(*edge.nbirth(MS), T0, 0.0))
    ingest.decode(Received(*edge.dbirth("mill", sim.next(T0), MS), T0, 0.0))
    message = edge.reading_data("mill", sim.next(T0), MS + 1)
    (item,) = ingest.decode(Received(*message, T0, 0.0))
    assert isinstance(item, Reading)
    assert item.identity == f"spb:plant1/edge1/mill:7:{MS}:2"
    assert item.telemetry.seq == 2


def test_a_reading_seq_that_is_no_integer_is_dead_lettered_with_the_reason() -> None:
    """A ``factorywatch/Reading Seq`` born as a Double is not read as an id: type_mismatch."""
    ingest, edge = SparkplugIngest(), EdgeNode("plant1", "edge1", ["m1"], bd_seq=1)
    topic, payload = edge.births({"m1": MachineSimulator("m1", "g", seed=1).next(T0)}, MS)[1]
    parsed = decode(payload)
    for metric in parsed.metrics:
        if metric.name == READING_SEQ_METRIC:
            metric.datatype, metric.double_value = 10, 5.0
    nbirth = EdgeNode("plant1", "edge1", [], bd_seq=1).births({}, MS)[0]
    ingest.decode(Received(*nbirth, T0, 0.0))
    (error,) = ingest.decode(Received(topic, parsed.SerializeToString(), T0, 0.0))
    assert isinstance(error, PayloadError)
    assert error.reason == "type_mismatch"
    assert READING_SEQ_METRIC in error.detail


def test_a_reading_seq_beyond_63_bits_is_refused_at_the_door() -> None:
    """A reading seq of 2^63 (UInt64) fails the wire schema's bounds: a schema dead letter."""
    ingest, sim = SparkplugIngest(), MachineSimulator("m1", "g", seed=1)
    edge = EdgeNode("plant1", "edge1", ["m1"], bd_seq=1)
    topic, payload = edge.births({"m1": sim.next(T0)}, MS)[1]
    parsed = decode(payload)
    for metric in parsed.metrics:
        if metric.name == READING_SEQ_METRIC:
            metric.datatype, metric.long_value = 8, 2**63  # UInt64
    nbirth = EdgeNode("plant1", "edge1", [], bd_seq=1).births({}, MS)[0]
    ingest.decode(Received(*nbirth, T0, 0.0))
    (error,) = ingest.decode(Received(topic, parsed.SerializeToString(), T0, 0.0))
    assert isinstance(error, PayloadError)
    assert error.reason == "schema"


def test_a_dead_letter_answers_the_message_it_quotes() -> None:
    """The edge node knows which reading a dead letter answers by its size and excerpt."""
    edge = EdgeNode("plant1", "edge1", ["m1"], bd_seq=1)
    sim = MachineSimulator("m1", "g", seed=1)
    edge.births({"m1": sim.next(T0)}, MS)
    one = edge.data("m1", sim.next(T0), MS + 1)
    other = edge.data("m1", sim.next(T0), MS + 2)
    assert one is not None
    assert other is not None
    letter = DeadLetter(
        reason="clock_skew",
        detail="x",
        topic=one[0],
        payload_bytes=len(one[1]),
        payload_excerpt=one[1][:200].decode("utf-8", errors="replace"),
        received_at=T0,
    )
    assert answers_letter(one[1], letter)
    assert not answers_letter(other[1], letter)


def test_again_refuses_what_is_no_device_reading() -> None:
    """Only a DBIRTH or DDATA is a reading that can be sent again."""
    edge = EdgeNode("plant1", "edge1", ["m1"], bd_seq=1)
    with pytest.raises(ValueError, match="not a device's reading"):
        edge.again(edge.ndeath())


def test_reading_seq_metric_is_declared_in_the_birth_and_sent_in_data() -> None:
    """The birth names the metric (Int64, an alias); data carries it by alias only."""
    edge = EdgeNode("plant1", "edge1", ["m1"], bd_seq=1)
    sim = MachineSimulator("m1", "g", seed=1, seq_start=77)
    births = edge.births({"m1": sim.next(T0)}, MS)
    declared = {m.name: m for m in decode(births[1][1]).metrics}[READING_SEQ_METRIC]
    assert (declared.datatype, declared.long_value) == (INT64, 77)
    data = edge.data("m1", sim.next(T0), MS + 1)
    assert data is not None
    carried = [m for m in decode(data[1]).metrics if m.alias == declared.alias]
    assert [(m.name, m.long_value) for m in carried] == [("", 78)]


def test_a_message_redelivered_after_its_sessions_death_is_consumed_not_refused() -> None:
    """A DDATA read, then the node's NDEATH (a restarting broker's will), then the same DDATA
    again (the broker's redelivery): consumed silently, no rebirth asked; new data after the
    death is still refused no_birth with a rebirth request, as before."""
    ingest, edge = SparkplugIngest(), TahuEdgeNode("plant1", "edge1", bd_seq=4)
    sim = MachineSimulator("m", "l", seed=3)
    ingest.decode(Received(*edge.nbirth(MS), T0, 0.0))
    ingest.decode(Received(*edge.dbirth("mill", sim.next(T0), MS), T0, 0.0))
    data = edge.reading_data("mill", sim.next(T0), MS + 1)
    (first,) = ingest.decode(Received(*data, T0, 0.0))
    assert isinstance(first, Reading)
    assert ingest.decode(Received(*edge.ndeath(), T0 + 1, 0.0)) == []
    ingest.take_effects(T0 + 1)
    assert ingest.decode(Received(*data, T0 + 2, 0.0)) == []
    assert ingest.take_effects(T0 + 2).commands == []
    later = edge.reading_data("mill", sim.next(T0), MS + 2)
    (error,) = ingest.decode(Received(*later, T0 + 3, 0.0))
    assert isinstance(error, PayloadError)
    assert error.reason == "no_birth"
    assert len(ingest.take_effects(T0 + 3).commands) == 1
