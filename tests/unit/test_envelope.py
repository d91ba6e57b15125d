"""The training envelope: the range of each channel (and of the temperature difference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from factorywatch.model.envelope import MARGIN, Envelope, fit_envelope, watched

AIR, PROCESS, SPEED = "air_temperature_k", "process_temperature_k", "rotational_speed_rpm"


def columns(air: list[float], process: list[float]) -> dict[str, np.ndarray]:
    """Air and process temperature columns."""
    return {AIR: np.array(air), PROCESS: np.array(process)}


def test_the_envelope_is_the_training_range_widened_by_the_margin() -> None:
    """Each quantity's range grows by MARGIN of its width on both sides."""
    env = fit_envelope(columns([300.0, 302.0], [310.0, 311.0]), [AIR, PROCESS])
    assert env.channels == [AIR, PROCESS, "temp_diff_k"]
    assert env.low[0] == pytest.approx(300.0 - 2.0 * MARGIN)
    assert env.high[1] == pytest.approx(311.0 + 1.0 * MARGIN)
    assert (env.low[2], env.high[2]) == pytest.approx((9.0 - 0.1, 10.0 + 0.1))


def test_readings_outside_name_their_quantities() -> None:
    """A drifting process temperature leaves the temperature difference's range first."""
    env = fit_envelope(columns([300.0, 302.0, 301.0], [310.0, 312.5, 310.5]), [AIR, PROCESS])
    live = columns([301.0, 301.0, 290.0], [311.0, 312.0, 300.0])
    assert env.outside(live, 3) == [None, ["temp_diff_k"], [AIR, PROCESS]]


def test_temperature_difference_is_watched_only_with_both_temperatures() -> None:
    """temp_diff_k needs both temperature channels among the model's inputs."""
    assert watched([AIR, SPEED]) == [AIR, SPEED]
    assert watched([PROCESS, AIR]) == [PROCESS, AIR, "temp_diff_k"]


def test_a_constant_training_channel_admits_only_that_value() -> None:
    """A channel that never varied in training has a range of one value."""
    env = fit_envelope({SPEED: np.array([1500.0, 1500.0])}, [SPEED])
    assert env.outside({SPEED: np.array([1500.0, 1500.5])}, 2) == [None, [SPEED]]


def test_an_envelope_needs_one_bound_pair_per_quantity() -> None:
    """A card with mismatched bounds is refused."""
    with pytest.raises(ValidationError, match="one low and one high"):
        Envelope(channels=[AIR], low=[1.0, 2.0], high=[3.0])


@given(
    arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e6)),
    arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e6)),
)
def test_no_training_reading_is_outside(air: np.ndarray, process: np.ndarray) -> None:
    """Whatever the training data, every training reading is inside its own envelope."""
    n = min(len(air), len(process))
    train = columns(air[:n].tolist(), process[:n].tolist())
    assert fit_envelope(train, [AIR, PROCESS]).outside(train, n) == [None] * n
