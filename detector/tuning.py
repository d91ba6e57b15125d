"""A machine's own threshold: operator adjustments and its realized alarm rate. Pure.

A model card's threshold is set for a target false-alarm rate on the training rows. Two things
may show that it does not hold for one machine after training, and this module turns each
into per-machine state (``Tuning``, kept in the machine's record: journaled, checkpointed,
shown on its retained state topic):

* **Operator feedback.** A ``false_alarm`` label on one of the machine's alerts
  (``<root>/commands/<line>/<m>/feedback``, from the web view or any client) raises that
  machine's threshold to just above the alert's peak score: ``peak + FEEDBACK_MARGIN x
  spread``, where the spread is the card's threshold minus its median calibration score (the
  score scale of that model). A ``confirmed`` label changes nothing. An operator may also
  ``widen`` (raise by ``WIDEN_STEP`` spreads) or ``reset`` (back to the card's threshold) on
  ``<root>/commands/<line>/<m>/threshold``. The threshold never rises above the card's plus
  ``RAISE_CAP`` spreads: feedback can quieten a machine, never silence it. Every change is
  recorded (who, when, why, before, after; the last ``ADJUSTMENTS_KEPT``). A model with the
  surprise rule (``model.pipeline``, step 6) has a second cut, on the verdict's
  ``surprise``: a false alarm and a widen also raise it by ``SURPRISE_STEP`` (a recent score
  level ten times rarer), at most ``SURPRISE_CAP`` above the card's, and reset restores it,
  so the button quietens an alert the surprise rule raised too.
* **Following.** A card with a following threshold (``model.threshold.Follow``) judges each
  machine by that threshold plus how far the machine's normal score level (an exponential
  mean of its live NORMAL verdicts' scores while no alert is open, kept here) has risen
  above the card's median calibration score, at most ``Follow.cap`` spreads; the verdict
  carries the threshold it was judged by.
* **Realized alarm rate.** Each live verdict updates an exponentially weighted share of ALERT
  verdicts (time constant ``max(RATE_MIN_READINGS, RATE_SPAN_TARGETS / target)`` readings).
  Once that many readings were counted, a rate above ``RATE_BOUND`` x the card's target is
  *out of bound* (reported once, with the remedy: widen, or refit on recent normal data), and
  back within bound below ``RATE_BACK`` x target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from factorywatch.contracts import MAX_THRESHOLD_CHANGES, ThresholdChange, Verdict
from factorywatch.model.artifact import ModelCard
from factorywatch.model.threshold import Follow

#: a false alarm's threshold goes this many spreads above the alert's peak score
FEEDBACK_MARGIN: Final = 0.1
#: ``widen`` raises the threshold by this many spreads
WIDEN_STEP: Final = 0.5
#: the threshold never rises more than this many spreads above the card's
RAISE_CAP: Final = 3.0
#: a false alarm or a widen raises the machine's surprise cut by this (-log10: ten times
#: rarer), at most ``SURPRISE_CAP`` above the card's
SURPRISE_STEP: Final = 1.0
SURPRISE_CAP: Final = 3.0
#: recent alerts whose peak is remembered (feedback usually comes soon after an alert)
PEAKS_KEPT: Final = 16
#: changes kept in the record (and shown on the state topic)
ADJUSTMENTS_KEPT: Final = 20
#: the realized rate leaves its bound above RATE_BOUND x target, returns below RATE_BACK x
RATE_BOUND: Final = 3.0
RATE_BACK: Final = 2.0
RATE_MIN_READINGS: Final = 1000
RATE_SPAN_TARGETS: Final = 20.0

Action = Literal["false_alarm", "widen", "reset"]
RateChange = Literal["out_of_bound", "within_bound"]


def rate_span(target: float) -> float:
    """How many readings the realized rate averages over, and counts before it is judged."""
    return max(RATE_MIN_READINGS, RATE_SPAN_TARGETS / target)


@dataclass(frozen=True, slots=True)
class Scale:
    """What a model card says about its threshold: the value, the score scale around it
    (threshold minus the median calibration score) and the target false-alarm rate."""

    threshold: float
    spread: float
    target: float | None
    #: the card's surprise threshold (None: no surprise rule)
    surprise: float | None = None

    @property
    def ceiling(self) -> float:
        """The highest threshold any adjustment may set."""
        return self.threshold + RAISE_CAP * self.spread


def scale_of(card: ModelCard) -> Scale:
    """A card's ``Scale`` (a card without a median calibration score: spread 10 % of its
    threshold; without a rate target: no realized-rate bound)."""
    median = card.metrics.get("calibration_score_p50")
    spread = card.threshold - float(median) if median is not None else 0.0
    if not math.isfinite(spread) or spread <= 0.0:
        spread = 0.1 * max(abs(card.threshold), 1e-6)
    spec = card.threshold_spec
    target = spec.value if spec.method == "far" else None
    rule = card.pipeline.surprise if card.pipeline is not None else None
    return Scale(
        threshold=card.threshold,
        spread=spread,
        target=target,
        surprise=None if rule is None else rule.threshold,
    )


@dataclass(slots=True)
class Tuning:
    """One machine's threshold adjustments and realized alarm rate (JSON-able)."""

    #: the machine's own threshold (None: the card's)
    threshold: float | None = None
    #: exponentially weighted share of ALERT verdicts, and how many readings it counted
    rate: float = 0.0
    rated: int = 0
    out_of_bound: bool = False
    #: the target rate it was last counted against (None: its model has none)
    target: float | None = None
    #: alert id -> peak score of the machine's recent alerts (oldest first)
    peaks: dict[str, float] = field(default_factory=dict)
    #: the changes, oldest first: {at, by, action, alert_id, note, before, after}
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    #: its normal score level for a following threshold (``model.threshold.Follow``) and
    #: the model version that level is of (another model's scores start it over)
    level: float | None = None
    level_model: str | None = None
    #: how far above the card's surprise threshold this machine's is (``SURPRISE_STEP``s)
    surprise_shift: float = 0.0

    def surprise_cut(self, scale: Scale) -> float | None:
        """The surprise a verdict must exceed to be an ALERT by the surprise rule (None: the
        model has no such rule)."""
        return None if scale.surprise is None else scale.surprise + self.surprise_shift

    def effective(self, scale: Scale) -> float:
        """The threshold an operator's adjustments leave (before any following)."""
        return scale.threshold if self.threshold is None else self.threshold

    def judged_by(self, scale: Scale, follow: Follow | None, model: str) -> float:
        """The threshold this machine's next verdict is judged by: ``effective`` plus how far
        its normal score level has risen under the card's following rule."""
        if follow is None:
            return self.effective(scale)
        return self.effective(scale) + follow.offset(self._level(follow, model))

    def follow_normal(
        self, follow: Follow | None, verdict: Verdict, model: str, *, alert_open: bool
    ) -> None:
        """Move the normal score level by one live verdict's score, if it is NORMAL and no
        alert of the machine is open after it."""
        if follow is None or verdict.status != "NORMAL" or alert_open:
            return
        self.level = follow.update(self._level(follow, model), verdict.score)

    def _level(self, follow: Follow, model: str) -> float:
        """The level for ``model``'s scores: started at its median calibration score when
        there is none yet or it was of another model."""
        if self.level is None or self.level_model != model:
            self.level, self.level_model = follow.median, model
        return self.level

    def remember_peak(self, alert_id: str, peak: float) -> None:
        """Keep an alert's (latest) peak score for a later false-alarm label."""
        self.peaks.pop(alert_id, None)
        self.peaks[alert_id] = float(peak)
        while len(self.peaks) > PEAKS_KEPT:
            del self.peaks[next(iter(self.peaks))]

    def count(self, alert: bool, scale: Scale) -> RateChange | None:
        """Count one live verdict; the bound's change, if this reading made one."""
        self.target = scale.target
        if scale.target is None:
            return None
        span = rate_span(scale.target)
        self.rated += 1
        weight = max(1.0 / self.rated, 1.0 / span)  # a plain mean until span readings
        self.rate += weight * ((1.0 if alert else 0.0) - self.rate)
        if self.rated < span:
            return None
        if not self.out_of_bound and self.rate > RATE_BOUND * scale.target:
            self.out_of_bound = True
            return "out_of_bound"
        if self.out_of_bound and self.rate < RATE_BACK * scale.target:
            self.out_of_bound = False
            return "within_bound"
        return None

    def adjust(
        self,
        action: Action,
        scale: Scale,
        *,
        by: str,
        at: float,
        alert_id: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any] | None:
        """Apply one change and record it (None: this very change, same action, author, time
        and alert, is already recorded: a redelivered command); ``KeyError`` for a false
        alarm of an alert whose peak this record does not know."""
        for done in self.adjustments:
            if (done["action"], done["by"], done["at"], done["alert_id"]) == (
                action,
                by,
                at,
                alert_id,
            ):
                return None
        before = self.effective(scale)
        surprise_before = self.surprise_cut(scale)
        if action == "reset":
            after = scale.threshold
            self.surprise_shift = 0.0
        elif action == "widen":
            after = min(before + WIDEN_STEP * scale.spread, scale.ceiling)
        else:
            if alert_id is None or alert_id not in self.peaks:
                raise KeyError(alert_id)
            wanted = self.peaks[alert_id] + FEEDBACK_MARGIN * scale.spread
            after = min(max(before, wanted), scale.ceiling)
        if action != "reset" and scale.surprise is not None:
            self.surprise_shift = min(self.surprise_shift + SURPRISE_STEP, SURPRISE_CAP)
        self.threshold = None if after == scale.threshold else after
        change = {
            "at": at,
            "by": by,
            "action": action,
            "alert_id": alert_id,
            "note": note,
            "before": before,
            "after": after,
        }
        if surprise_before is not None:
            change["surprise_before"] = surprise_before
            change["surprise_after"] = self.surprise_cut(scale)
        self.adjustments.append(change)
        del self.adjustments[:-ADJUSTMENTS_KEPT]
        return change

    def state_fields(self) -> dict[str, Any]:
        """What the machine's retained state shows of it (``contracts.MachineState``)."""
        fields: dict[str, Any] = {}
        if self.threshold is not None:
            fields["threshold"] = self.threshold
        if self.adjustments:
            fields["threshold_changes"] = [
                ThresholdChange.model_validate(change)
                for change in self.adjustments[-MAX_THRESHOLD_CHANGES:]
            ]
        # Only a rate judged against its bound: before span readings it is the share of a
        # handful (a first reading's ALERT showed as "alarm rate 100 %" on a quiet machine).
        if self.target is not None and self.rated >= rate_span(self.target):
            fields["alarm_rate"] = self.rate
            fields["alarm_rate_bound"] = RATE_BOUND * self.target
            fields["alarm_rate_out_of_bound"] = self.out_of_bound
        return fields

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-able form (``restore`` reads it)."""
        return {
            "threshold": self.threshold,
            "rate": self.rate,
            "rated": self.rated,
            "out_of_bound": self.out_of_bound,
            "target": self.target,
            "peaks": dict(self.peaks),
            "adjustments": list(self.adjustments),
            "level": self.level,
            "level_model": self.level_model,
            "surprise_shift": self.surprise_shift,
        }

    @classmethod
    def restore(cls, data: dict[str, Any] | None) -> Tuning:
        """The tuning a ``snapshot`` describes (None: a record from before tuning)."""
        if not data:
            return cls()
        threshold = data.get("threshold")
        return cls(
            threshold=None if threshold is None else float(threshold),
            rate=float(data.get("rate", 0.0)),
            rated=int(data.get("rated", 0)),
            out_of_bound=bool(data.get("out_of_bound", False)),
            target=None if data.get("target") is None else float(data["target"]),
            peaks={str(k): float(v) for k, v in (data.get("peaks") or {}).items()},
            adjustments=list(data.get("adjustments") or []),
            level=None if data.get("level") is None else float(data["level"]),
            level_model=data.get("level_model"),
            surprise_shift=float(data.get("surprise_shift", 0.0)),
        )


def rejudge(verdict: Verdict, threshold: float, surprise_cut: float | None = None) -> Verdict:
    """A verdict judged by a machine's own ``threshold`` (and ``surprise_cut``) instead of its
    card's: ALERT when the score is above it, a channel is outside the training range (that
    rule stays) or its surprise is above the cut (a surprise at or below it is dropped)."""
    if verdict.status == "CALIBRATING":
        return verdict
    surprise = verdict.surprise
    if surprise is not None and surprise_cut is not None and surprise <= surprise_cut:
        surprise = None
    alert = verdict.score > threshold or bool(verdict.outside_training) or surprise is not None
    return verdict.model_copy(
        update={
            "status": "ALERT" if alert else "NORMAL",
            "threshold": threshold,
            "explanation": verdict.explanation if alert else None,
            "surprise": surprise,
        }
    )


def rate_notice(
    machine_id: str, line: str, tuning: Tuning, change: RateChange, scale: Scale
) -> dict[str, Any]:
    """What the shell logs when a machine's realized alarm rate leaves (or re-enters) its
    bound, with the remedies an operator has."""
    target = scale.target or 0.0
    notice: dict[str, Any] = {
        "event": f"alarm_rate_{change}",
        "machine_id": machine_id,
        "line": line,
        "alarm_rate": round(tuning.rate, 6),
        "target": target,
        "bound": RATE_BOUND * target,
        "readings": tuning.rated,
    }
    if change == "out_of_bound":
        notice["remedy"] = (
            f"label its false alarms in the web view (each raises its threshold above that "
            f"alarm), or `factorywatch threshold {machine_id} --line {line} --widen --by NAME`; "
            "if its normal operation has changed, recalibrate it on its next readings "
            f"(`factorywatch threshold {machine_id} --line {line} --recalibrate --by NAME`) or "
            "refit it on recent normal readings "
            f"(`factorywatch history export --machine {machine_id} --false-alarms-as-normal "
            f"--csv {machine_id}.csv`, then the `train` command it prints)"
        )
    return notice
