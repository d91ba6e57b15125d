"""Property tests of the wire edge: the decoder, the features and the de-duplication cache."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorywatch.contracts import (
    AI4I_CHANNELS,
    ANOMALY_KINDS,
    MAX_CHANNELS,
    Telemetry,
)
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.detector.dedup import SeenCache
from factorywatch.errors import DEAD_LETTER_REASONS, PayloadError
from factorywatch.model.features import DERIVED, FEATURE_SETS, PRODUCT_TYPE_COLUMN, compute_features
from factorywatch.topics import Topics

NOW = 1.7e9
SKEW = 7 * 24 * 3600.0
TOPICS = Topics()
TOPIC = TOPICS.telemetry("line1", "mill-01")
REASONS = set(DEAD_LETTER_REASONS) - {"unknown_machine"}
FAST = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

DECODER = Decoder(
    TOPICS,
    channels=AI4I_CHANNELS,
    max_clock_skew_s=SKEW,
    max_future_skew_s=SKEW,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and +-Infinity included: json.dumps writes them as bare constants
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
channel_names = st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)


def outcome(payload: bytes, topic: str = TOPIC) -> str:
    """Decode and return "ok" or the rejection reason; any other exception propagates."""
    try:
        DECODER.decode(Received(topic=topic, payload=payload, received_at=NOW, received_perf=0.0))
    except PayloadError as exc:
        return exc.reason
    return "ok"


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_payload_error(payload: bytes) -> None:
    """Any byte string is either a reading or a PayloadError with a known reason."""
    assert outcome(payload) in {*REASONS, "ok"}


@FAST
@given(st.text(max_size=80), st.binary(max_size=64))
def test_arbitrary_topics_only_raise_payload_error(topic: str, payload: bytes) -> None:
    """Any topic string is either a telemetry topic or rejected with a PayloadError."""
    assert outcome(payload, topic) in {*REASONS, "ok"}


@FAST
@given(json_values)
def test_arbitrary_json_only_raises_payload_error(value: object) -> None:
    """Any JSON document (NaN, Infinity and huge integers included) is accepted or rejected."""
    assert outcome(json.dumps(value).encode()) in {*REASONS, "ok"}


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "schema_version": json_values | st.just(1),
            "machine_id": json_values | st.just("mill-01"),
            "line": json_values | st.just("line1"),
            "seq": json_values | st.integers(),
            "ts": json_values | st.floats() | st.just(NOW),
            "product_type": json_values | st.sampled_from(["L", "M", "H"]),
            "readings": json_values
            | st.dictionaries(st.sampled_from(AI4I_CHANNELS) | channel_names, json_values),
            "injected": json_values | st.sampled_from(ANOMALY_KINDS),
            "extra": json_values,
        },
    )
)
def test_near_valid_json_only_raises_payload_error(data: dict[str, Any]) -> None:
    """Telemetry-shaped objects with arbitrary field values are accepted or rejected cleanly."""
    assert outcome(json.dumps(data).encode()) in {*REASONS, "ok"}


@st.composite
def telemetry(draw: st.DrawFn) -> Telemetry:
    """A valid reading that the AI4I decoder accepts."""
    readings = {ch: draw(finite) for ch in AI4I_CHANNELS}
    extra = draw(st.dictionaries(channel_names, finite, max_size=MAX_CHANNELS - len(AI4I_CHANNELS)))
    readings.update({k: v for k, v in extra.items() if k not in readings})
    return Telemetry(
        machine_id=draw(identifiers),
        line=draw(identifiers),
        seq=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        ts=draw(st.floats(min_value=NOW - SKEW, max_value=NOW + SKEW)),
        attributes={"product_type": draw(st.sampled_from(["L", "M", "H"]))},
        readings=readings,
        injected=draw(st.none() | st.sampled_from(ANOMALY_KINDS)),
    )


@FAST
@given(telemetry())
def test_valid_telemetry_round_trips_exactly(reading: Telemetry) -> None:
    """encode() then Decoder.decode on the reading's own topic gives back an equal reading."""
    topic = TOPICS.telemetry(reading.line, reading.machine_id)
    decoded = DECODER.decode(
        Received(topic=topic, payload=reading.encode(), received_at=NOW, received_perf=0.0)
    )
    assert decoded == reading
    assert decoded.encode() == reading.encode()


@st.composite
def feature_columns(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Channel columns of 1..25 rows with finite values and valid product-type codes."""
    n = draw(st.integers(min_value=1, max_value=25))
    # Sensor precision (3 decimals) keeps products away from subnormal floats, whose
    # reciprocals overflow (a RuntimeWarning, which this suite treats as an error).
    values = st.floats(min_value=-1e5, max_value=1e5).map(lambda x: round(x, 3))
    cols = {ch: np.array(draw(st.lists(values, min_size=n, max_size=n))) for ch in AI4I_CHANNELS}
    codes = draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=n, max_size=n))
    cols[PRODUCT_TYPE_COLUMN] = np.array(codes)
    return cols


ALL_FEATURE_LISTS = [list(f) for f in FEATURE_SETS.values()] + [list(DERIVED)]


@FAST
@given(feature_columns(), st.sampled_from(ALL_FEATURE_LISTS))
def test_compute_features_batch_equals_row_by_row(
    cols: dict[str, np.ndarray], features: list[str]
) -> None:
    """The feature matrix of a batch equals the stacked matrices of its single rows."""
    batch = compute_features(cols, features)
    n = len(cols[PRODUCT_TYPE_COLUMN])
    rows = [
        compute_features({k: v[i : i + 1] for k, v in cols.items()}, features) for i in range(n)
    ]
    assert batch.shape == (n, len(features))
    assert batch.dtype == np.float64
    np.testing.assert_array_equal(batch, np.vstack(rows))


@settings(deadline=None, max_examples=300)
@given(st.integers(min_value=0, max_value=8), st.lists(st.integers(0, 15), max_size=200))
def test_seen_cache_matches_reference_model(capacity: int, keys: list[int]) -> None:
    """SeenCache stays within capacity and reports a key seen iff it is among the last
    ``capacity`` distinct keys it was given."""
    cache = SeenCache(capacity)
    history: list[int] = []
    for key in keys:
        recent: list[int] = []
        for old in reversed(history):
            if len(recent) == capacity:
                break
            if old not in recent:
                recent.append(old)
        assert cache.seen(key) is (key in recent)
        history.append(key)
        assert len(cache) <= capacity
        assert len(cache) == min(capacity, len(set(history)))
