"""The detector's alert rule over a machine's verdicts, one reading at a time (pure).

``detector/alerting.py`` raises an alert when ``k`` of a machine's last ``n`` verdicts are
ALERT and clears it after ``m`` clear readings in a row (NORMAL, with a score at or below the
model's clear threshold); its window starts over at each clear. ``AlertRule`` is that rule
for offline use: ``model.streams`` counts the alarms an operator would have seen, and
``model.threshold.Follow`` knows when an alert is open (a following threshold does not move
during one). A property test holds it equal to the detector's ``AlertTracker``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

#: the alert rule's defaults (``detector/alerting.py``'s DEFAULT_K, DEFAULT_N, DEFAULT_M are these)
ALARM_K: Final = 3
ALARM_N: Final = 5
ALARM_M: Final = 10


@dataclass(slots=True)
class AlertRule:
    """One machine's alert state under the k-of-n raise, m-clear rule."""

    k: int = ALARM_K
    n: int = ALARM_N
    m: int = ALARM_M
    open: bool = False
    calm: int = 0  # clear readings in a row while open
    window: deque[bool] = field(default_factory=deque)  # the last n flags (none open)

    def step(self, flagged: bool, clear: bool) -> bool:
        """Account one reading (``flagged``: its verdict is ALERT; ``clear``: it counts
        toward clearing); True when it raises an alert."""
        self.window.append(flagged)
        if len(self.window) > self.n:
            self.window.popleft()
        if self.open:
            self.calm = self.calm + 1 if clear and not flagged else 0
            if self.calm >= self.m:
                self.open, self.calm = False, 0
                self.window.clear()
            return False
        if sum(self.window) >= self.k:
            self.open, self.calm = True, 0
            return True
        return False
