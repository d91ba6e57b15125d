"""The on-disk journal of answered readings that makes duplicates rare across restarts."""

from __future__ import annotations

from pathlib import Path

from factorywatch.detector.journal import SeenJournal


def test_keys_survive_reopening(tmp_path: Path) -> None:
    """What one detector process recorded and flushed, the next one reads back in order."""
    path = tmp_path / "state" / "det.seen"
    first = SeenJournal(path, capacity=10)
    first.record("m1", 5)
    first.record("m2", 7)
    first.flush()
    first.record("m3", 9)  # not flushed yet: a killed process would lose it
    # no close(): a killed process never closes its file, but what was flushed is kept
    second = SeenJournal(path, capacity=10)
    assert second.entries() == [("m1", 5), ("m2", 7)]
    first.close()
    second.close()


def test_compaction_keeps_the_most_recent_capacity_keys(tmp_path: Path) -> None:
    """The file is bounded: past twice the capacity it is rewritten with the newest keys."""
    path = tmp_path / "det.seen"
    journal = SeenJournal(path, capacity=3)
    for seq in range(20):
        journal.record("m", seq)
    journal.close()
    assert len(path.read_text().splitlines()) <= 6
    reopened = SeenJournal(path, capacity=3)
    assert reopened.entries() == [("m", 17), ("m", 18), ("m", 19)]
    reopened.close()


def test_torn_or_garbage_lines_are_ignored(tmp_path: Path) -> None:
    """A half-written last line (crash mid-write) does not stop the detector from starting."""
    path = tmp_path / "det.seen"
    path.write_text("m1 1\nm1 2\nm1 \ngarbage\nm1 3")
    journal = SeenJournal(path, capacity=10)
    assert journal.entries() == [("m1", 1), ("m1", 2), ("m1", 3)]
    journal.close()
