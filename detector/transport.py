"""The driver seam: how a shell receives, publishes and acknowledges, sync or async.

httpx's ``BaseTransport`` / ``AsyncBaseTransport`` is the model: one shape, a synchronous and
an asynchronous protocol. Every policy (which message may be acked when, what a refused
publish means, what is due) is the runner's (``detector/runner.py``); a driver only does
I/O. ``send``/``commit`` (sync) and ``asend``/``acommit`` (async) below are the one place a
shell carries out a batch: publish its sends, settle each with the runner, write and flush
the store, then acknowledge.

* ``Driver`` (sync, a confirmation arrives later through a callback): ``PahoTransport``
  (``detector/mqtt_transport.py``, Mosquitto), ``MemoryTransport`` (below).
* ``AsyncDriver`` (asyncio, a publish is awaited until confirmed): ``JetStreamDriver``
  (``detector/jetstream.py``), ``AsyncMemoryTransport`` (below). The JetStream shell fetches
  per partition from its consumers; the driver publishes and acknowledges.

Contract (at-least-once with ack-after-verdict): a received message is acknowledged only
after every publish it caused was confirmed and the state store flushed, so a crash before
that makes the transport redeliver it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from factorywatch.detector.engine import Inbound, Publish

if TYPE_CHECKING:
    from factorywatch.detector.runner import Runner, Send, Settled
    from factorywatch.detector.store import AsyncStore, Store

Confirm = Callable[[bool], None]


class Driver(Protocol):
    """A synchronous message transport (one loop on one thread)."""

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

    def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for unconfirmed publishes (their callbacks run)."""
        ...

    def close(self, drain_timeout_s: float) -> None:
        """Wait up to ``drain_timeout_s`` for unconfirmed publishes, then disconnect (queued
        acknowledgements leave first)."""
        ...


#: the name the Mosquitto shell has always used for the synchronous driver
Transport = Driver


class AsyncDriver(Protocol):
    """An asyncio message transport: a publish returns once it is confirmed or refused."""

    async def publish(self, publish: Publish, msg_id: str | None) -> bool:
        """Publish (QoS 1 or a JetStream PubAck); True once confirmed, False when refused."""
        ...

    async def ack(self, token: Any) -> None:
        """Acknowledge a received message (it will not be redelivered)."""
        ...

    async def give_back(self, token: Any) -> None:
        """Leave a message unacknowledged, asking for its redelivery soon."""
        ...

    def is_connected(self) -> bool:
        """Whether the transport is connected right now."""
        ...


def send(runner: Runner, driver: Driver, sends: Sequence[Send]) -> None:
    """Queue every publish; each confirmation settles its send with the runner."""
    for item in sends:

        def confirmed(ok: bool, item: Send = item) -> None:
            runner.settle(item, ok)

        driver.publish(
            item.publish.topic,
            item.publish.payload,
            retain=item.publish.retain,
            confirmed=confirmed,
        )


def commit(
    runner: Runner, driver: Driver, store: Store, *, records: bool, snapshot: bool
) -> Settled:
    """Write what changed to the store, flush it, then acknowledge what settled."""
    settled = runner.take_settled()
    store.write(runner.changes(settled, records=records, snapshot=snapshot))
    store.flush()
    for token in settled.acks:
        driver.ack(token)
    return settled


async def asend(runner: Runner, driver: AsyncDriver, sends: Sequence[Send]) -> list[Any]:
    """Publish every send concurrently and settle each; the tokens of messages given back."""
    results = await asyncio.gather(*(driver.publish(s.publish, s.msg_id) for s in sends))
    refused: dict[int, Any] = {}
    for item, ok in zip(sends, results, strict=True):
        runner.settle(item, ok)
        if not ok and item.ticket is not None:
            refused[id(item.ticket)] = item.ticket.token
    for token in refused.values():
        await driver.give_back(token)
    return list(refused.values())


async def acommit(
    runner: Runner,
    driver: AsyncDriver,
    store: AsyncStore,
    *,
    machines: set[str] | None = None,
    may_ack: Callable[[], bool] | None = None,
) -> bool:
    """Write what changed (and ``machines``' records) to the store, flush it, then ack what
    settled (unless ``may_ack()`` says no more); False when the store could not flush."""
    settled = runner.take_settled()
    store.write(runner.changes(settled, machines=machines or set()))
    if not await store.flush():
        runner.store_failed(settled)
        for token in settled.acks:
            await driver.give_back(token)
        return False
    if may_ack is None or may_ack():
        for token in settled.acks:
            await driver.ack(token)
    return True


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

    def drain(self, timeout_s: float) -> None:
        """Confirm what is outstanding."""
        del timeout_s
        self.receive(0.0)

    def close(self, drain_timeout_s: float) -> None:
        """Confirm what is outstanding, then disconnect."""
        del drain_timeout_s
        self.receive(0.0)
        self.connected = False

    def topics(self, part: str) -> list[str]:
        """Topics published so far that contain ``part`` (e.g. ``/event``)."""
        return [s.topic for s in self.published if part in s.topic]


class AsyncMemoryTransport:
    """``MemoryTransport``'s asyncio twin: a publish is confirmed when awaited, unless its
    topic starts with one of ``refuse_prefixes``."""

    def __init__(self) -> None:
        self.inbox: deque[Inbound] = deque()
        self.published: list[Sent] = []
        self.acked: list[Any] = []
        self.given_back: list[Any] = []
        self.refuse_prefixes: tuple[str, ...] = ()
        self.connected = True
        self._tokens = itertools.count(1)

    def deliver(self, topic: str, payload: bytes) -> int:
        """Make a message arrive; returns its token (what ``ack`` will be called with)."""
        token = next(self._tokens)
        self.inbox.append(Inbound(topic, payload, time.time(), time.perf_counter(), token))
        return token

    async def receive(self, timeout: float) -> list[Inbound]:
        """Everything delivered so far (never waits)."""
        del timeout
        messages = list(self.inbox)
        self.inbox.clear()
        return messages

    async def publish(self, publish: Publish, msg_id: str | None) -> bool:
        """Record the publish; refused when its topic starts with a refused prefix."""
        del msg_id
        self.published.append(Sent(publish.topic, publish.payload, publish.retain))
        return not (self.refuse_prefixes and publish.topic.startswith(self.refuse_prefixes))

    async def ack(self, token: Any) -> None:
        """Record the acknowledgement."""
        self.acked.append(token)

    async def give_back(self, token: Any) -> None:
        """Record that the message was left for redelivery."""
        self.given_back.append(token)

    def is_connected(self) -> bool:
        """Always connected."""
        return self.connected

    def topics(self, part: str) -> list[str]:
        """Topics published so far that contain ``part`` (e.g. ``/event``)."""
        return [s.topic for s in self.published if part in s.topic]
