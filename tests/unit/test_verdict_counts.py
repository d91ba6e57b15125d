"""The duplicate check the integration tests use counts verdicts per (machine, seq)."""

from __future__ import annotations

import json

from tests.support import Message, duplicated, verdict_counts


def _verdict(machine: str, seq: int) -> Message:
    body = {"machine_id": machine, "seq": seq, "status": "NORMAL"}
    return Message(f"t/alerts/line1/{machine}/verdict", json.dumps(body).encode(), retain=False)


def test_a_second_verdict_for_one_reading_is_reported() -> None:
    """Two verdicts for (m1, 2) are a duplicate; the same seq on another machine is not."""
    counts = verdict_counts(
        [_verdict("m1", 1), _verdict("m1", 2), _verdict("m2", 2), _verdict("m1", 2)]
    )
    assert len(counts) == 3
    assert duplicated(counts) == {("m1", 2): 2}


def test_one_verdict_per_reading_has_no_duplicates() -> None:
    """Distinct readings give an empty duplicate report."""
    assert duplicated(verdict_counts([_verdict("m1", s) for s in range(5)])) == {}
