"""PendingReadings: a sensor's readings kept until the detector's answer, sent again if lost."""

from __future__ import annotations

import pytest

from factorywatch.sensors.pending import PendingReadings

TOPIC = "t/telemetry/line1/m1"


def _sent(pending: PendingReadings, *seqs: int, now: float = 0.0, acked: bool = True) -> None:
    for seq in seqs:
        pending.sent(seq, TOPIC, f"r{seq}".encode(), now)
        if acked:
            pending.acknowledged(seq)


def test_an_answered_reading_is_no_longer_pending() -> None:
    """A verdict (or dead letter) ends a reading's wait; an unknown answer changes nothing."""
    pending = PendingReadings(10)
    _sent(pending, 1, 2)
    assert pending.answered(1, now=1.0) is True
    assert pending.answered(1, now=1.0) is False
    assert pending.answered(99, now=1.0) is False
    assert pending.seqs() == [2]


def test_after_a_reconnect_only_acknowledged_unanswered_readings_go_again() -> None:
    """Readings without a PUBACK are the MQTT client's to resend; acknowledged ones are ours."""
    pending = PendingReadings(10)
    _sent(pending, 1, 2, 3)
    _sent(pending, 4, acked=False)
    pending.answered(2, now=1.0)
    again, released = pending.after_reconnect(now=5.0)
    assert [(e.seq, e.topic, e.payload, e.sends) for e in again] == [
        (1, TOPIC, b"r1", 2),
        (3, TOPIC, b"r3", 2),
    ]
    assert released.given_up == []
    # sent again, so unacknowledged until the new broker's PUBACK: not sent a third time yet
    assert pending.after_reconnect(now=6.0)[0] == []
    assert pending.resent == 2


def test_the_oldest_reading_is_dropped_and_counted_when_full() -> None:
    """A full set makes room by dropping the oldest reading, and says which."""
    pending = PendingReadings(3)
    _sent(pending, 1, 2, 3)
    assert pending.sent(4, TOPIC, b"r4", 0.0) == [1]
    assert pending.seqs() == [2, 3, 4]
    assert pending.dropped == 1


def test_a_reading_sent_max_times_is_given_up() -> None:
    """Each reading goes at most ``max_sends`` times; then it is let go and counted."""
    pending = PendingReadings(10, max_sends=2)
    _sent(pending, 1)
    again, _ = pending.after_reconnect(1.0)
    assert [e.seq for e in again] == [1]
    pending.acknowledged(1)
    again, released = pending.after_reconnect(2.0)
    assert again == []
    assert released.given_up == [1]
    assert len(pending) == 0
    assert pending.given_up == 1


def test_overdue_needs_a_later_answer_and_the_delay() -> None:
    """While connected, a reading goes again only if a later one was answered and it waited
    ``after_s``: a detector that is away answers nothing, so nothing is multiplied."""
    pending = PendingReadings(10)
    _sent(pending, 1, 2, 3, now=0.0)
    assert pending.overdue(now=100.0, after_s=10.0)[0] == []  # nothing answered yet
    pending.answered(2, now=1.0)
    assert pending.overdue(now=5.0, after_s=10.0)[0] == []  # answered, but not long enough
    again, _ = pending.overdue(now=10.0, after_s=10.0)
    assert [e.seq for e in again] == [1]  # 3 was sent after the last answer: still in time
    pending.acknowledged(1)
    # sent again after every answer so far: not overdue until a later one is answered
    assert pending.overdue(now=50.0, after_s=10.0)[0] == []
    pending.answered(3, now=1.0)
    assert pending.overdue(now=50.0, after_s=10.0)[0] == []  # 3 went before 1's second send


def test_a_refused_or_unqueued_reading_is_discarded() -> None:
    """A reading that can never be answered stops being waited for."""
    pending = PendingReadings(10)
    _sent(pending, 1, 2)
    pending.discard(1)
    assert pending.seqs() == [2]
    assert 1 not in pending


def test_a_reused_seq_keeps_the_newer_content() -> None:
    """The same seq sent twice is one pending reading: the newer bytes."""
    pending = PendingReadings(10)
    pending.sent(1, TOPIC, b"old", 0.0)
    pending.sent(1, TOPIC, b"new", 1.0)
    pending.acknowledged(1)
    again, _ = pending.after_reconnect(2.0)
    assert [e.payload for e in again] == [b"new"]


def test_limits_must_be_positive() -> None:
    """A set that can hold nothing is a configuration error."""
    with pytest.raises(ValueError, match="at least 1"):
        PendingReadings(0)


def test_readings_answered_just_before_the_connection_was_lost_go_again_once() -> None:
    """A killed broker may have lost a verdict on its way to other consumers after we heard
    it: readings answered since ``answered_since`` go again after the reconnect, once."""
    pending = PendingReadings(10)
    _sent(pending, 1, 2, 3)
    pending.answered(1, now=10.0)
    pending.answered(2, now=20.0)
    again, _ = pending.after_reconnect(now=30.0, answered_since=15.0)
    assert [e.seq for e in again] == [3, 2]  # the unanswered one, then the recent answer
    assert pending.seqs() == [3]  # the recent answer is not waited for again
    again, _ = pending.after_reconnect(now=31.0, answered_since=15.0)
    assert again == []
