"""The decoder's fuzz target: any bytes on any topic are a valid reading or a dead letter.

``check(data)`` is the whole target, shared by the coverage-guided atheris run
(``tests/fuzz/fuzz_decoder.py``, ``make fuzz``) and the hypothesis test in ``make test``.
The first byte picks the topic (telemetry, a gateway's batch, an invented one) and whether
the account registry is consulted; the rest is the payload. Invariants:

- nothing but ``PayloadError`` escapes, always with a documented reason;
- an accepted reading agrees with its topic, is registered for its sender, lies within the
  clock limits, carries every channel the model needs, holds only finite numbers and
  round-trips through its own encoding.
"""

from __future__ import annotations

import math
from typing import Final

from factorywatch.accounts import AccountRegistry
from factorywatch.contracts import AI4I_CHANNELS, MAX_BATCH_READINGS, Telemetry, TelemetryBatch
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.detector.registry import Registry
from factorywatch.errors import DEAD_LETTER_REASONS, PayloadError
from factorywatch.topics import Topics

NOW: Final = 1.7e9
PAST_S: Final = 7 * 86400.0
FUTURE_S: Final = 300.0
TOPICS: Final = Topics("fz")
REGISTRY: Final = Registry.from_accounts(
    AccountRegistry().with_machine("m1", "line1").with_gateway("gw1", ["m2", "m3"], "line1")
)
_TOPICS: Final = (
    TOPICS.telemetry("line1", "m1"),
    TOPICS.batch("line1", "gw1"),
    TOPICS.telemetry("line2", "m9"),
    TOPICS.batch("line7", "gw9"),
)
_DECODERS: Final = tuple(
    Decoder(
        TOPICS,
        channels=AI4I_CHANNELS,
        max_clock_skew_s=PAST_S,
        max_future_skew_s=FUTURE_S,
        registry=registry,
    )
    for registry in (None, REGISTRY)
)


def _accepted(reading: Telemetry, topic: str, decoder: Decoder) -> None:
    gateway = "/batch/" in topic
    line, sender = (TOPICS.parse_batch if gateway else TOPICS.parse_telemetry)(topic)
    assert reading.line == line
    assert gateway or reading.machine_id == sender
    if decoder.registry is not None:
        assert decoder.registry.check(sender, reading.machine_id, line) is None
    assert -PAST_S <= reading.ts - NOW <= FUTURE_S
    assert all(c in reading.readings for c in AI4I_CHANNELS)
    assert all(math.isfinite(v) for v in reading.readings.values())
    assert Telemetry.model_validate_json(reading.encode()) == reading


def _rejected(error: PayloadError) -> None:
    assert error.reason in DEAD_LETTER_REASONS, error.reason


def check(data: bytes) -> None:
    """Run one fuzz input through the decoder and check the invariants."""
    selector, payload = (data[0], data[1:]) if data else (0, b"")
    topic = _TOPICS[selector % len(_TOPICS)]
    decoder = _DECODERS[(selector >> 2) % 2]
    message = Received(topic, payload, NOW, 0.0)
    try:
        if "/batch/" in topic:
            items = decoder.decode_batch(message)
            assert 0 < len(items) <= MAX_BATCH_READINGS
        else:
            items = [decoder.decode(message)]
    except PayloadError as error:
        _rejected(error)
        return
    for item in items:
        if isinstance(item, PayloadError):
            _rejected(item)
        else:
            _accepted(item, topic, decoder)


def seeds() -> list[bytes]:
    """Valid and nearly valid inputs to start from (the fuzzer mutates these)."""
    reading = Telemetry(
        machine_id="m1",
        line="line1",
        seq=1,
        ts=NOW,
        attributes={"product_type": "L"},
        readings=dict.fromkeys(AI4I_CHANNELS, 300.0),
    )
    other = reading.model_copy(update={"machine_id": "m2", "seq": 2, "ts": NOW + 200})
    batch = TelemetryBatch(readings=[other, reading]).encode()
    return [
        b"\x00" + reading.encode(),
        b"\x04" + reading.encode(),
        b"\x01" + batch,
        b"\x05" + batch,
        b"\x00" + reading.encode().replace(b"1700000000.0", b"1700000000000"),
        b"\x05" + batch.replace(b"300.0", b"1e308"),
    ]
