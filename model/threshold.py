"""Threshold calibration: turn training scores into the ALERT threshold (pure).

Methods (score semantics: higher = more anomalous; ALERT when score > threshold):

* ``far``       target false-alarm rate r on training data: threshold = quantile(1 - r)
* ``contamination``  scikit-learn's ``contamination`` c: the expected share of anomalies in
                the training data; the same cut as ``far`` = c, equal to the forest's
                ``-offset_`` when fitted with ``contamination=c``
* ``quantile``  threshold = quantile q of the training scores
* ``fixed``     an absolute score in (0, 1], e.g. 0.6

The default alarm budget, a 3 % false-alarm rate on training scores, matches the documented
failure rate of the AI4I process (3.4 %); of the rates 1-5 % it gave the best mean F1 on the
hold-out protocol (``model.evaluate``). The threshold itself uses training scores only.

The *clear* threshold is the lower edge of the alert hysteresis: an open alert clears only
after readings at or below it (``detector.alerting``). It is the score that
``CLEAR_FALSE_ALARM_RATE`` of the training readings exceed, never above the threshold, so a
machine hovering just under the alarm line keeps its alert open.

A *following* threshold (``Follow``, cards trained by ``train --csv`` and live calibration):
a machine's threshold rises with its own normal score level, the way DSPOT (Siffer et al.
2017) moves its threshold with a moving average. Each machine keeps ``level``, an exponential
mean (time constant ``FOLLOW_SPAN`` readings) of its scores, updated only by NORMAL verdicts
while no alert is open, and started at the median calibration score. The threshold is the
card's plus how far that level has risen above the median, at most ``FOLLOW_CAP`` spreads
(the card's threshold minus its median calibration score). A machine whose normal operation
scores a little higher than training did (a season, a load, wear) so stops alarming on it,
while a fault, which moves the score at once and is not NORMAL, does not move the level; the
threshold never falls below the card's, so following never makes a machine more sensitive
than it was trained to be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from factorywatch.model.alert_rule import AlertRule

Method = Literal["far", "contamination", "quantile", "fixed"]
DEFAULT_FALSE_ALARM_RATE = 0.03
CLEAR_FALSE_ALARM_RATE = 0.10
#: the following threshold's time constant (readings) and its cap (spreads above the card's)
FOLLOW_SPAN: Final = 300.0
FOLLOW_CAP: Final = 1.0


@dataclass(frozen=True, slots=True)
class Follow:
    """A card's following threshold (module doc): where a machine's level starts, the score
    scale, the time constant and the cap."""

    median: float
    spread: float
    span: float = FOLLOW_SPAN
    cap: float = FOLLOW_CAP

    def offset(self, level: float) -> float:
        """How far the threshold has risen above the card's at this ``level``."""
        return min(self.cap * self.spread, max(0.0, level - self.median))

    def update(self, level: float, score: float) -> float:
        """The level after one NORMAL verdict's ``score``."""
        return level + (score - level) / self.span

    def flags(
        self,
        scores: list[float],
        always: list[bool],
        threshold: float,
        clear_threshold: float | None = None,
    ) -> tuple[list[bool], list[float]]:
        """One machine's ALERT flags and thresholds, reading by reading, from its first: a
        reading is ALERT when its score is above the followed threshold or ``always`` says
        so (outside the training envelope, or surprising); a NORMAL one moves the level
        unless an alert is open after it (the detector's alert rule, ``AlertRule``, with
        ``clear_threshold``)."""
        level = self.median
        rule = AlertRule()
        flagged: list[bool] = []
        thresholds: list[float] = []
        for value, out in zip(scores, always, strict=True):
            cut = threshold + self.offset(level)
            alert = out or value > cut
            flagged.append(alert)
            thresholds.append(cut)
            rule.step(alert, clear_threshold is None or value <= clear_threshold)
            if not alert and not rule.open:
                level = self.update(level, value)
        return flagged, thresholds


class ThresholdSpec(BaseModel):
    """How the threshold was (or is to be) chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "far"
    value: float = Field(
        default=DEFAULT_FALSE_ALARM_RATE, description="rate, quantile or absolute score"
    )

    @model_validator(mode="after")
    def _check_range(self) -> ThresholdSpec:
        if not 0.0 < self.value < 1.0 and not (self.method == "fixed" and self.value == 1.0):
            raise ValueError(f"threshold {self.method} value must be in (0, 1), got {self.value}")
        return self


def calibrate(train_scores: npt.NDArray[np.float64], spec: ThresholdSpec) -> float:
    """Return the score threshold for ``spec`` given the training scores."""
    if spec.method == "fixed":
        return float(spec.value)
    q = spec.value if spec.method == "quantile" else 1.0 - spec.value
    return float(np.quantile(train_scores, q))


def clear_threshold(train_scores: npt.NDArray[np.float64], threshold: float) -> float:
    """The score an open alert must fall to (or below) for a reading to count as clear."""
    return min(threshold, float(np.quantile(train_scores, 1.0 - CLEAR_FALSE_ALARM_RATE)))
