"""A sensor restarted with the same --seq-start is told its readings were refused, and why."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from factorywatch.contracts import Telemetry
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.settings import BrokerSettings
from tests.support import Collector, Proc, reading, wait_until

pytestmark = pytest.mark.integration


def _reading(seq: int, ts: float) -> Telemetry:
    return reading("reuse-1", seq, ts=ts, product_type="M")


def test_reused_sequence_numbers_are_dead_lettered_and_the_sensor_hears_it(
    detector: Callable[..., Proc],
    settings: BrokerSettings,
    collector: Callable[..., Collector],
) -> None:
    """Same (machine, seq) with new content: no verdict, dead letter duplicate_id, and the
    restarted sensor counts and logs each rejection; a plain redelivery stays silent."""
    detector()
    col = collector(f"{settings.topic_root}/alerts/+/reuse-1/verdict")
    first = SensorPublisher(settings, "reuse-1", buffer_size=100)
    first.start()
    now = time.time()
    for seq in range(3):
        first.publish(_reading(seq, now + seq))
    assert len(col.wait_for(lambda m: True, count=3)) == 3
    stats = first.close()
    assert stats.rejected == 0
    again = SensorPublisher(settings, "reuse-1", buffer_size=100)
    again.start()
    for seq in range(3):
        again.publish(_reading(seq, now + 10 + seq))  # the restart reused --seq-start 0
    again.publish(_reading(3, now + 13))  # a fresh sequence number still gets its verdict
    assert len(col.wait_for(lambda m: True, count=4)) == 4
    wait_until(lambda: again.stats.rejected == 3, 30, "the three rejections")
    assert again.rejections == {"duplicate_id": 3}
    again.close()
    assert len(col.messages) == 4
