"""Finding 1 (detector side): a gateway speaks only for its registered machines; invented
machines never create state. Real Mosquitto, real detector, registry from `broker`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.contracts import DeadLetter, Telemetry, TelemetryBatch, Verdict
from factorywatch.credentials import init_secrets
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import Collector, Proc, add_account, login_settings, secure_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _readings(machine: str, count: int, seed: int) -> list[Telemetry]:
    sim = MachineSimulator(machine, "line1", seed=seed, anomaly_rate=0.0)
    now = time.time()
    return [sim.next(now + i / 1000) for i in range(count)]


def test_gateway_cannot_speak_for_other_or_invented_machines(
    spawn: Callable[..., Proc], model_dir: Path, tmp_path: Path, topic_root: str
) -> None:
    """gw1 (registered for mc, md) sends a batch with mc, md, ma (a machine with its own
    account) and 300 invented ids: only mc and md get verdicts; ma is dead-lettered
    unauthorized_machine, the invented ones unknown_machine, and no state is created."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("ma",))
    add_account(secrets, "gw1", "gateway", line="line1", machines=("mc", "md"))
    broker = LocalBroker(tmp_path / "broker", secrets_dir=secrets, topic_root=topic_root).start()
    topics = Topics(topic_root)

    def login(user: str) -> BrokerSettings:
        return login_settings(broker.port, topic_root, secrets, user)

    filters = [f"{topic_root}/alerts/#", f"{topic_root}/deadletter/#"]
    monitor = Collector(login("monitor"), filters, "mon")
    try:
        det = spawn(
            "detect",
            *secure_args(broker.port, topic_root, secrets),
            "--model-dir",
            str(model_dir),
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            "0",
        )
        det.wait_log("telemetry_subscribed")
        mixed = [*_readings("mc", 3, 1), *_readings("md", 3, 2), *_readings("ma", 3, 3)]
        invented = [
            r.model_copy(update={"machine_id": f"ghost-{i}"})
            for i, r in enumerate(_readings("x", 300, 4))
        ]
        marker = _readings("mc", 1, 5)[0].model_copy(update={"seq": 7})
        gateway = fwmqtt.connected_client(login("gw1"), "gw1")
        topic = topics.batch("line1", "gw1")
        for readings in (mixed, invented, [marker]):
            payload = TelemetryBatch(readings=readings).encode()
            gateway.publish(topic, payload, qos=1).wait_for_publish(10)
        gateway.disconnect()
        gateway.loop_stop()
        # One detector answers in order: once the marker's verdict is here, all is.
        assert monitor.wait_for(
            lambda m: m.topic.endswith("/mc/verdict") and b'"seq":7,' in m.payload
        )
        letters = monitor.matching(lambda m: "/deadletter/" in m.topic)
        verdicts = monitor.matching(lambda m: m.topic.endswith("/verdict"))
        reasons = [DeadLetter.model_validate_json(m.payload).reason for m in letters]
        assert reasons.count("unauthorized_machine") == 3
        assert reasons.count("unknown_machine") == 300
        assert {Verdict.model_validate_json(m.payload).machine_id for m in verdicts} == {"mc", "md"}
        assert monitor.matching(lambda m: "/ghost-" in m.topic or "/ma/" in m.topic) == []
    finally:
        monitor.close()
        broker.stop()
