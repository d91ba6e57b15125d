"""Retained messages on the NATS cluster: published through its MQTT listener (MQTT 3.1.1).

A NATS client cannot publish an MQTT-retained message: NATS's MQTT layer keeps retained
messages in its own stream (``$MQTT_rmsgs``, a format internal to the server that changed
between 2.9 and 2.10), and the only documented way in is an MQTT PUBLISH with the retain flag
(nats-io/nats-server#4392, #7872). So the JetStream detector opens one MQTT 3.1.1 connection
to the cluster's MQTT listeners and publishes every retained message (each machine's
``<root>/alerts/<line>/<m>/state`` and its own status) there, QoS 1. The server stores it in
``$MQTT_rmsgs`` (R3) before the PUBACK, delivers it to the live subscribers once, and the
output stream still captures the subject; a subscriber connecting later to any node gets
each machine's latest state. The connection's last will is the detector's retained
``offline`` status, as on Mosquitto.

paho runs its own network thread; ``publish`` hands back an asyncio future that the PUBACK
resolves (``True``) or a refusal/disconnect resolves ``False``. On a lost connection paho
reconnects to the next listener in the list (a node died: another one serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from pydantic import SecretStr

from factorywatch import mqtt as fwmqtt
from factorywatch.errors import BrokerError
from factorywatch.settings import BrokerSettings

log = structlog.get_logger("detector.retained")


def parse_endpoints(value: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` -> ``[(host, port), ...]``; a clear error otherwise."""
    endpoints: list[tuple[str, int]] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--nats-mqtt {value!r}: comma-separated host:port, not {item!r}")
        endpoints.append((host, int(port)))
    if not endpoints:
        raise ValueError(f"--nats-mqtt {value!r}: at least one host:port")
    return endpoints


class RetainedPublisher:
    """One MQTT 3.1.1 connection to the cluster that publishes retained messages, QoS 1."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        client_id: str,
        *,
        user: str | None = None,
        password: str | None = None,
        tls_ca: Path | None = None,
        will: tuple[str, bytes] | None = None,
        connect_retries: int = 10,
    ) -> None:
        if not endpoints:
            raise ValueError("no MQTT endpoint")
        self.endpoints = list(endpoints)
        self._next = 0
        host, port = self.endpoints[0]
        self.settings = BrokerSettings(
            host=host,
            port=port,
            username=user,
            password=SecretStr(password) if password is not None else None,
            password_file=None,
            secrets_dir=None,
            tls_ca=tls_ca,
            tls_cert=None,
            tls_key=None,
            protocol="3.1.1",
            keepalive_s=10,
            connect_retries=connect_retries,
        )
        self.client = fwmqtt.new_client(self.settings, client_id, will=will)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._waiter = fwmqtt.ConnectWaiter()
        self._lock = threading.Lock()
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._early: dict[int, bool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    # -- paho callbacks (paho's network thread) ----------------------------------------------
    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._waiter.record(reason)
        if reason.is_failure:
            log.error("retained_connection_refused", reason=str(reason))
        else:
            log.info("retained_connection_up", host=self.client.host, port=self.client.port)

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        log.warning("retained_connection_lost", port=client.port, reason=str(reason))
        if len(self.endpoints) > 1:
            self._next = (self._next + 1) % len(self.endpoints)
            host, port = self.endpoints[self._next]
            with contextlib.suppress(RuntimeError):  # paho refuses while a socket is open
                client.host, client.port = host, port

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        ok = not fwmqtt.reason_failed(reason)
        with self._lock:
            future = self._pending.pop(mid, None)
            if future is None:  # the PUBACK beat ``publish`` to recording the mid
                self._early[mid] = ok
                return
        self._resolve(future, ok)

    def _resolve(self, future: asyncio.Future[bool], ok: bool) -> None:
        if self._loop is None:
            return

        def settle() -> None:
            if not future.done():
                future.set_result(ok)

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(settle)

    # -- API (the asyncio side) --------------------------------------------------------------
    async def start(self) -> None:
        """Connect (bounded retries, a clear error on a refused login) and start paho's thread."""
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(fwmqtt.connect, self.client, self.settings, self._waiter)
        except BrokerError as exc:
            raise BrokerError(f"the cluster's MQTT listener (retained state): {exc}") from None

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[bool]:
        """Publish ``payload`` retained, QoS 1; the future is True once the server stored it."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        info = self.client.publish(topic, payload, qos=fwmqtt.QOS, retain=True)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            future.set_result(False)
            return future
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = future
                return future
        future.set_result(early)
        return future

    def is_connected(self) -> bool:
        """paho's view of the connection."""
        return bool(self.client.is_connected())

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop paho's thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            self._resolve(future, False)
