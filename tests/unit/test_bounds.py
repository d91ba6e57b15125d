"""Bounds at the door: every consumer's decoder refuses what its stores cannot hold (#25)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from factorywatch import contracts
from factorywatch.contracts import (
    MAX_INT,
    AlertEvent,
    FeedbackCommand,
    MachineState,
    Telemetry,
    Verdict,
)
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.errors import PayloadError
from factorywatch.history_recorder import decode as recorder_decode
from factorywatch.history_store import HistoryStore
from factorywatch.notify import Notifier, NotifySettings
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import TYPICAL

NOW = 1.7e9
TOPICS = Topics("bd")
TOPIC = TOPICS.telemetry("line1", "m1")
HUGE = [2**63, 2**70]  # 2**63 overflows SQLite INTEGER, 2**70 orjson too


def reading(**overrides: Any) -> dict[str, Any]:
    """A valid version 2 reading of m1 on line1 as a dict, with ``overrides`` applied."""
    base: dict[str, Any] = {
        "schema_version": 2,
        "machine_id": "m1",
        "line": "line1",
        "seq": 1,
        "ts": NOW,
        "attributes": {"product_type": "L"},
        "readings": dict(TYPICAL),
    }
    return {**base, **overrides}


def raw(data: dict[str, Any]) -> bytes:
    """The JSON bytes a sender would publish."""
    return json.dumps(data).encode()


def detector_decoder() -> Decoder:
    """The detector's JSON decoder for the AI4I channels."""
    return Decoder(TOPICS, channels=list(TYPICAL), max_clock_skew_s=7 * 86400.0)


@pytest.mark.parametrize("seq", HUGE)
def test_a_seq_beyond_63_bits_is_refused_by_the_detector_decoder(seq: int) -> None:
    """A reading whose seq does not fit a signed 64-bit integer is a schema dead letter."""
    message = Received(TOPIC, raw(reading(seq=seq)), NOW, 0.0)
    with pytest.raises(PayloadError) as info:
        detector_decoder().decode(message)
    assert info.value.reason == "schema"


@pytest.mark.parametrize("seq", HUGE)
def test_a_seq_beyond_63_bits_is_refused_by_the_recorder_decoder(seq: int) -> None:
    """The recorder refuses a reading (alone or in a batch) whose seq SQLite cannot store."""
    with pytest.raises(PayloadError):
        recorder_decode(TOPICS, TOPIC, raw(reading(seq=seq)), NOW)
    batch = raw({"readings": [reading(seq=seq), reading(seq=2)]})
    kept = recorder_decode(TOPICS, TOPICS.batch("line1", "gw1"), batch, NOW)
    assert isinstance(kept, list)
    assert [r.seq for r in kept if isinstance(r, Telemetry)] == [2]


def test_the_largest_seq_the_door_accepts_is_stored(tmp_path: Path) -> None:
    """seq = 2**63 - 1 passes the decoder and is stored and read back by SQLite."""
    decoded = recorder_decode(TOPICS, TOPIC, raw(reading(seq=MAX_INT)), NOW)
    assert isinstance(decoded, list)
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    store.add_readings([r for r in decoded if isinstance(r, Telemetry)])
    assert [r["seq"] for r in store.readings("m1")] == [MAX_INT]


def test_a_reading_stamped_in_2099_is_refused_by_the_recorder() -> None:
    """A reading far in the receiver's future is refused (clock_skew), not stored."""
    with pytest.raises(PayloadError) as info:
        recorder_decode(TOPICS, TOPIC, raw(reading(ts=4_070_908_800.0)), NOW)
    assert info.value.reason == "clock_skew"


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (
            AlertEvent,
            {"machine_id": "m1", "line": "line1", "event": "ALERT_RAISED", "at": NOW, "seq": 2**70},
        ),
        (
            MachineState,
            {
                "machine_id": "m1",
                "line": "line1",
                "state": "NORMAL",
                "since": NOW,
                "window_size": 5,
                "alerts_raised": 2**64,
            },
        ),
        (
            Verdict,
            {
                "machine_id": "m1",
                "line": "line1",
                "seq": 2**63,
                "reading_ts": NOW,
                "status": "ALERT",
                "score": 0.7,
                "threshold": 0.6,
                "model_version": "v1",
                "latency_ms": 1.0,
            },
        ),
        (
            FeedbackCommand,
            {
                "machine_id": "m1",
                "alert_id": "x" * 129,
                "label": "confirmed",
                "by": "op",
                "at": NOW,
            },
        ),
        (
            Verdict,
            {
                "machine_id": "m1",
                "line": "line1",
                "seq": 1,
                "reading_ts": NOW,
                "status": "ALERT",
                "score": 0.7,
                "threshold": 0.6,
                "model_version": "v" * 200,
                "latency_ms": 1.0,
            },
        ),
    ],
)
def test_every_schema_bounds_its_integers_and_strings(
    model: type[Any], data: dict[str, Any]
) -> None:
    """Oversized integers and strings are refused by the shared decoder for every schema."""
    with pytest.raises(PayloadError) as info:
        contracts.decode(model, raw(data), now=NOW)
    assert info.value.reason == "schema"


def test_an_event_from_the_future_is_refused_by_the_shared_decoder() -> None:
    """An alert event stamped beyond the future window of the receiver's time is refused."""
    data = {"machine_id": "m1", "line": "line1", "event": "ALERT_RAISED", "at": NOW + 3600}
    with pytest.raises(PayloadError) as info:
        contracts.decode(AlertEvent, raw(data), now=NOW)
    assert info.value.reason == "clock_skew"
    assert contracts.decode(AlertEvent, raw({**data, "at": NOW}), now=NOW).at == NOW


def test_a_batch_keeps_its_good_readings_and_names_each_bad_one() -> None:
    """decode_batch: a bad item (huge seq, future ts) is a PayloadError in its place."""
    items = contracts.decode_batch(
        raw({"readings": [reading(seq=2**70), reading(seq=3), reading(seq=4, ts=NOW + 1e6)]}),
        now=NOW,
    )
    assert [type(i) for i in items] == [PayloadError, Telemetry, PayloadError]


def test_the_notifier_ignores_an_event_with_a_huge_seq() -> None:
    """The notifier's decoder refuses a 2**70 seq instead of raising out of its loop."""
    notifier = Notifier(BrokerSettings(topic_root="bd"), NotifySettings())
    data = {"machine_id": "m1", "line": "line1", "event": "ALERT_RAISED", "at": NOW, "seq": 2**70}
    assert notifier.handle(TOPICS.event("line1", "m1"), raw(data), NOW) == []
    assert notifier.rejected == 1


def test_the_web_live_feed_ignores_a_huge_seq_and_a_reading_from_2099() -> None:
    """The web view's live model refuses what the door refuses: no tile, no chart point."""
    from factorywatch.web.live import LiveModel  # noqa: PLC0415 - the web view's model

    model = LiveModel(TOPICS)
    state = MachineState(machine_id="m1", line="line1", state="NORMAL", since=NOW, window_size=5)
    assert model.feed(TOPICS.state("line1", "m1"), state.encode(), NOW) == "line1/m1"
    assert model.feed(TOPIC, raw(reading(seq=2**70)), NOW) is None
    assert model.feed(TOPIC, raw(reading(ts=4_070_908_800.0)), NOW) is None
    assert model.ignored == 2
    assert not model.machines["line1/m1"].readings
    assert model.feed(TOPIC, raw(reading()), NOW) == "line1/m1"
