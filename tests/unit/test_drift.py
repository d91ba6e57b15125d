"""Drift awareness: the rolling ALERT share against the model's training figures."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from factorywatch.detector.drift import ScoreDrift

THRESHOLD = 0.6


def monitor(window: int = 100, rate: float = 0.03) -> ScoreDrift:
    """A drift check with factor 3 against a training ALERT share of ``rate``."""
    return ScoreDrift(
        window=window, factor=3.0, training_alert_rate=rate, training_score_median=0.45
    )


def test_nothing_is_declared_before_the_window_is_full() -> None:
    """A detector that just started has too few readings to judge."""
    drift = monitor()
    drift.add([0.9] * 99, THRESHOLD)
    assert drift.figures().alert_rate == 1.0
    assert drift.check() is None


def test_drift_starts_at_factor_times_the_training_rate_and_ends_below_half_of_it() -> None:
    """Hysteresis: 9 % starts drift (3 x 3 %), 5 % keeps it, under 4.5 % ends it."""
    drift = monitor()
    drift.add([0.4] * 91 + [0.9] * 9, THRESHOLD)
    assert drift.check() == "drift_started"
    assert drift.check() is None  # transitions only
    drift.add([0.4] * 100, THRESHOLD)
    drift.add([0.9] * 5, THRESHOLD)
    assert drift.figures().alert_rate == pytest.approx(0.05)
    assert drift.check() is None
    assert drift.drifting
    drift.add([0.4] * 100, THRESHOLD)
    assert drift.check() == "drift_ended"
    assert not drift.drifting


def test_a_rate_as_in_training_is_no_drift() -> None:
    """Alerting as often as in training is what the threshold was calibrated for."""
    drift = monitor()
    drift.add([0.4] * 97 + [0.9] * 3, THRESHOLD)
    assert drift.check() is None
    assert drift.figures().training_score_median == 0.45


def test_a_training_rate_of_zero_needs_more_than_one_alert_per_window() -> None:
    """A fixed threshold above every training score: one alert in a window is not drift."""
    drift = monitor(rate=0.0)
    drift.add([0.4] * 99 + [0.9], THRESHOLD)
    assert drift.check() is None
    drift.add([0.9] * 2, THRESHOLD)
    assert drift.check() == "drift_started"


@pytest.mark.parametrize(("window", "factor"), [(0, 3.0), (10, 1.0)])
def test_bad_parameters_are_refused(window: int, factor: float) -> None:
    """An empty window or a factor that does not exceed the training rate is refused."""
    with pytest.raises(ValueError, match="drift"):
        ScoreDrift(window=window, factor=factor, training_alert_rate=0.03)


@given(
    window=st.integers(1, 40),
    batches=st.lists(st.lists(st.floats(0.0, 1.0), max_size=60), max_size=12),
)
def test_figures_are_those_of_the_last_window_readings(
    window: int, batches: list[list[float]]
) -> None:
    """Whatever the batch sizes, the window holds exactly the newest ``window`` scores."""
    drift = ScoreDrift(window=window, factor=2.0, training_alert_rate=0.1)
    for batch in batches:
        drift.add(batch, THRESHOLD)
    recent = [s for batch in batches for s in batch][-window:]
    figures = drift.figures()
    assert figures.readings == len(recent)
    if recent:
        assert figures.alert_rate == pytest.approx(np.mean(np.array(recent) > THRESHOLD))
        assert figures.score_median == pytest.approx(float(np.median(recent)))


@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12), min_size=1, max_size=30),
    st.integers(1, 20),
)
def test_small_lists_and_arrays_fill_the_window_alike(
    batches: list[list[float]], window: int
) -> None:
    """Scores added as short lists (one by one) leave the window exactly as numpy arrays do."""
    listed, arrays = monitor(window), monitor(window)
    for batch in batches:
        listed.add(batch, THRESHOLD)
        arrays.add(np.asarray(batch, dtype=np.float64), THRESHOLD)
    assert listed.snapshot() == arrays.snapshot()
    assert listed.figures() == arrays.figures()
