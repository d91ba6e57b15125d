"""The engine with the Sparkplug ingest beside the JSON one: effects, deaths, snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorywatch.contracts import AlertEvent, DeadLetter, Verdict
from factorywatch.detector.engine import Engine, Inbound
from factorywatch.detector.sparkplug import SparkplugIngest, SparkplugSettings
from factorywatch.model import artifact
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.sparkplug_edge import TahuEdgeNode, decode

T0 = 1_800_000_000.0
MS = int(T0 * 1000)


def _engine(model_dir: Path) -> Engine:
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=1.0, rebirth_backoff_s=0.0))
    return Engine(artifact.load(model_dir), Topics("t"), extra_ingests=[ingest])


def _in(message: tuple[str, bytes], at: float = T0) -> Inbound:
    return Inbound(message[0], message[1], at, 0.0)


@pytest.fixture
def edge() -> TahuEdgeNode:
    """An edge node with one device, not yet born."""
    return TahuEdgeNode("plant1", "edge1", bd_seq=2)


def test_births_and_data_become_verdicts_json_still_works(
    small_model_dir: Path, edge: TahuEdgeNode
) -> None:
    """A DBIRTH and a DDATA are scored like JSON readings, on the device's verdict topic."""
    engine = _engine(small_model_dir)
    sim = MachineSimulator("m", "l", seed=1)
    json_reading = MachineSimulator("json-1", "line1", seed=2).next(T0)  # received at T0
    batch = [
        _in(edge.nbirth(MS)),
        _in(edge.dbirth("mill", sim.next(T0), MS)),
        _in(edge.reading_data("mill", sim.next(T0), MS + 1)),
        _in(("t/telemetry/line1/json-1", json_reading.encode())),
    ]
    outcomes = engine.handle(batch, T0)
    assert [len(o.verdicts) for o in outcomes] == [0, 1, 1, 1]
    verdict_topics = [p.topic for o in outcomes for p in o.publishes if p.topic.endswith("verdict")]
    assert verdict_topics == [
        "t/alerts/plant1/edge1.mill/verdict",
        "t/alerts/plant1/edge1.mill/verdict",
        "t/alerts/line1/json-1/verdict",
    ]
    assert Verdict.model_validate_json(outcomes[2].publishes[0].payload).seq == 2


def test_death_is_an_offline_event_after_the_readings_before_it(
    small_model_dir: Path, edge: TahuEdgeNode
) -> None:
    """DDEATH in the same batch as data: the data is scored, then MACHINE_OFFLINE (ddeath)."""
    engine = _engine(small_model_dir)
    sim = MachineSimulator("m", "l", seed=1)
    engine.handle([_in(edge.nbirth(MS)), _in(edge.dbirth("mill", sim.next(T0), MS))], T0)
    data, death = _in(edge.reading_data("mill", sim.next(T0), MS + 1)), _in(edge.ddeath("mill", 2))
    outcomes = engine.handle([data, death], T0 + 1)
    assert len(outcomes[0].verdicts) == 1
    assert [e.event for e in outcomes[1].events] == ["MACHINE_OFFLINE"]
    event = next(p for p in outcomes[1].publishes if p.topic.endswith("/event"))
    assert AlertEvent.model_validate_json(event.payload).reason == "ddeath"
    assert engine.record("edge1.mill").offline_since == T0 + 1


def test_rebirth_requests_are_published_by_the_message_or_the_tick(
    small_model_dir: Path, edge: TahuEdgeNode
) -> None:
    """Data before birth: dead letter + NCMD in its outcome; an unfilled gap: NCMD at tick."""
    engine = _engine(small_model_dir)
    sim = MachineSimulator("m", "l", seed=1)
    edge.aliases["mill/Torque [Nm]"] = 4
    (early,) = engine.handle([_in(edge.ddata("mill", {"torque_nm": 1.0}, MS))], T0)
    topics = [p.topic for p in early.publishes]
    assert topics == ["spBv1.0/plant1/NCMD/edge1", "t/deadletter/plant1/edge1.mill"]
    assert DeadLetter.model_validate_json(early.publishes[1].payload).reason == "no_birth"
    assert decode(early.publishes[0].payload).metrics[0].boolean_value is True
    engine.handle([_in(edge.nbirth(MS)), _in(edge.dbirth("mill", sim.next(T0), MS))], T0)
    edge.seq += 1
    engine.handle([_in(edge.ddata("mill", {"torque_nm": 2.0}, MS + 1))], T0)
    publishes, _ = engine.tick(T0 + 0.5)
    assert not [p for p in publishes if "NCMD" in p.topic]
    publishes, _ = engine.tick(T0 + 1.0)
    assert [p.topic for p in publishes if "NCMD" in p.topic] == ["spBv1.0/plant1/NCMD/edge1"]


def test_snapshot_carries_the_sparkplug_state(small_model_dir: Path, edge: TahuEdgeNode) -> None:
    """A restored engine continues the edge node's stream (no rebirth, same reading)."""
    engine = _engine(small_model_dir)
    sim = MachineSimulator("m", "l", seed=1)
    engine.handle([_in(edge.nbirth(MS)), _in(edge.dbirth("mill", sim.next(T0), MS))], T0)
    snapshot = json.loads(json.dumps(engine.snapshot()))
    assert "plant1/edge1" in snapshot["ingests"]["sparkplug"]["nodes"]
    copy = _engine(small_model_dir)
    copy.restore(snapshot)
    message = _in(edge.ddata("mill", {"torque_nm": 33.0}, MS + 1))
    (a,) = engine.handle([message], T0)
    (b,) = copy.handle([message], T0)
    assert a.answered == b.answered
    assert len(a.verdicts) == len(b.verdicts) == 1


def test_a_quiet_sparkplug_device_is_not_offline_by_silence(
    small_model_dir: Path, edge: TahuEdgeNode
) -> None:
    """Report by exception: 120 s without data leave a living Sparkplug device as it was,
    while a JSON sensor silent as long goes OFFLINE (reason silence)."""
    engine = _engine(small_model_dir)
    sim = MachineSimulator("m", "l", seed=1)
    json_reading = MachineSimulator("json-1", "line1", seed=2).next(T0)  # received at T0
    engine.handle(
        [
            _in(edge.nbirth(MS)),
            _in(edge.dbirth("mill", sim.next(T0), MS)),
            _in(("t/telemetry/line1/json-1", json_reading.encode())),
        ],
        T0,
    )
    _, events = engine.tick(T0 + 120)
    assert [(e.machine_id, e.event, e.reason) for e in events] == [
        ("json-1", "MACHINE_OFFLINE", "silence")
    ]
    assert engine.tracker.state("edge1.mill").state == "NORMAL"
