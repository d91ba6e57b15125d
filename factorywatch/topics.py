"""The MQTT topic layout: every topic string is built and parsed here, nowhere else.

Layout under a configurable root (default ``factory``)::

    <root>/telemetry/<line>/<machine>          sensor readings (QoS 1), one reading per message
    <root>/batch/<line>/<gateway>              a gateway's batch of its line's readings (QoS 1)
    <root>/alerts/<line>/<machine>/verdict     one verdict per reading (NORMAL / ALERT)
    <root>/alerts/<line>/<machine>/event       alert transitions: raised, cleared, acknowledged,
                                               machine offline / online
    <root>/alerts/<line>/<machine>/state       retained current state (NORMAL / ALERT / OFFLINE)
    <root>/commands/<line>/<machine>/ack       an operator acknowledges the open alert
    <root>/commands/<line>/<machine>/feedback  an operator labels an alert (e.g. false alarm;
                                               the detector raises that machine's threshold)
    <root>/commands/<line>/<machine>/threshold an operator widens or resets its threshold
    <root>/deadletter/<line>/<machine>         rejected payloads with a reason
    <root>/status/<role>/<client>              retained online/offline status (last will);
                                               a sensor's client is its machine id

``mosquitto_sub -t '<root>/alerts/#' -v`` shows every verdict, event and state of every machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from factorywatch.errors import PayloadError

DEFAULT_ROOT = "factory"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
UNKNOWN = "_unknown"
_ALERT_LEAVES = frozenset({"verdict", "event", "state"})
#: the command leaves the detector acts on (``Topics.command_filters``)
COMMANDS = ("ack", "feedback", "threshold")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic level (letters, digits, ``_ . -``), else raise."""
    if not _ID_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the topics under one root prefix."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        parts = self.root.split("/")
        if not self.root or any(not p or p in {"+", "#"} or "+" in p or "#" in p for p in parts):
            raise ValueError(f"invalid topic root {self.root!r}")

    # -- telemetry ---------------------------------------------------------------------------
    def telemetry(self, line: str, machine: str) -> str:
        """Topic a machine publishes its readings to."""
        return f"{self.root}/telemetry/{check_id(line, 'line')}/{check_id(machine, 'machine id')}"

    @property
    def telemetry_filter(self) -> str:
        """Subscription filter matching every machine's telemetry."""
        return f"{self.root}/telemetry/+/+"

    def input_filters(self, lines: Sequence[str] | None = None) -> list[str]:
        """What a detector subscribes to for readings: every line, or only ``lines``.

        Shards split machines by line, so each machine's readings (and its alert state) stay
        with one detector; shared subscriptions would spread one machine over several.
        """
        levels = [check_id(line, "line") for line in lines] if lines else ["+"]
        return [
            f"{self.root}/{tree}/{level}/+" for level in levels for tree in ("telemetry", "batch")
        ]

    def parse_telemetry(self, topic: str) -> tuple[str, str]:
        """Return ``(line, machine)`` of a telemetry topic or raise ``PayloadError``."""
        return _parse_telemetry(self.root, topic)

    def batch(self, line: str, gateway: str) -> str:
        """Topic a gateway publishes batches of its line's readings to."""
        return f"{self.root}/batch/{check_id(line, 'line')}/{check_id(gateway, 'gateway id')}"

    @property
    def batch_filter(self) -> str:
        """Subscription filter matching every gateway's batches."""
        return f"{self.root}/batch/+/+"

    def parse_batch(self, topic: str) -> tuple[str, str]:
        """Return ``(line, gateway)`` of a batch topic or raise ``PayloadError``."""
        prefix = f"{self.root}/batch/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(parts) != 2 or not all(_ID_RE.fullmatch(p) for p in parts):
            raise PayloadError("bad_topic", f"not a batch topic: {topic!r}")
        return parts[0], parts[1]

    # -- verdicts and the alerts tree --------------------------------------------------------
    def verdict(self, line: str, machine: str) -> str:
        """Topic the detector publishes one machine's verdicts to."""
        return f"{self.root}/alerts/{line}/{machine}/verdict"

    @property
    def alerts_filter(self) -> str:
        """Filter that shows the whole alerts tree (``mosquitto_sub -t`` this)."""
        return f"{self.root}/alerts/#"

    def answers_filters(self, machine: str) -> tuple[str, str]:
        """The detector's answers about one machine's readings, on any line: its verdicts and
        its dead letters (the filters a sensor subscribes to; the ACL lets it read no other)."""
        m = check_id(machine, "machine id")
        return f"{self.root}/alerts/+/{m}/verdict", f"{self.root}/deadletter/+/{m}"

    # -- dead letters and status -------------------------------------------------------------
    def deadletter(self, line: str = UNKNOWN, machine: str = UNKNOWN) -> str:
        """Topic for rejected payloads of one machine (or ``_unknown`` when unparseable)."""
        return f"{self.root}/deadletter/{line}/{machine}"

    @property
    def deadletter_filter(self) -> str:
        """Filter matching every dead letter."""
        return f"{self.root}/deadletter/#"

    def status(self, role: str, client: str) -> str:
        """Retained online/offline status topic of one client."""
        return f"{self.root}/status/{check_id(role, 'role')}/{check_id(client, 'client id')}"

    # -- alert lifecycle: events, retained state, acknowledgements --------------------------
    def lease(self, role: str, client: str) -> str:
        """Retained lease of the process holding an identity (factorywatch.fencing)."""
        return f"{self.status(role, client)}/lease"

    def event(self, line: str, machine: str) -> str:
        """Topic of one machine's alert transitions (raised, cleared, offline, ...)."""
        return f"{self._alerts(line, machine)}/event"

    def state(self, line: str, machine: str) -> str:
        """Retained topic holding one machine's current alert state."""
        return f"{self._alerts(line, machine)}/state"

    def _alerts(self, line: str, machine: str) -> str:
        return f"{self.root}/alerts/{check_id(line, 'line')}/{check_id(machine, 'machine id')}"

    def parse_alert(self, topic: str) -> tuple[str, str, str]:
        """Return ``(line, machine, leaf)`` of a topic under the alerts tree or raise.

        ``leaf`` is ``verdict``, ``event`` or ``state``; anything else raises ``PayloadError``.
        """
        parts = self._levels(topic, "alerts", 3)
        if parts is None or parts[2] not in _ALERT_LEAVES:
            raise PayloadError("bad_topic", f"not an alerts topic: {topic!r}")
        return parts[0], parts[1], parts[2]

    def ack(self, line: str, machine: str) -> str:
        """Command topic an operator publishes an acknowledgement of one machine's alert to."""
        machine = check_id(machine, "machine id")
        return f"{self.root}/commands/{check_id(line, 'line')}/{machine}/ack"

    @property
    def ack_filter(self) -> str:
        """Subscription filter matching every machine's acknowledgement commands."""
        return f"{self.root}/commands/+/+/ack"

    def parse_ack(self, topic: str) -> tuple[str, str]:
        """Return ``(line, machine)`` of an ack command topic or raise ``PayloadError``."""
        parts = self._levels(topic, "commands", 3)
        if parts is None or parts[2] != "ack":
            raise PayloadError("bad_topic", f"not an ack topic: {topic!r}")
        return parts[0], parts[1]

    def feedback(self, line: str, machine: str) -> str:
        """Command topic an operator labels one machine's alert on (e.g. a false alarm)."""
        machine = check_id(machine, "machine id")
        return f"{self.root}/commands/{check_id(line, 'line')}/{machine}/feedback"

    @property
    def feedback_filter(self) -> str:
        """Subscription filter matching every machine's feedback commands."""
        return f"{self.root}/commands/+/+/feedback"

    def parse_feedback(self, topic: str) -> tuple[str, str]:
        """Return ``(line, machine)`` of a feedback command topic or raise ``PayloadError``."""
        parts = self._levels(topic, "commands", 3)
        if parts is None or parts[2] != "feedback":
            raise PayloadError("bad_topic", f"not a feedback topic: {topic!r}")
        return parts[0], parts[1]

    def threshold(self, line: str, machine: str) -> str:
        """Command topic an operator changes one machine's own threshold on."""
        machine = check_id(machine, "machine id")
        return f"{self.root}/commands/{check_id(line, 'line')}/{machine}/threshold"

    @property
    def command_filters(self) -> tuple[str, ...]:
        """The commands the detector acts on: acknowledgements, feedback, thresholds."""
        return tuple(f"{self.root}/commands/+/+/{leaf}" for leaf in COMMANDS)

    def parse_command(self, topic: str) -> tuple[str, str, str]:
        """Return ``(line, machine, command)`` of a command topic (``COMMANDS``) or raise
        ``PayloadError``."""
        parts = self._levels(topic, "commands", 3)
        if parts is None or parts[2] not in COMMANDS:
            raise PayloadError("bad_topic", f"not a command topic: {topic!r}")
        return parts[0], parts[1], parts[2]

    @property
    def sensor_status_filter(self) -> str:
        """Filter matching every sensor's retained status (its last will says ``offline``)."""
        return f"{self.root}/status/sensor/+"

    def parse_sensor_status(self, topic: str) -> str:
        """Return the machine id of a sensor status topic or raise ``PayloadError``."""
        parts = self._levels(topic, "status", 2)
        if parts is None or parts[0] != "sensor":
            raise PayloadError("bad_topic", f"not a sensor status topic: {topic!r}")
        return parts[1]

    def _levels(self, topic: str, tree: str, count: int) -> list[str] | None:
        """The ``count`` levels after ``<root>/<tree>/`` (the first two must be ids), or None."""
        prefix = f"{self.root}/{tree}/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        # fullmatch: unlike re.match with '$', it refuses a trailing newline ("m1\n")
        if len(parts) != count or not all(_ID_RE.fullmatch(p) for p in parts[:2]):
            return None
        return parts


@lru_cache(maxsize=65_536)
def _parse_telemetry(root: str, topic: str) -> tuple[str, str]:
    """Cached per topic: a detector sees the same few thousand topics over and over."""
    prefix = f"{root}/telemetry/"
    rest = topic[len(prefix) :] if topic.startswith(prefix) else None
    parts = rest.split("/") if rest is not None else []
    if len(parts) != 2 or not all(_ID_RE.fullmatch(p) for p in parts):
        raise PayloadError("bad_topic", f"not a telemetry topic: {topic!r}")
    return parts[0], parts[1]


# -- Sparkplug B (spBv1.0) ------------------------------------------------------------------
#: The Sparkplug B topic namespace: ``spBv1.0/<group>/<type>/<edge node>[/<device>]``.
SPARKPLUG_NAMESPACE = "spBv1.0"
#: Message types a host application reads (births, deaths, data) and the node commands it
#: sends (``NCMD``: a rebirth request). ``STATE`` is the host applications' own topic.
SPARKPLUG_NODE_TYPES = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
SPARKPLUG_DEVICE_TYPES = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})
_SPARKPLUG_INPUT_TYPES = ("NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA")


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    """A parsed Sparkplug B topic; ``device`` is None for node-level messages."""

    group: str
    kind: str
    node: str
    device: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.device}" if self.device is not None else ""
        return f"{SPARKPLUG_NAMESPACE}/{self.group}/{self.kind}/{self.node}{tail}"


def _sparkplug_level(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+#"):
        raise ValueError(f"invalid Sparkplug {what} {value!r}: non-empty, without '/', '+', '#'")
    return value


def sparkplug_topic(group: str, kind: str, node: str, device: str | None = None) -> str:
    """The topic of a Sparkplug message (``kind``: NBIRTH, DDATA, NCMD, ...)."""
    if kind not in SPARKPLUG_NODE_TYPES | SPARKPLUG_DEVICE_TYPES:
        raise ValueError(f"unknown Sparkplug message type {kind!r}")
    if (device is None) != (kind in SPARKPLUG_NODE_TYPES):
        raise ValueError(f"{kind} is a {'device' if device is None else 'node'} message type")
    topic = SparkplugTopic(
        _sparkplug_level(group, "group id"),
        kind,
        _sparkplug_level(node, "edge node id"),
        None if device is None else _sparkplug_level(device, "device id"),
    )
    return str(topic)


def parse_sparkplug(topic: str) -> SparkplugTopic:
    """Parse a Sparkplug B node or device topic, or raise ``PayloadError`` (``bad_topic``)."""
    parts = topic.split("/")
    if len(parts) in (4, 5) and parts[0] == SPARKPLUG_NAMESPACE and all(parts):
        kind = parts[2]
        if len(parts) == 4 and kind in SPARKPLUG_NODE_TYPES:
            return SparkplugTopic(parts[1], kind, parts[3])
        if len(parts) == 5 and kind in SPARKPLUG_DEVICE_TYPES:
            return SparkplugTopic(parts[1], kind, parts[3], parts[4])
    raise PayloadError("bad_topic", f"not a Sparkplug B node or device topic: {topic!r}")


_NOT_ID_CHAR = re.compile(r"[^A-Za-z0-9_.-]")


def sparkplug_machine_id(node: str, device: str | None) -> str:
    """The machine id of a Sparkplug device (``<node>.<device>``) or of a node's own metrics;
    characters outside ``A-Z a-z 0-9 _ . -`` become ``_`` (``PayloadError`` ``bad_topic`` when
    the result is no valid id). The one mapping the ingest, the edge node (which reads its
    devices' verdicts) and the broker's ACL share."""
    raw = node if device is None else f"{node}.{device}"
    return _sparkplug_id(raw, "machine id")


def sparkplug_line(group: str) -> str:
    """The production line of a Sparkplug group (mapped as ``sparkplug_machine_id``)."""
    return _sparkplug_id(group, "line")


def _sparkplug_id(raw: str, what: str) -> str:
    mapped = _NOT_ID_CHAR.sub("_", raw)
    if not _ID_RE.fullmatch(mapped):
        raise PayloadError(
            "bad_topic", f"Sparkplug {raw!r} does not map to a valid {what} (got {mapped!r})"
        )
    return mapped


def sparkplug_state_topic(host_id: str) -> str:
    """A Sparkplug host application's ``STATE`` topic: ``spBv1.0/STATE/<host id>``."""
    return f"{SPARKPLUG_NAMESPACE}/STATE/{_sparkplug_level(host_id, 'host id')}"


def sparkplug_filters(groups: Sequence[str] | None = None) -> list[str]:
    """What a Sparkplug host application subscribes to: births, deaths and data.

    Every group, or only ``groups``. Commands (``NCMD``/``DCMD``) are left out, so a host's
    own rebirth requests do not come back to it.
    """
    levels = [_sparkplug_level(g, "group id") for g in groups] if groups else ["+"]
    return [
        f"{SPARKPLUG_NAMESPACE}/{g}/{kind}/+" + ("/+" if kind.startswith("D") else "")
        for g in levels
        for kind in _SPARKPLUG_INPUT_TYPES
    ]
