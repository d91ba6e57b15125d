"""A Sparkplug B edge node for tests, built on Eclipse Tahu's reference Python client.

Its payloads come from Tahu's ``sparkplug_b.py`` (``addMetric`` and the generated
``Payload``, as shipped by the sparkplug-b-packets package), not from the ingest's code, so
the tests check the ingest against an independent implementation. The test decides every
sequence number (to make gaps and wraps) and every ``bdSeq``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparkplub_b_packets.core import sparkplug_b as tahu

from factorywatch.contracts import Telemetry

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
