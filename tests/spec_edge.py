"""A Sparkplug B 3.0 edge node written from the specification, for conformance tests.

Independent of the ingest and of every Sparkplug library: the payloads are encoded here,
byte by byte, in the protobuf wire format of ``sparkplug_b.proto`` (Payload: timestamp 1,
metrics 2, seq 3; Metric: name 1, alias 2, timestamp 3, datatype 4, is_historical 5,
is_transient 6, is_null 7, int_value 10, long_value 11, float_value 12, double_value 13,
boolean_value 14, string_value 15). It behaves as the specification allows and the project's
reference-client edge node does not:

* births declare every metric with name, alias and data type
  (tck-id-payloads-metric-datatype-req); data carries aliases only and **no data type**
  (tck-id-payloads-metric-datatype-not-req), and only the metrics that changed (report by
  exception);
* ``seq`` counts 0..255 and wraps (tck-id-payloads-sequence-num-incrementing), NBIRTH is 0
  (tck-id-topics-nbirth-seq-num); the test may skip numbers to make a gap;
* NDEATH carries only ``bdSeq`` (tck-id-topics-ndeath-payload) and no ``seq``.

``StoreAndForwardEdge`` runs such a node over a real MQTT connection, configured for a
primary host: it reads the host's retained ``spBv1.0/STATE/<host id>`` (JSON, newest
timestamp wins), publishes births and data at QoS 0 only while the host is online, stores
readings while it is offline and replays them, in order and ``is_historical``, as soon as it
is online again.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from factorywatch import mqtt as fwmqtt
from factorywatch.settings import BrokerSettings

# sparkplug_b.proto DataType values (Sparkplug 3.0, section 6.4.16)
INT32, INT64, FLOAT, DOUBLE, BOOLEAN, STRING = 3, 4, 9, 10, 11, 12

#: The AI4I metric names a plant edge node would use, and their data types.
METRICS: dict[str, tuple[str, int]] = {
    "air_temperature_k": ("Air temperature [K]", FLOAT),
    "process_temperature_k": ("Process temperature [K]", DOUBLE),
    "rotational_speed_rpm": ("Rotational speed [rpm]", INT32),
    "torque_nm": ("Torque [Nm]", DOUBLE),
    "tool_wear_min": ("Tool wear [min]", INT64),
}
PRODUCT_TYPE = "Product Type"


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative numbers as their 64-bit two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _uint(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def _bytes(number: int, value: bytes) -> bytes:
    return _key(number, 2) + _varint(len(value)) + value


def metric(
    *,
    name: str | None = None,
    alias: int | None = None,
    ts_ms: int | None = None,
    datatype: int | None = None,
    value: float | str | bool | None = None,
    value_type: int | None = None,
    historical: bool = False,
    transient: bool = False,
) -> bytes:
    """One encoded Metric; ``value_type`` picks the value field (default: ``datatype``'s).

    ``value`` None sends ``is_null``; ``datatype`` None leaves the data type out (as DATA
    messages should); a ``value_type`` other than the birth's makes a wrongly typed value.
    """
    out = b""
    if name is not None:
        out += _bytes(1, name.encode())
    if alias is not None:
        out += _uint(2, alias)
    if ts_ms is not None:
        out += _uint(3, ts_ms)
    if datatype is not None:
        out += _uint(4, datatype)
    if historical:
        out += _uint(5, 1)
    if transient:
        out += _uint(6, 1)
    if value is None:
        return out + _uint(7, 1)
    return out + _value_field(value_type if value_type is not None else datatype, value)


def _value_field(kind: int | None, value: float | str | bool) -> bytes:
    """The value in the field of data type ``kind`` (section 6.4.16's table)."""
    if kind == INT32:
        return _uint(10, int(value) & 0xFFFFFFFF)  # two's complement in a uint32
    if kind == INT64:
        return _uint(11, int(value))
    if kind == FLOAT:
        return _key(12, 5) + struct.pack("<f", float(value))
    if kind == DOUBLE:
        return _key(13, 1) + struct.pack("<d", float(value))
    if kind == BOOLEAN:
        return _uint(14, int(bool(value)))
    if kind == STRING:
        return _bytes(15, str(value).encode())
    raise ValueError(f"no value field for data type {kind}")


def payload(ts_ms: int | None, metrics: list[bytes], seq: int | None) -> bytes:
    """One encoded Payload."""
    out = b"" if ts_ms is None else _uint(1, ts_ms)
    for m in metrics:
        out += _bytes(2, m)
    return out if seq is None else out + _uint(3, seq)


@dataclass
class SpecEdgeNode:
    """One edge node and its devices; each method returns ``(topic, payload bytes)``."""

    group: str
    node: str
    bd_seq: int = 0
    seq: int = 0
    #: per device: channel -> alias, as its DBIRTH declared them
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)

    def _topic(self, kind: str, device: str | None = None) -> str:
        tail = f"/{device}" if device else ""
        return f"spBv1.0/{self.group}/{kind}/{self.node}{tail}"

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) % 256
        return seq

    def skip(self, count: int) -> None:
        """Lose ``count`` messages (their sequence numbers are never sent)."""
        self.seq = (self.seq + count) % 256

    def nbirth(self, ts_ms: int) -> tuple[str, bytes]:
        """NBIRTH: seq 0, ``bdSeq`` and ``Node Control/Rebirth``."""
        self.seq = 0
        metrics = [
            metric(name="bdSeq", ts_ms=ts_ms, datatype=INT64, value=self.bd_seq),
            metric(name="Node Control/Rebirth", ts_ms=ts_ms, datatype=BOOLEAN, value=False),
        ]
        return self._topic("NBIRTH"), payload(ts_ms, metrics, self._next_seq())

    def ndeath(self) -> tuple[str, bytes]:
        """NDEATH (also the MQTT will): ``bdSeq`` only, no seq."""
        body = payload(None, [metric(name="bdSeq", datatype=INT64, value=self.bd_seq)], None)
        return self._topic("NDEATH"), body

    def dbirth(
        self, device: str, values: dict[str, float], product_type: str, ts_ms: int
    ) -> tuple[str, bytes]:
        """DBIRTH: every metric with name, alias, data type and value."""
        table = self.aliases.setdefault(device, {})
        metrics = []
        for index, (channel, (name, datatype)) in enumerate(METRICS.items(), start=1):
            table[channel] = 10 * (len(self.aliases)) + index
            metrics.append(
                metric(
                    name=name,
                    alias=table[channel],
                    ts_ms=ts_ms,
                    datatype=datatype,
                    value=values[channel],
                )
            )
        table[PRODUCT_TYPE] = 10 * len(self.aliases)
        metrics.append(
            metric(
                name=PRODUCT_TYPE,
                alias=table[PRODUCT_TYPE],
                ts_ms=ts_ms,
                datatype=STRING,
                value=product_type,
            )
        )
        return self._topic("DBIRTH", device), payload(ts_ms, metrics, self._next_seq())

    def ddata(
        self,
        device: str,
        values: dict[str, float | str | None],
        ts_ms: int,
        *,
        by_name: bool = False,
        historical: bool = False,
        value_types: dict[str, int] | None = None,
    ) -> tuple[str, bytes]:
        """DDATA with only ``values`` (channel -> value), by alias and without data types."""
        metrics = []
        for channel, value in values.items():
            name, datatype = METRICS[channel]
            metrics.append(
                metric(
                    name=name if by_name else None,
                    alias=None if by_name else self.aliases[device][channel],
                    ts_ms=ts_ms,
                    value=value,
                    value_type=(value_types or {}).get(channel, datatype),
                    historical=historical,
                )
            )
        return self._topic("DDATA", device), payload(ts_ms, metrics, self._next_seq())

    def ddeath(self, device: str, ts_ms: int) -> tuple[str, bytes]:
        """DDEATH of one device (with the next seq)."""
        return self._topic("DDEATH", device), payload(ts_ms, [], self._next_seq())


class StoreAndForwardEdge:
    """A ``SpecEdgeNode`` on a real connection that waits for, and stores for, a primary host.

    Data goes out at QoS 0 (what Sparkplug edge nodes use) while the host's STATE says online;
    while it says offline each reading is stored, and on the next online the stored ones are
    published first, in order, every metric ``is_historical``, then live data goes on. A STATE
    older than the newest one seen is ignored (an old will delivered late).
    """

    def __init__(self, settings: BrokerSettings, node: SpecEdgeNode, host_id: str) -> None:
        self.node = node
        self.state_topic = f"spBv1.0/STATE/{host_id}"
        self.online = False
        self.state_ms = -1
        self.stored: list[tuple[str, dict[str, float | str | None], int]] = []
        self.live: list[int] = []  # timestamp (ms) of each live DDATA
        self.replayed: list[int] = []  # timestamp (ms) of each historical DDATA
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.client = fwmqtt.new_client(settings, f"saf-{node.group}-{node.node}")
        self.client.will_set(*node.ndeath(), qos=1, retain=False)
        waiter = fwmqtt.ConnectWaiter()

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            c.subscribe(self.state_topic, qos=1)
            waiter.record(rc)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_state
        fwmqtt.connect(self.client, settings, waiter)
        assert self._subscribed.wait(10), "STATE subscription not acknowledged"

    def _on_state(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        with self._lock:
            if data["timestamp"] < self.state_ms:
                return  # older than what we know: a previous session's message
            self.state_ms = data["timestamp"]
            came_back = data["online"] and not self.online
            self.online = bool(data["online"])
            if came_back:
                self._replay()
            self._lock.notify_all()

    def _replay(self) -> None:
        """Publish what was stored while the host was away (the lock is held)."""
        for device, values, ts_ms in self.stored:
            self._publish(self.node.ddata(device, values, ts_ms, historical=True))
            self.replayed.append(ts_ms)
        self.stored.clear()

    def _publish(self, message: tuple[str, bytes]) -> None:
        self.client.publish(message[0], message[1], qos=0)

    def wait_state(self, online: bool, timeout: float = 30.0) -> None:
        """Wait until the host's STATE says ``online`` (and the replay, if any, is out)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.online != online:
                left = deadline - time.monotonic()
                assert left > 0, f"the primary host never went {'on' if online else 'off'}line"
                self._lock.wait(left)

    def births(self, devices: dict[str, dict[str, float]], ts_ms: int) -> None:
        """NBIRTH and a DBIRTH per device (QoS 0; the host must be online)."""
        with self._lock:
            assert self.online, "births wait for the primary host"
            self._publish(self.node.nbirth(ts_ms))
            for device, values in devices.items():
                self._publish(self.node.dbirth(device, values, "L", ts_ms))

    def reading(self, device: str, values: dict[str, float | str | None], ts_ms: int) -> bool:
        """One reading: published live (True) or stored for the host (False)."""
        with self._lock:
            if not self.online:
                self.stored.append((device, values, ts_ms))
                return False
            self._publish(self.node.ddata(device, values, ts_ms))
            self.live.append(ts_ms)
            return True

    def close(self) -> None:
        """Disconnect cleanly (no will is sent)."""
        self.client.disconnect()
        self.client.loop_stop()
