"""Sparkplug B ingest: the detector as a (non-primary) Sparkplug host application.

Pure: values in, values out (the protobuf codec is esio-spb-builder's generated Tahu
``sparkplug_b_pb2``; no paho, no clock reads: times come with the messages and ``now``).

What it keeps per edge node (``<group>/<edge node>``): the ``bdSeq`` of its birth, the
birth's timestamp (the epoch its sequence numbers count from), the last sequence number as
an *extended* number that keeps counting past the wrap at 255, and the numbers still missing
from a gap; per device (and the node's own metrics): the alias table and the last-known
value and timestamp of every metric, from its birth certificate on.

* ``NBIRTH``/``DBIRTH`` build the tables (a birth is a reading too, when it carries every
  channel the model needs); ``NDATA``/``DDATA`` update the values they carry and become one
  reading of that device with every last-known value.
* ``NDEATH`` whose ``bdSeq`` matches the birth's marks the node and all its devices OFFLINE
  and their values stale (a death of an older session is ignored); ``DDEATH`` one device.
* A gap in the sequence numbers not filled within ``reorder_timeout_s`` asks the node for a
  rebirth (``NCMD`` ``Node Control/Rebirth`` = true). So does data before any birth (or after
  a death, or with an alias no birth declared): it is dead-lettered ``no_birth``, never
  guessed. Requests to one node are at least ``rebirth_backoff_s`` apart.
* A payload that is not a Sparkplug protobuf is dead-lettered ``invalid_protobuf``; the gap
  it leaves is filled by the rebirth.

Mapping (the README's Sparkplug section documents it): a device's machine id is
``<edge node>.<device>`` (a node's own metrics: ``<edge node>``) and its line is the group
id; characters outside ``A-Z a-z 0-9 _ . -`` become ``_``; two Sparkplug devices that map
to one machine id are refused (``bad_topic``). Metric names become channel names through
``channel_name`` (``Pump/Flow Rate`` -> ``pump_flow_rate``, ``Air temperature [K]`` ->
``air_temperature_k``); a String metric named ``Product Type`` (any spelling that maps to
``product_type``) gives the reading's product type.

A reading's identity is ``spb:<group>/<node>/<device>:<bdSeq>:<birth ms>:<extended seq>``
and its digest is the payload's CRC-32: a message the broker redelivers after a restart has
the same identity and digest, so the engine drops it as a duplicate.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from esio_spb_builder.core import sparkplug_b_pb2  # Eclipse Tahu's schema, generated
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from factorywatch.channels import canonical
from factorywatch.contracts import AI4I_CHANNELS, MAX_BATCH_BYTES, Telemetry
from factorywatch.detector.core import Received
from factorywatch.detector.ingest import Command, IngestEffects, Reading
from factorywatch.errors import PayloadError
from factorywatch.sparkplug_codec import BD_SEQ_METRIC, BOOLEAN, REBIRTH_METRIC, add_metric
from factorywatch.topics import (
    ID_PATTERN,
    SPARKPLUG_NAMESPACE,
    SparkplugTopic,
    parse_sparkplug,
    sparkplug_topic,
)

SNAPSHOT_VERSION: Final = 1
PRODUCT_TYPE: Final = "product_type"
_SEQ_MODULO: Final = 256
_MAX_MISSING: Final = 256  # a larger gap is one rebirth anyway
_ID_RE: Final = re.compile(ID_PATTERN)
_NOT_ID_CHAR: Final = re.compile(r"[^A-Za-z0-9_.-]")

# Sparkplug B data types (sparkplug_b.proto's DataType enum) the ingest reads as numbers.
_SIGNED_BITS: Final = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64, two's complement in uints
_UNSIGNED: Final = {5: 8, 6: 16, 7: 32, 8: 64}  # UInt8..UInt64
_FLOATS: Final = frozenset({9, 10})  # Float, Double
_STRINGS: Final = frozenset({12, 14})  # String, Text
_CONTROLS: Final = ("Node Control/", "Device Control/", "Properties/")

# -- names -----------------------------------------------------------------------------------------


def channel_name(metric: str) -> str:
    """The channel name of a Sparkplug metric name (``Pump/Flow Rate`` -> ``pump_flow_rate``).

    ``factorywatch.channels.canonical``: the one mapping every ingest and CSV training use
    (raises ``ChannelNameError``, a ``ValueError``, for a name with no letters or digits).
    """
    return canonical(metric)


def machine_id(node: str, device: str | None) -> str:
    """The machine id of a Sparkplug device (``<node>.<device>``) or of a node's own metrics."""
    raw = node if device is None else f"{node}.{device}"
    return _valid_id(raw, "machine id")


def line_id(group: str) -> str:
    """The production line of a Sparkplug group."""
    return _valid_id(group, "line")


def _valid_id(raw: str, what: str) -> str:
    mapped = _NOT_ID_CHAR.sub("_", raw)
    if not _ID_RE.fullmatch(mapped):
        raise PayloadError(
            "bad_topic", f"Sparkplug {raw!r} does not map to a valid {what} (got {mapped!r})"
        )
    return mapped


# -- the protobuf ----------------------------------------------------------------------------------
def _parse(payload: bytes) -> Any:
    if len(payload) > MAX_BATCH_BYTES:
        raise PayloadError("oversize", f"{len(payload)} bytes > {MAX_BATCH_BYTES}")
    try:
        parsed = sparkplug_b_pb2.Payload.FromString(payload)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise PayloadError("invalid_protobuf", f"not a Sparkplug B payload: {exc}") from None
    # protobuf hands out a name that is not UTF-8 as bytes: it would break the checkpoint
    if not all(isinstance(metric.name, str) for metric in parsed.metrics):
        raise PayloadError("invalid_protobuf", "a metric name is not UTF-8")
    return parsed


def _value(metric: Any) -> float | str | None:
    """A metric's value as a number (or text for String/Text); None when null or unreadable.

    Signed integers travel as their two's complement in the unsigned ``int_value`` /
    ``long_value`` fields (Tahu's encoding): the data type says how to read them back.
    """
    field_name = metric.WhichOneof("value")
    if metric.is_null or field_name is None:
        return None
    datatype = metric.datatype
    if field_name in ("int_value", "long_value") and datatype in _SIGNED_BITS | _UNSIGNED:
        raw = int(getattr(metric, field_name))
        bits = _SIGNED_BITS.get(datatype)
        if bits is not None:
            raw &= (1 << bits) - 1
            raw = raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
        return float(raw)
    if field_name in ("float_value", "double_value") and datatype in _FLOATS:
        return float(getattr(metric, field_name))
    if field_name == "boolean_value" and datatype == BOOLEAN:
        return 1.0 if metric.boolean_value else 0.0
    if field_name == "string_value" and datatype in _STRINGS:
        return str(metric.string_value)
    return None  # DateTime, arrays, datasets, templates, bytes: not a channel


def rebirth_request(group: str, node: str, now: float) -> Command:
    """The ``NCMD`` asking an edge node to publish its births again."""
    payload = sparkplug_b_pb2.Payload()
    payload.timestamp = int(now * 1000)
    add_metric(payload, True, payload.timestamp, datatype=BOOLEAN, name=REBIRTH_METRIC)
    return Command(sparkplug_topic(group, "NCMD", node), payload.SerializeToString())


# -- state -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Device:
    """A device (or a node's own metrics): its alias table and last-known values."""

    machine_id: str
    aliases: dict[int, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    values: dict[str, float] = field(default_factory=dict)
    stamps: dict[str, int] = field(default_factory=dict)
    product_type: str | None = None
    alive: bool = True
    #: a missing channel was dead-lettered once since the birth (not again for every message)
    incomplete: bool = False


@dataclass(slots=True)
class _Node:
    """An edge node as its birth declared it, and where its sequence numbers stand."""

    bd_seq: int | None = None
    birth_ms: int = 0
    born: bool = False
    last: int = 0  # extended seq of the newest message since the birth
    missing: dict[int, float] = field(default_factory=dict)  # extended seq -> deadline
    devices: dict[str, _Device] = field(default_factory=dict)  # "" = the node's own metrics
    next_rebirth: float = 0.0


@dataclass(slots=True)
class _Update:
    """What one message's metrics say (by channel) and the names no birth declared."""

    timestamp_ms: int = 0
    values: dict[str, float | None] = field(default_factory=dict)
    product_type: str | None = None
    unknown: list[str] = field(default_factory=list)


def _node_key(topic: SparkplugTopic) -> str:
    return f"{topic.group}/{topic.node}"


@dataclass(frozen=True, slots=True)
class SparkplugSettings:
    """The ingest's knobs (``FACTORYWATCH_DETECTOR_SPARKPLUG_*``)."""

    reorder_timeout_s: float = 2.0
    rebirth_backoff_s: float = 5.0
    max_clock_skew_s: float = 7 * 24 * 3600.0


class SparkplugIngest:
    """Sparkplug B births, deaths and data in; readings, rebirth requests and deaths out."""

    name = "sparkplug"

    def __init__(
        self,
        settings: SparkplugSettings | None = None,
        groups: Sequence[str] | None = None,
        *,
        ignore_groups: Sequence[str] = (),
    ) -> None:
        self.settings = settings if settings is not None else SparkplugSettings()
        self.groups = frozenset(groups) if groups else None
        #: groups whose messages are consumed silently (the detector's own Sparkplug out)
        self.ignore_groups = frozenset(ignore_groups)
        self.channels: tuple[str, ...] = AI4I_CHANNELS
        self.nodes: dict[str, _Node] = {}
        self._owners: dict[str, str] = {}  # machine id -> "<group>/<node>/<device>"
        self._gapped: set[str] = set()  # nodes with missing sequence numbers
        self._dirty: set[str] = set()  # nodes changed since the last ``changes``
        self._effects = IngestEffects()
        self._prefix = f"{SPARKPLUG_NAMESPACE}/"

    # -- the Ingest protocol ---------------------------------------------------------------------
    def accepts(self, topic: str) -> bool:
        """Sparkplug B topics (of the configured groups)."""
        if not topic.startswith(self._prefix):
            return False
        return self.groups is None or topic.split("/", 2)[1] in self.groups

    def origin(self, topic: str) -> tuple[str, str] | None:
        """The line and machine a Sparkplug topic maps to (None if it maps to none)."""
        try:
            parsed = parse_sparkplug(topic)
            return line_id(parsed.group), machine_id(parsed.node, parsed.device)
        except PayloadError:
            return None

    def bind(self, channels: Sequence[str]) -> None:
        """Build readings with the serving model's channels."""
        self.channels = tuple(channels)

    def take_effects(self, now: float) -> IngestEffects:
        """Rebirth requests and deaths since the last call; gaps past their timeout at ``now``."""
        for key in sorted(self._gapped):
            node = self.nodes[key]
            if not node.missing:
                self._gapped.discard(key)
            elif min(node.missing.values()) <= now:
                node.missing.clear()
                self._dirty.add(key)
                self._gapped.discard(key)
                self._request_rebirth(key, node, now)
        effects, self._effects = self._effects, IngestEffects()
        return effects

    def decode(self, message: Received) -> list[Reading | PayloadError]:
        """The readings of one Sparkplug message (births and data); deaths give none."""
        topic = parse_sparkplug(message.topic)
        if topic.group in self.ignore_groups:
            return []
        return self._decode(topic, message)

    def _decode(self, topic: SparkplugTopic, message: Received) -> list[Reading | PayloadError]:
        payload = _parse(message.payload)
        key = _node_key(topic)
        node = self.nodes.setdefault(key, _Node())
        self._dirty.add(key)
        now = message.received_at
        if topic.kind == "NDEATH":
            self._node_death(node, payload)
            return []
        if topic.kind == "NBIRTH":
            self._node_birth(node, payload)
        seq = self._sequence(node, payload, now) if node.born else None
        self.gapped(key)
        if seq is None:
            why = "no NBIRTH (since a death or start)" if not node.born else "older than NBIRTH"
            return [self._no_birth(key, node, now, why)]
        device_key = topic.device or ""
        if topic.kind in ("NBIRTH", "DBIRTH"):
            node.devices[device_key] = _Device(self._claim(topic))
        device = node.devices.get(device_key)
        if topic.kind == "DDEATH":
            if device is not None and device.alive:
                device.alive = False
                device.values.clear()
                self._effects.offline.append(device.machine_id)
            return []
        if device is None or not device.alive:
            return [self._no_birth(key, node, now, f"no DBIRTH for device {topic.device!r}")]
        birth = topic.kind in ("NBIRTH", "DBIRTH")
        update = self._apply(device, payload, birth=birth)
        if update.unknown:
            why = f"metrics no birth declared: {update.unknown[:5]}"
            return [self._no_birth(key, node, now, why)]
        reading = self._reading(topic, node, device, update, seq=seq, message=message)
        return [] if reading is None else [reading]

    # -- births, deaths, sequence numbers ----------------------------------------------------------
    def _node_birth(self, node: _Node, payload: Any) -> None:
        bd_seq = next((int(m.long_value) for m in payload.metrics if m.name == BD_SEQ_METRIC), None)
        node.bd_seq = bd_seq
        node.birth_ms = int(payload.timestamp)
        node.born = True
        node.missing.clear()
        for device in node.devices.values():
            device.alive = False  # every device must be born again after its node
        node.last = int(payload.seq) if payload.HasField("seq") else 0

    def _node_death(self, node: _Node, payload: Any) -> None:
        bd_seq = next((int(m.long_value) for m in payload.metrics if m.name == BD_SEQ_METRIC), None)
        if not node.born or (bd_seq is not None and bd_seq != node.bd_seq):
            return  # the will of an older session, delivered late: this session lives on
        node.born = False
        node.missing.clear()
        for device in node.devices.values():
            if device.alive:
                device.alive = False
                device.values.clear()
                self._effects.offline.append(device.machine_id)

    def _sequence(self, node: _Node, payload: Any, now: float) -> int | None:
        """The message's extended sequence number; notes gaps and fills them.

        Serial-number arithmetic on 8 bits: up to 127 ahead of the newest is new (the numbers
        skipped are missing until ``reorder_timeout_s``), anything else is late or a
        redelivery of an older message.
        """
        if not payload.HasField("seq"):
            return node.last
        seq = int(payload.seq) % _SEQ_MODULO
        delta = (seq - node.last) % _SEQ_MODULO
        if delta == 0 or delta >= _SEQ_MODULO // 2:
            extended = node.last - ((_SEQ_MODULO - delta) % _SEQ_MODULO)
            node.missing.pop(extended, None)
            return extended if extended >= 0 else None
        extended = node.last + delta
        deadline = now + self.settings.reorder_timeout_s
        for gap in range(max(node.last + 1, extended - _MAX_MISSING), extended):
            node.missing.setdefault(gap, deadline)
        node.last = extended
        return extended

    def gapped(self, key: str) -> None:
        """Remember that node ``key`` has missing sequence numbers (its timer runs)."""
        if self.nodes[key].missing:
            self._gapped.add(key)

    def _request_rebirth(self, key: str, node: _Node, now: float) -> None:
        if now < node.next_rebirth:
            return
        node.next_rebirth = now + self.settings.rebirth_backoff_s
        group, _, edge = key.partition("/")
        self._effects.commands.append(rebirth_request(group, edge, now))

    def _no_birth(self, key: str, node: _Node, now: float, why: str) -> PayloadError:
        self._request_rebirth(key, node, now)
        return PayloadError("no_birth", f"{why}: a rebirth was requested from {key}")

    def _claim(self, topic: SparkplugTopic) -> str:
        """The machine id of a device being born; refused if another device maps to it."""
        machine = machine_id(topic.node, topic.device)
        line_id(topic.group)
        owner = f"{topic.group}/{topic.node}/{topic.device or ''}"
        if self._owners.setdefault(machine, owner) != owner:
            raise PayloadError(
                "bad_topic",
                f"Sparkplug {owner} maps to machine id {machine!r} as {self._owners[machine]} does",
            )
        return machine

    # -- metrics and readings ----------------------------------------------------------------------
    def _apply(self, device: _Device, payload: Any, *, birth: bool) -> _Update:
        """The payload's metrics; the device keeps each one's newest value (by timestamp)."""
        default_ms = int(payload.timestamp)
        update = _Update(timestamp_ms=default_ms)
        for metric in payload.metrics:
            name = self._declare(device, metric) if birth else self._resolve(device, metric)
            if name is None:
                update.unknown.append(metric.name or f"alias {metric.alias}")
                continue
            if not name or name == BD_SEQ_METRIC or name.startswith(_CONTROLS):
                continue
            try:
                channel = channel_name(name)
            except ValueError:
                continue
            value = _value(metric)
            if channel == PRODUCT_TYPE:
                if not isinstance(value, str):
                    continue
                update.product_type = value
            elif isinstance(value, float) or value is None:  # None: null, the value is unknown
                update.values[channel] = value
            else:
                continue
            stamp = int(metric.timestamp) if metric.HasField("timestamp") else default_ms
            if stamp < device.stamps.get(channel, 0):
                continue  # a late message: the newer value stays the last-known one
            device.stamps[channel] = stamp
            if isinstance(value, float):
                device.values[channel] = value
            elif value is None:
                device.values.pop(channel, None)
            else:
                device.product_type = value
        return update

    @staticmethod
    def _declare(device: _Device, metric: Any) -> str:
        """A birth's metric: its name goes into the device's tables ("" if it has none)."""
        if metric.name:
            device.names.add(metric.name)
            if metric.HasField("alias"):
                device.aliases[int(metric.alias)] = metric.name
        return str(metric.name)

    @staticmethod
    def _resolve(device: _Device, metric: Any) -> str | None:
        """A data message's metric: its name, by name or alias; None if no birth declared it."""
        if metric.name:
            return str(metric.name) if metric.name in device.names else None
        if metric.HasField("alias"):
            return device.aliases.get(int(metric.alias))
        return None

    def _reading(
        self,
        topic: SparkplugTopic,
        node: _Node,
        device: _Device,
        update: _Update,
        *,
        seq: int,
        message: Received,
    ) -> Reading | PayloadError | None:
        """The device as this message saw it: its own metrics over the last-known values."""
        known = {**device.values, **update.values}
        product_type = update.product_type or device.product_type
        missing = [c for c in self.channels if known.get(c) is None]
        # Only the AI4I preset needs the product type (as the JSON decoder decides it).
        if product_type is None and set(self.channels) & set(AI4I_CHANNELS):
            missing.append(PRODUCT_TYPE)
        if missing:
            # A node's own metrics (bdSeq, controls) are not a machine; a device that lacks a
            # channel is told once, not for every message until its next birth.
            if topic.device is None or device.incomplete:
                return None
            device.incomplete = True
            return PayloadError("missing_channel", f"{device.machine_id} lacks {missing}")
        device.incomplete = False
        ts = update.timestamp_ms / 1000.0 if update.timestamp_ms else message.received_at
        skew = ts - message.received_at
        if abs(skew) > self.settings.max_clock_skew_s:
            return PayloadError("clock_skew", f"timestamp is {skew:+.0f} s from now")
        values = {c: float(known[c] or 0.0) for c in self.channels}
        if not all(math.isfinite(v) for v in values.values()):
            return PayloadError("non_finite", f"{device.machine_id}: a channel is not finite")
        try:
            telemetry = Telemetry.model_validate(
                {
                    "machine_id": device.machine_id,
                    "line": line_id(topic.group),
                    "seq": seq,
                    "ts": ts,
                    "readings": values,
                    **({"product_type": product_type} if product_type is not None else {}),
                }
            )
        except ValidationError as exc:
            return PayloadError("schema", str(exc).splitlines()[0])
        identity = (
            f"spb:{topic.group}/{topic.node}/{topic.device or ''}:"
            f"{node.bd_seq}:{node.birth_ms}:{seq}"
        )
        return Reading(telemetry, identity, zlib.crc32(message.payload))

    # -- snapshot ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Every node's tables, values and sequence position as one JSON-able value."""
        self._dirty.clear()
        nodes = {key: _node_snapshot(node) for key, node in self.nodes.items()}
        return {"version": SNAPSHOT_VERSION, "nodes": nodes}

    def restore(self, data: dict[str, Any]) -> None:
        """Take over a ``snapshot`` (an empty one: nothing known, every node must be born)."""
        self.nodes.clear()
        self._owners.clear()
        self._gapped.clear()
        self._dirty.clear()
        if not data:
            return
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown Sparkplug snapshot version {data.get('version')!r}")
        self.restore_changes(data["nodes"])

    def changes(self) -> dict[str, Any]:
        """The nodes changed since the last call (or snapshot), by node key, for a journal."""
        parts = {key: _node_snapshot(self.nodes[key]) for key in sorted(self._dirty)}
        self._dirty.clear()
        return parts

    def restore_changes(self, parts: dict[str, Any]) -> None:
        """Replace these nodes with their journaled state (written by ``changes``)."""
        for key, data in parts.items():
            node = _node_restore(data)
            for device_key, device in node.devices.items():
                self._owners[device.machine_id] = f"{key}/{device_key}"
            self.nodes[key] = node
            self.gapped(key)


def _node_snapshot(node: _Node) -> dict[str, Any]:
    return {
        "bd_seq": node.bd_seq,
        "birth_ms": node.birth_ms,
        "born": node.born,
        "last": node.last,
        "missing": [[s, d] for s, d in node.missing.items()],
        "devices": {
            key: {
                "machine_id": d.machine_id,
                "aliases": [[a, name] for a, name in d.aliases.items()],
                "names": sorted(d.names),
                "values": d.values,
                "stamps": d.stamps,
                "product_type": d.product_type,
                "alive": d.alive,
            }
            for key, d in node.devices.items()
        },
    }


def _node_restore(data: dict[str, Any]) -> _Node:
    node = _Node(
        bd_seq=data["bd_seq"],
        birth_ms=int(data["birth_ms"]),
        born=bool(data["born"]),
        last=int(data["last"]),
        missing={int(s): float(d) for s, d in data["missing"]},
    )
    for key, d in data["devices"].items():
        node.devices[key] = _Device(
            machine_id=d["machine_id"],
            aliases={int(a): str(name) for a, name in d["aliases"]},
            names=set(d["names"]),
            values={str(c): float(v) for c, v in d["values"].items()},
            stamps={str(c): int(v) for c, v in d["stamps"].items()},
            product_type=d["product_type"],
            alive=bool(d["alive"]),
        )
    return node
