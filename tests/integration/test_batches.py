"""Batched payloads from a gateway: one verdict per reading, bad readings rejected alone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import DeadLetter, TelemetryBatch, Verdict
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import Collector, Proc, duplicated, verdict_counts

pytestmark = pytest.mark.integration


def test_a_gateway_batch_yields_one_verdict_per_reading_and_rejects_bad_ones_alone(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """200 readings of 5 machines in one message -> 200 verdicts; 2 bad of 5 -> 3 + 2 letters.

    Each reading gets exactly one verdict: a last batch (machine ``gw-end``) marks the end,
    and as the detector answers in order, every verdict before it (duplicates included) has
    arrived once its verdict has; then verdicts are counted per ``(machine, seq)``.
    """
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter, topics.deadletter_filter)
    detector()
    now = time.time()
    sims = [MachineSimulator(f"gw-m{i}", "line1", seed=i) for i in range(5)]
    good = TelemetryBatch(readings=[sims[i % 5].next(now + i / 1000) for i in range(200)])
    mixed = [sims[0].next(now + 1).model_dump(exclude_none=True) for _ in range(5)]
    mixed[1]["readings"]["torque_nm"] = float("nan")
    mixed[3]["line"] = "another-line"
    end = TelemetryBatch(readings=[MachineSimulator("gw-end", "line1", seed=9).next(now + 2)])
    client = fwmqtt.connected_client(settings, "gateway-1")
    topic = topics.batch("line1", "gateway-1")
    for payload in (
        good.encode(),
        json.dumps({"schema_version": 1, "readings": mixed}).encode(),
        b'{"readings": "not a list"}',
        end.encode(),
    ):
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()

    assert col.wait_for(lambda m: m.topic.endswith("/gw-end/verdict"), timeout=30)
    verdicts = col.matching(
        lambda m: m.topic.endswith("/verdict") and not m.topic.endswith("/gw-end/verdict")
    )
    letters = col.matching(lambda m: "/deadletter/" in m.topic)
    parsed = [Verdict.model_validate_json(m.payload) for m in verdicts]
    per_reading = verdict_counts(verdicts)
    assert len(per_reading) == 203
    assert duplicated(per_reading) == {}, "a reading got more than one verdict"
    assert {v.machine_id for v in parsed} == {f"gw-m{i}" for i in range(5)}
    for v, m in zip(parsed, verdicts, strict=True):
        assert m.topic == topics.verdict("line1", v.machine_id), "each on its machine's topic"
    reasons = sorted(DeadLetter.model_validate_json(m.payload).reason for m in letters)
    assert reasons == ["non_finite", "schema", "topic_mismatch"]
    assert all(m.topic == topics.deadletter("line1", "gateway-1") for m in letters)
    assert len(col.matching(lambda m: "/deadletter/" in m.topic)) == 3
