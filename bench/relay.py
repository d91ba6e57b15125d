"""A bare relay: the ceiling a detector on this broker and machine can hope to reach.

``python -m bench.relay --port P --root R --client C`` subscribes ``<R>/telemetry/+/+`` at
QoS 1 and republishes every payload unchanged to ``<R>/alerts/<line>/<machine>/verdict`` at
QoS 1: no decoding, no validation, no scoring. ``--client`` picks the Python MQTT client:

* ``paho5``: paho-mqtt speaking MQTT 5 (what the project uses);
* ``paho311``: paho-mqtt speaking MQTT 3.1.1;
* ``gmqtt``: gmqtt (asyncio, its own packet codec) speaking MQTT 5;
* ``paho5tuned``: paho-mqtt MQTT 5 tuned: one thread drives ``loop()`` itself, the packets of
  a loop are written together (as ``detector/mqtt_transport.py`` does), and a PUBLISH without
  properties is decoded without a ``Properties`` object;
* ``mqtt5``: the detector's ``--transport mqtt5`` driver (``detector/mqtt5_transport.py``:
  the compiled ``mqtt5`` codec, one socket, one ``sendall`` per turn).

``--lines L1,L2`` subscribes those lines only (a shard, like ``factorywatch detect --lines``).
It prints ``relay_subscribed`` once the broker granted the subscription and its counters when
SIGTERM (or SIGINT) stops it. Every client runs one network thread (paho) or one event loop
(gmqtt) and acknowledges incoming messages itself, as a relay need not wait for anything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from types import FrameType
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion

from factorywatch import mqtt as fwmqtt
from factorywatch import runtime
from factorywatch.detector.mqtt5_transport import Mqtt5Transport
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

READY: Final = "relay_subscribed"
CLIENTS: Final = ("paho5", "paho311", "gmqtt", "paho5tuned", "mqtt5")


class _Routes:
    """Where a telemetry topic's payload goes: ``.../telemetry/<l>/<m>`` -> ``.../alerts/...``."""

    def __init__(self, settings: BrokerSettings, lines: Sequence[str] | None) -> None:
        self.filters = Topics(settings.topic_root).input_filters(list(lines) if lines else None)
        self._prefix = f"{settings.topic_root}/telemetry/"
        self._out = f"{settings.topic_root}/alerts/"

    def verdict_topic(self, topic: str) -> str | None:
        """The verdict topic for a telemetry topic (None for anything else)."""
        if not topic.startswith(self._prefix):
            return None
        return f"{self._out}{topic[len(self._prefix) :]}/verdict"


class PahoRelay:
    """Republishes with paho-mqtt (MQTT 5 or 3.1.1, from ``settings.protocol``)."""

    def __init__(
        self, settings: BrokerSettings, client_id: str, lines: Sequence[str] | None = None
    ) -> None:
        self.routes = _Routes(settings, lines)
        self.settings = settings
        self.relayed = 0
        self.refused = 0
        self.waiter = fwmqtt.ConnectWaiter()
        self.client = fwmqtt.new_client(settings, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.waiter.record(reason)
        if not reason.is_failure:
            client.subscribe([(f, fwmqtt.QOS) for f in self.routes.filters])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(fwmqtt.reason_failed(code) for code in codes):
            print(f"relay_subscribe_refused {[str(c) for c in codes]}", flush=True)
            return
        print(READY, flush=True)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        out = self.routes.verdict_topic(msg.topic)
        if out is not None:
            client.publish(out, msg.payload, qos=fwmqtt.QOS)
            self.relayed += 1

    def _on_publish(self, _c: mqtt.Client, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        if fwmqtt.reason_failed(reason):
            self.refused += 1

    def run(self, stop: threading.Event) -> None:
        """Connect, relay until ``stop`` is set, then disconnect."""
        fwmqtt.connect(self.client, self.settings, self.waiter)
        stop.wait()
        self.client.disconnect()
        self.client.loop_stop()


class GmqttRelay:
    """Republishes with gmqtt on one asyncio event loop (MQTT 5)."""

    def __init__(
        self, settings: BrokerSettings, client_id: str, lines: Sequence[str] | None = None
    ) -> None:
        import gmqtt  # noqa: PLC0415  (a dev dependency: only this relay needs it)

        self.routes = _Routes(settings, lines)
        self.settings = settings
        self.relayed = 0
        self.refused = 0  # gmqtt does not parse PUBACK reason codes: refusals are not seen
        self.client = gmqtt.Client(client_id)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_subscribe(self, _client: Any, _mid: int, qos: Any, _props: Any) -> None:
        if any(code >= 0x80 for code in qos):
            print(f"relay_subscribe_refused {list(qos)}", flush=True)
            return
        print(READY, flush=True)

    def _on_message(self, client: Any, topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        out = self.routes.verdict_topic(topic)
        if out is not None:
            client.publish(out, payload, qos=fwmqtt.QOS)
            self.relayed += 1
        return 0

    async def _main(self, stop: asyncio.Event) -> None:
        await self.client.connect(self.settings.host, self.settings.port, keepalive=30)
        for topic_filter in self.routes.filters:
            self.client.subscribe(topic_filter, qos=fwmqtt.QOS)
        await stop.wait()
        await self.client.disconnect()

    def run(self, stop: threading.Event) -> None:
        """Connect, relay until ``stop`` is set (SIGTERM), then disconnect."""
        del stop  # the event loop's own signal handlers end it

        async def main() -> None:
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, done.set)
            await self._main(done)

        asyncio.run(main())


_paho_decode_publish = paho_packet.decode_publish


def _write_in_next_loop(_client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
    """paho's hook for an external loop: packets wait for the next ``client.loop()``."""


def _decode_publish_lean(
    header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion
) -> Any:
    """paho's PUBLISH decoder, without a ``Properties`` object when the packet has none."""
    if protocol != MQTTProtocolVersion.MQTTv5:
        return _paho_decode_publish(header, packet, protocol)
    qos = (header & 0x06) >> 1
    topic_end = 2 + int.from_bytes(packet[:2], "big")
    at = topic_end + (2 if qos else 0)
    if packet[at] != 0:  # properties present: paho's own decoder
        return _paho_decode_publish(header, packet, protocol)
    return paho_packet.PublishPacket(
        dup=bool(header & 0x08),
        qos=qos,
        retain=bool(header & 0x01),
        topic=bytes(packet[2:topic_end]),
        mid=int.from_bytes(packet[topic_end:at], "big") if qos else 0,
        properties=None,
        payload=bytes(packet[at + 1 :]),
    )


class PahoTunedRelay(PahoRelay):
    """paho MQTT 5, tuned: one thread, batched writes, no per-message ``Properties``."""

    def __init__(
        self, settings: BrokerSettings, client_id: str, lines: Sequence[str] | None = None
    ) -> None:
        super().__init__(settings.with_overrides(protocol="5"), client_id, lines)
        self.client.on_socket_register_write = _write_in_next_loop
        # The relay's own process only: paho's client calls the decoder through its module.
        paho_packet.decode_publish = _decode_publish_lean

    def run(self, stop: threading.Event) -> None:
        """Connect, drive paho's loop on this thread until ``stop`` is set, disconnect."""
        fwmqtt.connect(self.client, self.settings, self.waiter, threaded=False)
        while not stop.is_set():
            self.client.loop(timeout=0.1)
        self.client.disconnect()
        self.client.loop_write()


class Mqtt5Relay:
    """Republishes with the detector's ``--transport mqtt5`` driver (compiled codec)."""

    def __init__(
        self, settings: BrokerSettings, client_id: str, lines: Sequence[str] | None = None
    ) -> None:
        self.routes = _Routes(settings, lines)
        self.relayed = 0
        self.refused = 0
        self.transport = Mqtt5Transport(
            settings, client_id, filters=self.routes.filters, session_expiry_s=0
        )

    def _confirmed(self, ok: bool) -> None:
        if not ok:
            self.refused += 1

    def run(self, stop: threading.Event) -> None:
        """Connect (returns after the SUBACK), relay until ``stop`` is set, then disconnect."""
        transport = self.transport
        transport.stop = stop
        transport.connect()
        print(READY, flush=True)
        verdict_topic, publish, ack = self.routes.verdict_topic, transport.publish, transport.ack
        confirmed = self._confirmed
        while not stop.is_set():
            for message in transport.receive(0.1):
                out = verdict_topic(message.topic)
                if out is not None:
                    publish(out, message.payload, confirmed=confirmed)
                    self.relayed += 1
                ack(message.token)  # a relay waits for nothing
        transport.close(5.0)


def make_relay(
    client: str, settings: BrokerSettings, client_id: str, lines: Sequence[str] | None
) -> PahoRelay | GmqttRelay | Mqtt5Relay:
    """The relay for one of ``CLIENTS``."""
    if client == "gmqtt":
        return GmqttRelay(settings, client_id, lines)
    if client == "paho5tuned":
        return PahoTunedRelay(settings, client_id, lines)
    if client == "mqtt5":
        return Mqtt5Relay(settings, client_id, lines)
    protocol = "3.1.1" if client == "paho311" else "5"
    return PahoRelay(settings.with_overrides(protocol=protocol), client_id, lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.relay``."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True, help="topic root")
    parser.add_argument("--client", choices=CLIENTS, default="paho5", help="MQTT client")
    parser.add_argument("--client-id", default=None, help="MQTT client id (default: random)")
    parser.add_argument("--lines", default=None, help="comma-separated lines (default: all)")
    args = parser.parse_args(argv)
    settings = BrokerSettings().with_overrides(host=args.host, port=args.port, topic_root=args.root)
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    lines = [x for x in (args.lines or "").split(",") if x]
    client_id = args.client_id or f"bench-relay-{uuid.uuid4().hex[:8]}"
    relay = make_relay(args.client, settings, client_id, lines or None)
    runtime.settle_heap()  # as the detector does: the ceiling gets every process-level tuning
    relay.run(stop)
    print(f"relay_stopped relayed={relay.relayed} refused={relay.refused}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
