"""Scale-out: detectors sharded by production line, each machine served by exactly one."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from factorywatch.contracts import Verdict
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import (
    Collector,
    Proc,
    await_end_marker,
    metric_value,
    not_marker,
    scrape,
)

pytestmark = pytest.mark.integration


def _readings_received(port: int) -> float:
    status, body = scrape(port, "/metrics")
    assert status == 200
    return metric_value(body, "factorywatch_readings_received_total")


def test_two_detectors_split_by_line_score_each_reading_exactly_once(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """`--lines` shards: line A's readings go to one detector, line B's to the other, once."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    first = detector("--lines", "line-a", client_id="detector-a")
    second = detector("--lines", "line-b,line-c", client_id="detector-b")
    now = time.time()
    plan = {"line-a": ["a1", "a2"], "line-b": ["b1"], "line-c": ["c1"]}
    for line, machines in plan.items():
        for machine in machines:
            sim = MachineSimulator(machine, line, seed=len(machine))
            pub = SensorPublisher(settings, machine, buffer_size=1000)
            pub.start()
            for i in range(50):
                pub.publish(sim.next(now + i / 100))
            assert pub.close().acknowledged == 50
    for line in ("line-a", "line-b"):  # one marker through each detector
        await_end_marker(settings, col, line)
    verdicts = [
        Verdict.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith("/verdict") and not_marker(m))
    ]
    assert len(verdicts) == 200
    assert len({(v.machine_id, v.seq) for v in verdicts}) == 200
    assert first.metrics_port is not None
    assert second.metrics_port is not None
    assert _readings_received(first.metrics_port) == 100 + 1  # + its end marker
    assert _readings_received(second.metrics_port) == 100 + 1
