"""The engine's checkpoint on disk: a snapshot plus a journal of what changed since.

Files in the state directory, per detector identity (``<name>``):

* ``<name>.snapshot.json`` — the engine's whole state (every machine's record, the drift
  window) and the ids of the newest readings answered, taken every ``snapshot_every_s`` seconds;
  written to a temporary file and renamed, so it is whole or absent.
* ``<name>.journal.<generation>`` — appended lines since that snapshot:
  ``S <json>``: a machine's record as it stood (the last one per machine wins);
  ``A <digest> <identity>``: a reading whose verdict the transport confirmed;
  ``I <json>``: parts of a stateful ingest's decoding state (Sparkplug: one edge node's
  tables, values and sequence position), written every turn it changed (the last per key
  wins), so a restarted detector decodes the stream where it stopped.

The generation number ties a journal to its snapshot: a crash between writing a new
snapshot and starting its journal can never replay an older journal over a newer snapshot.

When lines are written (see ``detector/service.py``): a record whose machine had an alert
transition or acknowledgement goes into the journal in the same turn of the loop, before any
message it reflects can be acknowledged; other changed records (the k-of-n window, the clear
streak, peaks) at most every ``records_every_s``. So ``kill -9`` never loses an open alert,
an acknowledgement or an unconfirmed event, and loses at most that many seconds of window
history. Lines reach the OS once per loop turn (``flush``): they survive the process, not a
power cut.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from factorywatch.detector.state import MachineRecord

CHECKPOINT_VERSION: Final = 1


@dataclass
class Restored:
    """What a checkpoint held: the snapshot, records written since, and answered ids."""

    snapshot: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    answered: list[tuple[str, int]] = field(default_factory=list)
    #: ingest name -> key -> the newest journaled part
    ingest: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when there was nothing to restore."""
        return self.snapshot is None and not self.records and not self.answered and not self.ingest


class FileCheckpoint:
    """Snapshot + journal files for one detector identity in ``directory``."""

    def __init__(self, directory: Path, name: str, capacity: int) -> None:
        self.directory = directory
        self.name = name
        #: the newest ``capacity`` confirmed reading ids, carried into each snapshot
        self._answered: deque[tuple[str, int]] = deque(maxlen=max(1, capacity))
        directory.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self._file: TextIO | None = None
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
            document = json.loads(self.snapshot_path.read_text())
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
            with journal.open() as lines:
                for line in lines:
                    if not line.endswith("\n"):
                        break  # torn write
                    kind, _, rest = line.rstrip("\n").partition(" ")
                    if kind == "S":
                        record = json.loads(rest)
                        records.pop(record["machine_id"], None)
                        records[record["machine_id"]] = record
                    elif kind == "A":
                        digest, _, identity = rest.partition(" ")
                        restored.answered.append((identity, int(digest)))
                    elif kind == "I":
                        part = json.loads(rest)
                        restored.ingest.setdefault(part["ingest"], {}).update(part["parts"])
                    self.lines += 1
            restored.records = list(records.values())
        self._answered.extend(restored.answered)
        for stale in self.directory.glob(f"{self.name}.journal.*"):
            if stale != journal:
                stale.unlink()
        return restored

    def write_records(self, records: Iterable[MachineRecord]) -> None:
        """Append the current state of these machines."""
        file = self._open()
        for record in records:
            file.write("S " + json.dumps(record.snapshot(), separators=(",", ":")) + "\n")
            self.lines += 1

    def write_ingest(self, changes: dict[str, dict[str, Any]]) -> None:
        """Append the changed parts of each stateful ingest's state."""
        if not changes:
            return
        file = self._open()
        for name, parts in changes.items():
            line = json.dumps({"ingest": name, "parts": parts}, separators=(",", ":"))
            file.write(f"I {line}\n")
            self.lines += 1

    def answered(self, identity: str, digest: int) -> None:
        """Append one reading whose verdict was confirmed."""
        self._answered.append((identity, digest))
        self._open().write(f"A {digest} {identity}\n")
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
        tmp.write_text(json.dumps(document, separators=(",", ":")))
        tmp.replace(self.snapshot_path)
        if self._file is not None:
            self._file.close()
        old = self._journal_path(self.generation)
        self.generation = generation
        self._file = self._journal_path(generation).open("a")
        self.lines = 0
        old.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush and close the journal."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> TextIO:
        if self._file is None:
            self._file = self._journal_path(self.generation).open("a")
        return self._file
