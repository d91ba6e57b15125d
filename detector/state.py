"""Keyed per-machine state: everything the detector knows about one machine, as one value.

Pure: no I/O. A ``MachineRecord`` holds a machine's alert state (the k-of-n window, the
clear streak, the open alert, its acknowledgement and peak), the identities of the readings
last applied to it (so a redelivered reading is not counted twice), the alert events not yet
confirmed by the transport (an outbox, republished after a crash), slots for the feature
pipeline's window state and the machine's model binding (the version that scored it last),
its own threshold and realized alarm rate (``detector/tuning.py``), and a live calibration
window (``detector/calibration_window.py``) while it has no model yet or re-baselines.
``StateTable`` keys the records by machine id and tracks which changed since the last
checkpoint.

Records and the table convert to and from plain JSON-able dicts (``snapshot`` /
``restore``): what a checkpoint writes beside the journal, or a key-value bucket of a
clustered engine holds, so a machine can move between detectors and survive ``kill -9``.
``encode`` / ``decode`` turn such values into JSON bytes and back for both (orjson: a windowed
record in a fifth of ``json.dumps``' time, and a changed record is written every second).
The state holds finite numbers only: readings are validated finite and standardised values
clipped (orjson would write a NaN as null).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from factorywatch.contracts import Contribution
from factorywatch.detector.tuning import Tuning

#: Identities of the last readings applied to a machine's state (see ``MachineRecord.recent``).
RECENT_IDENTITIES: Final = 32
SNAPSHOT_VERSION: Final = 1
#: numpy scalars (a score as numpy returns it) encode as the numbers they are
_ENCODE_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY


def encode(value: Any) -> bytes:
    """A record's (or any state value's) ``snapshot`` as compact JSON bytes."""
    return orjson.dumps(value, option=_ENCODE_OPTIONS)


def decode(data: bytes | str) -> Any:
    """The value ``encode`` wrote."""
    return orjson.loads(data)


@dataclass(frozen=True, slots=True)
class WindowEntry:
    """What the k-of-n window remembers of one applied reading."""

    anomalous: bool
    score: float
    explanation: list[Contribution] | None = None


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An alert event published but not yet confirmed by the transport (the outbox)."""

    uid: int
    topic: str
    payload: bytes


@dataclass(slots=True)
class MachineRecord:
    """Mutable state of one machine; bounded by the window of n readings and the id ring."""

    machine_id: str
    line: str
    since: float
    last_seen: float
    last_seq: int
    last_score: float
    window: deque[WindowEntry] = field(default_factory=deque)
    normal_streak: int = 0
    offline_since: float | None = None
    alert_id: str | None = None
    alert_since: float | None = None
    peak_score: float | None = None
    peak_explanation: list[Contribution] | None = None
    acknowledged_by: str | None = None
    alerts_raised: int = 0
    #: identity -> content digest of the last readings applied (oldest first)
    recent: dict[str, int] = field(default_factory=dict)
    #: alert events whose publish is not yet confirmed, in order
    outbox: list[PendingEvent] = field(default_factory=list)
    #: the feature pipeline's per-machine window state (JSON-able)
    features: dict[str, Any] = field(default_factory=dict)
    #: the model version that scored this machine last (None: none yet)
    model: str | None = None
    #: the live calibration window (channels, rows, needed) while the machine has no model,
    #: or while it re-baselines (then with ``rebaseline``: the version it leaves, ``fit``:
    #: the ``FitSpec`` fields to fit it with)
    calibration: dict[str, Any] | None = None
    #: live verdicts in a row its alert has been open after (re-baselining, ``model.rebaseline``)
    open_readings: int = 0
    #: whether its retained state topic has been published since this record was made
    state_published: bool = False
    #: its own threshold and realized alarm rate (``detector/tuning.py``)
    tuning: Tuning = field(default_factory=Tuning)

    def anomalous_in_window(self) -> int:
        """How many readings in the window were anomalous."""
        return sum(entry.anomalous for entry in self.window)

    def remember(self, identity: str, digest: int) -> None:
        """Record that the reading ``identity`` has been applied to this state."""
        self.recent[identity] = digest
        if len(self.recent) > RECENT_IDENTITIES:
            del self.recent[next(iter(self.recent))]

    def snapshot(self) -> dict[str, Any]:
        """This record as a JSON-able dict."""
        return {
            "machine_id": self.machine_id,
            "line": self.line,
            "since": self.since,
            "last_seen": self.last_seen,
            "last_seq": self.last_seq,
            "last_score": self.last_score,
            "window": [_entry_to_json(e) for e in self.window],
            "window_size": self.window.maxlen,
            "normal_streak": self.normal_streak,
            "offline_since": self.offline_since,
            "alert_id": self.alert_id,
            "alert_since": self.alert_since,
            "peak_score": self.peak_score,
            "peak_explanation": _explanation_to_json(self.peak_explanation),
            "acknowledged_by": self.acknowledged_by,
            "alerts_raised": self.alerts_raised,
            "recent": [[k, v] for k, v in self.recent.items()],
            "outbox": [[p.uid, p.topic, p.payload.decode()] for p in self.outbox],
            "features": self.features,
            "model": self.model,
            "calibration": self.calibration,
            "open_readings": self.open_readings,
            "tuning": self.tuning.snapshot(),
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> MachineRecord:
        """The record a ``snapshot`` describes (``state_published`` starts False)."""
        return cls(
            machine_id=data["machine_id"],
            line=data["line"],
            since=data["since"],
            last_seen=data["last_seen"],
            last_seq=data["last_seq"],
            last_score=data["last_score"],
            window=deque((_entry_from_json(e) for e in data["window"]), maxlen=data["window_size"]),
            normal_streak=data["normal_streak"],
            offline_since=data["offline_since"],
            alert_id=data["alert_id"],
            alert_since=data["alert_since"],
            peak_score=data["peak_score"],
            peak_explanation=_explanation_from_json(data["peak_explanation"]),
            acknowledged_by=data["acknowledged_by"],
            alerts_raised=data["alerts_raised"],
            recent={str(k): int(v) for k, v in data["recent"]},
            outbox=[PendingEvent(int(u), t, p.encode()) for u, t, p in data["outbox"]],
            features=dict(data.get("features") or {}),
            model=data.get("model"),
            calibration=data.get("calibration"),
            open_readings=int(data.get("open_readings", 0)),
            tuning=Tuning.restore(data.get("tuning")),
        )


@dataclass(frozen=True, slots=True)
class CalibrationRow:
    """A reading counted into a machine's calibration window, journaled on its own (the
    window can be hundreds of rows: journaling the whole record per reading would be
    quadratic). Replayed after the machine's record as last written (``append_to``)."""

    machine_id: str
    identity: str
    digest: int
    row: list[float]

    def snapshot(self) -> list[Any]:
        """This row as a JSON-able value."""
        return [self.machine_id, self.identity, self.digest, self.row]

    @classmethod
    def restore(cls, data: list[Any]) -> CalibrationRow:
        """The row a ``snapshot`` describes."""
        machine, identity, digest, row = data
        return cls(str(machine), str(identity), int(digest), [float(v) for v in row])

    def append_to(self, record: MachineRecord) -> bool:
        """Count this row into ``record``'s window (once); whether it was counted."""
        window = record.calibration
        if window is None or self.identity in record.recent:
            return False  # fitted since, or already in the record as written
        rows: list[list[float]] = window["rows"]
        if len(rows) >= window["needed"]:
            return False
        rows.append(self.row)
        record.remember(self.identity, self.digest)
        return True


class StateTable:
    """Every machine's record, keyed by machine id, with the set changed since last taken."""

    def __init__(self) -> None:
        self._records: dict[str, MachineRecord] = {}
        self._dirty: set[str] = set()
        self._urgent: set[str] = set()
        self._rows: list[CalibrationRow] = []

    def get(self, machine_id: str) -> MachineRecord | None:
        """The machine's record, or None for a machine never seen."""
        return self._records.get(machine_id)

    def __getitem__(self, machine_id: str) -> MachineRecord:
        return self._records[machine_id]

    def __contains__(self, machine_id: object) -> bool:
        return machine_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[MachineRecord]:
        return iter(self._records.values())

    def add(self, record: MachineRecord) -> None:
        """Insert (or replace) a machine's record and mark it changed."""
        self._records[record.machine_id] = record
        self._dirty.add(record.machine_id)

    def remove(self, machine_id: str) -> MachineRecord | None:
        """Drop a machine's record (another detector serves it now); the record, if any."""
        self._dirty.discard(machine_id)
        self._urgent.discard(machine_id)
        self._rows = [r for r in self._rows if r.machine_id != machine_id]
        return self._records.pop(machine_id, None)

    def touch(self, machine_id: str) -> None:
        """Mark a machine's record changed (it will be in the next ``take_dirty``)."""
        self._dirty.add(machine_id)

    def mark_urgent(self, machine_id: str) -> None:
        """Mark a record whose change must reach the checkpoint now (an alert transition)."""
        self._urgent.add(machine_id)
        self._dirty.add(machine_id)

    def counted_row(self, row: CalibrationRow) -> None:
        """A reading counted into its machine's calibration window: it must reach the
        checkpoint now (as a row of its own, ``take_rows``); the record is changed too."""
        self._rows.append(row)
        self._dirty.add(row.machine_id)

    def take_rows(self) -> list[CalibrationRow]:
        """The calibration rows counted since the last call, in order. Write them before
        the records taken in the same turn: a record written after its rows holds them."""
        rows, self._rows = self._rows, []
        return rows

    def take_urgent(self) -> list[MachineRecord]:
        """The records marked urgent since the last call (no longer dirty once taken)."""
        urgent = [self._records[m] for m in sorted(self._urgent) if m in self._records]
        self._dirty -= self._urgent
        self._urgent.clear()
        return urgent

    def dirty_ids(self) -> list[str]:
        """The machines whose records changed since they were last taken, sorted."""
        return sorted(m for m in self._dirty if m in self._records)

    def take_dirty_of(self, machines: Iterable[str]) -> list[MachineRecord]:
        """Those of ``machines`` whose records are still changed, in ``machines``' order; they
        are no longer dirty (the rest stay so; rows stay to be taken: written before these
        records, they are replayed only if no later record holds them)."""
        taken = [m for m in machines if m in self._dirty and m in self._records]
        self._dirty.difference_update(taken)
        self._urgent.difference_update(taken)
        return [self._records[m] for m in taken]

    def take_dirty(self) -> list[MachineRecord]:
        """The records changed since the last call, sorted by machine id; resets the set
        (and the rows not yet taken: a whole record holds them)."""
        dirty = [self._records[m] for m in sorted(self._dirty) if m in self._records]
        self._dirty.clear()
        self._urgent.clear()
        self._rows.clear()
        return dirty

    def snapshot(self) -> dict[str, Any]:
        """Every record as one JSON-able value."""
        return {
            "version": SNAPSHOT_VERSION,
            "machines": [self._records[m].snapshot() for m in sorted(self._records)],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace the table's content with a ``snapshot``'s (nothing is marked changed)."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown state snapshot version {data.get('version')!r}")
        self._records = {
            record.machine_id: record
            for record in (MachineRecord.restore(m) for m in data["machines"])
        }
        self._dirty.clear()
        self._urgent.clear()


def _explanation_to_json(explanation: list[Contribution] | None) -> list[list[Any]] | None:
    if explanation is None:
        return None
    return [[c.feature, c.value, c.z] for c in explanation]


def _explanation_from_json(data: list[list[Any]] | None) -> list[Contribution] | None:
    if data is None:
        return None
    return [Contribution.model_construct(feature=f, value=v, z=z) for f, v, z in data]


def _entry_to_json(entry: WindowEntry) -> list[Any]:
    return [entry.anomalous, entry.score, _explanation_to_json(entry.explanation)]


def _entry_from_json(data: list[Any]) -> WindowEntry:
    anomalous, score, explanation = data
    return WindowEntry(bool(anomalous), float(score), _explanation_from_json(explanation))
