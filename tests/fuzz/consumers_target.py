"""The consumers' fuzz target: any bytes to any consumer's decoder are accepted within every
bound of the wire contracts, or refused with a documented reason; nothing else escapes.

``check(data)`` is shared by the coverage-guided atheris run (``tests/fuzz/fuzz_consumers.py``,
``make fuzz``) and the hypothesis tests. The first byte picks the consumer and its topic:

- the detector's JSON decoder (``tests/fuzz/decoder_target.py``: readings and batches);
- the detector's Sparkplug B ingest (births and data of one edge node, any protobuf bytes);
- the recorder's decoder (readings, batches, alert events, verdicts, feedback);
- the notifier's decoder (alert events and retained states);
- the web view's live model (verdicts, events, states, readings, feedback), then its tiles
  and series serialised as the browser gets them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from factorywatch.accounts import AccountRegistry
from factorywatch.contracts import (
    AI4I_CHANNELS,
    DEFAULT_MAX_FUTURE_SKEW_S,
    DEFAULT_MAX_PAST_SKEW_S,
    MAX_INT,
    AlertEvent,
    FeedbackCommand,
    MachineState,
    Telemetry,
    TelemetryBatch,
    Verdict,
)
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.ingest import Reading
from factorywatch.detector.registry import Registry
from factorywatch.detector.sparkplug import SparkplugIngest
from factorywatch.errors import DEAD_LETTER_REASONS, PayloadError
from factorywatch.history_recorder import decode as recorder_decode
from factorywatch.notify import Notifier, NotifySettings
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from factorywatch.web.live import LiveModel
from tests.fuzz import decoder_target
from tests.sparkplug_edge import TahuEdgeNode

NOW: Final = 1.7e9
MS: Final = int(NOW * 1000)
TOPICS: Final = Topics("fz")
REGISTRY: Final = Registry.from_accounts(
    AccountRegistry().with_machine("m1", "line1").with_gateway("gw1", ["m2", "m3"], "line1")
)
_EDGE: Final = TahuEdgeNode("plant1", "edge1", bd_seq=1)
_SEED_READING: Final = Telemetry(
    machine_id="m1",
    line="line1",
    seq=1,
    ts=NOW,
    attributes={"product_type": "L"},
    readings=dict.fromkeys(AI4I_CHANNELS, 300.0),
)
_SPARKPLUG_TOPICS: Final = (
    _EDGE.nbirth(MS)[0],
    _EDGE.dbirth("mill", _SEED_READING, MS)[0],
    _EDGE.reading_data("mill", _SEED_READING, MS)[0],
    _EDGE.ddeath("mill", MS)[0],
)
_RECORDER_TOPICS: Final = (
    TOPICS.telemetry("line1", "m1"),
    TOPICS.batch("line1", "gw1"),
    TOPICS.event("line1", "m1"),
    TOPICS.verdict("line1", "m1"),
    TOPICS.feedback("line1", "m1"),
)
_NOTIFIER_TOPICS: Final = (TOPICS.event("line1", "m1"), TOPICS.state("line1", "m1"))
_WEB_TOPICS: Final = (
    TOPICS.verdict("line1", "m1"),
    TOPICS.event("line1", "m1"),
    TOPICS.state("line1", "m1"),
    TOPICS.telemetry("line1", "m1"),
    TOPICS.feedback("line1", "m1"),
)
_WEB: Final = LiveModel(TOPICS)
CONSUMERS: Final = 5
_INGEST: Final = SparkplugIngest()
_NOTIFIER: Final = Notifier(BrokerSettings(topic_root="fz"), NotifySettings())


def _refused(error: PayloadError) -> None:
    assert error.reason in DEAD_LETTER_REASONS, error.reason


def _bounded(reading: Telemetry, *, past_s: float | None) -> None:
    assert 0 <= reading.seq <= MAX_INT
    assert reading.ts - NOW <= DEFAULT_MAX_FUTURE_SKEW_S
    assert past_s is None or NOW - reading.ts <= past_s
    assert all(math.isfinite(v) for v in reading.readings.values())
    assert Telemetry.model_validate_json(reading.encode()) == reading


def _sparkplug(selector: int, payload: bytes) -> None:
    topic = _SPARKPLUG_TOPICS[selector % len(_SPARKPLUG_TOPICS)]
    try:
        items = _INGEST.decode(Received(topic, payload, NOW, 0.0))
    except PayloadError as error:
        _refused(error)
        return
    for item in items:
        if isinstance(item, PayloadError):
            _refused(item)
        else:
            assert isinstance(item, Reading)
            assert all(math.isfinite(v) for v in item.telemetry.readings.values())
    _INGEST.take_effects(NOW)
    _INGEST.changes()


def _recorder(selector: int, payload: bytes) -> None:
    topic = _RECORDER_TOPICS[selector % len(_RECORDER_TOPICS)]
    try:
        decoded: Any = recorder_decode(TOPICS, topic, payload, NOW, REGISTRY)
    except PayloadError as error:
        _refused(error)
        return
    if decoded is None:
        return
    if isinstance(decoded, list):
        for item in decoded:
            if isinstance(item, PayloadError):
                _refused(item)
            else:
                _bounded(item, past_s=DEFAULT_MAX_PAST_SKEW_S)
                assert (
                    REGISTRY.check("gw1" if "/batch/" in topic else "m1", item.machine_id) is None
                )
        return
    assert isinstance(decoded, (AlertEvent, Verdict, FeedbackCommand))
    for _name, value in decoded.event_times():
        assert value - NOW <= DEFAULT_MAX_FUTURE_SKEW_S
    assert type(decoded).model_validate_json(decoded.encode()) == decoded


def _notifier(selector: int, payload: bytes) -> None:
    topic = _NOTIFIER_TOPICS[selector % len(_NOTIFIER_TOPICS)]
    alerts = _NOTIFIER.handle(topic, payload, NOW)
    assert isinstance(alerts, list)


def _web(selector: int, payload: bytes) -> None:
    topic = _WEB_TOPICS[selector % len(_WEB_TOPICS)]
    key = _WEB.feed(topic, payload, NOW)
    if key is not None:
        machine = _WEB.machines.get(key)
        if machine is not None:
            json.dumps(machine.full(), allow_nan=False)  # what the browser is sent


def check(data: bytes) -> None:
    """Run one fuzz input through the consumer its first byte picks; check the invariants."""
    selector, payload = (data[0], data[1:]) if data else (0, b"")
    consumer, rest = selector % CONSUMERS, selector // CONSUMERS
    if consumer == 0:  # the payload starts with the JSON decoder target's own selector
        decoder_target.check(payload)
    elif consumer == 1:
        _sparkplug(rest, payload)
    elif consumer == 2:
        _recorder(rest, payload)
    elif consumer == 3:
        _notifier(rest, payload)
    else:
        _web(rest, payload)


def seeds() -> list[bytes]:
    """Valid and nearly valid inputs for every consumer (the fuzzer mutates these)."""
    reading = _SEED_READING
    batch = TelemetryBatch(readings=[reading.model_copy(update={"machine_id": "m2"})]).encode()
    event = AlertEvent(
        machine_id="m1", line="line1", event="ALERT_RAISED", at=NOW, seq=7, alert_id="m1-7",
        peak_score=0.7,
    ).encode()  # fmt: skip
    verdict = Verdict(
        machine_id="m1", line="line1", seq=7, reading_ts=NOW, status="ALERT", score=0.7,
        threshold=0.6, model_version="v1", latency_ms=1.0,
    ).encode()  # fmt: skip
    state = MachineState(
        machine_id="m1", line="line1", state="ALERT", since=NOW, alert_id="m1-7", window_size=5
    ).encode()
    feedback = FeedbackCommand(
        machine_id="m1", alert_id="m1-7", label="false_alarm", by="ana", at=NOW
    ).encode()
    huge = reading.encode().replace(b'"seq":1', b'"seq":1180591620717411303424')
    seeds = [bytes([0]) + s for s in decoder_target.seeds()]
    n = CONSUMERS
    seeds += [
        bytes([1]) + _EDGE.nbirth(MS)[1],
        bytes([1 + n]) + _EDGE.dbirth("mill", reading, MS)[1],
        bytes([1 + 2 * n]) + _EDGE.reading_data("mill", reading, MS + 1)[1],
    ]
    seeds += [
        bytes([2 + n * i]) + s
        for i, s in enumerate([reading.encode(), batch, event, verdict, feedback])
    ]
    seeds += [bytes([2]) + huge, bytes([3]) + event, bytes([3 + n]) + state, bytes([3]) + huge]
    seeds += [
        bytes([4 + n * i]) + s
        for i, s in enumerate([verdict, event, state, reading.encode(), feedback])
    ]
    seeds += [bytes([4 + 3 * n]) + huge]
    return seeds
