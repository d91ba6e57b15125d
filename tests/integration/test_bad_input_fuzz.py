"""Hypothesis-generated garbage through a real broker: each dead-lettered, good ones served."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import DeadLetter, Verdict
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import Collector, Proc

pytestmark = pytest.mark.integration

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
_garbage = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    # almost-valid readings: right keys, wrong values
    st.fixed_dictionaries(
        {
            "machine_id": st.just("fuzz-1"),
            "line": st.just("line1"),
            "seq": st.one_of(st.integers(), st.text(max_size=5), st.none()),
            "ts": st.one_of(st.floats(), st.just(time.time() * 1000)),
            "product_type": st.sampled_from(["L", "M", "H", "X", ""]),
            "readings": st.dictionaries(st.text(max_size=12), st.floats(), max_size=6),
        }
    ).map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture
def running(
    detector: Callable[..., Proc], collector: Callable[..., Collector], settings: BrokerSettings
) -> tuple[Proc, Collector]:
    """One detector and one collector shared by all the generated examples of the test."""
    topics = Topics(settings.topic_root)
    return detector(), collector(topics.alerts_filter, topics.deadletter_filter)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(garbage=st.lists(_garbage, min_size=10, max_size=25))
def test_generated_garbage_is_dead_lettered_and_good_readings_still_get_verdicts(
    running: tuple[Proc, Collector], settings: BrokerSettings, garbage: list[bytes]
) -> None:
    """Every generated payload yields one dead letter, the good readings interleaved all pass."""
    proc, col = running
    topics = Topics(settings.topic_root)
    run = uuid.uuid4().hex[:6]
    sim = MachineSimulator("fuzz-1", "line1", seed=1, seq_start=int(time.time_ns() // 1000))
    good = [sim.next(time.time()) for _ in range(len(garbage))]
    letters_before = len(col.matching(lambda m: "/deadletter/" in m.topic))
    client = fwmqtt.connected_client(settings, f"fuzzer-{run}")
    topic = topics.telemetry("line1", "fuzz-1")
    infos = []
    for bad, reading in zip(garbage, good, strict=True):
        infos.append(client.publish(topic, bad, qos=1))
        infos.append(client.publish(topic, reading.encode(), qos=1))
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    wanted = {r.seq for r in good}
    got = col.wait_for(
        lambda m: (
            m.topic.endswith("/verdict") and Verdict.model_validate_json(m.payload).seq in wanted
        ),
        count=len(good),
        timeout=30,
    )
    assert len(got) == len(good)
    letters = col.wait_for(
        lambda m: "/deadletter/" in m.topic, count=letters_before + len(garbage), timeout=30
    )
    assert len(letters) == letters_before + len(garbage)
    for m in letters[letters_before:]:
        assert DeadLetter.model_validate_json(m.payload).reason
    assert proc.process.poll() is None, "the detector survived"
