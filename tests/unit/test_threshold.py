"""Threshold calibration (far / quantile / fixed) and ThresholdSpec validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from factorywatch.model.threshold import (
    CLEAR_FALSE_ALARM_RATE,
    DEFAULT_FALSE_ALARM_RATE,
    ThresholdSpec,
    calibrate,
    clear_threshold,
)

SCORES = np.linspace(0.3, 0.8, 10_001)


def test_default_spec_is_a_small_false_alarm_rate() -> None:
    """The default spec targets the module's default false-alarm rate, a few per cent."""
    spec = ThresholdSpec()
    assert (spec.method, spec.value) == ("far", DEFAULT_FALSE_ALARM_RATE)
    assert 0.0 < spec.value <= 0.05


@pytest.mark.parametrize("rate", [0.001, 0.02, 0.1, 0.5])
def test_far_threshold_alerts_on_the_target_share_of_training_scores(rate: float) -> None:
    """With method far=r, about a share r of the training scores lie above the threshold."""
    cut = calibrate(SCORES, ThresholdSpec(method="far", value=rate))
    assert cut == pytest.approx(float(np.quantile(SCORES, 1 - rate)))
    assert float(np.mean(cut < SCORES)) == pytest.approx(rate, abs=1 / len(SCORES))


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantile_threshold_is_that_quantile(q: float) -> None:
    """With method quantile=q the threshold is the q-quantile of the training scores."""
    cut = calibrate(SCORES, ThresholdSpec(method="quantile", value=q))
    assert cut == pytest.approx(0.3 + 0.5 * q)


def test_far_and_quantile_are_complementary() -> None:
    """far=r and quantile=1-r give the same threshold."""
    far = calibrate(SCORES, ThresholdSpec(method="far", value=0.05))
    quantile = calibrate(SCORES, ThresholdSpec(method="quantile", value=0.95))
    assert far == pytest.approx(quantile)


def test_lower_false_alarm_rate_gives_a_higher_threshold() -> None:
    """Asking for fewer false alarms never lowers the threshold."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.35, 0.75, 5000)
    cuts = [calibrate(scores, ThresholdSpec(value=r)) for r in (0.2, 0.1, 0.02, 0.001)]
    assert cuts == sorted(cuts)


@pytest.mark.parametrize("value", [0.6, 0.999, 1.0])
def test_fixed_threshold_ignores_training_scores(value: float) -> None:
    """A fixed threshold is returned as is, whatever the training scores."""
    assert calibrate(SCORES, ThresholdSpec(method="fixed", value=value)) == value
    assert calibrate(np.array([0.9]), ThresholdSpec(method="fixed", value=value)) == value


def test_calibrate_returns_a_python_float() -> None:
    """The threshold is a plain float, ready for the JSON model card."""
    assert type(calibrate(SCORES, ThresholdSpec())) is float


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "far", "value": 0.0},
        {"method": "far", "value": 1.0},
        {"method": "far", "value": -0.1},
        {"method": "quantile", "value": 0.0},
        {"method": "quantile", "value": 1.0},
        {"method": "quantile", "value": 1.5},
        {"method": "fixed", "value": 0.0},
        {"method": "fixed", "value": 1.01},
        {"method": "fixed", "value": float("nan")},
        {"method": "far", "value": float("nan")},
        {"method": "far", "value": float("inf")},
        {"method": "sigma", "value": 0.5},
        {"method": "far", "value": 0.02, "extra": 1},
    ],
)
def test_invalid_specs_are_rejected(fields: dict[str, Any]) -> None:
    """Values outside (0, 1) (fixed may be 1), unknown methods and extra keys fail."""
    with pytest.raises(ValidationError):
        ThresholdSpec(**fields)


def test_spec_is_frozen() -> None:
    """A spec cannot be changed after creation (it is recorded in the model card)."""
    spec = ThresholdSpec()
    with pytest.raises(ValidationError):
        spec.value = 0.5  # type: ignore[misc]


def test_spec_round_trips_through_json() -> None:
    """A spec survives the JSON of the model card unchanged."""
    spec = ThresholdSpec(method="quantile", value=0.97)
    assert ThresholdSpec.model_validate_json(spec.model_dump_json()) == spec


def test_contamination_matches_scikit_learns_own_offset() -> None:
    """`contamination=c` gives exactly the cut scikit-learn's IsolationForest computes for c."""
    from sklearn.ensemble import IsolationForest  # noqa: PLC0415

    from factorywatch.model.scoring import SklearnScorer  # noqa: PLC0415

    rng = np.random.default_rng(0)
    data = rng.normal(size=(2000, 3))
    for c in (0.01, 0.03, 0.1):
        forest = IsolationForest(n_estimators=50, contamination=c, random_state=0).fit(data)
        ours = calibrate(
            SklearnScorer(forest).score(data), ThresholdSpec(method="contamination", value=c)
        )
        assert ours == pytest.approx(-forest.offset_, abs=1e-12)


def test_clear_threshold_is_a_lower_quantile_of_training_scores() -> None:
    """The clear threshold lets CLEAR_FALSE_ALARM_RATE of training scores above it."""
    cut = calibrate(SCORES, ThresholdSpec())
    clear = clear_threshold(SCORES, cut)
    assert clear < cut
    assert float(np.mean(clear < SCORES)) == pytest.approx(CLEAR_FALSE_ALARM_RATE, abs=1e-3)


def test_clear_threshold_never_exceeds_the_alert_threshold() -> None:
    """With an alert threshold below that quantile, clearing needs the alert threshold."""
    assert clear_threshold(SCORES, 0.5) == 0.5
