"""The detector as a Sparkplug B 3.0 primary host application: its ``STATE`` birth and death.

Pure: times come in as arguments. Edge nodes configured for a primary host watch the retained
``spBv1.0/STATE/<host id>`` (JSON ``{"online": bool, "timestamp": ms}``, QoS 1): while it says
offline they store their data, and once it says online again they replay it with
``is_historical``. The shell (``detector/mosquitto_shell.py``) registers ``will`` as the MQTT
will of the connection it subscribes with, publishes ``birth`` once that connection's subscriptions
are acknowledged, ``answer``s its own STATE topic and publishes ``death`` before a clean
disconnect.
"""

from __future__ import annotations

import json
from typing import Any

from factorywatch.detector.engine import Publish
from factorywatch.topics import sparkplug_state_topic


def state_payload(*, online: bool, timestamp_ms: int) -> bytes:
    """A STATE payload (tck-id-host-topic-phid-birth-payload, ``-death-payload``)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


def parse_state(payload: bytes) -> tuple[bool, int] | None:
    """``(online, timestamp ms)`` of a STATE payload, or None if it is not one."""
    try:
        data: Any = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    online, timestamp = data.get("online"), data.get("timestamp")
    if not isinstance(online, bool) or not isinstance(timestamp, int):
        return None
    return online, timestamp


class PrimaryHost:
    """One host id's STATE messages; ``connect_ms`` is the timestamp of the current session."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.topic = sparkplug_state_topic(host_id)  # raises ValueError for a bad id
        self.connect_ms = 0

    def will(self, now_ms: int) -> tuple[str, bytes]:
        """The will of a connection about to be made at ``now_ms``: offline, stamped with the
        connect time (tck-id-host-topic-phid-death-payload-timestamp-connect), which the
        birth repeats (tck-id-host-topic-phid-birth-payload-timestamp)."""
        self.connect_ms = now_ms
        return self.topic, state_payload(online=False, timestamp_ms=now_ms)

    def birth(self) -> Publish:
        """Online, retained, with the timestamp of the will registered at connect."""
        return Publish(
            self.topic, state_payload(online=True, timestamp_ms=self.connect_ms), retain=True
        )

    def death(self, now_ms: int) -> Publish:
        """Offline, retained, stamped now: published before a clean disconnect
        (tck-id-host-topic-phid-death-payload-timestamp-disconnect-clean). Never older than
        the birth, so a clock stepped back cannot make edge nodes take it for a stale one."""
        stamp = max(now_ms, self.connect_ms)
        return Publish(self.topic, state_payload(online=False, timestamp_ms=stamp), retain=True)

    def answer(self, payload: bytes) -> Publish | None:
        """A message on our own STATE topic: an ``online: false`` (a previous session's will,
        or another client's) is answered at once with the birth again
        (tck-id-message-flow-hid-sparkplug-state-message-delivered); anything else, None.

        The birth keeps the connect timestamp: our will carries it, and an edge node that
        ignores a STATE older than the last one it saw must still believe that will.
        """
        state = parse_state(payload)
        if state is None or state[0]:
            return None
        return self.birth()
