"""Issue #26: a machine added while the detector runs is scored without a restart, and a
removed one's next reading is dead-lettered saying so. Real Mosquitto with logins, a real
`factorywatch detect`, accounts changed with the real `factorywatch broker add-user` /
`remove-user` (the functions the web view's accounts page calls)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.contracts import DeadLetter, Verdict
from factorywatch.credentials import init_secrets
from factorywatch.errors import BrokerError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import (
    Collector,
    Message,
    Proc,
    login_settings,
    reading,
    run_cli,
    secure_args,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timing]

#: the detector's reload cadence here (seconds): a removal applies within it
RELOAD_S = 1.0


def _about(machine: str, kind: str) -> Callable[[Message], bool]:
    """Messages of ``kind`` (``verdict``, ``deadletter``) about ``machine``."""
    if kind == "deadletter":
        return lambda m: "/deadletter/" in m.topic and m.topic.endswith(f"/{machine}")
    return lambda m: m.topic.endswith(f"/{machine}/{kind}")


def _seq(message: Message) -> int:
    """The reading's sequence number, from its verdict or its dead letter's excerpt."""
    if message.topic.endswith("/verdict"):
        return Verdict.model_validate_json(message.payload).seq
    excerpt = DeadLetter.model_validate_json(message.payload).payload_excerpt
    found = re.search(r'"seq":\s*(\d+)', excerpt)
    assert found, excerpt
    return int(found.group(1))


def test_an_added_machine_is_scored_and_a_removed_one_dead_lettered_without_a_restart(
    spawn: Callable[..., Proc], model_dir: Path, tmp_path: Path, topic_root: str
) -> None:
    """weld-4, unknown when the detector started, is added with `broker add-user` (and the
    broker reloaded, as the view does): its first reading gets a verdict from the same
    detector process. Removed with `broker remove-user`, its connection still open (the
    broker not reloaded yet), its next reading is dead-lettered `unknown_machine` 'removed
    from the registry' within the detector's reload cadence; no reading is answered twice."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    broker = LocalBroker(tmp_path / "broker", secrets_dir=secrets, topic_root=topic_root).start()
    topics = Topics(topic_root)

    def login(user: str) -> BrokerSettings:
        return login_settings(broker.port, topic_root, secrets, user, connect_retries=0)

    filters = [f"{topic_root}/alerts/#", f"{topic_root}/deadletter/#"]
    monitor = Collector(login("monitor"), filters, "mon")
    weld: mqtt.Client | None = None
    try:
        det = spawn(
            "detect", *secure_args(broker.port, topic_root, secrets),
            "--model-dir", str(model_dir), "--state-dir", str(tmp_path / "state"),
            "--metrics-port", "0",
            env={"FACTORYWATCH_DETECTOR_RELOAD_INTERVAL_S": str(RELOAD_S)},
        )  # fmt: skip
        det.wait_log("telemetry_subscribed")
        pid = det.process.pid

        added = run_cli("broker", "add-user", "weld-4", "--line", "line1", "--secrets-dir",
                        str(secrets))  # fmt: skip
        assert added.returncode == 0, added.stderr
        broker.reload()
        weld = wait_until(
            lambda: fwmqtt.connected_client(login("weld-4"), "weld-4"),
            what="the reloaded broker to let weld-4 in",
            errors=(BrokerError,),
        )
        topic = topics.telemetry("line1", "weld-4")
        for seq in (1, 2, 3):
            weld.publish(topic, reading("weld-4", seq).encode(), qos=1).wait_for_publish(10)
        assert monitor.wait_for(lambda m: _about("weld-4", "verdict")(m) and _seq(m) == 3)
        verdicts = monitor.matching(_about("weld-4", "verdict"))
        assert sorted(_seq(m) for m in verdicts) == [1, 2, 3]  # each once, none dead-lettered
        assert monitor.matching(_about("weld-4", "deadletter")) == []
        assert det.process.poll() is None
        assert det.process.pid == pid
        assert det.log().count("detector_started") == 1  # the same detector, never restarted

        removed = run_cli("broker", "remove-user", "weld-4", "--secrets-dir", str(secrets))
        assert removed.returncode == 0, removed.stderr
        started = time.monotonic()
        # the detector's reload cadence reads the changed file (no restart, no signal)
        det.wait_log('"machines_removed": ["weld-4"]', timeout=30)
        assert time.monotonic() - started < RELOAD_S + 5.0
        # the old ACL still admits the open connection: the detector is the fence now
        weld.publish(topic, reading("weld-4", 4).encode(), qos=1).wait_for_publish(10)
        (letter,) = monitor.wait_for(lambda m: _about("weld-4", "deadletter")(m) and _seq(m) == 4)
        dead = DeadLetter.model_validate_json(letter.payload)
        assert dead.reason == "unknown_machine"
        assert "removed from the registry" in dead.detail
        assert sorted(_seq(m) for m in monitor.matching(_about("weld-4", "verdict"))) == [1, 2, 3]
        assert det.log().count("detector_started") == 1
    finally:
        if weld is not None:
            weld.disconnect()
            weld.loop_stop()
        monitor.close()
        broker.stop()
