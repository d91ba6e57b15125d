"""Least privilege on a real Mosquitto with broker/mosquitto.conf and broker/acl, secure mode.

Every denial is shown for real: CONNACK refusals, PUBACK reason 0x87 (MQTT 5), silent drops
(MQTT 3.1.1) and "subscribe, publish, nothing arrives" for reads.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import SecretStr

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.credentials import init_secrets, read_password
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import Collector, Proc, add_account

pytestmark = pytest.mark.integration
MACHINES = ("machine-a", "machine-b")
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Users for every role and both machines, plus TLS certificates (made at test time)."""
    directory = tmp_path_factory.mktemp("secrets")
    init_secrets(directory, MACHINES)
    # A login is a client id (one connection per account): the test's own observer.
    add_account(directory, "monitor-tests", "monitor")
    return directory


@pytest.fixture
def as_user(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> Callable[..., BrokerSettings]:
    """Broker settings for one user of the secure broker."""

    def make(user: str | None, *, password: str | None = None, tls: bool = False) -> BrokerSettings:
        base = BrokerSettings().with_overrides(
            port=secure_broker.tls_port if tls else secure_broker.port,
            topic_root=topic_root,
            connect_retries=0,
            tls_ca=secrets_dir / "certs" / "ca.crt" if tls else None,
        )
        if user is None:
            return base
        secret = password if password is not None else read_password(secrets_dir, user)
        return base.with_overrides(username=user, password=SecretStr(secret or ""))

    return make


class _Client:
    """A connected paho client that records PUBACK reason codes per message id."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.acks: dict[int, Any] = {}
        self.event = threading.Condition()
        self.client = fwmqtt.new_client(settings, f"sec-{uuid.uuid4().hex[:8]}")
        self.waiter = fwmqtt.ConnectWaiter()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.waiter.record(rc)
        self.client.on_publish = self._on_publish
        fwmqtt.connect(self.client, settings, self.waiter, timeout_s=5)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.event:
            self.acks[mid] = rc
            self.event.notify_all()

    def publish(self, topic: str, payload: bytes = b"{}") -> Any:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self.event:
            self.event.wait_for(lambda: info.mid in self.acks, timeout=10)
            return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def client(as_user: Callable[..., BrokerSettings]) -> Iterator[Callable[..., _Client]]:
    """Factory of connected clients for a user; all closed at the end."""
    made: list[_Client] = []

    def make(user: str, **kwargs: Any) -> _Client:
        c = _Client(as_user(user, **kwargs))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def monitor(as_user: Callable[..., BrokerSettings], topic_root: str) -> Iterator[Collector]:
    """A subscriber with read access to everything under the root."""
    col = Collector(
        as_user("monitor-tests"), [f"{topic_root}/#"], f"monitor-{uuid.uuid4().hex[:6]}"
    )
    yield col
    col.close()


def test_anonymous_clients_are_rejected(as_user: Callable[..., BrokerSettings]) -> None:
    """A client without credentials gets no session (CONNACK refusal)."""
    settings = as_user(None)
    c = fwmqtt.new_client(settings, "anon")
    waiter = fwmqtt.ConnectWaiter()
    c.on_connect = lambda _c, _u, _f, rc, _p: waiter.record(rc)
    with pytest.raises(BrokerError, match="wants a login"):
        fwmqtt.connect(c, settings, waiter, timeout_s=3)
    assert waiter.last_reason is not None
    assert "authori" in waiter.last_reason.lower()


def test_wrong_password_is_rejected(as_user: Callable[..., BrokerSettings]) -> None:
    """A known user with a wrong password is refused."""
    settings = as_user("detector", password="not-the-password")
    c = fwmqtt.new_client(settings, "wrong-pw")
    waiter = fwmqtt.ConnectWaiter()
    c.on_connect = lambda _c, _u, _f, rc, _p: waiter.record(rc)
    with pytest.raises(BrokerError, match="broker add-user detector"):
        fwmqtt.connect(c, settings, waiter, timeout_s=3)


def test_machine_cannot_publish_as_another_machine_mqtt5(
    client: Callable[..., _Client], monitor: Collector, topic_root: str
) -> None:
    """machine-a publishing on machine-b's topic gets PUBACK 0x87 and nothing is delivered."""
    topics = Topics(topic_root)
    a = client("machine-a")
    denied = a.publish(topics.telemetry("line1", "machine-b"), b'{"forged": true}')
    allowed = a.publish(topics.telemetry("line1", "machine-a"), b'{"own": true}')
    assert denied.value == NOT_AUTHORIZED
    assert not allowed.is_failure
    monitor.wait_for(lambda m: m.payload == b'{"own": true}', timeout=5)
    assert monitor.matching(lambda m: b"forged" in m.payload) == []


@pytest.mark.parametrize("person", ["viewer", "operator"])
def test_people_publish_no_readings_even_under_their_own_login(
    client: Callable[..., _Client], monitor: Collector, topic_root: str, person: str
) -> None:
    """Telemetry rights come from a machine's registry block, not a pattern for every
    account: a viewer's or operator's reading on its own login gets PUBACK 0x87 (no tile,
    no row, no verdict for an invented machine), while a machine's own goes through."""
    topics = Topics(topic_root)
    denied = client(person).publish(topics.telemetry("line9", person), b'{"invented": true}')
    assert denied.value == NOT_AUTHORIZED
    allowed = client("machine-a").publish(topics.telemetry("line1", "machine-a"), b'{"own": 1}')
    assert not allowed.is_failure
    monitor.wait_for(lambda m: m.payload == b'{"own": 1}', timeout=5)
    assert monitor.matching(lambda m: b"invented" in m.payload) == []


def test_machine_cannot_publish_as_another_machine_mqtt311(
    secure_broker: LocalBroker, secrets_dir: Path, monitor: Collector, topic_root: str
) -> None:
    """Over MQTT 3.1.1 the forged publish is acknowledged but silently dropped."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="v311-a", protocol=MQTTProtocolVersion.MQTTv311
    )
    c.username_pw_set("machine-a", read_password(secrets_dir, "machine-a"))
    c.connect("127.0.0.1", secure_broker.port)
    c.loop_start()
    try:
        topics = Topics(topic_root)
        forged = c.publish(topics.telemetry("line1", "machine-b"), b"forged311", qos=1)
        own = c.publish(topics.telemetry("line1", "machine-a"), b"own311", qos=1)
        forged.wait_for_publish(5)
        own.wait_for_publish(5)
        monitor.wait_for(lambda m: m.payload == b"own311", timeout=5)
        time.sleep(0.5)
        assert monitor.matching(lambda m: m.payload == b"forged311") == []
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize("user", ["viewer", "operator", "machine-a", "monitor"])
def test_only_the_detector_writes_the_alerts_tree(
    user: str, client: Callable[..., _Client], monitor: Collector, topic_root: str
) -> None:
    """Forged verdicts from any other role are refused with 0x87; the detector's pass."""
    topic = Topics(topic_root).verdict("line1", "machine-a")
    assert client(user).publish(topic, f"forged-by-{user}".encode()).value == NOT_AUTHORIZED
    assert not client("detector").publish(topic, b"genuine").is_failure
    monitor.wait_for(lambda m: m.payload == b"genuine", timeout=5)
    assert monitor.matching(lambda m: m.payload.startswith(b"forged-by")) == []


def test_read_denial_subscribe_publish_nothing_arrives(
    as_user: Callable[..., BrokerSettings], client: Callable[..., _Client], topic_root: str
) -> None:
    """A machine subscribed to the alerts tree and a viewer to telemetry receive nothing."""
    topics = Topics(topic_root)
    machine_sub = Collector(as_user("machine-b"), [topics.alerts_filter], "sub-machine-b")
    viewer_sub = Collector(
        as_user("viewer"), [topics.alerts_filter, f"{topic_root}/telemetry/#"], "sub-viewer"
    )
    try:
        client("detector").publish(topics.verdict("line1", "machine-a"), b"verdict")
        client("machine-a").publish(topics.telemetry("line1", "machine-a"), b"reading")
        assert viewer_sub.wait_for(lambda m: m.payload == b"verdict", timeout=5)
        time.sleep(0.5)
        assert machine_sub.matching(lambda m: True) == []
        assert viewer_sub.matching(lambda m: m.payload == b"reading") == []
    finally:
        machine_sub.close()
        viewer_sub.close()


def test_tls_works_and_plaintext_to_the_tls_port_fails(
    as_user: Callable[..., BrokerSettings], secure_broker: LocalBroker
) -> None:
    """TLS 1.2+ with the generated CA connects; a plaintext client on the TLS port does not."""
    tls = as_user("viewer", tls=True)
    c = fwmqtt.connected_client(tls, "tls-viewer", timeout_s=5)
    sock = c.socket()
    assert isinstance(sock, ssl.SSLSocket)
    assert sock.version() in {"TLSv1.2", "TLSv1.3"}
    c.disconnect()
    c.loop_stop()
    plain = as_user("viewer").with_overrides(port=secure_broker.tls_port)
    p = fwmqtt.new_client(plain, "plain-on-tls")
    pw = fwmqtt.ConnectWaiter()
    p.on_connect = lambda _c, _u, _f, rc, _p: pw.record(rc)
    with pytest.raises(BrokerError):
        fwmqtt.connect(p, plain, pw, timeout_s=3)


def test_oversize_payloads_are_refused_before_sending() -> None:
    """The publisher refuses a payload over 64 KiB itself (the broker's refusal kills paho)."""
    with pytest.raises(PayloadError) as caught:
        fwmqtt.check_size(b"x" * (64 * 1024 + 1))
    assert caught.value.reason == "oversize"
    assert fwmqtt.check_size(b"x" * 1024) == b"x" * 1024


@pytest.mark.parametrize(
    ("detector_tls", "transport"),
    [(False, "paho"), (True, "paho"), (True, "mqtt5")],
    ids=["detector-plain", "detector-tls", "detector-tls-mqtt5"],
)
def test_secure_pipeline_end_to_end_over_tls(
    spawn: Callable[..., Proc],
    secure_broker: LocalBroker,
    secrets_dir: Path,
    model_dir: Path,
    topic_root: str,
    as_user: Callable[..., BrokerSettings],
    tmp_path: Path,
    detector_tls: bool,
    transport: str,
) -> None:
    """Detector (as `detector`, plaintext or TLS, on each transport) and a sensor over TLS
    produce verdicts."""
    topics = Topics(topic_root)
    viewer = Collector(as_user("viewer"), [topics.alerts_filter], "e2e-viewer")
    try:
        common = ["--topic-root", topic_root, "--secrets-dir", str(secrets_dir)]
        tls = ["--tls-ca", str(secrets_dir / "certs" / "ca.crt")]
        det = spawn(
            "detect",
            "--port",
            str(secure_broker.tls_port if detector_tls else secure_broker.port),
            *(tls if detector_tls else []),
            *common,
            "--model-dir",
            str(model_dir),
            "--state-dir",
            str(tmp_path / "st"),
            "--transport",
            transport,
        )
        det.wait_log("telemetry_subscribed")
        sensor = spawn(
            "sensor",
            "--machine-id",
            "machine-a",
            "--count",
            "10",
            "--rate",
            "20",
            "--port",
            str(secure_broker.tls_port),
            "--tls-ca",
            str(secrets_dir / "certs" / "ca.crt"),
            *common,
        )
        assert sensor.process.wait(60) == 0, sensor.log()
        got = viewer.wait_for(lambda m: m.topic.endswith("/verdict"), count=10, timeout=30)
        assert len(got) == 10
        forged = spawn(
            "sensor",
            "--machine-id",
            "machine-b",
            "--count",
            "3",
            "--rate",
            "20",
            "--port",
            str(secure_broker.port),
            *common,
            env={"FACTORYWATCH_MQTT_PASSWORD": read_password(secrets_dir, "machine-a") or ""},
        )
        assert forged.process.wait(60) != 0, "machine-b with machine-a's password must fail"
    finally:
        viewer.close()


def test_a_machine_reads_its_own_dead_letters_and_nobody_elses(
    as_user: Callable[..., BrokerSettings], client: Callable[..., _Client], topic_root: str
) -> None:
    """The ACL lets a sensor hear why its readings were refused, not another machine's."""
    topics = Topics(topic_root)
    machine_sub = Collector(as_user("machine-a"), [f"{topic_root}/deadletter/#"], "dl-machine-a")
    try:
        detector = client("detector")
        # Published first by the same client: had it been readable, it would arrive first.
        detector.publish(topics.deadletter("line1", "machine-b"), b"for-b")
        detector.publish(topics.deadletter("line1", "machine-a"), b"for-a")
        assert machine_sub.wait_for(lambda m: m.payload == b"for-a", timeout=10)
        assert [m.payload for m in machine_sub.matching(lambda m: True)] == [b"for-a"]
    finally:
        machine_sub.close()


def test_a_machine_reads_its_own_verdicts_and_nothing_else_of_the_alerts(
    as_user: Callable[..., BrokerSettings], client: Callable[..., _Client], topic_root: str
) -> None:
    """The ACL lets a sensor hear the verdicts on its own readings (its end-to-end
    acknowledgement), not another machine's verdicts nor its own alert events or state."""
    topics = Topics(topic_root)
    machine_sub = Collector(as_user("machine-a"), [f"{topic_root}/alerts/#"], "v-machine-a")
    try:
        detector = client("detector")
        # Published first by the same client: had they been readable, they would arrive first.
        detector.publish(topics.verdict("line1", "machine-b"), b"for-b")
        detector.publish(topics.event("line1", "machine-a"), b"event-a")
        detector.publish(topics.state("line1", "machine-a"), b"state-a")
        detector.publish(topics.verdict("line1", "machine-a"), b"for-a")
        assert machine_sub.wait_for(lambda m: m.payload == b"for-a", timeout=10)
        assert [m.payload for m in machine_sub.matching(lambda m: True)] == [b"for-a"]
    finally:
        machine_sub.close()
