"""The ``mqtt5`` transport on a real Mosquitto: session, redelivery, refusals, TLS, liveness."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.credentials import init_secrets
from factorywatch.detector.engine import Inbound
from factorywatch.detector.mqtt5_transport import Mqtt5Transport
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import login_settings

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87


def _transport(
    settings: BrokerSettings, client_id: str, *, session_s: int = 300, **kw: object
) -> Mqtt5Transport:
    topics = Topics(settings.topic_root)
    return Mqtt5Transport(
        settings,
        client_id,
        filters=[topics.telemetry_filter],
        session_expiry_s=session_s,
        **kw,  # type: ignore[arg-type]
    )


def _drive(
    transport: Mqtt5Transport, until: Callable[[list[Inbound]], bool], timeout_s: float = 15.0
) -> list[Inbound]:
    """Turn the transport (it does I/O only when driven) until ``until(received)`` holds."""
    got: list[Inbound] = []
    deadline = time.monotonic() + timeout_s
    while not until(got) and time.monotonic() < deadline:
        got += transport.receive(0.05)
    return got


def _publish(settings: BrokerSettings, topic: str, payloads: list[bytes]) -> None:
    """Publish at QoS 1 with paho (an independent client) and wait for every PUBACK."""
    client = fwmqtt.connected_client(settings, f"pub-{uuid.uuid4().hex[:8]}")
    try:
        for info in [client.publish(topic, p, qos=1) for p in payloads]:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_session_resumes_and_delivers_what_was_queued_while_down(
    settings: BrokerSettings,
) -> None:
    """Readings published while the driver is away arrive after it reconnects (same id)."""
    topic = Topics(settings.topic_root).telemetry("line1", "m1")
    first = _transport(settings, "det-resume")
    first.connect()
    assert first.connack is not None
    assert not first.connack.session_present
    first.close(1.0)
    payloads = [b"queued-%d" % i for i in range(20)]
    _publish(settings, topic, payloads)
    second = _transport(settings, "det-resume")
    second.connect()
    try:
        assert second.connack is not None
        assert second.connack.session_present
        got = _drive(second, lambda g: len(g) >= len(payloads))
        assert [m.payload for m in got] == payloads
    finally:
        second.close(1.0)


def test_unacknowledged_readings_are_redelivered_after_a_crash(
    settings: BrokerSettings,
) -> None:
    """Of ten readings the six not acked before the socket died come back, the four acked not."""
    topic = Topics(settings.topic_root).telemetry("line1", "m1")
    crashed = _transport(settings, "det-crash")
    crashed.connect()
    payloads = [b"r-%d" % i for i in range(10)]
    _publish(settings, topic, payloads)
    got = _drive(crashed, lambda g: len(g) >= 10)
    assert [m.payload for m in got] == payloads
    for message in got[:4]:
        crashed.ack(message.token)
    # The broker reads a connection's packets in order: once it confirms a publish queued
    # after the four PUBACKs, it has taken them, and the crash cannot overtake them.
    confirmed: list[bool] = []
    crashed.publish(f"{settings.topic_root}/sync", b"sync", confirmed=confirmed.append)
    crashed.drain(10.0)
    assert confirmed == [True]
    crashed.abort()
    assert not crashed.is_connected()
    again = _transport(settings, "det-crash")
    again.connect()
    try:
        _publish(settings, topic, [b"marker"])
        redelivered = _drive(again, lambda g: any(m.payload == b"marker" for m in g))
        assert [m.payload for m in redelivered] == [*payloads[4:], b"marker"]
    finally:
        again.close(1.0)


def test_an_ack_of_a_message_from_an_earlier_connection_is_dropped(
    settings: BrokerSettings,
) -> None:
    """A reading received before a reconnect and acked after it is still redelivered."""
    topic = Topics(settings.topic_root).telemetry("line1", "m1")
    transport = _transport(settings, "det-stale")
    transport.connect()
    try:
        _publish(settings, topic, [b"stale"])
        (old,) = _drive(transport, lambda g: len(g) >= 1)
        transport.abort()  # the connection dies with the reading unacknowledged
        again = _drive(transport, lambda g: len(g) >= 1)  # receive reconnects
        assert transport.connections == 2
        transport.ack(old.token)  # names the old connection: nothing is written
        assert [m.payload for m in again] == [b"stale"]
        assert again[0].token != old.token
    finally:
        transport.close(1.0)


def test_publishes_beyond_the_brokers_receive_maximum_wait_and_are_all_confirmed(
    settings: BrokerSettings,
) -> None:
    """1,500 publishes at once: never more in flight than the CONNACK allows, all confirmed."""
    transport = _transport(settings, "det-flow", session_s=0)
    transport.connect()
    try:
        assert transport.connack is not None
        quota = transport.connack.receive_max
        verdict = Topics(settings.topic_root).verdict("line1", "m1")
        confirmed: list[bool] = []
        for i in range(1500):
            transport.publish(verdict, b"v-%d" % i, confirmed=confirmed.append)
        peak = transport.in_flight
        while len(confirmed) < 1500 and transport.is_connected():
            transport.receive(0.05)
            peak = max(peak, transport.in_flight)
        assert quota < 1500
        assert peak <= quota
        assert confirmed == [True] * 1500
    finally:
        transport.close(1.0)


def test_keepalive_pings_keep_an_idle_connection(broker: LocalBroker, topic_root: str) -> None:
    """Idle past 1.5 x keepalive: PINGREQs are answered and the broker keeps the connection."""
    settings = BrokerSettings().with_overrides(
        port=broker.port, topic_root=topic_root, keepalive_s=5
    )
    transport = _transport(settings, "det-idle", session_s=0)
    transport.connect()
    try:
        idle_until = time.monotonic() + 1.6 * settings.keepalive_s
        while time.monotonic() < idle_until:
            assert transport.receive(0.2) == []
        assert transport.pings_answered >= 1
        assert transport.is_connected()
        assert transport.connections == 1
    finally:
        transport.close(1.0)


def test_a_restarted_broker_is_reconnected_with_the_session_kept(
    broker: LocalBroker, settings: BrokerSettings
) -> None:
    """The broker goes away and comes back: the driver reconnects by itself and resumes."""
    transport = _transport(settings, "det-restart")
    transport.connect()
    try:
        broker.stop()
        broker.start()
        topic = Topics(settings.topic_root).telemetry("line1", "m1")
        _drive(transport, lambda _g: transport.connections == 2)
        assert transport.connections == 2
        assert transport.is_connected()
        _publish(settings, topic, [b"after"])
        got = _drive(transport, lambda g: len(g) >= 1)
        assert [m.payload for m in got] == [b"after"]
    finally:
        transport.close(1.0)


# -- a broker with logins, the ACL and a TLS listener -------------------------------------------
@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every role's account and TLS certificates, made at test time."""
    directory = tmp_path_factory.mktemp("secrets")
    init_secrets(directory, ("machine-a",))
    return directory


def test_a_publish_the_acl_denies_is_confirmed_as_refused(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> None:
    """The detector's publish on a machine's telemetry topic gets 0x87: confirmed(False)."""
    settings = login_settings(secure_broker.port, topic_root, secrets_dir, "detector")
    topics = Topics(topic_root)
    transport = _transport(settings, "detector")
    transport.connect()
    try:
        outcomes: dict[str, bool] = {}
        transport.publish(
            topics.telemetry("line1", "machine-a"),
            b"{}",
            confirmed=lambda ok: outcomes.__setitem__("denied", ok),
        )
        transport.publish(
            topics.verdict("line1", "machine-a"),
            b"{}",
            confirmed=lambda ok: outcomes.__setitem__("allowed", ok),
        )
        _drive(transport, lambda _g: len(outcomes) == 2)
        assert outcomes == {"denied": False, "allowed": True}
    finally:
        transport.close(1.0)


def test_tls_listener_carries_readings_and_publishes(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> None:
    """Over the TLS listener (CA from the secrets folder) a reading arrives and a publish is
    confirmed."""
    assert secure_broker.tls_port is not None
    settings = login_settings(
        secure_broker.tls_port,
        topic_root,
        secrets_dir,
        "detector",
        tls_ca=secrets_dir / "certs" / "ca.crt",
    )
    topics = Topics(topic_root)
    transport = _transport(settings, "detector")
    transport.connect()
    try:
        sensor = login_settings(secure_broker.port, topic_root, secrets_dir, "machine-a")
        _publish(sensor, topics.telemetry("line1", "machine-a"), [b"over-tls"])
        got = _drive(transport, lambda g: len(g) >= 1)
        assert [m.payload for m in got] == [b"over-tls"]
        confirmed: list[bool] = []
        transport.publish(topics.verdict("line1", "machine-a"), b"{}", confirmed=confirmed.append)
        transport.ack(got[0].token)
        _drive(transport, lambda _g: bool(confirmed))
        assert confirmed == [True]
    finally:
        transport.close(1.0)


def test_a_reading_confirmed_while_closing_stays_unacknowledged(
    settings: BrokerSettings,
) -> None:
    """A verdict confirmed during close's drain does not ack its reading: it comes back."""
    topics = Topics(settings.topic_root)
    closing = _transport(settings, "det-closing")
    closing.connect()
    _publish(settings, topics.telemetry("line1", "m1"), [b"late"])
    (reading,) = _drive(closing, lambda g: len(g) >= 1)
    confirmed: list[bool] = []

    def settle(ok: bool) -> None:
        confirmed.append(ok)
        closing.ack(reading.token)

    closing.publish(topics.verdict("line1", "m1"), b"{}", confirmed=settle)
    closing.close(5.0)  # the PUBACK of the verdict is read here
    assert confirmed == [True]
    again = _transport(settings, "det-closing")
    again.connect()
    try:
        got = _drive(again, lambda g: len(g) >= 1)
        assert [m.payload for m in got] == [b"late"]
    finally:
        again.close(1.0)


def test_the_newer_process_with_one_identity_fences_the_older_one(
    settings: BrokerSettings,
) -> None:
    """Two drivers with one client id: the older stops for good, the newer keeps the session."""
    lease = Topics(settings.topic_root).lease("detector", "det-fence")
    old_fenced: list[str] = []
    new_fenced: list[str] = []
    old = _transport(settings, "det-fence")
    old.fence(lease, old_fenced.append, settle_s=0.2)
    old.connect()
    _drive(old, lambda _g: old.lease_echoed)
    assert old.lease_echoed
    new = _transport(settings, "det-fence")
    new.fence(lease, new_fenced.append, settle_s=0.2)
    new.connect()  # the broker closes the older connection
    _drive(new, lambda _g: new.lease_echoed)
    try:
        # The older one notices, settles, reconnects once and finds the newer lease retained.
        _drive(old, lambda _g: old.fenced)
        assert old.fenced
        assert len(old_fenced) == 1
        # That reconnect kicked the newer one off once: it comes back and stays.
        _drive(new, lambda _g: new.connections == 2 and new.is_connected())
        assert old.receive(0.05) == []  # lost again, and fenced: no reconnect
        assert not old.is_connected()
        assert old.connections == 2
        new.receive(0.2)
        assert new.is_connected()
        assert new.connections == 2
        assert new_fenced == []
    finally:
        old.close(0.5)
        new.close(0.5)
