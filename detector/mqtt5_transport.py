"""A sans-I/O MQTT 5 transport: the ``mqtt5`` package's compiled codec, our own small client.

The codec (Rust, ``mqtt5.read`` / ``<Packet>.write``) parses and writes packets; everything
else is here: one socket (TCP or TLS), one thread, a selector. The Transport contract of
``detector/transport.py`` holds as with paho:

* **Session**: a fixed client id, ``clean_start=False`` and a session expiry keep the
  session (and what the broker queued for it) across reconnects and restarts; the filters
  are subscribed at QoS 1 on every connect.
* **Manual ack**: a reading's PUBACK is queued only by ``ack`` (the shell calls it once every
  publish the reading caused was confirmed) and written at the start of the NEXT ``receive``,
  i.e. after the shell's turn flushed its state. Acks of a message received on an earlier
  connection are dropped (the broker redelivers it on the new one), and so are acks made
  while ``close`` drains (the shell saves its state after ``close``).
* **Publish**: QoS 1; the PUBACK's reason code is read, a failure (>= 0x80, e.g. 0x87 not
  authorised) calls ``confirmed(False)``. At most the broker's Receive Maximum publishes are
  in flight; the rest wait. On reconnect every unconfirmed publish is sent again (DUP).
* **Batched writes**: publishes, acks and pings only append to one buffer; each ``receive``
  starts with one ``sendall`` of it.
* **Fence** (``fence``, as ``factorywatch/fencing.py`` does for paho): a retained lease with a
  random token, published on every connect until it came back; another token arriving after
  ours came back means a newer process holds the identity: stop taking messages, call
  ``on_fenced``, never reconnect. After losing the connection, a fenced-in driver waits
  ``SETTLE_S`` before reconnecting, so the newer process's lease reaches the broker first.
* **Keepalive**: a PINGREQ after ``keepalive_s`` without writing; no packet at all for 1.5 x
  keepalive means the connection is dead. A lost connection is reconnected with bounded
  exponential backoff (0.5 s doubling to 10 s) until ``stop`` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import mqtt5
import structlog

from factorywatch import mqtt as fwmqtt
from factorywatch.detector.engine import Inbound
from factorywatch.detector.transport import Confirm
from factorywatch.errors import BrokerError
from factorywatch.fencing import SETTLE_S
from factorywatch.settings import BrokerSettings

log = structlog.get_logger("detector")

_QOS0: Final = mqtt5.QoS.AT_MOST_ONCE
_QOS1: Final = mqtt5.QoS.AT_LEAST_ONCE
_PING: Final = mqtt5.PingReqPacket().write()
_READ_CHUNK: Final = 256 * 1024
# A token is the packet id plus the connection's generation above 16 bits: one int, and an
# ack of a message from an earlier connection is recognised and dropped.
_ID_BITS: Final = 16
_ID_MASK: Final = (1 << _ID_BITS) - 1
_MAX_BACKOFF_S: Final = 10.0


def _kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    """Bound blocking sends and receives in the kernel (``SO_SNDTIMEO`` / ``SO_RCVTIMEO``)
    instead of in Python, where a socket with a timeout polls before every ``send`` and
    ``recv`` (two system calls each, every turn). A send the broker does not take within
    ``timeout`` fails with ``OSError`` (the connection is then lost and reconnected), as
    with Python's timeout. Where the options cannot be set, Python's timeout stays."""
    seconds = int(timeout)
    limit = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    except (OSError, AttributeError):
        return
    sock.settimeout(None)


class ConnectionLostError(Exception):
    """The socket closed, failed, or the broker went silent past the keepalive."""


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    """The client TLS context ``settings`` asks for (None: plain TCP)."""
    if settings.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert is not None:
        context.load_cert_chain(
            str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None
        )
    return context


class Mqtt5Transport:
    """The detector's MQTT 5 connection on the compiled codec (see the module docstring)."""

    def __init__(
        self,
        broker: BrokerSettings,
        client_id: str,
        *,
        filters: Sequence[str],
        will: tuple[str, bytes] | None = None,
        session_expiry_s: int,
        stop: threading.Event | None = None,
        on_connected: Callable[[], None] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        receive_maximum: int = fwmqtt.RECEIVE_MAXIMUM,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.filters = list(filters)
        self.session_expiry_s = session_expiry_s
        self.stop = stop if stop is not None else threading.Event()
        self.on_connected = on_connected
        self.on_connection_change = on_connection_change
        self.ssl_context = ssl_context if ssl_context is not None else tls_context(broker)
        self.receive_maximum = receive_maximum
        password = broker.resolved_password()
        self._connect_packet = mqtt5.ConnectPacket(
            client_id,
            username=broker.username,
            password=password.encode() if password is not None else None,
            clean_start=session_expiry_s == 0,
            will=None
            if will is None
            else mqtt5.Will(will[0], payload=will[1], qos=_QOS1, retain=True),
            keep_alive=broker.keepalive_s,
            session_expiry_interval=session_expiry_s,
            receive_max=receive_maximum,
        ).write()
        self._sock: socket.socket | None = None
        self._selector: selectors.DefaultSelector | None = None
        self._generation = 0
        self._connected = False
        self._subscribed = False
        self._closing = False
        self._inbox: list[Inbound] = []
        self._out = bytearray()  # packets waiting for the next write
        self._buf = bytearray()  # bytes read and not parsed yet
        # Outgoing QoS 1 publishes: in flight (packet id -> (topic, payload, retain, confirm))
        # and waiting for a free slot of the broker's Receive Maximum.
        self._inflight: dict[int, tuple[str, bytes, bool, Confirm | None]] = {}
        self._waiting: deque[tuple[str, bytes, bool, Confirm | None]] = deque()
        self._send_quota = 65535
        self._next_id = 1
        self._last_write = self._last_read = 0.0
        self._keepalive_s = broker.keepalive_s
        self._connack: mqtt5.ConnAckPacket | None = None
        self.connections = 0  # successful connects so far (a reconnect adds one)
        self.pings_answered = 0
        # The fence (None: off): lease topic, our lease, whether it came back, fenced.
        self._lease_topic: str | None = None
        self._lease = b""
        self._lease_token = ""
        self._on_fenced: Callable[[str], None] | None = None
        self._settle_s = SETTLE_S
        self.lease_echoed = False
        self.fenced = False

    def fence(
        self, lease_topic: str, on_fenced: Callable[[str], None], *, settle_s: float = SETTLE_S
    ) -> None:
        """Newest process wins this identity (see the module docstring); call before connect."""
        self._lease_topic = lease_topic
        self._lease_token = uuid.uuid4().hex
        self._lease = json.dumps(
            {
                "token": self._lease_token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": time.time(),
            }
        ).encode()
        self._on_fenced = on_fenced
        self._settle_s = settle_s

    # -- the Transport protocol ---------------------------------------------------------------
    def connect(self) -> None:
        """Connect with bounded retries and subscribe; ``BrokerError`` when it cannot."""
        delay, attempt = 0.5, 0
        while True:
            try:
                self._open()
                return
            except BrokerError:
                raise
            except (OSError, ConnectionLostError) as exc:
                attempt += 1
                if attempt > self.broker.connect_retries:
                    raise BrokerError(
                        f"broker {self.broker.host}:{self.broker.port} unreachable after "
                        f"{attempt} attempts: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def receive(self, timeout: float) -> list[Inbound]:
        """Write what is queued (one ``sendall``), then read for up to ``timeout`` seconds."""
        try:
            if not self._connected:
                raise ConnectionLostError("not connected")
            self._flush()
            self._pump(timeout)
            self._keepalive()
        except (OSError, ConnectionLostError) as exc:
            self._reconnect(exc)
        inbox, self._inbox = self._inbox, []
        return inbox

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, confirmed: Confirm | None
    ) -> None:
        """Queue a QoS 1 publish; ``confirmed(ok)`` runs when its PUBACK is read."""
        entry = (topic, payload, retain, confirmed)
        if self._connected and len(self._inflight) < self._send_quota and not self._waiting:
            self._send_publish(entry, duplicate=False)
        else:
            self._waiting.append(entry)

    def ack(self, token: Any) -> None:
        """Queue the PUBACK of a received message (written at the next ``receive``)."""
        if token is None or token >> _ID_BITS != self._generation or self._closing:
            # QoS 0; received on an earlier connection (the broker redelivers it); or closing:
            # the shell saves its checkpoint only after ``close``, so a reading confirmed
            # while draining stays unacknowledged and is recognised as answered on redelivery.
            return
        self._out += mqtt5.PubAckPacket(token & _ID_MASK).write()

    def is_connected(self) -> bool:
        """Whether the socket is up and the broker accepted us."""
        return self._connected

    def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for unconfirmed publishes; their confirmations run in here."""
        deadline = time.monotonic() + timeout_s
        try:
            while (self._inflight or self._waiting) and self._connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._flush()
                self._pump(min(left, 0.05))
        except (OSError, ConnectionLostError):
            pass  # the session keeps what was not confirmed

    def close(self, drain_timeout_s: float) -> None:
        """Wait up to ``drain_timeout_s`` for unconfirmed publishes, then DISCONNECT."""
        self._closing = True
        self.drain(drain_timeout_s)
        try:
            # Messages received now stay unacknowledged: the broker redelivers them.
            if self._connected:
                self._out += mqtt5.DisconnectPacket().write()
                self._flush()
        except (OSError, ConnectionLostError):
            pass  # closing anyway; the session keeps what was not confirmed
        self._drop_socket()

    def abort(self) -> None:
        """Close the socket without a DISCONNECT, as a crash would (the will is published)."""
        self._drop_socket()

    # -- state the shell and tests may read ---------------------------------------------------
    @property
    def connack(self) -> mqtt5.ConnAckPacket | None:
        """The last CONNACK (``session_present``, the broker's limits)."""
        return self._connack

    @property
    def in_flight(self) -> int:
        """Publishes sent and not confirmed yet (at most the broker's Receive Maximum)."""
        return len(self._inflight)

    @property
    def unconfirmed(self) -> int:
        """Publishes not confirmed yet (in flight or waiting for a slot)."""
        return len(self._inflight) + len(self._waiting)

    # -- connection ---------------------------------------------------------------------------
    def _open(self) -> None:
        """TCP (+TLS), CONNECT, CONNACK, resend what was in flight, SUBSCRIBE, SUBACK."""
        self._drop_socket()
        timeout = float(self.broker.keepalive_s)
        sock = self._dial(timeout)
        self._sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._generation += 1
        self._buf.clear()
        self._out = bytearray(self._connect_packet)
        self._connack = None
        self._subscribed = False
        self._flush()
        deadline = time.monotonic() + timeout
        while self._connack is None:
            if time.monotonic() > deadline:
                raise ConnectionLostError("no CONNACK")
            self._pump(0.1)
        code = int(self._connack.reason_code)
        if code >= 0x80:
            self._drop_socket()
            raise self._refusal(code)
        self._send_quota = self._connack.receive_max or 65535
        # A broker may impose its own keepalive (CONNACK Server Keep Alive): it wins.
        self._keepalive_s = self._connack.server_keep_alive or self.broker.keepalive_s
        self._connected = True
        self.connections += 1
        # What was in flight went unconfirmed: send it again (DUP), the waiting ones behind it.
        resend = list(self._inflight.items())
        self._inflight.clear()
        for packet_id, entry in resend:
            self._send_publish(entry, duplicate=True, packet_id=packet_id)
        self._release()
        subscribe_id = self._new_id()
        topic_filters = [mqtt5.TopicFilter(f, max_qos=_QOS1) for f in self.filters]
        if self._lease_topic is not None:
            # QoS 0: a lease is never redelivered from the shared session to another process.
            topic_filters.append(mqtt5.TopicFilter(self._lease_topic, max_qos=_QOS0))
        self._out += mqtt5.SubscribePacket(subscribe_id, topic_filters).write()
        if self._lease_topic is not None and not self.lease_echoed:
            self._send_publish((self._lease_topic, self._lease, True, None), duplicate=False)
        self._flush()
        while not self._subscribed:
            if time.monotonic() > deadline:
                raise ConnectionLostError("no SUBACK")
            self._pump(0.1)
        log.info(
            "broker_connected",
            session_present=self._connack.session_present,
            subscribed=self.filters,
            transport="mqtt5",
        )
        if self.on_connection_change is not None:
            self.on_connection_change(True)
        if self.on_connected is not None:
            self.on_connected()

    def _dial(self, timeout: float) -> socket.socket:
        """A TCP connection to the broker, Nagle off (small packets go at once), TLS if asked;
        connected, its send and receive limits are the kernel's (``_kernel_timeouts``)."""
        raw = socket.create_connection((self.broker.host, self.broker.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is None:
            _kernel_timeouts(raw, timeout)
            return raw
        try:
            sock = self.ssl_context.wrap_socket(raw, server_hostname=self.broker.host)
        except (OSError, ssl.SSLError):
            raw.close()
            raise
        _kernel_timeouts(sock, timeout)
        return sock

    def _refusal(self, code: int) -> BrokerError:
        where = f"broker {self.broker.host}:{self.broker.port}"
        log.error("broker_refused", reason=code)
        if code in fwmqtt.LOGIN_REFUSED:
            return BrokerError(f"{where} refused the login (reason 0x{code:02x})")
        return BrokerError(f"{where} refused the connection (reason 0x{code:02x})")

    def _reconnect(self, cause: BaseException) -> None:
        """The connection dropped: reconnect with backoff (the session and its queue wait)."""
        was_connected = self._connected
        self._connected = False
        self._drop_socket()
        if was_connected:
            log.warning("broker_disconnected", reason=str(cause))
            if self.on_connection_change is not None:
                self.on_connection_change(False)
        if self.fenced:
            return  # a newer process holds the identity: reconnecting would kick it off
        if self._lease_topic is not None and was_connected:
            # Maybe a newer process took our identity: let its lease reach the broker first.
            self.stop.wait(self._settle_s)
        delay = 0.5
        while not self.stop.is_set() and not self.fenced:
            try:
                self._open()
                return
            except (OSError, ConnectionLostError, BrokerError) as exc:
                log.warning("reconnect_failed", error=str(exc), retry_in_s=delay)
                self._drop_socket()
            self.stop.wait(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def _drop_socket(self) -> None:
        self._connected = False
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # -- I/O ----------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write every queued packet in one ``sendall``."""
        if self._out and self._sock is not None:
            out, self._out = self._out, bytearray()
            self._sock.sendall(out)
            self._last_write = time.monotonic()

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for bytes, read everything there is, handle each packet."""
        sock, selector = self._sock, self._selector
        if sock is None or selector is None:
            raise ConnectionLostError("no socket")
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending and not selector.select(timeout):
            return
        while True:
            try:
                chunk = sock.recv(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                raise ConnectionLostError("closed by the broker")
            self._buf += chunk
            if isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
                continue
            if len(chunk) < _READ_CHUNK or not selector.select(0):
                break
        self._last_read = time.monotonic()
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        view = memoryview(buf)
        at = 0
        # Every message of one read burst arrived together: one clock read for all of them.
        received_at, received_perf = time.time(), time.perf_counter()
        try:
            while at < len(buf):
                try:
                    packet, size = mqtt5.read(view[at:])
                except IndexError:  # an incomplete packet: the rest comes with the next read
                    break
                at += size
                if type(packet) is mqtt5.PublishPacket:  # the common case first, inline
                    if self._lease_topic is not None and (
                        self.fenced or packet.topic == self._lease_topic
                    ):
                        self._fenced_publish(packet)
                        continue
                    packet_id = packet.packet_id
                    self._inbox.append(
                        Inbound(
                            packet.topic,
                            packet.payload,
                            received_at,
                            received_perf,
                            None
                            if packet_id is None
                            else (self._generation << _ID_BITS) | packet_id,
                        )
                    )
                else:
                    self._handle(packet)
        except ValueError as exc:
            raise ConnectionLostError(f"malformed packet: {exc}") from exc
        finally:
            view.release()
            del buf[:at]

    def _handle(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PubAckPacket):
            self._on_puback(packet.packet_id, int(packet.reason_code))
        elif isinstance(packet, mqtt5.ConnAckPacket):
            self._connack = packet
        elif isinstance(packet, mqtt5.SubAckPacket):
            failed = [int(c) for c in packet.reason_codes if int(c) >= 0x80]
            if failed:
                log.error("subscribe_refused", reasons=failed)
            else:
                log.info("telemetry_subscribed", filters=self.filters)
            self._subscribed = True
        elif isinstance(packet, mqtt5.DisconnectPacket):
            raise ConnectionLostError(f"broker disconnected us ({packet.reason_code!r})")
        elif isinstance(packet, mqtt5.PingRespPacket):
            self.pings_answered += 1

    def _fenced_publish(self, packet: mqtt5.PublishPacket) -> None:
        """A lease arrived, or a message while fenced (left unacknowledged for the newer one)."""
        if packet.topic != self._lease_topic:
            return
        try:
            token = json.loads(packet.payload).get("token")
        except (ValueError, AttributeError):
            return  # not a lease (e.g. a cleared retained message)
        if token == self._lease_token:
            self.lease_echoed = True
        elif self.lease_echoed and not self.fenced:
            self.fenced = True
            log.error("identity_fenced", lease_topic=self._lease_topic)
            if self._on_fenced is not None:
                lease = packet.payload.decode(errors="replace")[:200]
                self._on_fenced(f"a newer process holds this identity: {lease}")

    def _on_puback(self, packet_id: int, code: int) -> None:
        entry = self._inflight.pop(packet_id, None)
        if entry is None:
            return
        confirm = entry[3]
        if code >= 0x80:
            log.error("publish_refused", mid=packet_id, reason=code, topic=entry[0])
        if confirm is not None:
            confirm(code < 0x80)
        self._release()

    def _keepalive(self) -> None:
        now = time.monotonic()
        keepalive = self._keepalive_s
        if now - self._last_read > 1.5 * keepalive:
            raise ConnectionLostError("keepalive: nothing from the broker")
        if now - self._last_write >= keepalive:
            self._out += _PING
            self._flush()

    # -- publishes ----------------------------------------------------------------------------
    def _new_id(self) -> int:
        packet_id = self._next_id
        while packet_id in self._inflight:
            packet_id = packet_id % 65535 + 1
        self._next_id = packet_id % 65535 + 1
        return packet_id

    def _send_publish(
        self,
        entry: tuple[str, bytes, bool, Confirm | None],
        *,
        duplicate: bool,
        packet_id: int | None = None,
    ) -> None:
        packet_id = packet_id if packet_id is not None else self._new_id()
        self._inflight[packet_id] = entry
        self._out += mqtt5.PublishPacket(
            entry[0],
            entry[1],
            qos=_QOS1,
            retain=entry[2],
            packet_id=packet_id,
            duplicate=duplicate,
        ).write()

    def _release(self) -> None:
        """Send waiting publishes while the broker's Receive Maximum has room."""
        waiting, quota = self._waiting, self._send_quota
        while waiting and len(self._inflight) < quota:
            self._send_publish(waiting.popleft(), duplicate=False)
