"""A Sparkplug B edge node for tests, built on Eclipse Tahu's reference Python client.

Its payloads come from Tahu's ``sparkplug_b.py`` (``addMetric`` and the generated
``Payload``, as shipped by the sparkplug-b-packets package), not from the ingest's code, so
the tests check the ingest against an independent implementation. The test decides every
sequence number (to make gaps and wraps) and every ``bdSeq``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from sparkplub_b_packets.core import sparkplug_b as tahu

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import Telemetry
from factorywatch.settings import BrokerSettings

#: AI4I channels as a Sparkplug edge node would name its metrics (the dataset's columns).
AI4I_METRICS = {
    "air_temperature_k": "Air temperature [K]",
    "process_temperature_k": "Process temperature [K]",
    "rotational_speed_rpm": "Rotational speed [rpm]",
    "torque_nm": "Torque [Nm]",
    "tool_wear_min": "Tool wear [min]",
}
PRODUCT_TYPE_METRIC = "Product Type"
T = tahu.MetricDataType


@dataclass
class TahuEdgeNode:
    """One edge node and its devices; each method returns ``(topic, payload bytes)``."""

    group: str
    node: str
    bd_seq: int = 0
    seq: int = 0
    aliases: dict[str, int] = field(default_factory=dict)

    def _topic(self, kind: str, device: str | None = None) -> str:
        tail = f"/{device}" if device else ""
        return f"spBv1.0/{self.group}/{kind}/{self.node}{tail}"

    def _payload(self, ts_ms: int, *, seq: bool = True) -> Any:
        payload = tahu.sparkplug_b_pb2.Payload()
        payload.timestamp = ts_ms
        if seq:
            payload.seq = self.seq
            self.seq = (self.seq + 1) % 256
        return payload

    def nbirth(self, ts_ms: int) -> tuple[str, bytes]:
        """A node birth: sequence numbers start again at 0; carries ``bdSeq``."""
        self.seq = 0
        payload = self._payload(ts_ms)
        tahu.addMetric(payload, "bdSeq", None, T.Int64, self.bd_seq, ts_ms)
        tahu.addMetric(payload, "Node Control/Rebirth", None, T.Boolean, False, ts_ms)
        return self._topic("NBIRTH"), payload.SerializeToString()

    def ndeath(self, bd_seq: int | None = None) -> tuple[str, bytes]:
        """A node death (the last will): ``bdSeq`` of the session it ends, no ``seq``."""
        payload = tahu.sparkplug_b_pb2.Payload()
        value = self.bd_seq if bd_seq is None else bd_seq
        tahu.addMetric(payload, "bdSeq", None, T.Int64, value, 0)
        return self._topic("NDEATH"), payload.SerializeToString()

    def dbirth(self, device: str, reading: Telemetry, ts_ms: int) -> tuple[str, bytes]:
        """A device birth declaring every metric (name, type, alias) with its value."""
        payload = self._payload(ts_ms)
        for index, (channel, name) in enumerate(AI4I_METRICS.items(), start=1):
            alias = self.aliases.setdefault(f"{device}/{name}", 100 * len(self.aliases) + index)
            tahu.addMetric(payload, name, alias, T.Double, reading.readings[channel], ts_ms)
        tahu.addMetric(payload, PRODUCT_TYPE_METRIC, None, T.String, reading.product_type, ts_ms)
        return self._topic("DBIRTH", device), payload.SerializeToString()

    def ddata(
        self, device: str, values: dict[str, float], ts_ms: int, *, by_alias: bool = True
    ) -> tuple[str, bytes]:
        """Device data carrying only ``values`` (channel -> value), by alias as is usual."""
        payload = self._payload(ts_ms)
        for channel, value in values.items():
            name = AI4I_METRICS[channel]
            alias = self.aliases[f"{device}/{name}"]
            if by_alias:
                tahu.addMetric(payload, None, alias, T.Double, value, ts_ms)
            else:
                tahu.addMetric(payload, name, None, T.Double, value, ts_ms)
        return self._topic("DDATA", device), payload.SerializeToString()

    def reading_data(self, device: str, reading: Telemetry, ts_ms: int) -> tuple[str, bytes]:
        """A ``DDATA`` carrying every channel of ``reading``."""
        return self.ddata(device, dict(reading.readings), ts_ms)

    def ddeath(self, device: str, ts_ms: int) -> tuple[str, bytes]:
        """A device death (published by its edge node)."""
        return self._topic("DDEATH", device), self._payload(ts_ms).SerializeToString()


def decode(payload: bytes) -> Any:
    """A payload parsed with Tahu's generated class (to read the detector's commands)."""
    return tahu.sparkplug_b_pb2.Payload.FromString(payload)


class EdgeMessages(Protocol):
    """What ``LiveEdge`` needs of an edge node (Tahu's here, or the spec's in spec_edge)."""

    group: str
    node: str

    def ndeath(self) -> tuple[str, bytes]:
        """The node's death certificate (its will)."""
        ...


class LiveEdge:
    """A real MQTT client publishing a ``TahuEdgeNode``'s messages at QoS 1.

    Its last will is the node's ``NDEATH``; it records the rebirth requests (``NCMD``) the
    detector sends it, and the test decides when to answer them.
    """

    def __init__(self, settings: BrokerSettings, node: EdgeMessages) -> None:
        self.node = node
        self.requests: list[Any] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._ncmd = f"spBv1.0/{node.group}/NCMD/{node.node}"
        self.client = fwmqtt.new_client(settings, f"edge-{node.group}-{node.node}")
        self.client.will_set(*node.ndeath(), qos=1, retain=False)
        waiter = fwmqtt.ConnectWaiter()

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            c.subscribe(self._ncmd, qos=1)
            waiter.record(rc)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        fwmqtt.connect(self.client, settings, waiter)
        assert self._subscribed.wait(10), "NCMD subscription not acknowledged"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.requests.append(decode(bytes(msg.payload)))
            self._cond.notify_all()

    def send(self, message: tuple[str, bytes]) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(message[0], message[1], qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"no PUBACK for {message[0]}"

    def wait_rebirth_requests(self, count: int, timeout: float = 30.0) -> int:
        """Wait until ``count`` rebirth requests arrived; how many did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return len(self.requests)

    def close(self) -> None:
        """Disconnect cleanly (no will is sent)."""
        self.client.disconnect()
        self.client.loop_stop()
