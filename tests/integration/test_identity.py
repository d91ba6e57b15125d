"""No account speaks for another (issue 13), shown on a real Mosquitto with the project's config.

Client ids are bound to logins (``use_username_as_clientid``), only gateways publish batches,
a detector taken over stops instead of fighting, oversize payloads are refused by the broker,
and a refused sensor stops at once with the remedy.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import BASE_CONFIG, LocalBroker, free_port
from factorywatch.contracts import MAX_BATCH_BYTES, MAX_PAYLOAD_BYTES, TelemetryBatch, Verdict
from factorywatch.credentials import init_secrets
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import (
    CLI,
    PROJECT_DIR,
    Collector,
    Proc,
    add_account,
    login_settings,
    secure_args,
)

pytestmark = pytest.mark.integration
NOT_AUTHORIZED = 0x87


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """Service users, machines ma and mb (line1), gateway gw1 for mc and md, a second
    detector account ``detector-line2``, TLS material."""
    directory = tmp_path / "secrets"
    init_secrets(directory, ("ma", "mb"))
    add_account(directory, "gw1", "gateway", line="line1", machines=("mc", "md"))
    add_account(directory, "detector-line2", "detector")
    return directory


@pytest.fixture
def as_user(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> Callable[[str], BrokerSettings]:
    """Broker settings logging in as one account."""

    def make(user: str) -> BrokerSettings:
        return login_settings(secure_broker.port, topic_root, secrets_dir, user, connect_retries=0)

    return make


class _Peer:
    """A connected client that records PUBACK codes, messages and disconnect reasons."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        session_s: int | None = None,
        subscribe: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.acks: dict[int, Any] = {}
        self.messages: list[bytes] = []
        self.disconnects: list[str] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        self._subscribe = subscribe
        self.client = fwmqtt.new_client(settings, client_id, will=will)
        self.client.reconnect_delay_set(min_delay=5, max_delay=5)
        self.waiter = fwmqtt.ConnectWaiter()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = threading.Event()
        fwmqtt.connect(self.client, settings, self.waiter, persistent_session_s=session_s)
        if subscribe is not None:
            assert self.subscribed.wait(10), "SUBACK not received"

    def _on_connect(self, c: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self.waiter.record(rc)
        if self._subscribe is not None and not rc.is_failure:
            c.subscribe(self._subscribe, qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        self.subscribed.set()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._cond:
            self.acks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(bytes(msg.payload))
            self._cond.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self._cond:
            self.disconnects.append(str(rc))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> Any:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, timeout=10), "no PUBACK"
            return self.acks[info.mid]

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``count`` messages arrived; return them."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= count, timeout=timeout)
            return list(self.messages)

    def close(self) -> None:
        """Disconnect cleanly."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(as_user: Callable[[str], BrokerSettings]) -> Iterator[Callable[..., _Peer]]:
    """Factory of connected peers; all closed at the end."""
    made: list[_Peer] = []

    def make(user: str, client_id: str | None = None, **kwargs: Any) -> _Peer:
        p = _Peer(as_user(user), client_id or f"{user}-{uuid.uuid4().hex[:6]}", **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_another_account_cannot_take_over_the_detectors_client_id(
    peer: Callable[..., _Peer], topic_root: str
) -> None:
    """Finding 2: machine mb connecting with the detector's client id (clean start) neither
    kicks the detector off nor wipes its persistent session: queued readings survive."""
    topics = Topics(topic_root)
    detector = peer(
        "detector",
        "factorywatch-detector",
        session_s=3600,
        subscribe=topics.telemetry_filter,
    )
    ma = peer("ma")
    intruder = peer("mb", "factorywatch-detector")  # also try the login as the id:
    intruder2 = peer("mb", "detector")
    assert not ma.publish(topics.telemetry("line1", "ma"), b"while-intruders-online").is_failure
    assert detector.wait_messages(1) == [b"while-intruders-online"]
    assert detector.disconnects == [], "the detector was not kicked off"
    intruder.close()
    intruder2.close()
    # Offline detector: readings queue in its session; an intruder with a clean start on
    # the same id must not wipe them.
    detector.close()
    for i in range(5):
        assert not ma.publish(topics.telemetry("line1", "ma"), f"queued-{i}".encode()).is_failure
    peer("mb", "detector").close()
    back = peer("detector", "any-id", session_s=3600, subscribe=topics.telemetry_filter)
    assert back.session_present, "the detector's session survived"
    got = back.wait_messages(5)
    assert sorted(got) == [f"queued-{i}".encode() for i in range(5)]


def _die_with_will(settings: BrokerSettings, client_id: str, will: tuple[str, bytes]) -> str:
    """Connect with a last will, then drop the TCP connection without DISCONNECT.

    Returns the CONNACK reason (the broker may refuse a will it does not authorise).
    """
    client = fwmqtt.new_client(settings, client_id, will=will)
    waiter = fwmqtt.ConnectWaiter()
    client.on_connect = lambda _c, _u, _f, rc, _p: waiter.record(rc)
    client.connect(settings.host, settings.port)
    deadline = time.monotonic() + 10
    while waiter.last_reason is None and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    sock = client.socket()
    if sock is not None:
        sock.close()  # no DISCONNECT: the broker publishes the will
    return waiter.last_reason or "no CONNACK"


def test_another_account_cannot_fake_a_machines_last_will(
    peer: Callable[..., _Peer], as_user: Callable[[str], BrokerSettings], topic_root: str
) -> None:
    """Finding 2: mb using ma's sensor client id does not disconnect ma (no forged
    MACHINE_OFFLINE from ma's last will), and mb's own will on ma's status is not published."""
    topics = Topics(topic_root)
    status = topics.status("sensor", "ma")
    monitor = Collector(as_user("monitor"), [f"{topic_root}/status/#"], "mon-will")
    try:
        ma = peer("ma", "sensor-ma", will=(status, b"ma-will"))
        reason = _die_with_will(as_user("mb"), "sensor-ma", (status, b"forged-will"))
        assert not ma.publish(status, b"marker").is_failure
        assert monitor.wait_for(lambda m: m.payload == b"marker", timeout=10)
        assert ma.disconnects == [], f"ma was not kicked off (intruder: {reason})"
        assert monitor.matching(lambda m: m.payload.endswith(b"-will")) == []
    finally:
        monitor.close()


def test_only_gateways_publish_batches_and_only_for_their_lines(
    peer: Callable[..., _Peer], topic_root: str
) -> None:
    """Finding 1 (broker side): a machine's batch is refused (0x87); the gateway may publish
    batches only on its machines' lines and may not publish telemetry as its machines."""
    topics = Topics(topic_root)
    ma, gw = peer("ma"), peer("gw1")
    assert ma.publish(topics.batch("line1", "ma"), b"{}").value == NOT_AUTHORIZED
    assert not gw.publish(topics.batch("line1", "gw1"), b"{}").is_failure
    assert gw.publish(topics.batch("line2", "gw1"), b"{}").value == NOT_AUTHORIZED
    assert gw.publish(topics.telemetry("line1", "mc"), b"{}").value == NOT_AUTHORIZED
    assert gw.publish(topics.batch("line1", "gw2"), b"{}").value == NOT_AUTHORIZED


def test_broker_refuses_oversize_payloads(
    peer: Callable[..., _Peer], as_user: Callable[[str], BrokerSettings], topic_root: str
) -> None:
    """Finding 6: the broker refuses a payload above message_size_limit (the largest message
    our clients send, a 512 KiB batch); one just under it is delivered."""
    topics = Topics(topic_root)
    conf = BASE_CONFIG.read_text()
    assert f"\nmessage_size_limit {MAX_BATCH_BYTES}\n" in conf
    assert MAX_PAYLOAD_BYTES < MAX_BATCH_BYTES
    # A gateway checks its batches against the same limit before sending.
    assert fwmqtt.check_size(b"x" * MAX_BATCH_BYTES, MAX_BATCH_BYTES)
    with pytest.raises(PayloadError):
        fwmqtt.check_size(b"x" * (MAX_BATCH_BYTES + 1), MAX_BATCH_BYTES)
    detector = peer("detector", subscribe=topics.telemetry_filter)
    big = b"x" * (10 * 1024 * 1024)
    # A raw client: paho drops its own connection on the broker's refusal ("Protocol error").
    rogue = fwmqtt.connected_client(as_user("ma"), "rogue-ma")
    rogue.publish(topics.telemetry("line1", "ma"), big, qos=1)
    ok = peer("mb")
    assert not ok.publish(topics.telemetry("line1", "mb"), b"y" * (MAX_BATCH_BYTES - 1)).is_failure
    got = detector.wait_messages(1)
    rogue.loop_stop()
    rogue.disconnect()
    assert [len(m) for m in got] == [MAX_BATCH_BYTES - 1], "the 10 MB payload never arrived"


@pytest.mark.timing
def test_refused_sensor_stops_at_once_with_the_remedy(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str, tmp_path: Path
) -> None:
    """Finding 6: a sensor whose account does not exist exits 2 naming `broker add-user`,
    instead of retrying for its connect timeout."""
    started = time.monotonic()
    done = subprocess.run(
        [
            *CLI,
            "sensor",
            "--machine-id",
            "machine-z",
            "--count",
            "3",
            *secure_args(secure_broker.port, topic_root, secrets_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PROJECT_DIR,
        env={"FACTORYWATCH_MQTT_PASSWORD": "guessed", "PATH": "/usr/bin:/bin"},
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert "factorywatch broker add-user machine-z" in done.stderr
    assert "SIGHUP" in done.stderr
    # Before: paho retried "Not authorized" until the 10 s connect timeout.
    assert elapsed < 9.0, f"took {elapsed:.1f} s"


def test_remove_user_of_unknown_user_fails(tmp_path: Path) -> None:
    """Finding 6: `broker remove-user nosuch` exits non-zero with a message."""
    secrets = tmp_path / "s"
    init_secrets(secrets, ("ma",))
    done = subprocess.run(
        [*CLI, "broker", "remove-user", "nosuch", "--secrets-dir", str(secrets)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert done.returncode == 2
    assert "no user 'nosuch'" in done.stderr


def _detect(
    spawn: Callable[..., Proc],
    broker: LocalBroker,
    secrets_dir: Path,
    model_dir: Path,
    topic_root: str,
    state: Path,
    *extra: str,
) -> Proc:
    return spawn(
        "detect",
        *secure_args(broker.port, topic_root, secrets_dir),
        "--model-dir",
        str(model_dir),
        "--state-dir",
        str(state),
        "--metrics-port",
        "0",
        *extra,
    )


def _batch(machine: str, count: int, seed: int) -> bytes:
    sim = MachineSimulator(machine, "line1", seed=seed, anomaly_rate=0.0)
    now = time.time()
    return TelemetryBatch(readings=[sim.next(now + i / 1000) for i in range(count)]).encode()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["paho", "mqtt5"])
def test_two_detectors_with_one_identity_do_not_fight(
    spawn: Callable[..., Proc],
    secure_broker: LocalBroker,
    secrets_dir: Path,
    model_dir: Path,
    topic_root: str,
    as_user: Callable[[str], BrokerSettings],
    peer: Callable[..., _Peer],
    tmp_path: Path,
    transport: str,
) -> None:
    """Finding 2: a second detector logging in as `detector` fences the first (it exits 2
    naming the remedy, it does not reconnect); readings then get exactly one verdict each
    (on each detector transport)."""
    topics = Topics(topic_root)
    viewer = Collector(as_user("viewer"), [topics.alerts_filter], "viewer-fence")
    chosen = ("--transport", transport)
    try:
        first = _detect(
            spawn, secure_broker, secrets_dir, model_dir, topic_root, tmp_path / "a", *chosen
        )
        first.wait_log("telemetry_subscribed")
        second = _detect(
            spawn, secure_broker, secrets_dir, model_dir, topic_root, tmp_path / "b", *chosen
        )
        second.wait_log("telemetry_subscribed")
        assert first.process.wait(30) == 2
        assert "detector_fenced" in first.log()
        assert "broker add-user detector-<shard> --detector" in first.log()
        gw = peer("gw1")
        assert not gw.publish(topics.batch("line1", "gw1"), _batch("mc", 50, 1)).is_failure
        got = viewer.wait_for(lambda m: m.topic.endswith("/verdict"), count=50, timeout=30)
        viewer.wait_for(lambda m: m.topic.endswith("/verdict"), count=51, timeout=1.0)
        seqs = [Verdict.model_validate_json(m.payload).seq for m in got]
        assert len(seqs) == 50
        assert len(set(seqs)) == 50, "no duplicate verdicts"
        assert second.process.poll() is None, "the newer detector keeps serving"
        assert "detector_fenced" not in second.log()
    finally:
        viewer.close()


@pytest.mark.slow
def test_detector_shards_have_their_own_identities(
    spawn: Callable[..., Proc],
    secure_broker: LocalBroker,
    secrets_dir: Path,
    model_dir: Path,
    topic_root: str,
    as_user: Callable[[str], BrokerSettings],
    peer: Callable[..., _Peer],
    tmp_path: Path,
) -> None:
    """Two shards logged in as `detector` and `detector-line2` run side by side (no
    takeover), each answering its own lines."""
    topics = Topics(topic_root)
    viewer = Collector(as_user("viewer"), [topics.alerts_filter], "viewer-shards")
    try:
        one = _detect(
            spawn, secure_broker, secrets_dir, model_dir, topic_root, tmp_path / "1",
            "--lines", "line1",
        )  # fmt: skip
        two = _detect(
            spawn, secure_broker, secrets_dir, model_dir, topic_root, tmp_path / "2",
            "--lines", "line2", "--username", "detector-line2",
        )  # fmt: skip
        one.wait_log("telemetry_subscribed")
        two.wait_log("telemetry_subscribed")
        gw = peer("gw1")
        assert not gw.publish(topics.batch("line1", "gw1"), _batch("mc", 10, 2)).is_failure
        got = viewer.wait_for(lambda m: m.topic.endswith("/verdict"), count=10, timeout=30)
        assert len(got) == 10
        assert one.process.poll() is None
        assert two.process.poll() is None
        assert "detector_fenced" not in one.log() + two.log()
    finally:
        viewer.close()


def test_broker_serve_reloads_a_new_gateway_on_sighup(
    spawn: Callable[..., Proc], tmp_path: Path, topic_root: str
) -> None:
    """`broker add-user GW --gateway` then SIGHUP to `broker serve`: the gateway logs in and may
    write its batch topic (the ACL was regenerated from the registry), not another's."""
    secrets = tmp_path / "s"
    init_secrets(secrets, ("ma",))
    port = free_port()
    serve = spawn(
        "broker", "serve", "--port", str(port), "--workdir", str(tmp_path / "w"),
        "--secrets-dir", str(secrets), name="serve",
    )  # fmt: skip
    serve.wait_log("mosquitto listening")
    added = subprocess.run(
        [*CLI, "broker", "add-user", "gw2", "--gateway", "--machines", "mz",
         "--secrets-dir", str(secrets)],
        capture_output=True, text=True, timeout=60, check=False, cwd=PROJECT_DIR,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    settings = login_settings(port, "factory", secrets, "gw2", connect_retries=0)
    with pytest.raises(BrokerError, match="login of user 'gw2'"):
        _Peer(settings, "gw2")  # not reloaded yet
    serve.process.send_signal(signal.SIGHUP)
    serve.wait_log("reloaded users and ACL")
    gw = _Peer(settings, "gw2")
    try:
        topics = Topics("factory")
        assert not gw.publish(topics.batch("line1", "gw2"), b"{}").is_failure
        assert gw.publish(topics.batch("line1", "gw1"), b"{}").value == NOT_AUTHORIZED
    finally:
        gw.close()
    assert serve.terminate() == 0
