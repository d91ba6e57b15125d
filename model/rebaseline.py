"""Re-baselining: a sustained alarm is taken for a new operating point (pure).

A machine whose normal operation moves to a new level and stays there (a load that settles
after the training rows, a replaced part, a new set point) would otherwise stay in ALERT for
good: a model's training range and threshold never follow a move that happens during an
alert. The policy, for a card fitted with ``FitSpec.rebaseline`` (the default of
``train --csv``, ``evaluate`` and live calibration):

1. The card names ``rebaseline_readings`` N: its training rows per machine.
2. When a machine's alert has been open after N live verdicts in a row, its operation is
   taken to have moved: the detector clears the alert (``ALERT_CLEARED``, its note says
   why) and the machine recalibrates on its next N readings (CALIBRATING verdicts), on its
   card's channels and with its card's ``FitSpec`` (``spec_of``).
3. The model fitted on them serves the machine from then on, from fresh state (feature
   windows, smoothing, likelihood, following threshold and the alert rule's window), as a
   machine's first own model does; its card re-baselines the same way.

Live, readings that arrive while that fit runs (off the detector's loop) get CALIBRATING
verdicts too; ``replay`` (offline, ``evaluate``) has the fit take no time. An alarm shorter
than N readings, and every reading until then, is judged exactly as without the policy.

``ModelCard.rebaseline_readings`` gives N and ``spec_of`` the fit; ``replay`` scores one
machine's rows in order under the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from factorywatch.model.alert_rule import AlertRule
from factorywatch.model.fitspec import (
    DEFAULT_PRESET,
    DEFAULT_SMOOTH,
    DEFAULT_TREES,
    DEFAULT_WINDOW,
    FitSpec,
)
from factorywatch.model.generic import Scores, Trained, fit_columns, score_recording
from factorywatch.model.pipeline import SURPRISE_RATE

if TYPE_CHECKING:
    from factorywatch.model.artifact import ModelCard
    from factorywatch.model.scoring import FloatArray

#: what the cleared alert's event says
NOTE = "re-baselined: alarm open for {n} readings in a row, taken for a new operating point"


def spec_of(card: ModelCard) -> FitSpec:
    """The ``FitSpec`` a card of ``train --csv`` or live calibration was fitted with (what a
    re-baseline fits its next model with)."""
    p = card.params
    trees, rate = p.get("n_estimators"), p.get("surprise_rate")
    # with the likelihood as the score the rule is off whatever its rate (``surprise_rate``)
    surprise = SURPRISE_RATE if p.get("likelihood") else None if rate is None else float(rate)
    return FitSpec(  # a parameter an older card lacks takes today's default
        preset=str(p.get("preset") or DEFAULT_PRESET),
        window=int(p.get("window") or DEFAULT_WINDOW),
        smooth=int(p.get("smooth") or DEFAULT_SMOOTH),
        family=card.scorer_family,
        far=card.threshold_spec.value,
        trees=DEFAULT_TREES if trees is None else int(trees),
        seed=int(p.get("random_state") or 0),
        likelihood=bool(p.get("likelihood")),
        follow=p.get("follow_span") is not None,
        surprise=surprise,
        rebaseline=True,
    )


def sustained(flagged: Sequence[bool], calm: Sequence[bool], readings: int) -> int | None:
    """The first row after which the alert rule (``AlertRule``) has been open for
    ``readings`` rows in a row, from a closed rule at row 0 (None: never)."""
    rule = AlertRule()
    open_for = 0
    for i, (hit, quiet) in enumerate(zip(flagged, calm, strict=True)):
        rule.step(hit, quiet)
        open_for = open_for + 1 if rule.open else 0
        if open_for >= readings:
            return i
    return None


@dataclass(frozen=True)
class Replayed:
    """One machine's rows under the policy: the scores, and the model serving each part."""

    scores: Scores
    #: (first row, model) of each part, in order; rows between parts recalibrate
    parts: list[tuple[int, Trained]]


def replay(model: Trained, columns: dict[str, FloatArray]) -> Replayed:
    """Score one machine's rows in order as the detector does, re-baselining included:
    ``calibrating`` marks the rows of each recalibration (neither ALERT nor NORMAL)."""
    n = len(next(iter(columns.values()))) if columns else 0
    score = np.zeros(n, dtype=np.float64)
    outside = np.zeros(n, dtype=np.bool_)
    flagged = np.zeros(n, dtype=np.bool_)
    surprise = np.zeros(n, dtype=np.bool_)
    calm = np.ones(n, dtype=np.bool_)
    calibrating = np.zeros(n, dtype=np.bool_)
    parts: list[tuple[int, Trained]] = []
    start, current = 0, model
    while start < n:
        parts.append((start, current))
        part = score_recording(current, {c: v[start:] for c, v in columns.items()})
        clear = current.card.clear_threshold
        quiet = np.ones(n - start, dtype=np.bool_) if clear is None else part.score <= clear
        score[start:], outside[start:], flagged[start:] = part.score, part.outside, part.flagged
        calm[start:] = quiet
        if part.surprise is not None:
            surprise[start:] = part.surprise
        readings = current.card.rebaseline_readings()
        last = (
            None if readings is None else sustained(part.flagged.tolist(), quiet.tolist(), readings)
        )
        if readings is None or last is None:
            break
        window = start + last + 1
        end = min(n, window + readings)
        score[window:], outside[window:], flagged[window:] = 0.0, False, False
        surprise[window:], calm[window:], calibrating[window:end] = False, True, True
        if end - window < readings:
            break  # the recording ends before the window is full
        channels = current.card.channels
        current = fit_columns(
            {c: np.ascontiguousarray(columns[c][window:end]) for c in channels},
            spec_of(current.card),
            name="rebaseline",
        )
        start = end
    return Replayed(
        scores=Scores(
            score=score,
            outside=outside,
            flagged=flagged,
            surprise=surprise,
            calm=calm,
            calibrating=calibrating,
        ),
        parts=parts,
    )
