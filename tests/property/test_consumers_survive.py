"""No generated message stops a consumer: the detector engine, the recorder's decoder and
store, the notifier's decoder, the Sparkplug ingest (#25). Each refuses and goes on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorywatch.contracts import AI4I_CHANNELS
from factorywatch.detector import state
from factorywatch.detector.engine import Engine, Inbound
from factorywatch.detector.sparkplug import SparkplugIngest, SparkplugSettings
from factorywatch.history_recorder import Recorder
from factorywatch.history_store import HistorySettings, HistoryStore
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.fuzz.consumers_target import NOW, TOPICS, check, seeds

FIELDS = ("schema_version", "machine_id", "line", "seq", "ts", "readings", "attributes", "x")
#: values at and beyond every bound: 63/64-bit edges, non-finite floats, long strings
HOSTILE = st.one_of(
    st.sampled_from([2**63 - 1, 2**63, 2**64, 2**70, -1, -(2**63) - 1, 0]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([NOW + 3600, NOW - 30 * 86400, 4_070_908_800.0, NOW * 1000]),
    st.text(max_size=100) | st.sampled_from(["x" * 65, "x" * 200, "m1\x00", "\u202e"]),
    st.none() | st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=70), st.floats() | st.integers(), max_size=70),
)


@st.composite
def hostile_reading(draw: st.DrawFn, machine: str = "m1") -> bytes:
    """A reading of ``machine`` with a few fields replaced by hostile values."""
    data: dict[str, Any] = {
        "machine_id": machine,
        "line": "line1",
        "seq": draw(st.integers(0, 50)),
        "ts": NOW,
        "attributes": {"product_type": "L"},
        "readings": dict.fromkeys(AI4I_CHANNELS, 300.0),
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        data[name] = draw(HOSTILE)
    return json.dumps(data, allow_nan=True).encode()


@st.composite
def message(draw: st.DrawFn, topics: Topics) -> tuple[str, bytes]:
    """A message on a topic some consumer reads, with a hostile or mutated payload."""
    topic = draw(
        st.sampled_from([
            topics.telemetry("line1", "m1"),
            topics.batch("line1", "gw1"),
            topics.event("line1", "m1"),
            topics.verdict("line1", "m1"),
            topics.feedback("line1", "m1"),
            topics.ack("line1", "m1"),
        ])
    )  # fmt: skip
    reading = hostile_reading()
    payload = draw(
        reading
        | st.lists(reading, min_size=1, max_size=4).map(
            lambda items: b'{"readings":[' + b",".join(items) + b"]}"
        )
        | st.binary(max_size=200)
        | st.sampled_from(seeds()).map(lambda seed: seed[1:])
    )
    return topic, payload


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed of some consumer with a few bytes replaced, inserted or removed."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        byte = draw(st.integers(0, 255))
        if at == len(data) or draw(st.booleans()):
            data.insert(at, byte)
        else:
            data[at] = byte
    return bytes(data)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400) | mutated())
def test_every_consumers_decoder_refuses_or_accepts_within_bounds(data: bytes) -> None:
    """Any bytes to the detector (JSON, Sparkplug), the recorder or the notifier: refused with
    a documented reason, or accepted with every bound of the wire contracts met."""
    check(data)


@pytest.fixture(scope="module")
def engine(small_model_dir: Path) -> Engine:
    """One engine (JSON and Sparkplug ingests) for every example: state accumulates."""
    model: LoadedModel = artifact.load(small_model_dir)
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=1.0, rebirth_backoff_s=0.0))
    return Engine(model, TOPICS, extra_ingests=[ingest])


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(message(TOPICS), min_size=1, max_size=6))
def test_no_batch_stops_the_detector_engine(engine: Engine, batch: list[tuple[str, bytes]]) -> None:
    """Any batch of hostile messages: one outcome per message, and the state still encodes
    for the checkpoint (the 2**70 seq broke orjson there)."""
    outcomes = engine.handle([Inbound(t, p, NOW, 0.0) for t, p in batch], NOW)
    assert len(outcomes) == len(batch)
    state.encode(engine.snapshot())
    for record in engine.take_dirty():
        state.encode(record.snapshot())


@pytest.fixture(scope="module")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    """A recorder on an SQLite store in a temporary directory (no broker: fed directly)."""
    path = tmp_path_factory.mktemp("recorder") / "history.sqlite"
    store = HistoryStore(f"sqlite:///{path}")
    return Recorder(BrokerSettings(topic_root=TOPICS.root), store, HistorySettings())


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(message(TOPICS), min_size=1, max_size=6))
def test_no_message_stops_the_recorder(recorder: Recorder, batch: list[tuple[str, bytes]]) -> None:
    """Any hostile messages are decoded, stored or refused, and acknowledged: flush never
    raises and what was stored reads back."""
    for topic, payload in batch:
        recorder.receive(topic, payload, (1, 0), NOW)
    recorder.flush()
    assert not recorder._pending
    assert all(0 <= r["seq"] < 2**63 for r in recorder.store.readings("m1"))
