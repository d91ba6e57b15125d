"""The engine's checkpoint on disk: a snapshot plus a journal of what changed since.

Files in the state directory, per detector identity (``<name>``):

* ``<name>.snapshot.json`` — the engine's whole state (every machine's record, the drift
  window) and the ids of the newest readings answered, taken every ``snapshot_every_s`` seconds;
  written to a temporary file and renamed, so it is whole or absent.
* ``<name>.journal.<generation>`` — appended lines since that snapshot:
  ``S <json>``: a machine's record as it stood (the last one per machine wins);
  ``C <json>``: a reading counted into a machine's calibration window (machine, reading id,
  digest, row), counted again on replay when no ``S`` line of that machine follows it;
  ``A <digest> <identity>``: a reading whose verdict the transport confirmed;
  ``I <json>``: parts of a stateful ingest's decoding state (Sparkplug: one edge node's
  tables, values and sequence position), written every turn it changed (the last per key
  wins), so a restarted detector decodes the stream where it stopped.

The generation number ties a journal to its snapshot: a crash between writing a new
snapshot and starting its journal can never replay an older journal over a newer snapshot.

When lines are written (``detector/runner.py``'s cadence): a record whose machine had an alert
transition or acknowledgement goes into the journal in the same turn of the loop, before any
message it reflects can be acknowledged; other changed records (the k-of-n window, the clear
streak, peaks) at most every ``records_every_s``, ``RECORDS_PER_TURN`` of them a turn from
then on (the loop turns at once until all are written). So ``kill -9`` never loses an open
alert, an acknowledgement or an unconfirmed event, and loses about that many seconds of
window history. Lines reach the OS once per loop turn (``flush``): they survive the process, not a
power cut.

Lines and the snapshot are JSON as ``detector/state.py``'s ``encode`` writes it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Final

from factorywatch.detector.state import CalibrationRow, MachineRecord, decode, encode
from factorywatch.detector.store import Changes, Restored

CHECKPOINT_VERSION: Final = 1


class FileCheckpoint:
    """Snapshot + journal files for one detector identity in ``directory``."""

    def __init__(self, directory: Path, name: str, capacity: int) -> None:
        self.directory = directory
        self.name = name
        #: the newest ``capacity`` confirmed reading ids, carried into each snapshot
        self._answered: deque[tuple[str, int]] = deque(maxlen=max(1, capacity))
        directory.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self._file: BinaryIO | None = None
        self.lines = 0

    @property
    def snapshot_path(self) -> Path:
        """Where the snapshot lives."""
        return self.directory / f"{self.name}.snapshot.json"

    def _journal_path(self, generation: int) -> Path:
        return self.directory / f"{self.name}.journal.{generation}"

    def load(self) -> Restored:
        """Read the snapshot and replay its journal (appending goes on in the same journal).

        A torn last line (the process died mid-write) is ignored.
        """
        restored = Restored()
        if self.snapshot_path.exists():
            document = decode(self.snapshot_path.read_bytes())
            if document.get("version") != CHECKPOINT_VERSION:
                raise ValueError(
                    f"{self.snapshot_path}: unknown checkpoint version {document.get('version')!r}"
                )
            self.generation = int(document["generation"])
            restored.snapshot = document["engine"]
            restored.answered = [(str(i), int(d)) for i, d in document["answered"]]
        journal = self._journal_path(self.generation)
        if journal.exists():
            records: dict[str, dict[str, Any]] = {}
            rows: dict[str, list[CalibrationRow]] = {}
            with journal.open("rb") as lines:
                for raw in lines:
                    if not raw.endswith(b"\n"):
                        break  # torn write
                    kind, _, rest = raw.rstrip(b"\n").decode().partition(" ")
                    if kind == "S":
                        record = decode(rest)
                        records.pop(record["machine_id"], None)
                        records[record["machine_id"]] = record
                        rows.pop(record["machine_id"], None)  # the record holds them
                    elif kind == "C":
                        row = CalibrationRow.restore(decode(rest))
                        rows.setdefault(row.machine_id, []).append(row)
                    elif kind == "A":
                        digest, _, identity = rest.partition(" ")
                        restored.answered.append((identity, int(digest)))
                    elif kind == "I":
                        part = decode(rest)
                        restored.ingest.setdefault(part["ingest"], {}).update(part["parts"])
                    self.lines += 1
            restored.records = list(records.values())
            restored.rows = [row for machine in rows.values() for row in machine]
        self._answered.extend(restored.answered)
        for stale in self.directory.glob(f"{self.name}.journal.*"):
            if stale != journal:
                stale.unlink()
        return restored

    def write(self, changes: Changes) -> None:
        """Journal a turn's changes (the ``Store`` protocol); a snapshot when one is due."""
        for identity, digest in changes.answered:
            self.answered(identity, digest)
        self.write_ingest(changes.ingest)
        self.write_rows(changes.rows)  # before their records
        self.write_records(changes.records)
        if changes.snapshot is not None:
            self.save(changes.snapshot)

    def write_records(self, records: Iterable[MachineRecord]) -> None:
        """Append the current state of these machines."""
        file = self._open()
        for record in records:
            file.write(b"S " + encode(record.snapshot()) + b"\n")
            self.lines += 1

    def write_rows(self, rows: Iterable[CalibrationRow]) -> None:
        """Append calibration rows (before the records taken in the same turn)."""
        file = self._open()
        for row in rows:
            file.write(b"C " + encode(row.snapshot()) + b"\n")
            self.lines += 1

    def write_ingest(self, changes: dict[str, dict[str, Any]]) -> None:
        """Append the changed parts of each stateful ingest's state."""
        if not changes:
            return
        file = self._open()
        for name, parts in changes.items():
            file.write(b"I " + encode({"ingest": name, "parts": parts}) + b"\n")
            self.lines += 1

    def answered(self, identity: str, digest: int) -> None:
        """Append one reading whose verdict was confirmed."""
        self._answered.append((identity, digest))
        self._open().write(f"A {digest} {identity}\n".encode())
        self.lines += 1

    def flush(self) -> None:
        """Hand what was appended to the OS (one write for many lines)."""
        if self._file is not None:
            self._file.flush()

    def save(self, engine_snapshot: dict[str, Any]) -> None:
        """Write a new snapshot (atomically) and start its journal; the old one is removed."""
        generation = self.generation + 1
        document = {
            "version": CHECKPOINT_VERSION,
            "generation": generation,
            "engine": engine_snapshot,
            "answered": [[identity, digest] for identity, digest in self._answered],
        }
        tmp = self.snapshot_path.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_bytes(encode(document))
        tmp.replace(self.snapshot_path)
        if self._file is not None:
            self._file.close()
        old = self._journal_path(self.generation)
        self.generation = generation
        self._file = self._journal_path(generation).open("ab")
        self.lines = 0
        old.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush and close the journal."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> BinaryIO:
        if self._file is None:
            self._file = self._journal_path(self.generation).open("ab")
        return self._file
