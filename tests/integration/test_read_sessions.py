"""Watching from several places: one read-only login per session, as docs/guides/security.md
decides (a login is its client id; Mosquitto takes a session over on a reused id)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.credentials import init_secrets
from factorywatch.topics import Topics
from tests.support import Collector, add_account, login_settings

pytestmark = pytest.mark.integration
VERDICTS = 20


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service accounts, one machine, and a second read-only login as the docs add it."""
    directory = tmp_path_factory.mktemp("secrets")
    init_secrets(directory, ("machine-a",))
    add_account(directory, "viewer-2", "viewer")
    return directory


def test_two_read_only_logins_both_receive_every_verdict(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> None:
    """`viewer` and a second viewer-role login, watching at once, each get all verdicts."""
    topics = Topics(topic_root)
    watchers = [
        Collector(
            login_settings(secure_broker.port, topic_root, secrets_dir, user),
            [topics.alerts_filter],
            user,
        )
        for user in ("viewer", "viewer-2")
    ]
    detector = fwmqtt.connected_client(
        login_settings(secure_broker.port, topic_root, secrets_dir, "detector"), "detector"
    )
    try:
        for i in range(VERDICTS):
            detector.publish(topics.verdict("line1", "machine-a"), f"v{i}", qos=1)
        for watcher in watchers:
            got = watcher.wait_for(lambda m: m.topic.endswith("/verdict"), count=VERDICTS)
            assert sorted(m.payload for m in got) == sorted(
                f"v{i}".encode() for i in range(VERDICTS)
            )
    finally:
        detector.disconnect()
        detector.loop_stop()
        for watcher in watchers:
            watcher.close()


def test_a_second_session_of_one_login_takes_the_first_over(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> None:
    """Whatever client id it asks for, a second `viewer` connection closes the first one."""
    settings = login_settings(secure_broker.port, topic_root, secrets_dir, "viewer")
    dropped = threading.Event()
    first = fwmqtt.connected_client(settings, f"first-{uuid.uuid4().hex[:6]}")

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        dropped.set()

    first.on_disconnect = on_disconnect
    first.reconnect_delay_set(min_delay=30, max_delay=30)  # no ping-pong while we look
    second = fwmqtt.connected_client(settings, f"second-{uuid.uuid4().hex[:6]}")
    try:
        assert dropped.wait(10), "the first viewer session stayed connected"
        assert second.is_connected()
    finally:
        for client in (first, second):
            client.disconnect()
            client.loop_stop()
