"""Drift awareness: is the detector still seeing the data its model was trained on? (pure)

The model card records how its own training readings scored: the share above the alarm
threshold (the false-alarm budget, 3 % by default) and the median score. ``ScoreDrift``
keeps the scores of the last ``window`` readings (all machines) and compares: when the
share scored above the threshold stays at ``factor`` times the training share or more, the
process, its sensors or the plant have moved away from what the model learnt, and alerts
are no longer calibrated (retrain, or find what changed). It reports transitions only,
with hysteresis: drift is declared at ``factor`` x the training rate and over when the rate
is back under half of that, so a rate sitting on the line does not flap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

DriftChange = Literal["drift_started", "drift_ended"]
_FEW: Final = 8  # scores added one by one below this many (numpy's fixed cost dominates)


@dataclass(frozen=True, slots=True)
class DriftFigures:
    """The recent window next to the training baseline."""

    readings: int  # in the window (at most its size)
    alert_rate: float  # share of the window's readings scored above the threshold
    score_median: float
    training_alert_rate: float
    training_score_median: float | None


class ScoreDrift:
    """Rolling share of alerting scores over the last ``window`` readings, against training."""

    def __init__(
        self,
        *,
        window: int,
        factor: float,
        training_alert_rate: float,
        training_score_median: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"drift window must be >= 1 reading, got {window}")
        if factor <= 1.0:
            raise ValueError(f"drift factor must be > 1, got {factor}")
        self.window = window
        self.factor = factor
        self.training_alert_rate = training_alert_rate
        self.training_score_median = training_score_median
        self._scores = np.zeros(window, dtype=np.float64)
        self._alerting = np.zeros(window, dtype=np.bool_)
        self._next = 0
        self._count = 0
        self.drifting = False

    def add(self, scores: npt.ArrayLike, threshold: float) -> None:
        """Remember a batch of scores (the oldest fall out of the window)."""
        if isinstance(scores, list) and len(scores) <= _FEW and len(scores) < self.window:
            # a machine's own model sees a reading or two per batch: numpy costs more here
            for value in scores:
                score = float(value)
                self._scores[self._next] = score
                self._alerting[self._next] = score > threshold
                self._next = (self._next + 1) % self.window
            self._count = min(self.window, self._count + len(scores))
            return
        values = np.asarray(scores, dtype=np.float64).ravel()[-self.window :]
        n = values.shape[0]
        first = min(n, self.window - self._next)
        for part, start in ((values[:first], self._next), (values[first:], 0)):
            self._scores[start : start + part.shape[0]] = part
            self._alerting[start : start + part.shape[0]] = part > threshold
        self._next = (self._next + n) % self.window
        self._count = min(self.window, self._count + n)

    def figures(self) -> DriftFigures:
        """Where the window stands (rates of 0 before any reading)."""
        filled = slice(0, self._count)
        return DriftFigures(
            readings=self._count,
            alert_rate=float(self._alerting[filled].mean()) if self._count else 0.0,
            score_median=float(np.median(self._scores[filled])) if self._count else 0.0,
            training_alert_rate=self.training_alert_rate,
            training_score_median=self.training_score_median,
        )

    def snapshot(self) -> dict[str, Any]:
        """The window as a JSON-able value, oldest reading first."""
        order = np.roll(np.arange(self.window), -self._next)[self.window - self._count :]
        return {
            "window": self.window,
            "scores": self._scores[order].tolist(),
            "alerting": self._alerting[order].tolist(),
            "drifting": self.drifting,
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Take over a ``snapshot``'s readings (the newest ``window`` of them) and state."""
        scores = np.asarray(data["scores"], dtype=np.float64)[-self.window :]
        alerting = np.asarray(data["alerting"], dtype=np.bool_)[-self.window :]
        n = scores.shape[0]
        self._scores[:n], self._alerting[:n] = scores, alerting
        self._next, self._count = n % self.window, n
        self.drifting = bool(data["drifting"])

    def check(self) -> DriftChange | None:
        """Call now and then: a change of the drift state, once the window is full."""
        if self._count < self.window:
            return None
        rate = self.figures().alert_rate
        # a training rate of 0 (a fixed threshold above every training score): one in a window
        limit = self.factor * max(self.training_alert_rate, 1.0 / self.window)
        if not self.drifting and rate >= limit:
            self.drifting = True
            return "drift_started"
        if self.drifting and rate < limit / 2:
            self.drifting = False
            return "drift_ended"
        return None
