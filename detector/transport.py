"""The transport seam: how the detector's shell receives, publishes and acknowledges.

httpx's ``BaseTransport`` is the model: the shell (``detector/service.py``) speaks only this
protocol, and the engine speaks none of it. Implementations: ``PahoTransport``
(``detector/mqtt_transport.py``, Mosquitto), ``MemoryTransport`` (below: in-process, for
fast tests of the whole shell without a broker), and a clustered engine's transport later.

Contract (at-least-once with ack-after-verdict): ``publish`` calls ``confirmed(ok)`` once the
transport knows the publish is safe (a PUBACK) or refused; the shell acknowledges a received
message with ``ack(token)`` only after every publish it caused was confirmed ok, so a crash
before that makes the transport redeliver it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from factorywatch.detector.engine import Inbound

Confirm = Callable[[bool], None]


class Transport(Protocol):
    """What the detector's shell needs from a message transport."""

    def connect(self) -> None:
        """Connect (bounded retries) and subscribe; raise a ``FactorywatchError`` on failure."""
        ...

    def receive(self, timeout: float) -> list[Inbound]:
        """Do pending I/O for up to ``timeout`` seconds; the messages that arrived, in order.

        Confirmations of earlier publishes are delivered (their callbacks run) in here.
        """
        ...

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, confirmed: Confirm | None
    ) -> None:
        """Queue a QoS 1 publish; ``confirmed(ok)`` runs from a later ``receive``."""
        ...

    def ack(self, token: Any) -> None:
        """Acknowledge a received message (it will not be redelivered)."""
        ...

    def is_connected(self) -> bool:
        """Whether the transport is connected right now."""
        ...

    def close(self, drain_timeout_s: float) -> None:
        """Wait up to ``drain_timeout_s`` for unconfirmed publishes, then disconnect."""
        ...


@dataclass(frozen=True, slots=True)
class Sent:
    """A message the memory transport was asked to publish."""

    topic: str
    payload: bytes
    retain: bool


class MemoryTransport:
    """An in-process transport: tests deliver messages, read what was published and acked.

    A publish is confirmed at the next ``receive`` (as a PUBACK would arrive), unless its topic
    starts with one of ``refuse_prefixes`` (then it is confirmed as refused).
    """

    def __init__(self) -> None:
        self.inbox: deque[Inbound] = deque()
        self.published: list[Sent] = []
        self.acked: list[Any] = []
        self.refuse_prefixes: tuple[str, ...] = ()
        self.connected = False
        self._unconfirmed: list[tuple[str, Confirm]] = []
        self._tokens = itertools.count(1)

    def deliver(self, topic: str, payload: bytes) -> int:
        """Make a message arrive; returns its token (what ``ack`` will be called with)."""
        token = next(self._tokens)
        now = time.time()
        self.inbox.append(Inbound(topic, payload, now, time.perf_counter(), token))
        return token

    def connect(self) -> None:
        """Nothing to connect to."""
        self.connected = True

    def receive(self, timeout: float) -> list[Inbound]:
        """Confirm earlier publishes, then hand over everything delivered (never waits)."""
        del timeout
        unconfirmed, self._unconfirmed = self._unconfirmed, []
        for topic, confirm in unconfirmed:
            confirm(not topic.startswith(self.refuse_prefixes) if self.refuse_prefixes else True)
        messages = list(self.inbox)
        self.inbox.clear()
        return messages

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, confirmed: Confirm | None
    ) -> None:
        """Record the publish; confirm it at the next ``receive``."""
        self.published.append(Sent(topic, payload, retain))
        if confirmed is not None:
            self._unconfirmed.append((topic, confirmed))

    def ack(self, token: Any) -> None:
        """Record the acknowledgement."""
        self.acked.append(token)

    def is_connected(self) -> bool:
        """Connected between ``connect`` and ``close``."""
        return self.connected

    def close(self, drain_timeout_s: float) -> None:
        """Confirm what is outstanding, then disconnect."""
        del drain_timeout_s
        self.receive(0.0)
        self.connected = False

    def topics(self, part: str) -> list[str]:
        """Topics published so far that contain ``part`` (e.g. ``/event``)."""
        return [s.topic for s in self.published if part in s.topic]
