"""A simulated Sparkplug B edge node (``factorywatch sensor --sparkplug``) for the demo.

One edge node (``spBv1.0/<group>/.../<edge node>``) whose devices are simulated machines.
It publishes what a real one does: ``NBIRTH`` (``bdSeq``, ``Node Control/Rebirth``), one
``DBIRTH`` per device declaring every metric with its name, type and alias, then ``DDATA``
by alias carrying only the metrics that changed (report by exception), a sequence number
that wraps at 255, ``NDEATH`` as its last will (and before a clean disconnect), and a new
set of births when a host application asks with ``NCMD`` ``Node Control/Rebirth``.

The metrics are named as the AI4I dataset's columns (``Air temperature [K]``, ...,
``Product Type``), so the detector maps them to the default model's channels. Data goes out
at QoS 1 (the specification allows 0): with the detector's persistent session nothing is
lost across a detector restart. The pure part (``EdgeNode``, on
``factorywatch.sparkplug_codec``'s payloads) builds the messages; ``run`` is the MQTT shell.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AI4I_CHANNELS, Telemetry
from factorywatch.sensors.publisher import Pacer, PublishStats, wait_for_pubacks
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.sparkplug_codec import (
    Message,
    SparkplugNode,
    add_metric,
    datatype_of,
    is_rebirth_request,
)
from factorywatch.topics import sparkplug_topic

log = structlog.get_logger("sensors")

#: Metric names of the AI4I channels: the dataset's own column names.
METRIC_NAMES: Final = {
    "air_temperature_k": "Air temperature [K]",
    "process_temperature_k": "Process temperature [K]",
    "rotational_speed_rpm": "Rotational speed [rpm]",
    "torque_nm": "Torque [Nm]",
    "tool_wear_min": "Tool wear [min]",
}
PRODUCT_TYPE_METRIC: Final = "Product Type"
_PRODUCT_ALIAS: Final = len(AI4I_CHANNELS) + 1


class EdgeNode(SparkplugNode):
    """The messages of one edge node (pure: no I/O; times are given)."""

    def __init__(self, group: str, node: str, devices: Sequence[str], bd_seq: int) -> None:
        super().__init__(group, node, bd_seq)
        self.devices = list(devices)
        self._last: dict[str, dict[str, float | str]] = {}

    @staticmethod
    def _add(payload: Any, name: str | None, alias: int, value: float | str, ts_ms: int) -> None:
        # births name each metric with its data type; data (by alias) leaves the type out
        add_metric(
            payload,
            value,
            ts_ms,
            datatype=datatype_of(value),
            name=name,
            alias=alias,
            typed=name is not None,
        )

    def births(self, readings: dict[str, Telemetry], ts_ms: int) -> list[Message]:
        """``NBIRTH`` then one ``DBIRTH`` per device with all its metrics (seq from 0)."""
        out = [self.nbirth(ts_ms)]
        for device in self.devices:
            reading = readings[device]
            payload = self.payload(ts_ms)
            for alias, channel in enumerate(AI4I_CHANNELS, start=1):
                self._add(payload, METRIC_NAMES[channel], alias, reading.readings[channel], ts_ms)
            product = reading.attributes["product_type"]
            self._add(payload, PRODUCT_TYPE_METRIC, _PRODUCT_ALIAS, product, ts_ms)
            self._last[device] = {**reading.readings, PRODUCT_TYPE_METRIC: product}
            out.append(self.device_message("DBIRTH", device, payload))
        return out

    def data(self, device: str, reading: Telemetry, ts_ms: int) -> Message | None:
        """``DDATA`` by alias with the metrics that changed since the last; None if none did."""
        last = self._last.setdefault(device, {})
        changed: list[tuple[int, float | str]] = [
            (alias, reading.readings[channel])
            for alias, channel in enumerate(AI4I_CHANNELS, start=1)
            if last.get(channel) != reading.readings[channel]
        ]
        product = reading.attributes["product_type"]
        if last.get(PRODUCT_TYPE_METRIC) != product:
            changed.append((_PRODUCT_ALIAS, product))
        if not changed:
            return None
        payload = self.payload(ts_ms)
        for alias, value in changed:
            self._add(payload, None, alias, value, ts_ms)
        last.update(reading.readings)
        last[PRODUCT_TYPE_METRIC] = product
        return self.device_message("DDATA", device, payload)


class EdgeNodeClient:
    """The MQTT shell of one edge node: its will, births on (re)connect and on request."""

    def __init__(self, broker: BrokerSettings, edge: EdgeNode) -> None:
        if broker.authenticates:  # an edge node logs in as itself: the ACL scopes it
            broker = broker.with_overrides(username=edge.node)
        self.broker = broker
        self.edge = edge
        self.stats = PublishStats()
        self.rebirth = threading.Event()
        self._lock = threading.Lock()
        self._waiter = fwmqtt.ConnectWaiter()
        self._ncmd = sparkplug_topic(edge.group, "NCMD", edge.node)
        self.client = fwmqtt.new_client(broker, f"spb-{edge.group}-{edge.node}")
        self.client.will_set(*edge.ndeath(), qos=1, retain=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self._ncmd, qos=1)
            self.rebirth.set()  # every (re)connection starts with births (before any data)
        self._waiter.record(reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._ncmd and is_rebirth_request(bytes(msg.payload)):
            log.info("rebirth_requested", group=self.edge.group, edge_node=self.edge.node)
            self.rebirth.set()

    def _on_publish(self, _c: mqtt.Client, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self.stats.count_puback(reason)

    def start(self) -> None:
        """Connect (bounded retries); paho reconnects by itself afterwards."""
        fwmqtt.connect(self.client, self.broker, self._waiter)

    def send(self, message: Message | None) -> None:
        """Publish at QoS 1 (nothing for None: no metric changed)."""
        if message is None:
            return
        with self._lock:
            self.stats.sent += 1
        self.client.publish(message[0], message[1], qos=1)

    def close(self, timeout_s: float = 30.0) -> PublishStats:
        """Say NDEATH (a clean disconnect sends no will), await the PUBACKs, disconnect."""
        self.send(self.edge.ndeath())
        wait_for_pubacks(self.stats, self._lock, timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            return PublishStats(**vars(self.stats))


def run(
    broker: BrokerSettings,
    group: str,
    node: str,
    sims: Sequence[MachineSimulator],
    *,
    rate_hz: float,
    count: int | None,
    stop: threading.Event,
) -> PublishStats:
    """Publish births, then ``count`` data messages per device (forever when None)."""
    devices = [sim.machine_id for sim in sims]
    shell = EdgeNodeClient(broker, EdgeNode(group, node, devices, bd_seq=int(time.time())))
    shell.start()
    log.info("edge_node_started", group=group, edge_node=node, devices=devices)
    produced, pacer = 0, Pacer(rate_hz)
    current = {sim.machine_id: sim.next(time.time()) for sim in sims}
    stats = PublishStats()
    try:
        while not stop.is_set() and (count is None or produced < count):
            now = time.time()
            if shell.rebirth.is_set():
                shell.rebirth.clear()
                for message in shell.edge.births(current, int(now * 1000)):
                    shell.send(message)
            for sim in sims:
                current[sim.machine_id] = reading = sim.next(now)
                shell.send(shell.edge.data(sim.machine_id, reading, int(now * 1000)))
            produced += 1
            pacer.wait(stop)
    finally:
        stats = shell.close()
        log.info("edge_node_stopped", **vars(stats))
    return stats
