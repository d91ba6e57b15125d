"""The benchmark's ceilings run for real: each relay client and Mosquitto's C-client paths."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.ceiling import CeilingProbe
from bench.load import ReadingSource
from bench.relay import CLIENTS, READY
from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.launch import Launched, child_env, module_command
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import PROJECT_DIR, Collector

pytestmark = [pytest.mark.integration, pytest.mark.timing]

COUNT = 300


@pytest.mark.parametrize("client", CLIENTS)
def test_each_relay_client_republishes_every_reading_once(
    client: str,
    broker: LocalBroker,
    settings: BrokerSettings,
    collector: Callable[..., Collector],
    tmp_path: Path,
) -> None:
    """Every relay client (paho 5, 3.1.1, tuned, gmqtt, mqtt5): 300 readings in, 300 out."""
    topics = Topics(settings.topic_root)
    col = collector(f"{settings.topic_root}/alerts/+/+/verdict")
    path = os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")]))
    env = child_env({"PYTHONPATH": path})
    relay = Launched(
        module_command(
            "bench.relay",
            "--port",
            str(broker.port),
            "--root",
            settings.topic_root,
            "--client",
            client,
        ),
        tmp_path / f"relay-{client}.log",
        cwd=PROJECT_DIR,
        env=env,
        name=f"relay-{client}",
    )
    try:
        relay.wait_log(READY, timeout=30)
        source = ReadingSource(5)
        readings = source.take(COUNT)
        publisher = fwmqtt.connected_client(settings, f"relay-test-{client}")
        telemetry = source.topics(settings.topic_root)
        infos = [publisher.publish(telemetry[r.machine], r.payload, qos=1) for r in readings]
        for info in infos:
            info.wait_for_publish(10)
        publisher.disconnect()
        publisher.loop_stop()
        got = col.wait_for(lambda m: m.topic.endswith("/verdict"), count=COUNT, timeout=30)
        assert sorted(m.payload for m in got) == sorted(r.payload for r in readings)
        for m in got:
            assert m.topic.startswith(f"{topics.root}/alerts/line1/m")
    finally:
        code = relay.terminate(timeout=15)
    assert code == 0, relay.log()
    assert f"relay_stopped relayed={COUNT}" in relay.log()


def test_mosquitto_c_clients_measure_one_hop_and_a_c_relay(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """Both C paths deliver every payload (the subscriber exits at the N-th) and time it."""
    probe = CeilingProbe(broker.port, tmp_path / "ceiling")
    payloads = [r.payload for r in ReadingSource(5).take(2000)]
    for run in (probe.one_hop(payloads), probe.c_relay(payloads)):
        assert run.messages == 2000
        assert run.seconds > 0
        assert run.msgs_per_s > 0
