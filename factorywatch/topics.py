"""The MQTT topic layout: every topic string is built and parsed here, nowhere else.

Layout under a configurable root (default ``factory``)::

    <root>/telemetry/<line>/<machine>          sensor readings (QoS 1), one reading per message
    <root>/alerts/<line>/<machine>/verdict     one verdict per reading (NORMAL / ALERT)
    <root>/deadletter/<line>/<machine>         rejected payloads with a reason
    <root>/status/<role>/<client>              retained online/offline status (last will)

``mosquitto_sub -t '<root>/alerts/#' -v`` shows every verdict of every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from factorywatch.errors import PayloadError

DEFAULT_ROOT = "factory"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
UNKNOWN = "_unknown"


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic level (letters, digits, ``_ . -``), else raise."""
    if not _ID_RE.match(value):
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

    def parse_telemetry(self, topic: str) -> tuple[str, str]:
        """Return ``(line, machine)`` of a telemetry topic or raise ``PayloadError``."""
        prefix = f"{self.root}/telemetry/"
        rest = topic[len(prefix) :] if topic.startswith(prefix) else None
        parts = rest.split("/") if rest is not None else []
        if len(parts) != 2 or not all(_ID_RE.match(p) for p in parts):
            raise PayloadError("bad_topic", f"not a telemetry topic: {topic!r}")
        return parts[0], parts[1]

    # -- verdicts and the alerts tree --------------------------------------------------------
    def verdict(self, line: str, machine: str) -> str:
        """Topic the detector publishes one machine's verdicts to."""
        return f"{self.root}/alerts/{line}/{machine}/verdict"

    @property
    def alerts_filter(self) -> str:
        """Filter that shows the whole alerts tree (``mosquitto_sub -t`` this)."""
        return f"{self.root}/alerts/#"

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
