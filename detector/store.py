"""The state store seam: where the engine's keyed state is made durable before an ack.

Two stores, one shape (``Store`` / ``AsyncStore``, as the transports pair ``Driver`` /
``AsyncDriver``): ``write(changes)`` takes what the runner says changed, ``flush()`` makes it
durable, and only then does the shell acknowledge the messages it reflects; ``load`` reads it
back after a restart or a partition move (``Runner.restore`` hands it to the engine).

* ``FileCheckpoint`` (``detector/checkpoint.py``): a snapshot plus a journal on disk, for the
  Mosquitto detector. It journals changed records, calibration rows, stateful ingests' parts
  and answered reading ids; the runner's cadence decides when every changed record and a
  full snapshot are included.
* ``KvStore`` (below): the JetStream detector's state bucket, one whole record per machine
  (key ``<partition>.<machine>``); a flush is every put acknowledged by the cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from factorywatch.detector.state import CalibrationRow, MachineRecord, decode, encode

if TYPE_CHECKING:  # nats-py is the cluster extra's: the Mosquitto detector runs without it
    from nats.js.kv import KeyValue

log = structlog.get_logger("detector")


@dataclass
class Restored:
    """What a checkpoint held: the snapshot, records written since, and answered ids."""

    snapshot: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    answered: list[tuple[str, int]] = field(default_factory=list)
    #: calibration rows journaled after their machine's newest record, in order
    rows: list[CalibrationRow] = field(default_factory=list)
    #: ingest name -> key -> the newest journaled part
    ingest: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when there was nothing to restore."""
        return self.snapshot is None and not (
            self.records or self.answered or self.ingest or self.rows
        )


@dataclass(slots=True)
class Changes:
    """What changed in the engine since the store was last written."""

    #: (identity, digest) of readings whose verdicts were confirmed
    answered: list[tuple[str, int]] = field(default_factory=list)
    #: stateful ingests' changed parts (name -> key -> part)
    ingest: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: calibration rows counted (journaled before their records)
    rows: list[CalibrationRow] = field(default_factory=list)
    #: changed records (urgent ones always, every changed one when the cadence says)
    records: list[MachineRecord] = field(default_factory=list)
    #: the whole records of the machines the settled messages touched (a keyed store)
    touched: list[MachineRecord] = field(default_factory=list)
    #: the engine's whole state, when a snapshot is due
    snapshot: dict[str, Any] | None = None


class Store(Protocol):
    """A state store written from a synchronous loop (the file checkpoint)."""

    def load(self) -> Restored:
        """What the store holds (nothing on a first start)."""
        ...

    def write(self, changes: Changes) -> None:
        """Take these changes (not yet durable)."""
        ...

    def flush(self) -> None:
        """Make everything written durable (before the acks it allows)."""
        ...


class AsyncStore(Protocol):
    """A state store written from an asyncio loop (the JetStream state bucket)."""

    async def load(self, prefix: str) -> Restored:
        """What the store holds under ``prefix`` (a partition)."""
        ...

    def write(self, changes: Changes) -> None:
        """Take these changes (not yet durable)."""
        ...

    async def flush(self) -> bool:
        """Make everything written durable; False when some of it could not be."""
        ...


class KvStore:
    """Machine records in a JetStream key-value bucket (``key(machine)`` names each one)."""

    def __init__(self, kv: KeyValue, key: Callable[[str], str]) -> None:
        self.kv = kv
        self.key = key
        self._pending: dict[str, bytes] = {}

    async def load(self, prefix: str) -> Restored:
        """Every machine record under ``<prefix>.``."""
        watcher = await self.kv.watch(f"{prefix}.*", ignore_deletes=True)
        records: list[dict[str, Any]] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break  # the end of the current values
                if entry.value:
                    records.append(decode(entry.value))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return Restored(records=records)

    def write(self, changes: Changes) -> None:
        """Queue the touched machines' whole records (they include their calibration rows)."""
        for record in changes.touched:
            self._pending[record.machine_id] = encode(record.snapshot())

    async def flush(self) -> bool:
        """Put every queued record; True when the cluster acknowledged every put."""
        pending, self._pending = self._pending, {}
        puts = [self.kv.put(self.key(machine), value) for machine, value in sorted(pending.items())]
        results = await asyncio.gather(*puts, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed[:1]:
            log.warning("state_write_failed", error=repr(exc))
        return not failed
