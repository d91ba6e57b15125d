"""The checkpoint files: snapshot + journal generations, torn lines, last record wins."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from factorywatch.detector.checkpoint import FileCheckpoint
from factorywatch.detector.state import CalibrationRow, MachineRecord
from factorywatch.detector.store import Changes


def _record(machine: str, score: float) -> MachineRecord:
    return MachineRecord(
        machine_id=machine,
        line="l1",
        since=1.0,
        last_seen=2.0,
        last_seq=3,
        last_score=score,
        window=deque(maxlen=5),
    )


def test_nothing_to_restore_on_a_first_start(tmp_path: Path) -> None:
    """An empty state directory restores nothing."""
    checkpoint = FileCheckpoint(tmp_path, "d", capacity=10)
    assert checkpoint.load().empty
    checkpoint.close()


def test_journal_replays_the_last_record_per_machine_and_answered_ids(tmp_path: Path) -> None:
    """Records written twice come back as the later one; answered ids in order."""
    first = FileCheckpoint(tmp_path, "d", capacity=10)
    first.load()
    first.write_records([_record("a", 0.1), _record("b", 0.2)])
    first.answered("a:1", 11)
    first.write_records([_record("a", 0.9)])
    first.answered("b:7", 22)
    first.close()
    restored = FileCheckpoint(tmp_path, "d", capacity=10).load()
    assert {r["machine_id"]: r["last_score"] for r in restored.records} == {"a": 0.9, "b": 0.2}
    assert restored.answered == [("a:1", 11), ("b:7", 22)]


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    """A line cut short by a crash mid-write is dropped; everything before it is kept."""
    first = FileCheckpoint(tmp_path, "d", capacity=10)
    first.load()
    first.answered("a:1", 1)
    first.close()
    journal = next(tmp_path.glob("d.journal.*"))
    with journal.open("a") as f:
        f.write('S {"machine_id": "a", "li')
    assert FileCheckpoint(tmp_path, "d", capacity=10).load().answered == [("a:1", 1)]


def test_a_snapshot_starts_a_new_journal_generation(tmp_path: Path) -> None:
    """After save() the old journal is gone and only newer lines are replayed over it."""
    first = FileCheckpoint(tmp_path, "d", capacity=3)
    first.load()
    for i in range(5):
        first.answered(f"a:{i}", i)
    first.save({"marker": 1})
    first.answered("a:9", 9)
    first.close()
    assert [p.name for p in tmp_path.glob("d.journal.*")] == ["d.journal.1"]
    restored = FileCheckpoint(tmp_path, "d", capacity=3).load()
    assert restored.snapshot == {"marker": 1}
    # the newest `capacity` answered ids go into the snapshot, then the journal's
    assert restored.answered == [("a:2", 2), ("a:3", 3), ("a:4", 4), ("a:9", 9)]


def test_an_older_journal_is_never_replayed_over_a_newer_snapshot(tmp_path: Path) -> None:
    """A journal left from the previous generation (crash during save) is discarded."""
    first = FileCheckpoint(tmp_path, "d", capacity=10)
    first.load()
    first.write_records([_record("a", 0.5)])
    first.save({"marker": 2})
    first.close()
    stale = tmp_path / "d.journal.0"
    stale.write_text('S {"machine_id": "a"}\n')
    restored = FileCheckpoint(tmp_path, "d", capacity=10).load()
    assert restored.records == []
    assert not stale.exists()


def test_calibration_rows_replay_after_their_record_and_count_once(tmp_path: Path) -> None:
    """Rows journaled before their machine's newer record are held by it and dropped; rows
    after it are counted into its window once (a row already in the record is not)."""
    record = _record("a", 0.1)
    record.calibration = {"channels": ["x", "y"], "rows": [[1.0, 2.0]], "needed": 4}
    record.remember("a:0", 10)
    first = FileCheckpoint(tmp_path, "d", capacity=10)
    first.load()
    first.write_rows([CalibrationRow("a", "a:1", 11, [3.0, 4.0])])  # then held by the record
    record.calibration["rows"].append([3.0, 4.0])
    record.remember("a:1", 11)
    first.write_records([record])
    first.write_rows(
        [
            CalibrationRow("a", "a:2", 12, [5.0, 6.0]),
            CalibrationRow("a", "a:1", 11, [3.0, 4.0]),  # a redelivery: already counted
            CalibrationRow("b", "b:0", 13, [7.0, 8.0]),  # no record of b: nothing to count into
        ]
    )
    first.close()
    restored = FileCheckpoint(tmp_path, "d", capacity=10).load()
    assert [r.identity for r in restored.rows] == ["a:2", "a:1", "b:0"]
    (data,) = restored.records
    back = MachineRecord.restore(data)
    counted = [row.append_to(back) for row in restored.rows[:2]]
    assert counted == [True, False]
    assert back.calibration is not None
    assert back.calibration["rows"] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert list(back.recent) == ["a:0", "a:1", "a:2"]


def test_write_journals_a_turns_changes_as_the_store_protocol_hands_them(tmp_path: Path) -> None:
    """``write(Changes)``: answered ids, ingest parts, rows and records journaled, and a
    snapshot when one is given (a new generation that still carries the answered ids)."""
    first = FileCheckpoint(tmp_path, "d", capacity=10)
    first.load()
    first.write(Changes(answered=[("a:1", 11)], records=[_record("a", 0.4)]))
    first.write(Changes(ingest={"spb": {"edge1": {"seq": 3}}}))
    first.flush()
    restored = FileCheckpoint(tmp_path, "d", capacity=10).load()
    assert restored.answered == [("a:1", 11)]
    assert [r["last_score"] for r in restored.records] == [0.4]
    assert restored.ingest == {"spb": {"edge1": {"seq": 3}}}
    first.write(Changes(answered=[("a:2", 12)], snapshot={"engine": "state"}))
    first.close()
    after = FileCheckpoint(tmp_path, "d", capacity=10).load()
    assert after.snapshot == {"engine": "state"}
    assert after.answered == [("a:1", 11), ("a:2", 12)]
    assert after.records == []  # the snapshot holds them now
