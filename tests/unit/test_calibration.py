"""Threshold calibration that holds its false-alarm rate after training (model.calibration)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from factorywatch.model.calibration import (
    MIN_TRAIN_ROWS,
    conformal_quantile,
    folds,
    pot_quantile,
    threshold_for,
)


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
    st.floats(0.001, 0.5),
)
def test_conformal_quantile_leaves_at_most_the_rate_above(scores: list[float], rate: float) -> None:
    """At most floor(rate * (n + 1)) calibration scores lie above the conformal quantile."""
    cut = conformal_quantile(np.array(scores), rate)
    assert sum(s > cut for s in scores) <= int(rate * (len(scores) + 1))


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_threshold_holds_the_rate_on_new_readings(rate: float) -> None:
    """From 200 calibration scores, new scores of the same process exceed it at about the rate."""
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(200):
        cut = threshold_for(rng.gamma(2.0, 1.0, 200), rate)
        rates.append(np.mean(rng.gamma(2.0, 1.0, 5000) > cut))
    assert np.mean(rates) <= rate * 1.1
    assert np.mean(rates) >= rate * 0.3  # not absurdly conservative either


def test_tail_fit_extrapolates_beyond_a_small_window() -> None:
    """With 100 scores and a 0.1 % rate the tail fit reaches past the largest score seen."""
    rng = np.random.default_rng(2)
    scores = rng.exponential(1.0, 100)
    tail = pot_quantile(scores, 0.001)
    assert tail is not None
    assert tail > scores.max()
    assert tail == pytest.approx(np.log(1000.0), rel=0.5)  # exponential's true quantile


def test_folds_are_contiguous_blocks_in_time() -> None:
    """Fold ids never decrease along the rows and every fold is used."""
    ids = folds(103)
    assert (np.diff(ids) >= 0).all()
    assert set(ids.tolist()) == {0, 1, 2, 3, 4}


def test_too_few_training_rows_are_refused() -> None:
    """Fewer than MIN_TRAIN_ROWS rows cannot both fit and calibrate: a clear error."""
    with pytest.raises(ValueError, match="too few"):
        folds(MIN_TRAIN_ROWS - 1)


def test_rate_must_be_a_probability() -> None:
    """A false-alarm rate outside (0, 1) is refused."""
    with pytest.raises(ValueError, match="false-alarm rate"):
        threshold_for(np.ones(10), 1.5)
