"""Ingest: raw messages become readings, each with the identity its source gives it.

What identifies a reading belongs here, not to the engine: a JSON reading is
``<machine_id>:<seq>``; a Sparkplug B ingest names its readings by edge node, device,
``bdSeq`` and its wrapping ``seq``. Each reading also carries a content digest (of the
message's bytes for a single reading, of the re-encoded reading for a batch item), so the
engine can tell a redelivery (same identity, same content: dropped) from a reused identity with
different content (dead-lettered ``duplicate_id``).

Pure: values in, values out (the decoder's clock is injected).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from factorywatch.contracts import OfflineReason, Telemetry
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.detector.registry import Registry
from factorywatch.errors import PayloadError
from factorywatch.topics import Topics


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated reading, its identity (unique per source) and a digest of its content."""

    telemetry: Telemetry
    identity: str
    digest: int
    #: store-and-forward data (Sparkplug ``is_historical``): scored, kept out of live alerts
    historical: bool = False


class Ingest(Protocol):
    """Turns one raw message into readings (or per-reading rejections)."""

    def accepts(self, topic: str) -> bool:
        """Whether messages on ``topic`` are readings for this ingest."""
        ...

    def decode(self, message: Received) -> list[Reading | PayloadError]:
        """The message's readings in order; ``PayloadError`` for a message unusable whole."""
        ...


@dataclass(frozen=True, slots=True)
class Command:
    """A message an ingest needs published (QoS 1), e.g. a Sparkplug rebirth request."""

    topic: str
    payload: bytes


@dataclass(slots=True)
class IngestEffects:
    """What a stateful ingest asks of the engine since it was last asked."""

    #: messages to publish (Sparkplug ``NCMD`` rebirth requests)
    commands: list[Command] = field(default_factory=list)
    #: machines whose source announced their death (Sparkplug ``NDEATH``/``DDEATH``)
    offline: list[str] = field(default_factory=list)
    #: why each of ``offline`` is offline (an ``OfflineReason``: ``ndeath``, ``ddeath``)
    reasons: dict[str, OfflineReason] = field(default_factory=dict)


class StatefulIngest(Ingest, Protocol):
    """An ingest with decoding state of its own (Sparkplug: alias tables, last values, seq).

    The engine binds it to the model's channels, drains its effects after every message it
    decoded and on every ``tick``, and keeps its state in the engine's snapshot.
    """

    name: str
    #: counters by event since start (the metrics read them at each scrape)
    stats: dict[str, int]

    def bind(self, channels: Sequence[str]) -> None:
        """Build readings with these channels from now on (the serving model's)."""
        ...

    def origin(self, topic: str) -> tuple[str, str] | None:
        """``(line, machine)`` a message on ``topic`` is about (its dead letters go there)."""
        ...

    def set_registry(self, registry: Registry) -> None:
        """Check senders against ``registry`` from now on (it changed while running)."""
        ...

    def take_effects(self, now: float) -> IngestEffects:
        """Commands and deaths since the last call, and what timers due at ``now`` decided."""
        ...

    def take_notes(self) -> list[tuple[str, dict[str, Any]]]:
        """Log events (name, fields) since the last call, for the shell to log."""
        ...

    def silence_timeout(self, machine: str, default: float) -> float | None:
        """Seconds without readings before ``machine`` is OFFLINE: ``default`` for machines
        this ingest does not feed; None: never by silence (reported by exception)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """The decoding state as one JSON-able value."""
        ...

    def restore(self, data: dict[str, Any]) -> None:
        """Take over a ``snapshot``'s decoding state."""
        ...

    def changes(self) -> dict[str, Any]:
        """Parts of the state changed since the last call or snapshot, by key (a journal's)."""
        ...

    def restore_changes(self, parts: dict[str, Any]) -> None:
        """Apply journaled parts over a restored snapshot (the last part per key wins)."""
        ...


class Ingests:
    """Several ingests behind one: each message goes to the first that accepts its topic."""

    def __init__(self, members: Sequence[Ingest]) -> None:
        self.members = tuple(members)

    def accepts(self, topic: str) -> bool:
        """Whether any member accepts ``topic``."""
        return any(member.accepts(topic) for member in self.members)

    def decode(self, message: Received) -> list[Reading | PayloadError]:
        """The first accepting member's readings."""
        for member in self.members:
            if member.accepts(message.topic):
                return member.decode(message)
        raise PayloadError("bad_topic", f"no ingest accepts {message.topic!r}")


_SERIALIZER = Telemetry.__pydantic_serializer__


def content_digest(telemetry: Telemetry) -> int:
    """A digest of everything a reading says (stable across processes and restarts)."""
    return zlib.crc32(_SERIALIZER.to_json(telemetry))


def json_identity(telemetry: Telemetry) -> str:
    """The identity of a JSON reading: its machine and sequence number."""
    return f"{telemetry.machine_id}:{telemetry.seq}"


class JsonIngest:
    """factorywatch's own JSON readings, one per message or a gateway's batch."""

    def __init__(self, topics: Topics, decoder: Decoder) -> None:
        self.decoder = decoder
        self._telemetry_prefix = f"{topics.root}/telemetry/"
        self._batch_prefix = f"{topics.root}/batch/"

    def accepts(self, topic: str) -> bool:
        """Telemetry and batch topics under the root."""
        return topic.startswith(self._telemetry_prefix) or topic.startswith(self._batch_prefix)

    def decode(self, message: Received) -> list[Reading | PayloadError]:
        """One reading for a telemetry message, one entry per item for a batch."""
        if message.topic.startswith(self._telemetry_prefix):
            # One reading per message: its bytes are its content (a redelivery repeats them).
            reading = self.decoder.decode(message)
            return [Reading(reading, json_identity(reading), zlib.crc32(message.payload))]
        items = self.decoder.decode_batch(message)
        return [
            item
            if isinstance(item, PayloadError)
            else Reading(item, json_identity(item), content_digest(item))
            for item in items
        ]
