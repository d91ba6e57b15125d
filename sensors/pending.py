"""The readings a sensor sent and the detector has not answered yet (pure: no paho, no clock).

A broker's PUBACK says only that the broker has the reading: a broker killed before its next
save loses what it acknowledged since the last one. The detector's answer (a verdict, or a dead
letter) is the end-to-end acknowledgement, so a publisher keeps each reading here until that
answer is heard, and sends again what has none:

- after a reconnect, every reading the (maybe new) broker had acknowledged but nobody answered
  (``after_reconnect``); the ones without a PUBACK are still paho's to resend. Also, once,
  the readings answered in the last moments before the connection was lost: a broker killed
  then may have lost their verdicts on the way to other consumers (a recorder, a notifier)
  after delivering them to us; sent again, they get the same verdict again;
- while connected, a reading acknowledged more than ``after_s`` ago and still unanswered once
  a reading sent after it was answered (``overdue``): the detector is alive and answering,
  this one's answer was lost. A detector that is away answers nothing, so its backlog is not
  multiplied.

Each reading is sent at most ``max_sends`` times, then given up (counted). The set holds at
most ``capacity`` readings: the oldest is dropped (counted) to make room. Sending a reading
twice is safe: the detector drops a duplicate (same id, same content) and answers it with the
verdict it already gave.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

#: readings kept per machine while their answers are outstanding
DEFAULT_CAPACITY: Final = 10_000
#: the first send and at most three more
DEFAULT_MAX_SENDS: Final = 4


@dataclass(slots=True)
class Unanswered:
    """One reading on its way: where it goes, its exact bytes, how often and when it went."""

    seq: int
    topic: str
    payload: bytes
    #: when it was last sent (until answered), then when it was answered
    sent_at: float
    order: int
    sends: int = 1
    #: the broker acknowledged its latest send (before that, it is paho's to resend)
    acknowledged: bool = False


@dataclass(slots=True)
class Released:
    """What a call let go of: readings dropped for room, readings given up after max sends."""

    dropped: list[int] = field(default_factory=list)
    given_up: list[int] = field(default_factory=list)


class PendingReadings:
    """Readings sent and not yet answered, oldest first (see the module docstring)."""

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, *, max_sends: int = DEFAULT_MAX_SENDS
    ) -> None:
        if capacity < 1 or max_sends < 1:
            raise ValueError("capacity and max_sends must be at least 1")
        self.capacity = capacity
        self.max_sends = max_sends
        self._entries: OrderedDict[int, Unanswered] = OrderedDict()
        #: answered readings, oldest answer first (at most ``capacity``; see ``after_reconnect``)
        self._recent: OrderedDict[int, Unanswered] = OrderedDict()
        self._orders = itertools.count()
        #: send order of the latest send that was answered (-1: none yet)
        self._answered_order = -1
        self.dropped = 0
        self.given_up = 0
        self.resent = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq: object) -> bool:
        return seq in self._entries

    def sent(self, seq: int, topic: str, payload: bytes, now: float) -> list[int]:
        """A reading was handed to the client; return the sequence numbers dropped for room."""
        self._entries.pop(seq, None)  # a reused seq: the newer content is the one outstanding
        self._entries[seq] = Unanswered(seq, topic, payload, now, next(self._orders))
        dropped: list[int] = []
        while len(self._entries) > self.capacity:
            old, _ = self._entries.popitem(last=False)
            dropped.append(old)
        self.dropped += len(dropped)
        return dropped

    def acknowledged(self, seq: int) -> None:
        """The broker acknowledged the reading's latest send."""
        entry = self._entries.get(seq)
        if entry is not None:
            entry.acknowledged = True

    def answered(self, seq: int, now: float) -> bool:
        """The detector answered the reading (a verdict or a dead letter); True if it was held."""
        entry = self._entries.pop(seq, None)
        if entry is None:
            return False
        self._answered_order = max(self._answered_order, entry.order)
        entry.sent_at = now
        self._recent[seq] = entry
        if len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        return True

    def discard(self, seq: int) -> None:
        """Stop waiting for the reading's answer (it was never queued, or the broker refused
        it: no answer will come)."""
        self._entries.pop(seq, None)

    def after_reconnect(
        self, now: float, answered_since: float | None = None
    ) -> tuple[list[Unanswered], Released]:
        """The readings to send again on a new connection: every acknowledged, unanswered one,
        then (once, not waited for again) those answered at or after ``answered_since``."""
        again, released = self._resend([e for e in self._entries.values() if e.acknowledged], now)
        if answered_since is not None:
            recent = [e for e in self._recent.values() if e.sent_at >= answered_since]
            for entry in recent:
                del self._recent[entry.seq]
            self.resent += len(recent)
            again += recent
        return again, released

    def overdue(self, now: float, after_s: float) -> tuple[list[Unanswered], Released]:
        """Acknowledged readings unanswered for ``after_s`` while a later one was answered."""
        due = [
            e
            for e in self._entries.values()
            if e.acknowledged and e.order < self._answered_order and now - e.sent_at >= after_s
        ]
        return self._resend(due, now)

    def _resend(self, entries: list[Unanswered], now: float) -> tuple[list[Unanswered], Released]:
        """Mark ``entries`` sent once more (newest in send order); give up on spent ones."""
        released = Released()
        again: list[Unanswered] = []
        for entry in entries:
            if entry.sends >= self.max_sends:
                del self._entries[entry.seq]
                released.given_up.append(entry.seq)
                continue
            entry.sends += 1
            entry.sent_at = now
            entry.acknowledged = False
            entry.order = next(self._orders)
            self._entries.move_to_end(entry.seq)
            again.append(entry)
        self.given_up += len(released.given_up)
        self.resent += len(again)
        return again, released

    def get(self, seq: int) -> Unanswered | None:
        """The outstanding reading ``seq`` (None when answered, let go or never sent)."""
        return self._entries.get(seq)

    def seqs(self) -> list[int]:
        """The outstanding sequence numbers, oldest send first."""
        return list(self._entries)
