"""detector.sparkplug_out: the detector's edge node, read back with Tahu's generated class."""

from __future__ import annotations

from typing import Any

from factorywatch.contracts import MachineState, Verdict
from factorywatch.detector.sparkplug_out import VerdictNode, tags
from factorywatch.sensors.sparkplug import EdgeNode
from factorywatch.sparkplug_codec import is_rebirth_request
from tests.sparkplug_edge import decode

T0 = 1_800_000_000.0


def _state(**changes: Any) -> MachineState:
    base: dict[str, Any] = {
        "machine_id": "edge1.mill",
        "line": "plant1",
        "state": "NORMAL",
        "since": T0,
        "window_size": 5,
    }
    return MachineState(**{**base, **changes})


def _verdict(score: float, status: str = "NORMAL") -> Verdict:
    return Verdict.model_validate(
        {
            "machine_id": "edge1.mill",
            "line": "plant1",
            "seq": 1,
            "reading_ts": T0,
            "status": status,
            "score": score,
            "threshold": 0.6,
            "model_version": "v1",
            "latency_ms": 0.1,
        }
    )


def _metrics(payload: bytes) -> dict[str, Any]:
    out = {}
    for m in decode(payload).metrics:
        out[m.name or m.alias] = getattr(m, m.WhichOneof("value"))
    return out


def test_births_declare_every_metric_and_data_carries_only_changes() -> None:
    """NBIRTH (bdSeq), DBIRTH with names, aliases and data types, then DDATA by alias (no
    data type) with what changed."""
    node = VerdictNode("factorywatch", "det", bd_seq=300)
    nbirth = node.births(1)
    assert [t for t, _ in nbirth] == ["spBv1.0/factorywatch/NBIRTH/det"]
    assert _metrics(nbirth[0][1])["bdSeq"] == 300 % 256
    (dbirth,) = node.update("edge1.mill", tags(_state(), _verdict(0.5), {}), 2)
    assert dbirth[0] == "spBv1.0/factorywatch/DBIRTH/det/edge1.mill"
    born = _metrics(dbirth[1])
    assert born["Score"] == 0.5
    assert born["Alert State"] == "NORMAL"
    assert born["Alert Active"] is False
    values = tags(_state(state="ALERT", alert_id="a1"), _verdict(0.8, "ALERT"), born)
    (ddata,) = node.update("edge1.mill", values, 3)
    assert ddata[0] == "spBv1.0/factorywatch/DDATA/det/edge1.mill"
    changed = decode(ddata[1])
    assert {m.alias for m in changed.metrics} == {2, 3, 5, 6}  # Status, Score, state, active
    assert all(not m.name for m in changed.metrics)
    # tck-id-payloads-metric-datatype-req / -not-req: types in births only
    assert all(m.datatype for m in decode(dbirth[1]).metrics)
    assert all(m.datatype == 0 for m in changed.metrics)
    assert [decode(p).seq for _, p in (*nbirth, dbirth, ddata)] == [0, 1, 2]
    assert node.update("edge1.mill", values, 4) == []  # nothing changed


def test_rebirth_republishes_every_machine_and_death_matches_the_birth() -> None:
    """A rebirth restarts seq at 0 with a DBIRTH per machine; NDEATH carries the same bdSeq."""
    node = VerdictNode("factorywatch", "det", bd_seq=9)
    node.births(1)
    node.update("a", tags(_state(machine_id="a"), _verdict(0.4), {}), 2)
    node.update("b", tags(_state(machine_id="b"), _verdict(0.4), {}), 2)
    again = node.births(5)
    assert [t.rsplit("/", 1)[-1] for t, _ in again] == ["det", "a", "b"]
    assert decode(again[0][1]).seq == 0
    topic, payload = node.ndeath()
    assert topic == "spBv1.0/factorywatch/NDEATH/det"
    assert _metrics(payload)["bdSeq"] == 9
    assert is_rebirth_request(b"\xff") is False


def test_detector_and_simulated_edge_nodes_share_one_birth_and_death() -> None:
    """The detector's node and `sensor --sparkplug`'s node build NBIRTH and NDEATH alike:
    same bytes for the same ids, the rebirth control stamped with the birth's time."""
    detector = VerdictNode("g", "n", bd_seq=260)
    sensor = EdgeNode("g", "n", [], bd_seq=260)
    assert detector.births(7) == sensor.births({}, 7)
    assert detector.ndeath() == sensor.ndeath()
    rebirth = next(m for m in decode(detector.births(8)[0][1]).metrics if m.name != "bdSeq")
    assert (rebirth.name, rebirth.timestamp, rebirth.boolean_value) == (
        "Node Control/Rebirth",
        8,
        False,
    )
