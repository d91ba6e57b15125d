"""Sparkplug B ingest: the detector as a (non-primary) Sparkplug host application.

Pure: values in, values out (the protobuf codec is esio-spb-builder's generated Tahu
``sparkplug_b_pb2``; no paho, no clock reads: times come with the messages and ``now``).

What it keeps per edge node (``<group>/<edge node>``): the ``bdSeq`` of its birth, the
birth's timestamp (the epoch its sequence numbers count from), the last sequence number as
an *extended* number that keeps counting past the wrap at 255, the CRC-32 of the newest
message seen with each of the 256 numbers (a redelivery is told from a wrapped gap by it), and
the numbers still missing from a gap; per device (and the node's own metrics): the alias and
data-type tables and the last-known value and timestamp of every metric, from its birth
certificate on.

* With a registry, only a registered edge node, in its own group, for its devices, is read
  (``unauthorized_machine`` otherwise, before any state is made).
* ``NBIRTH``/``DBIRTH`` build the tables (a birth is a reading too, when it carries every
  channel the model needs); ``NDATA``/``DDATA`` update the values they carry (each read as
  the data type its birth declared; a value of another type dead-letters the message
  ``type_mismatch``) and become one reading of that device with every last-known value;
  historical values are scored but never become the last-known ones.
* ``NDEATH`` whose ``bdSeq`` matches the birth's marks the node and all its devices OFFLINE
  (reason ``ndeath``) and their values stale (a death of an older session is ignored). A
  message of the dead session that was read before (same seq and CRC-32) and comes again
  after the death (a restarted broker redelivers what we had not acknowledged, after the
  will it published on its way down) is a redelivery: consumed, neither read nor refused;
  ``DDEATH`` one device (``ddeath``). A device is never OFFLINE by silence unless
  ``silence_timeout_s`` says so: it reports by exception.
* A gap in the sequence numbers (1 to 255) not filled within ``reorder_timeout_s`` asks the
  node for a rebirth (``NCMD`` ``Node Control/Rebirth`` = true). So does data before any birth
  (or after a death, or with an alias no birth declared): it is dead-lettered ``no_birth``,
  never guessed. Requests to one node are at least ``rebirth_backoff_s`` apart; one the
  backoff holds back is owed and sent when it ends. Each is counted (``stats``) and noted
  for the shell's log (``take_notes``).
* A payload that is not a Sparkplug protobuf is dead-lettered ``invalid_protobuf``; the gap
  it leaves is filled by the rebirth.

Mapping (the README's Sparkplug section documents it): a device's machine id is
``<edge node>.<device>`` (a node's own metrics: ``<edge node>``) and its line is the group
id; characters outside ``A-Z a-z 0-9 _ . -`` become ``_``; two Sparkplug devices that map
to one machine id are refused (``bad_topic``). Metric names become channel names through
``channel_name`` (``Pump/Flow Rate`` -> ``pump_flow_rate``, ``Air temperature [K]`` ->
``air_temperature_k``); a String metric named ``Product Type`` (any spelling that maps to
``product_type``) gives the reading's product type.

One identity rule (``_identity``). A reading is who sent it plus where it stands:

* a message carrying ``factorywatch/Reading Seq`` (``READING_SEQ_METRIC``: the reading's own
  sequence number, as factorywatch's edge node sends it, declared Int64 in the birth) is the
  reading ``spb:<group>/<node>/<device>:r:<reading seq>``, its verdict's ``seq`` is that number
  and its digest the CRC-32 of what its metrics say (names, values, timestamps; not the
  Sparkplug ``seq``, not names vs aliases). Such an edge node keeps each reading until its
  verdict is seen and sends it again, in a later session (after a new ``NBIRTH``, with a new
  Sparkplug ``seq``), as ``DDATA`` with the same metrics: the same identity and digest, so the
  engine drops it as a duplicate and answers it with the verdict already given. A metric
  older than the last-known value never replaces it, so a late resend leaves the device's
  present values alone;
* any other message is ``spb:<group>/<node>/<device>:<bdSeq>:<birth ms>:<extended seq>``, its
  verdict's ``seq`` the extended number and its digest the payload's CRC-32 (as before:
  Sparkplug implementations that never resend are read exactly as they always were).

Either way a message the broker redelivers after a restart has the same identity and digest,
so the engine drops it as a duplicate.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from esio_spb_builder.core import sparkplug_b_pb2  # Eclipse Tahu's schema, generated
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from factorywatch.channels import canonical
from factorywatch.contracts import AI4I_CHANNELS, MAX_BATCH_BYTES, OfflineReason, Telemetry
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.ingest import Command, IngestEffects, Reading
from factorywatch.detector.registry import Registry
from factorywatch.errors import PayloadError
from factorywatch.sparkplug_codec import (
    BD_SEQ_METRIC,
    BOOLEAN,
    READING_SEQ_METRIC,
    REBIRTH_METRIC,
    add_metric,
)
from factorywatch.topics import (
    SPARKPLUG_NAMESPACE,
    SparkplugTopic,
    parse_sparkplug,
    sparkplug_topic,
)
from factorywatch.topics import sparkplug_line as line_id
from factorywatch.topics import sparkplug_machine_id as machine_id

__all__ = [
    "STAT_NAMES",
    "SparkplugIngest",
    "SparkplugSettings",
    "channel_name",
    "line_id",
    "machine_id",
    "rebirth_request",
]

SNAPSHOT_VERSION: Final = 2  # 2: birth data types, seen seqs, owed rebirths
PRODUCT_TYPE: Final = "product_type"
_SEQ_MODULO: Final = 256
_MAX_MISSING: Final = 256  # a larger gap is one rebirth anyway

# Sparkplug B data types (sparkplug_b.proto's DataType enum) the ingest reads as numbers.
_SIGNED_BITS: Final = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64, two's complement in uints
_UNSIGNED: Final = {5: 8, 6: 16, 7: 32, 8: 64}  # UInt8..UInt64
_STRINGS: Final = frozenset({12, 14})  # String, Text
_CONTROLS: Final = ("Node Control/", "Device Control/", "Properties/")

# -- names -----------------------------------------------------------------------------------------


def channel_name(metric: str) -> str:
    """The channel name of a Sparkplug metric name (``Pump/Flow Rate`` -> ``pump_flow_rate``).

    ``factorywatch.channels.canonical``: the one mapping every ingest and CSV training use
    (raises ``ChannelNameError``, a ``ValueError``, for a name with no letters or digits).
    """
    return canonical(metric)


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


_INTS: Final = frozenset({"int_value", "long_value"})
#: The value field each data type travels in (sparkplug_b.proto; Tahu sends UInt32 and the
#: 64-bit types as ``long_value``, the smaller ones as ``int_value``: either is read).
_FIELDS: Final[dict[int, frozenset[str]]] = {
    **dict.fromkeys((*_SIGNED_BITS, *_UNSIGNED), _INTS),
    9: frozenset({"float_value"}),
    10: frozenset({"double_value"}),
    BOOLEAN: frozenset({"boolean_value"}),
    **{t: frozenset({"string_value"}) for t in _STRINGS},
}


class _TypeMismatchError(Exception):
    """A metric's value is not of the data type its birth declared."""


def _value(metric: Any, datatype: int) -> float | str | None:
    """A metric's value as its birth's ``datatype`` says (a number, or text for String/Text).

    None when null, or for a type that is not a channel (DateTime, arrays, datasets, ...).
    Raises ``_TypeMismatchError`` when the metric carries another data type than its birth or its
    value in another field (a String "40" for a Float metric is not 40). Signed integers
    travel as their two's complement in the unsigned ``int_value`` / ``long_value`` fields
    (Tahu's encoding): the data type says how to read them back.
    """
    if metric.datatype and metric.datatype != datatype:
        raise _TypeMismatchError(f"sent as data type {metric.datatype}, born as {datatype}")
    field_name = metric.WhichOneof("value")
    if metric.is_null or field_name is None:
        return None
    fields = _FIELDS.get(datatype)
    if fields is None:
        return None  # DateTime, UUID, bytes, arrays, datasets, templates: not a channel
    if field_name not in fields:
        raise _TypeMismatchError(f"a {field_name} for a metric born as data type {datatype}")
    if field_name in _INTS:
        raw = int(getattr(metric, field_name))
        bits = _SIGNED_BITS.get(datatype)
        if bits is not None:
            raw &= (1 << bits) - 1
            raw = raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
        return float(raw)
    if field_name == "boolean_value":
        return 1.0 if metric.boolean_value else 0.0
    if field_name == "string_value":
        return str(metric.string_value)
    return float(getattr(metric, field_name))


def _integer(metric: Any, datatype: int) -> int | None:
    """An integer metric's exact value (not through a float: 63-bit sequence numbers);
    None when null. Raises ``_TypeMismatchError`` for a type that is not an integer."""
    if datatype not in _SIGNED_BITS and datatype not in _UNSIGNED:
        raise _TypeMismatchError(f"born as data type {datatype}, not an integer")
    if metric.datatype and metric.datatype != datatype:
        raise _TypeMismatchError(f"sent as data type {metric.datatype}, born as {datatype}")
    field_name = metric.WhichOneof("value")
    if metric.is_null or field_name is None:
        return None
    if field_name not in _INTS:
        raise _TypeMismatchError(f"a {field_name} for a metric born as data type {datatype}")
    raw = int(getattr(metric, field_name))
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None:
        raw &= (1 << bits) - 1
        raw = raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
    return raw


def _content_digest(update: _Update) -> int:
    """CRC-32 of what a message's metrics say, however they were encoded (by name or alias,
    with any Sparkplug ``seq``): a reading sent again in another session digests alike."""
    said = (
        update.reading_seq,
        update.timestamp_ms,
        sorted(update.values.items()),
        sorted(update.stamps.items()),
        update.product_type,
        update.historical,
    )
    return zlib.crc32(repr(said).encode())


def rebirth_request(group: str, node: str, now: float) -> Command:
    """The ``NCMD`` asking an edge node to publish its births again."""
    payload = sparkplug_b_pb2.Payload()
    payload.timestamp = int(now * 1000)
    add_metric(payload, True, payload.timestamp, datatype=BOOLEAN, name=REBIRTH_METRIC)
    return Command(sparkplug_topic(group, "NCMD", node), payload.SerializeToString())


# -- state -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Device:
    """A device (or a node's own metrics): its birth's tables and last-known values."""

    machine_id: str
    aliases: dict[int, str] = field(default_factory=dict)
    #: metric name -> data type, as the birth declared it (DATA need not repeat it)
    types: dict[str, int] = field(default_factory=dict)
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
    #: seq (0..255) -> CRC-32 of the newest message seen with it since the birth (a message
    #: seen again is a redelivery, anything else is new: a gap up to 255 is a gap); its
    #: extended number is the newest one with that seq up to ``last`` (``_extended``)
    seen: dict[int, int] = field(default_factory=dict)
    devices: dict[str, _Device] = field(default_factory=dict)  # "" = the node's own metrics
    next_rebirth: float = 0.0
    #: a rebirth is owed but the backoff held it back: sent as soon as the backoff ends
    rebirth_owed: bool = False


@dataclass(slots=True)
class _Update:
    """What one message's metrics say (by channel) and the names no birth declared."""

    timestamp_ms: int = 0
    values: dict[str, float | None] = field(default_factory=dict)
    #: each channel's (and the product type's) own timestamp, ms
    stamps: dict[str, int] = field(default_factory=dict)
    product_type: str | None = None
    unknown: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    #: every channel it carries is historical (store-and-forward data, not the present)
    historical: bool = False
    #: the reading's own sequence number (``READING_SEQ_METRIC``), when the message says it
    reading_seq: int | None = None


def _node_key(topic: SparkplugTopic) -> str:
    return f"{topic.group}/{topic.node}"


#: The counters the ingest keeps (the detector's metrics show them).
STAT_NAMES: Final = (
    "births",
    "deaths",
    "gaps",
    "rebirth_requests_sent",
    "rebirth_requests_suppressed",
    "historical_readings",
    "type_mismatches",
    "refused",
)


@dataclass(frozen=True, slots=True)
class SparkplugSettings:
    """The ingest's knobs (``FACTORYWATCH_DETECTOR_SPARKPLUG_*``)."""

    reorder_timeout_s: float = 2.0
    rebirth_backoff_s: float = 5.0
    max_clock_skew_s: float = 7 * 24 * 3600.0
    #: seconds without data after which a living device counts as OFFLINE (None: never; a
    #: Sparkplug device reports by exception and is offline on its or its node's death)
    silence_timeout_s: float | None = None


class SparkplugIngest:
    """Sparkplug B births, deaths and data in; readings, rebirth requests and deaths out."""

    name = "sparkplug"

    def __init__(
        self,
        settings: SparkplugSettings | None = None,
        groups: Sequence[str] | None = None,
        *,
        ignore_groups: Sequence[str] = (),
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings if settings is not None else SparkplugSettings()
        self.groups = frozenset(groups) if groups else None
        #: groups whose messages are consumed silently (the detector's own Sparkplug out)
        self.ignore_groups = frozenset(ignore_groups)
        #: who may speak for which edge node and device (None: an open broker, no check)
        self.registry = registry
        self.channels: tuple[str, ...] = AI4I_CHANNELS
        self.nodes: dict[str, _Node] = {}
        self._owners: dict[str, str] = {}  # machine id -> "<group>/<node>/<device>"
        self._gapped: set[str] = set()  # nodes with missing sequence numbers
        self._owed: set[str] = set()  # nodes owed a rebirth request the backoff held back
        self._dirty: set[str] = set()  # nodes changed since the last ``changes``
        self._effects = IngestEffects()
        self._prefix = f"{SPARKPLUG_NAMESPACE}/"
        #: counters since start (births, deaths, gaps, rebirth requests sent/suppressed, ...)
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        #: what the shell should log (event name, fields), drained by ``take_notes``
        self._notes: list[tuple[str, dict[str, Any]]] = []

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

    def silence_timeout(self, machine: str, default: float) -> float | None:
        """How long ``machine`` may be silent before it is OFFLINE: ``default`` for machines
        that are not Sparkplug devices; for a device the configured timeout (None: never, it
        is offline on its death or its node's)."""
        if machine not in self._owners:
            return default
        return self.settings.silence_timeout_s

    def take_notes(self) -> list[tuple[str, dict[str, Any]]]:
        """Log events (name, fields) since the last call: rebirth requests sent/suppressed."""
        notes, self._notes = self._notes, []
        return notes

    def take_effects(self, now: float) -> IngestEffects:
        """Rebirth requests and deaths since the last call; gaps past their timeout at ``now``."""
        for key in sorted(self._gapped):
            node = self.nodes[key]
            if not node.missing:
                self._gapped.discard(key)
            elif min(node.missing.values()) <= now:
                lost = len(node.missing)
                node.missing.clear()
                self._dirty.add(key)
                self._gapped.discard(key)
                self._request_rebirth(key, node, now, f"{lost} message(s) missing")
        for key in sorted(self._owed):
            node = self.nodes[key]
            if not node.rebirth_owed:
                self._owed.discard(key)
            elif now >= node.next_rebirth:
                self._owed.discard(key)
                self._request_rebirth(key, node, now, "owed since the backoff")
        effects, self._effects = self._effects, IngestEffects()
        return effects

    def decode(self, message: Received) -> list[Reading | PayloadError]:
        """The readings of one Sparkplug message (births and data); deaths give none."""
        topic = parse_sparkplug(message.topic)
        if topic.group in self.ignore_groups:
            return []
        self._authorize(topic)
        return self._decode(topic, message)

    def set_registry(self, registry: Registry) -> None:
        """Check edge nodes and devices against ``registry`` from the next message on."""
        self.registry = registry

    def _authorize(self, topic: SparkplugTopic) -> None:
        """The registry decides who may speak for which edge node and device (refused:
        dead-lettered before any state is made, so it creates no machine)."""
        if self.registry is None:
            return
        machine = machine_id(topic.node, topic.device)
        refused = self.registry.check_sparkplug(topic.group, topic.node, topic.device, machine)
        if refused is not None:
            self.stats["refused"] += 1
            raise PayloadError(
                refused,
                f"edge node {topic.node!r} may not speak for {topic.group}/{machine} (registry)",
            )

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
        if not node.born and _seen_before(node, payload, message):
            # A message of the session that died, redelivered after its death (a broker that
            # restarted before our acknowledgement; the will overtook it): it was read then.
            return []
        seq = self._sequence(node, payload, message) if node.born else None
        self.gapped(key)
        if seq is None:
            why = "no NBIRTH (since a death or start)" if not node.born else "older than NBIRTH"
            return [self._no_birth(key, node, now, why)]
        device_key = topic.device or ""
        if topic.kind in ("NBIRTH", "DBIRTH"):
            self.stats["births"] += 1
            node.devices[device_key] = _Device(self._claim(topic))
        device = node.devices.get(device_key)
        if topic.kind == "DDEATH":
            if device is not None and device.alive:
                self._device_death(device, "ddeath")
            return []
        if device is None or not device.alive:
            return [self._no_birth(key, node, now, f"no DBIRTH for device {topic.device!r}")]
        return self._data(topic, node, device, payload, seq=seq, message=message)

    def _data(
        self,
        topic: SparkplugTopic,
        node: _Node,
        device: _Device,
        payload: Any,
        *,
        seq: int,
        message: Received,
    ) -> list[Reading | PayloadError]:
        """A living device's birth or data: its reading, or why there is none."""
        update = self._read(device, payload, birth=topic.kind in ("NBIRTH", "DBIRTH"))
        if update.unknown:
            why = f"metrics no birth declared: {update.unknown[:5]}"
            return [self._no_birth(_node_key(topic), node, message.received_at, why)]
        if update.mismatched:
            self.stats["type_mismatches"] += 1
            return [
                PayloadError(
                    "type_mismatch",
                    f"{device.machine_id}: not the data type of their birth, not read: "
                    f"{update.mismatched[:5]}",
                )
            ]
        self._keep(device, update)
        reading = self._reading(topic, node, device, update, seq=seq, message=message)
        if isinstance(reading, Reading) and update.historical:
            self.stats["historical_readings"] += 1
        return [] if reading is None else [reading]

    # -- births, deaths, sequence numbers ----------------------------------------------------------
    def _node_birth(self, node: _Node, payload: Any) -> None:
        bd_seq = next((int(m.long_value) for m in payload.metrics if m.name == BD_SEQ_METRIC), None)
        node.bd_seq = bd_seq
        node.birth_ms = int(payload.timestamp)
        node.born = True
        node.missing.clear()
        node.seen.clear()
        node.rebirth_owed = False  # the births asked for are here
        for device in node.devices.values():
            device.alive = False  # every device must be born again after its node
        # tck-id-topics-nbirth-seq-num: an NBIRTH's seq is 0 (another value is taken as is)
        node.last = int(payload.seq) if payload.HasField("seq") else 0

    def _node_death(self, node: _Node, payload: Any) -> None:
        bd_seq = next((int(m.long_value) for m in payload.metrics if m.name == BD_SEQ_METRIC), None)
        if not node.born or (bd_seq is not None and bd_seq != node.bd_seq):
            return  # the will of an older session, delivered late: this session lives on
        node.born = False
        node.missing.clear()
        node.rebirth_owed = False
        for device in node.devices.values():
            if device.alive:
                self._device_death(device, "ndeath")

    def _device_death(self, device: _Device, reason: OfflineReason) -> None:
        """A device dies: OFFLINE, its values stale (data needs a new birth)."""
        self.stats["deaths"] += 1
        device.alive = False
        device.values.clear()
        self._effects.offline.append(device.machine_id)
        self._effects.reasons[device.machine_id] = reason

    def _sequence(self, node: _Node, payload: Any, message: Received) -> int | None:
        """The message's extended sequence number (counting on past the wrap at 255).

        A message seen before (same seq and CRC-32: a redelivery) gets the number it had; one
        that fills a gap (less than 128 behind the newest) gets the missing number; anything
        else is the next message, and the
        numbers it skipped (1 to 255 of them; a seq equal to the newest one with other bytes
        skipped 255) are missing until ``reorder_timeout_s``, then a rebirth is requested
        (tck-id-operational-behavior-host-reordering-start/-rebirth/-success).
        """
        if not payload.HasField("seq"):
            return node.last
        seq = int(payload.seq) % _SEQ_MODULO
        crc = zlib.crc32(message.payload)
        if node.seen.get(seq) == crc:
            return _extended(node.last, seq)
        if not node.seen and seq == node.last % _SEQ_MODULO:
            node.seen[seq] = crc  # the NBIRTH itself: the session's first number
            return node.last
        # A late message is a little behind the newest; a number that far back is new
        # again (the edge node wrapped after a gap of more than half the range).
        filled = next(
            (
                s
                for s in node.missing
                if s % _SEQ_MODULO == seq and node.last - s < _SEQ_MODULO // 2
            ),
            None,
        )
        if filled is not None:
            node.missing.pop(filled)
            node.seen[seq] = crc
            return filled
        delta = (seq - node.last) % _SEQ_MODULO or _SEQ_MODULO
        extended = node.last + delta
        if delta > 1:
            self.stats["gaps"] += 1
            deadline = message.received_at + self.settings.reorder_timeout_s
            for gap in range(max(node.last + 1, extended - _MAX_MISSING), extended):
                node.missing.setdefault(gap, deadline)
                node.seen.pop(gap % _SEQ_MODULO, None)  # a lap ago: not the newest with it
        node.last = extended
        node.seen[seq] = crc
        return extended

    def gapped(self, key: str) -> None:
        """Remember that node ``key`` has missing sequence numbers (its timer runs)."""
        if self.nodes[key].missing:
            self._gapped.add(key)

    def _request_rebirth(self, key: str, node: _Node, now: float, why: str) -> bool:
        """Ask ``key`` for its births (``NCMD`` ``Node Control/Rebirth``) unless the backoff
        holds it back; then it is owed and sent when the backoff ends. Whether it was sent."""
        group, _, edge = key.partition("/")
        if now < node.next_rebirth:
            self.stats["rebirth_requests_suppressed"] += 1
            node.rebirth_owed = True
            self._owed.add(key)
            self._notes.append(
                (
                    "sparkplug_rebirth_suppressed",
                    {"edge_node": key, "why": why, "retry_in_s": round(node.next_rebirth - now, 3)},
                )
            )
            return False
        node.next_rebirth = now + self.settings.rebirth_backoff_s
        node.rebirth_owed = False
        self.stats["rebirth_requests_sent"] += 1
        self._effects.commands.append(rebirth_request(group, edge, now))
        self._notes.append(("sparkplug_rebirth_requested", {"edge_node": key, "why": why}))
        return True

    def _no_birth(self, key: str, node: _Node, now: float, why: str) -> PayloadError:
        if self._request_rebirth(key, node, now, why):
            return PayloadError("no_birth", f"{why}: a rebirth was requested from {key}")
        wait = node.next_rebirth - now
        return PayloadError(
            "no_birth",
            f"{why}: a rebirth request to {key} was held back by the backoff "
            f"(one was sent less than {self.settings.rebirth_backoff_s:g} s ago; "
            f"the next goes out in {wait:.1f} s)",
        )

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
    def _read(self, device: _Device, payload: Any, *, birth: bool) -> _Update:
        """What the payload's metrics say, each read as the data type its birth declared."""
        update = _Update(timestamp_ms=int(payload.timestamp))
        historical: list[bool] = []
        newest_ms = 0
        for metric in payload.metrics:
            name = self._declare(device, metric) if birth else self._resolve(device, metric)
            if name is None:
                update.unknown.append(metric.name or f"alias {metric.alias}")
                continue
            if self._not_a_channel(device, update, name, metric):
                continue
            try:
                channel = channel_name(name)
            except ValueError:
                continue
            try:
                value = _value(metric, device.types.get(name, 0))
            except _TypeMismatchError as exc:
                update.mismatched.append(f"{name}: {exc}")
                continue
            if channel == PRODUCT_TYPE:
                if not isinstance(value, str):
                    continue
                update.product_type = value
            elif isinstance(value, float) or value is None:  # None: null, the value is unknown
                update.values[channel] = value
            else:
                continue
            historical.append(bool(metric.is_historical))
            if metric.HasField("timestamp"):
                update.stamps[channel] = int(metric.timestamp)
                newest_ms = max(newest_ms, update.stamps[channel])
        update.historical = bool(historical) and all(historical)
        if update.historical and newest_ms:
            # store-and-forward data: the reading is of when it was measured, not sent
            update.timestamp_ms = newest_ms
        return update

    @staticmethod
    def _not_a_channel(device: _Device, update: _Update, name: str, metric: Any) -> bool:
        """Whether metric ``name`` is no channel: none, ``bdSeq``, a control or property, or
        the reading's own sequence number (taken into ``update`` here)."""
        if name == READING_SEQ_METRIC:
            try:
                update.reading_seq = _integer(metric, device.types.get(name, 0))
            except _TypeMismatchError as exc:
                update.mismatched.append(f"{name}: {exc}")
            return True
        return not name or name == BD_SEQ_METRIC or name.startswith(_CONTROLS)

    @staticmethod
    def _keep(device: _Device, update: _Update) -> None:
        """The device keeps each channel's newest value (by timestamp); historical values
        never replace the present ones."""
        if update.historical:
            return
        for channel, value in update.values.items():
            stamp = update.stamps.get(channel, update.timestamp_ms)
            if stamp < device.stamps.get(channel, 0):
                continue  # a late message: the newer value stays the last-known one
            device.stamps[channel] = stamp
            if value is None:
                device.values.pop(channel, None)
            else:
                device.values[channel] = value
        stamp = update.stamps.get(PRODUCT_TYPE, update.timestamp_ms)
        if update.product_type is not None and stamp >= device.stamps.get(PRODUCT_TYPE, 0):
            device.stamps[PRODUCT_TYPE] = stamp
            device.product_type = update.product_type

    @staticmethod
    def _declare(device: _Device, metric: Any) -> str:
        """A birth's metric: its name, alias and data type go into the device's tables."""
        if metric.name:
            device.types[metric.name] = int(metric.datatype)
            if metric.HasField("alias"):
                device.aliases[int(metric.alias)] = metric.name
        return str(metric.name)

    @staticmethod
    def _resolve(device: _Device, metric: Any) -> str | None:
        """A data message's metric: its name, by name or alias; None if no birth declared it."""
        if metric.name:
            return str(metric.name) if metric.name in device.types else None
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
        identity, verdict_seq, digest = _identity(topic, node, update, seq, message)
        try:
            telemetry = Telemetry.model_validate(
                {
                    "machine_id": device.machine_id,
                    "line": line_id(topic.group),
                    "seq": verdict_seq,
                    "ts": ts,
                    "readings": values,
                    **({"product_type": product_type} if product_type is not None else {}),
                }
            )
        except ValidationError as exc:
            return PayloadError("schema", str(exc).splitlines()[0])
        return Reading(telemetry, identity, digest, update.historical)

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
        self._owed.clear()
        self._dirty.clear()
        if not data:
            return
        if data.get("version") not in (1, SNAPSHOT_VERSION):
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
            if node.rebirth_owed:
                self._owed.add(key)


def _identity(
    topic: SparkplugTopic, node: _Node, update: _Update, seq: int, message: Received
) -> tuple[str, int, int]:
    """A reading's identity, its verdict's ``seq`` and its digest (the module docstring's one
    rule): by the reading's own sequence number when the message carries it, else by the
    session (``bdSeq``, birth time) and the extended Sparkplug ``seq``."""
    source = f"spb:{topic.group}/{topic.node}/{topic.device or ''}"
    if update.reading_seq is not None:
        number = update.reading_seq
        return f"{source}:r:{number}", number, _content_digest(update)
    return f"{source}:{node.bd_seq}:{node.birth_ms}:{seq}", seq, zlib.crc32(message.payload)


def _seen_before(node: _Node, payload: Any, message: Received) -> bool:
    """Whether this very message (its seq and CRC-32) was read since the node's last birth."""
    if not payload.HasField("seq"):
        return False
    return node.seen.get(int(payload.seq) % _SEQ_MODULO) == zlib.crc32(message.payload)


def _extended(last: int, seq: int) -> int:
    """The newest extended sequence number up to ``last`` whose 8 bits are ``seq``."""
    return last - (last - seq) % _SEQ_MODULO


def _pack_seen(seen: dict[int, int]) -> str:
    """The seen table as base64 of 256 little-endian uint32 CRCs (0: none; 1.4 KB where a
    JSON list took 4 KB in every journaled change of the node)."""
    table = [0] * _SEQ_MODULO
    for seq, crc in seen.items():
        table[seq] = crc
    return base64.b64encode(struct.pack(f"<{_SEQ_MODULO}I", *table)).decode()


def _unpack_seen(text: str) -> dict[int, int]:
    if not text:
        return {}
    table = struct.unpack(f"<{_SEQ_MODULO}I", base64.b64decode(text))
    return {seq: crc for seq, crc in enumerate(table) if crc}


def _node_snapshot(node: _Node) -> dict[str, Any]:
    return {
        "bd_seq": node.bd_seq,
        "birth_ms": node.birth_ms,
        "born": node.born,
        "last": node.last,
        "missing": [[s, d] for s, d in node.missing.items()],
        "seen": _pack_seen(node.seen),
        "rebirth_owed": node.rebirth_owed,
        "devices": {
            key: {
                "machine_id": d.machine_id,
                "aliases": [[a, name] for a, name in d.aliases.items()],
                "types": d.types,
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
        # a version 1 node kept no data types: it must be born again (a rebirth is asked)
        born=bool(data["born"]) and "seen" in data,
        last=int(data["last"]),
        missing={int(s): float(d) for s, d in data["missing"]},
        seen=_unpack_seen(data.get("seen", "")),
        rebirth_owed=bool(data.get("rebirth_owed", False)),
    )
    for key, d in data["devices"].items():
        node.devices[key] = _Device(
            machine_id=d["machine_id"],
            aliases={int(a): str(name) for a, name in d["aliases"]},
            types={str(n): int(t) for n, t in d.get("types", {}).items()},
            values={str(c): float(v) for c, v in d["values"].items()},
            stamps={str(c): int(v) for c, v in d["stamps"].items()},
            product_type=d["product_type"],
            alive=bool(d["alive"]) and "types" in d,
        )
    return node
