"""The pure part of the alert history: durations, alert episodes, what may be trained on."""

from __future__ import annotations

import io
from typing import Any

import pytest

from factorywatch.history_episodes import (
    AI4I_HEADER,
    episodes,
    is_ai4i,
    parse_since,
    training_rows,
    write_ai4i_csv,
    write_channels_csv,
)
from tests.support import TYPICAL


def _ev(
    event: str, at: float, alert_id: str | None, seq: int | None = None, **kw: Any
) -> dict[str, Any]:
    return {"machine_id": "m1", "line": "line1", "event": event, "at": at, "alert_id": alert_id,
            "seq": seq, **kw}  # fmt: skip


def _reading(seq: int) -> dict[str, Any]:
    channels = {**TYPICAL, "tool_wear_min": 10.0}
    return {"seq": seq, "ts": 1000.0 + seq, "product_type": "L", "readings": channels}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1.5h", 5400)],
)
def test_parse_since_reads_the_usual_durations(text: str, seconds: float) -> None:
    """`--since 24h` and friends mean that long before now."""
    assert parse_since(text, 1_000_000.0) == 1_000_000.0 - seconds


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "1y", "1 hour"])
def test_parse_since_refuses_what_it_cannot_read(text: str) -> None:
    """A bad duration is a clear error, not a silent default."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_since(text, 0.0)


def test_episodes_group_events_and_labels_by_alert_newest_first() -> None:
    """Raise, ack, clear and a label fold into one episode per alert id; offline events and
    a label for an alert without events are kept apart."""
    events = [
        _ev("ALERT_RAISED", 10.0, "a1", 5, peak_score=0.7, explanation=[{"feature": "f"}]),
        _ev("ALERT_ACKNOWLEDGED", 11.0, "a1", acknowledged_by="ana"),
        _ev("ALERT_CLEARED", 12.0, "a1", 9, peak_score=0.8),
        _ev("MACHINE_OFFLINE", 13.0, None),
        _ev("ALERT_RAISED", 20.0, "a2", 15, peak_score=0.65),
    ]
    feedback: list[dict[str, Any]] = [
        {"machine_id": "m1", "line": "line1", "alert_id": "a1", "label": "false_alarm",
         "by": "ana", "note": "tool change"},
        {"machine_id": "m1", "line": "line1", "alert_id": "gone", "label": "confirmed",
         "by": "bo", "note": None},
    ]  # fmt: skip
    eps = {e.alert_id: e for e in episodes(events, feedback)}
    assert [e.alert_id for e in episodes(events, feedback)][:2] == ["a2", "a1"]
    a1 = eps["a1"]
    assert (a1.raised_at, a1.cleared_at, a1.raised_seq, a1.cleared_seq) == (10.0, 12.0, 5, 9)
    assert (a1.acknowledged_by, a1.peak_score, a1.label, a1.note) == (
        "ana",
        0.8,
        "false_alarm",
        "tool change",
    )
    assert not a1.open
    assert eps["a2"].open
    assert eps["gone"].label == "confirmed"
    assert eps["gone"].raised_at is None


def test_equal_raise_times_are_ordered_by_seq() -> None:
    """One batch can raise twice at the same detector time: the later seq is newer."""
    events = [_ev("ALERT_RAISED", 5.0, "b", 40), _ev("ALERT_RAISED", 5.0, "a", 10)]
    assert [e.alert_id for e in episodes(events, [])] == ["b", "a"]


def test_training_rows_leave_out_alerts_unless_they_were_false_alarms() -> None:
    """Readings of an alert (the ALERT ones just before its raise included) are left out,
    unless operators labelled it a false alarm; a lone ALERT reading is always left out."""
    events = [
        _ev("ALERT_RAISED", 1.0, "fa", 12), _ev("ALERT_CLEARED", 2.0, "fa", 15),
        _ev("ALERT_RAISED", 3.0, "real", 32),
    ]  # fmt: skip
    feedback = [{"machine_id": "m1", "line": "line1", "alert_id": "fa", "label": "false_alarm",
                 "by": "ana"}]  # fmt: skip
    eps = episodes(events, feedback)
    alert_seqs = {5, 10, 11, 12, 13, 30, 31, 32}
    readings = [_reading(s) for s in range(40)]
    strict = [
        r["seq"]
        for r in training_rows(readings, eps, alert_seqs, window=5, false_alarms_as_normal=False)
    ]
    relaxed = [
        r["seq"]
        for r in training_rows(readings, eps, alert_seqs, window=5, false_alarms_as_normal=True)
    ]
    assert strict == [
        0,
        1,
        2,
        3,
        4,
        6,
        7,
        8,
        9,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
    ]
    assert relaxed == sorted([*strict, 10, 11, 12, 13, 14, 15])


def test_ai4i_csv_has_the_layout_train_reads() -> None:
    """The export writes the AI4I header and one healthy row per reading."""
    out = io.StringIO()
    assert write_ai4i_csv([_reading(1), _reading(2)], out) == 2
    lines = out.getvalue().splitlines()
    assert lines[0] == ",".join(AI4I_HEADER)
    assert lines[1] == "1,L1,L,300.0,310.0,1500.0,40.0,10.0,0,0,0,0,0,0"


def test_a_machine_of_other_channels_is_written_as_its_channels_over_time() -> None:
    """Not AI4I-shaped: ``ts`` in UTC, ``seq`` and every channel, blank where one is missing."""
    rows = [
        {"seq": 1, "ts": 0.5, "product_type": None, "readings": {"flow": 1.0, "level": 2.0}},
        {"seq": 2, "ts": 1.5, "product_type": None, "readings": {"flow": 3.0}},
    ]
    assert not is_ai4i(rows)
    assert is_ai4i([_reading(1)])
    out = io.StringIO()
    assert write_channels_csv(rows, out) == 2
    assert out.getvalue().splitlines() == [
        "ts,seq,flow,level",
        "1970-01-01T00:00:00.500+00:00,1,1.0,2.0",
        "1970-01-01T00:00:01.500+00:00,2,3.0,",
    ]
