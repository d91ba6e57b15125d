"""The paho-mqtt set-up every role shares: MQTT 5 (or 3.1.1), TLS/credentials, bounded connect.

Traps handled here (see the project's MQTT reliability notes): a persistent session needs a
fixed client id, ``clean_start=False`` AND ``SessionExpiryInterval > 0``; payload size is
enforced before ``publish()``; a denied publish shows only as a failing PUBACK reason code.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from factorywatch.contracts import MAX_PAYLOAD_BYTES
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.settings import BrokerSettings

QOS: Final = 1
# Receive Maximum we announce: how many unacknowledged QoS 1 messages the broker may send us.
RECEIVE_MAXIMUM: Final = 1000


def new_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    manual_ack: bool = False,
    will: tuple[str, bytes] | None = None,
    max_queued: int = 0,
    max_inflight: int = 0,
    persistent: bool = False,
) -> mqtt.Client:
    """A configured (not yet connected) client speaking ``settings.protocol`` (MQTT 5 default).

    ``persistent`` matters only for MQTT 3.1.1, where the session flag is fixed here
    (``clean_session=False``); MQTT 5 chooses it at ``connect(persistent_session_s=...)``.
    """
    if settings.protocol == "3.1.1":
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=not persistent,
            manual_ack=manual_ack,
            reconnect_on_failure=True,
        )
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
            reconnect_on_failure=True,
        )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.resolved_password())
    if settings.tls_ca is not None:
        client.tls_set(
            ca_certs=str(settings.tls_ca),
            certfile=str(settings.tls_cert) if settings.tls_cert else None,
            keyfile=str(settings.tls_key) if settings.tls_key else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=QOS, retain=True)
    client.max_queued_messages_set(max_queued)
    # 0 = no client-side in-flight cap. With a cap, paho rescans every outgoing message on
    # each PUBACK (Client._update_inflight): measured 1,846 -> 3,941 msg/s for the detector
    # when removed. The broker's queue limits still bound what is outstanding.
    client.max_inflight_messages_set(max_inflight)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    client.on_socket_open = _no_delay
    return client


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Disable Nagle's algorithm: small MQTT packets go out at once (paho leaves it on)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a test double or websocket)
        return


def connect_properties(session_expiry_s: int | None) -> Properties:
    """CONNECT properties: session expiry (persistent session) and our receive maximum."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


# CONNACK reason codes of a refused login: bad user name or password (0x86), not
# authorised (0x87); paho maps MQTT 3.1.1's return codes 4 and 5 to these.
LOGIN_REFUSED: Final = frozenset({0x86, 0x87})
# CONNACK 0x84 (3.1.1: return code 1): the server does not speak this MQTT version.
PROTOCOL_REFUSED: Final = 0x84


class ConnectWaiter:
    """Records CONNACK outcomes so start-up can wait for the first successful connect."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.answered = threading.Event()  # a CONNACK came back, accepting or refusing
        self.last_reason: str | None = None
        self.login_refused = False
        self.protocol_refused = False

    def record(self, reason_code: ReasonCode) -> None:
        """Call from ``on_connect``."""
        self.last_reason = str(reason_code)
        if reason_code.is_failure:
            self.connected.clear()
            self.login_refused = reason_code.value in LOGIN_REFUSED
            self.protocol_refused = reason_code.value == PROTOCOL_REFUSED
        else:
            self.connected.set()
        self.answered.set()


def connect(
    client: mqtt.Client,
    settings: BrokerSettings,
    waiter: ConnectWaiter,
    *,
    persistent_session_s: int | None = None,
    timeout_s: float = 10.0,
    threaded: bool = True,
) -> None:
    """Connect with bounded exponential backoff, start the network loop, await CONNACK.

    ``threaded=False``: no network thread is started; the caller drives ``client.loop()``.

    Raises ``BrokerError`` when the broker stays unreachable after ``connect_retries`` or
    refuses us (bad credentials, not authorised).
    """
    delay, attempt = 0.5, 0
    while True:
        try:
            if settings.protocol == "3.1.1":  # session flag and limits were set in new_client
                client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
            else:
                client.connect(
                    settings.host,
                    settings.port,
                    keepalive=settings.keepalive_s,
                    clean_start=not persistent_session_s,
                    properties=connect_properties(persistent_session_s),
                )
            break
        except (OSError, ssl.SSLError) as exc:
            attempt += 1
            if attempt > settings.connect_retries:
                raise BrokerError(
                    f"broker {settings.host}:{settings.port} unreachable after {attempt} "
                    f"attempts: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    # Wait for the first CONNACK: a refused login is final (paho would retry it forever).
    if threaded:
        client.loop_start()
        waiter.answered.wait(timeout_s)
    else:  # the caller runs client.loop() itself; run it here until the CONNACK
        deadline = time.monotonic() + timeout_s
        while not waiter.answered.is_set() and time.monotonic() < deadline:
            client.loop(timeout=0.1)
    if not waiter.connected.is_set():
        if threaded:
            client.loop_stop()
        client.disconnect()
        raise _refusal(settings, waiter)


def _refusal(settings: BrokerSettings, waiter: ConnectWaiter) -> BrokerError:
    """The error of a connection the broker did not accept, with the remedy where known."""
    where = f"broker {settings.host}:{settings.port}"
    if waiter.protocol_refused and settings.protocol == "5":
        return BrokerError(
            f"{where} does not speak MQTT 5 ({waiter.last_reason}); a NATS cluster's MQTT "
            "listener speaks 3.1.1 only: use --mqtt-protocol 3.1.1 "
            "(FACTORYWATCH_MQTT_PROTOCOL=3.1.1)"
        )
    if waiter.login_refused and settings.username is None:
        return BrokerError(
            f"{where} did not accept the connection ({waiter.last_reason}): it wants a "
            "login; set FACTORYWATCH_MQTT_USERNAME and its password "
            "(FACTORYWATCH_MQTT_PASSWORD[_FILE] or --secrets-dir)"
        )
    if waiter.login_refused:
        user = settings.username
        return BrokerError(
            f"{where} did not accept the login of user {user!r} ({waiter.last_reason}). "
            f"If {user!r} is new, create it: `factorywatch broker add-user {user}`, "
            "then reload the broker: `docker compose kill -s SIGHUP broker` (or "
            "`kill -HUP` the `factorywatch broker serve` or `factorywatch demo` process); else "
            "check its password "
            "(FACTORYWATCH_MQTT_PASSWORD[_FILE] or FACTORYWATCH_MQTT_SECRETS_DIR)"
        )
    return BrokerError(
        f"{where} did not accept the connection (last reason: {waiter.last_reason or 'no CONNACK'})"
    )


def connected_client(
    settings: BrokerSettings, client_id: str, *, timeout_s: float = 10.0
) -> mqtt.Client:
    """A client with its network thread running, connected (or ``BrokerError``)."""
    client = new_client(settings, client_id)
    waiter = ConnectWaiter()
    client.on_connect = lambda _c, _u, _f, rc, _p: waiter.record(rc)
    connect(client, settings, waiter, timeout_s=timeout_s)
    return client


def check_size(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Refuse oversize payloads before ``publish()``: a reading over 64 KiB, or with
    ``limit=MAX_BATCH_BYTES`` a gateway's batch over 512 KiB (the broker's own limit, whose
    refusal makes paho drop the connection and resend the same message for ever)."""
    if len(payload) > limit:
        raise PayloadError("oversize", f"{len(payload)} bytes > {limit}")
    return payload


def reason_failed(reason_code: Any) -> bool:
    """True when a v5 reason code reports failure (e.g. 0x87 not authorised)."""
    return bool(getattr(reason_code, "is_failure", False))
