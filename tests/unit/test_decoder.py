"""Decoder: every bad input of the reliability guide becomes a PayloadError with a stable reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from factorywatch.contracts import (
    AI4I_CHANNELS,
    MAX_PAYLOAD_BYTES,
    DeadLetter,
    Telemetry,
)
from factorywatch.detector.batch_scoring import Decoder, Received, dead_letter
from factorywatch.errors import DEAD_LETTER_REASONS, PayloadError
from factorywatch.topics import Topics
from tests.support import TYPICAL

NOW = 1.7e9
SKEW = 7 * 24 * 3600.0
TOPICS = Topics()
TOPIC = TOPICS.telemetry("line1", "mill-01")
REASONS = set(DEAD_LETTER_REASONS)


def reading(**overrides: Any) -> dict[str, Any]:
    """A valid reading of mill-01 on line1 as a plain dict, with ``overrides`` applied."""
    base: dict[str, Any] = {
        "machine_id": "mill-01",
        "line": "line1",
        "seq": 3,
        "ts": NOW,
        "product_type": "L",
        "readings": dict(TYPICAL),
    }
    return {**base, **overrides}


def raw(data: dict[str, Any]) -> bytes:
    """The JSON bytes a sender would publish for ``data``."""
    return json.dumps(data).encode()


def decoder(machines: frozenset[str] | None = None) -> Decoder:
    """A decoder for the AI4I channels with a fixed clock."""
    return Decoder(
        TOPICS,
        channels=AI4I_CHANNELS,
        max_clock_skew_s=SKEW,
        max_future_skew_s=SKEW,
        machines=machines,
    )


def message(payload: bytes, topic: str = TOPIC) -> Received:
    """A received message on ``topic``."""
    return Received(topic=topic, payload=payload, received_at=NOW, received_perf=0.0)


def reason_of(payload: bytes, topic: str = TOPIC, dec: Decoder | None = None) -> str:
    """The PayloadError reason ``decode`` gives for ``payload`` (fails if it is accepted)."""
    with pytest.raises(PayloadError) as info:
        (dec or decoder()).decode(message(payload, topic))
    assert info.value.reason in REASONS
    assert str(info.value).startswith(f"{info.value.reason}: ")
    return info.value.reason


def with_token(field: str, token: str) -> bytes:
    """A valid reading whose ``field`` holds a raw JSON token (NaN, 1e400...)."""
    text = raw(reading()).decode()
    old = '"torque_nm": 40.0' if field == "torque_nm" else f'"ts": {NOW}'
    assert old in text
    return text.replace(old, old.split(": ", maxsplit=1)[0] + ": " + token).encode()


def test_valid_reading_decodes() -> None:
    """A well-formed reading on its own topic decodes to the same Telemetry."""
    decoded = decoder().decode(message(raw(reading())))
    assert decoded == Telemetry(**reading())


def test_valid_reading_of_registered_machine_decodes() -> None:
    """With a machine registry, a registered machine's reading is accepted."""
    dec = decoder(frozenset({"mill-01", "mill-02"}))
    assert dec.decode(message(raw(reading()))).machine_id == "mill-01"


@pytest.mark.parametrize(
    "payload",
    [
        b"{",
        b"not json",
        b"{'machine_id': 'mill-01'}",
        b'{"machine_id": "mill-01",}',
        raw(reading()) + b"garbage",
        raw(reading()) + b"\x00",
        b"\xef\xbb\xbf" + raw(reading()),  # a UTF-8 byte-order mark is not JSON
        b" ",
    ],
)
def test_invalid_json(payload: bytes) -> None:
    """Bytes that are UTF-8 but not one JSON document are rejected as invalid_json."""
    assert reason_of(payload) == "invalid_json"


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"\xc3\x28", b'{"machine_id": "mill-\xe9"}', "é".encode("latin-1"), b"\x80"],
)
def test_not_utf8(payload: bytes) -> None:
    """Bytes that are not valid UTF-8 are rejected as not_utf8."""
    assert reason_of(payload) == "not_utf8"


def test_empty_payload() -> None:
    """A zero-length payload is rejected as empty_payload."""
    assert reason_of(b"") == "empty_payload"


@pytest.mark.parametrize("payload", [b"null", b'"reading"', b"[]", b"[1, 2]", b"42", b"true"])
def test_top_level_non_object(payload: bytes) -> None:
    """A top-level null, string, list, number or boolean is rejected as schema."""
    assert reason_of(payload) == "schema"


@pytest.mark.parametrize(
    "data",
    [
        reading(firmware="1.2"),  # unknown key
        {k: v for k, v in reading().items() if k != "seq"},  # missing key
        {k: v for k, v in reading().items() if k != "readings"},
        reading(seq="12"),  # wrong types
        reading(readings={**reading()["readings"], "torque_nm": True}),
        reading(readings={**reading()["readings"], "torque_nm": "40"}),
        reading(readings={f"ch_{i}": 1.0 for i in range(65)}),  # too many channels
        reading(product_type="Q"),
    ],
)
def test_schema(data: dict[str, Any]) -> None:
    """Valid JSON that breaks the Telemetry schema is rejected as schema."""
    assert reason_of(raw(data)) == "schema"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("field", ["torque_nm", "ts"])
def test_non_finite(token: str, field: str) -> None:
    """NaN, Infinity and overflowing numbers are rejected as non_finite."""
    assert reason_of(with_token(field, token)) == "non_finite"


def test_oversize() -> None:
    """A payload one byte over the limit is rejected as oversize, even if it is valid JSON."""
    base = raw(reading())
    payload = base[:-1] + b" " * (MAX_PAYLOAD_BYTES + 1 - len(base)) + b"}"
    assert len(payload) == MAX_PAYLOAD_BYTES + 1
    assert reason_of(payload) == "oversize"


def test_at_size_limit_is_not_oversize() -> None:
    """A valid reading padded to exactly the size limit still decodes."""
    payload = raw(reading())[:-1]
    payload += b" " * (MAX_PAYLOAD_BYTES - len(payload) - 1) + b"}"
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert decoder().decode(message(payload)).seq == 3


def test_very_deep_nesting_is_rejected_without_crashing() -> None:
    """``[[[[...]]]]`` 100000 deep is rejected (by size) instead of crashing the decoder."""
    depth = 100_000
    assert reason_of(b"[" * depth + b"]" * depth) == "oversize"


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'{"readings": {"torque_nm": ' + b"[" * 5_000 + b"]" * 5_000 + b"}}",
    ],
)
def test_deep_nesting_under_size_limit_is_rejected(payload: bytes) -> None:
    """Deep nesting that fits the size limit hits the parser's depth limit: invalid_json."""
    assert len(payload) <= MAX_PAYLOAD_BYTES
    assert reason_of(payload) == "invalid_json"


@pytest.mark.parametrize(
    "data",
    [reading(machine_id="mill-02"), reading(line="line2"), reading(machine_id="MILL-01")],
)
def test_topic_mismatch(data: dict[str, Any]) -> None:
    """A payload whose machine id or line disagrees with its topic is rejected."""
    assert reason_of(raw(data)) == "topic_mismatch"


@pytest.mark.parametrize("offset", [-SKEW - 1, SKEW + 1, -30 * 86400.0, 365 * 86400.0])
def test_clock_skew(offset: float) -> None:
    """Timestamps beyond the allowed skew in the past or future are rejected as clock_skew."""
    assert reason_of(raw(reading(ts=NOW + offset))) == "clock_skew"


@pytest.mark.parametrize("offset", [-SKEW, SKEW, 0.0])
def test_clock_skew_limit_is_inclusive(offset: float) -> None:
    """A timestamp exactly at the skew limit is still accepted."""
    assert decoder().decode(message(raw(reading(ts=NOW + offset)))).ts == NOW + offset


@pytest.mark.parametrize("channel", AI4I_CHANNELS)
def test_missing_channel(channel: str) -> None:
    """A reading without one of the model's channels is rejected as missing_channel."""
    channels = {k: v for k, v in reading()["readings"].items() if k != channel}
    with pytest.raises(PayloadError) as info:
        decoder().decode(message(raw(reading(readings=channels))))
    assert info.value.reason == "missing_channel"
    assert channel in info.value.detail


def test_extra_channels_are_accepted() -> None:
    """Channels beyond the model's are allowed (and kept) in an otherwise valid reading."""
    channels = {**reading()["readings"], "vibration_mm_s": 2.5}
    decoded = decoder().decode(message(raw(reading(readings=channels))))
    assert decoded.readings["vibration_mm_s"] == 2.5


@pytest.mark.parametrize(
    "topic",
    [
        "other/telemetry/line1/mill-01",
        "factory/telemetry/line1",
        "factory/telemetry/line1/mill-01/x",
        "factory/telemetry/+/mill-01",
        "factory/telemetry/line1/#",
        "factory/alerts/line1/mill-01/verdict",
    ],
)
def test_bad_topic(topic: str) -> None:
    """A message on a topic that is not a telemetry topic is rejected as bad_topic."""
    assert reason_of(raw(reading()), topic=topic) == "bad_topic"


def test_bad_topic_wins_over_bad_payload() -> None:
    """The topic is checked first: garbage on a foreign topic is still bad_topic."""
    assert reason_of(b"\xff", topic="elsewhere") == "bad_topic"


def test_trailing_newline_in_topic_is_bad_topic() -> None:
    """A topic whose machine level ends in a newline is rejected as bad_topic."""
    assert reason_of(raw(reading()), topic=TOPIC + "\n") == "bad_topic"


def test_unknown_machine() -> None:
    """With a machine registry, a reading from an unregistered machine is rejected."""
    dec = decoder(frozenset({"mill-02"}))
    assert reason_of(raw(reading()), dec=dec) == "unknown_machine"


def test_no_registry_accepts_any_machine() -> None:
    """Without a registry any well-formed machine id is accepted."""
    topic = TOPICS.telemetry("line1", "brand-new")
    decoded = decoder().decode(message(raw(reading(machine_id="brand-new")), topic))
    assert decoded.machine_id == "brand-new"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe{",
        b"",
        raw(reading(machine_id="mill-02")),
        b"[" * 100_000,
        with_token("torque_nm", "NaN"),
        b'{"x": "\xc3',  # cut inside a two-byte UTF-8 character
    ],
)
def test_dead_letter_is_valid_json_with_the_reason(payload: bytes) -> None:
    """dead_letter() of a rejected message encodes to valid strict JSON naming the reason."""
    msg = message(payload)
    with pytest.raises(PayloadError) as info:
        decoder().decode(msg)
    letter = dead_letter(msg, info.value)
    wire = letter.encode()
    parsed = json.loads(wire, parse_constant=lambda c: pytest.fail(f"constant {c} in JSON"))
    assert parsed["reason"] == info.value.reason
    assert parsed["topic"] == TOPIC
    assert parsed["payload_bytes"] == len(payload)
    assert len(parsed["payload_excerpt"]) <= 200
    assert len(parsed["detail"]) <= 500
    assert DeadLetter.model_validate_json(wire) == letter
