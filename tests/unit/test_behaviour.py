"""Channel behaviour over the training rows (model.behaviour), the slow-baseline feature, the
forward-in-time false-alarm estimate and FitSpec."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factorywatch.model.behaviour import Behaviour, characterise
from factorywatch.model.fitspec import FitSpec
from factorywatch.model.generic import fit_columns, forward_far, preset_steps
from factorywatch.model.pipeline import BASE_STEP, Pipeline, Step


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n)


def test_white_noise_is_stationary() -> None:
    """Independent noise around a fixed level is stationary."""
    assert characterise(_noise(400)) == "stationary"


def test_a_ramp_is_trending_and_a_step_is_stepping() -> None:
    """A level that rises block after block is trending; one that jumps and comes back is
    stepping."""
    n = 400
    assert characterise(_noise(n) + np.linspace(0, 12, n)) == "trending"
    levels = np.repeat([0.0, 8.0, 0.0, 8.0], n // 4)
    assert characterise(_noise(n) + levels) == "stepping"


def test_a_cycle_shorter_than_the_training_part_is_seasonal() -> None:
    """A sine with a period of 50 rows over 400 rows is seasonal, not a moving level."""
    n = 400
    assert characterise(3 * np.sin(2 * np.pi * np.arange(n) / 50) + 0.3 * _noise(n)) == "seasonal"


def test_auto_preset_leaves_a_moving_channels_level_out() -> None:
    """With the auto preset, a trending or stepping channel keeps only its variability
    against its slow baseline; stationary and seasonal ones get the windowed features."""
    behaviour: dict[str, Behaviour] = {
        "a": "trending",
        "b": "stationary",
        "c": "stepping",
        "d": "seasonal",
    }
    steps = preset_steps("auto", ["a", "b", "c", "d"], 5, behaviour)
    assert [(s.op, s.channel) for s in steps] == [
        ("vol", "a"),
        ("raw", "b"),
        ("mean", "b"),
        ("logstd", "b"),
        ("vol", "c"),
        ("raw", "d"),
        ("mean", "d"),
        ("logstd", "d"),
    ]


def test_baseline_follows_slow_drift_but_not_a_jump() -> None:
    """A slow ramp leaves a small deviation from the baseline; a jump of 100 spreads shows in
    full and leaves the baseline where it was (it is beyond BASE_STEP spreads)."""
    n = 2000
    ramp = np.linspace(0.0, 6.0, n)
    columns = {"a": ramp + 0.5 * _noise(n)}
    steps = [Step(op="base", channel="a", window=1, span=50)]
    pipeline = Pipeline.fit({"a": columns["a"][:200]}, steps)
    features = pipeline.feature_rows(columns)[:, 0]
    z = (columns["a"] - pipeline.spec.center[0]) / pipeline.spec.scale[0]
    # the ramp moves z by far more than the last deviations from the baseline do
    assert z[-200:].mean() - z[:200].mean() > 5.0
    assert abs(features[-200:].mean()) < 0.5
    state: dict[str, object] = {}
    pipeline.step_features(state, {"a": pipeline.spec.center[0]})
    held = state["b0:a"]
    assert isinstance(held, list)
    level, var = float(held[0]), float(held[1])
    jump = pipeline.spec.center[0] + 100 * pipeline.spec.scale[0]
    deviation = pipeline.step_features(state, {"a": jump})[0]
    assert deviation == pytest.approx((100.0 - level) / math.sqrt(var), rel=1e-9)
    after = state["b0:a"]
    assert isinstance(after, list)
    assert after == [level, var]
    assert BASE_STEP < 100.0


def test_vol_follows_a_moderate_change_of_variability_but_not_a_burst() -> None:
    """A channel that becomes 1.5 times noisier is followed by vol's baseline; one that
    becomes ten times noisier stays visible (beyond VOL_GATE the baseline holds)."""
    n = 3000
    steps = [Step(op="vol", channel="a", window=5, span=100)]
    moderate = _noise(n)
    moderate[1000:] *= 1.5
    pipeline = Pipeline.fit({"a": moderate[:400]}, steps)
    vol = pipeline.feature_rows({"a": moderate})[:, 0]
    assert abs(vol[2500:].mean()) < 0.2
    burst = _noise(n)
    burst[1000:] *= 10.0
    vol = pipeline.feature_rows({"a": burst})[:, 0]
    assert vol[2500:].mean() > 1.5


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=80), st.integers(1, 6))
def test_baseline_batch_equals_streaming(values: list[float], window: int) -> None:
    """The batch transform of the base and vol features equals the streaming step row by
    row."""
    columns = {"a": np.asarray(values, dtype=np.float64)}
    steps = [
        Step(op="base", channel="a", window=window, span=7),
        Step(op="vol", channel="a", window=window, span=5),
    ]
    pipeline = Pipeline.fit(columns, steps)
    batch = pipeline.feature_rows(columns)
    state: dict[str, object] = {}
    online = [pipeline.step_features(state, {"a": v}) for v in values]
    assert np.allclose(batch, online, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_forward_far_measures_the_last_block_with_the_earlier_blocks_threshold() -> None:
    """A threshold set on calm early blocks is exceeded often by a later block that got
    noisier, and rarely by one like them."""
    rng = np.random.default_rng(3)
    fold = np.repeat(np.arange(5), 200)
    calm = rng.normal(size=1000)
    assert forward_far(calm, fold, 0.01) < 0.05
    drifted = calm.copy()
    drifted[fold == 4] *= 3.0
    assert forward_far(drifted, fold, 0.01) > 0.2


def test_fit_records_forward_far_and_behaviour_in_the_card() -> None:
    """A fitted card carries the forward-in-time estimate and each channel's behaviour."""
    n = 300
    columns = {"a": _noise(n, 1), "b": _noise(n, 2) + np.linspace(0, 20, n)}
    card = fit_columns(columns, FitSpec(family="pca")).card  # auto: the default preset
    assert math.isfinite(card.metrics["forward_far"])
    assert card.params["behaviour"] == "a:stationary,b:trending"
    assert "b__vol5" in card.features
    assert "b" not in card.features  # its level moved while normal: left out
    # ... and out of the envelope, which would otherwise flood once the drift goes on
    assert card.envelope is not None
    assert card.envelope.channels[0] == "a"
    assert "b" not in card.envelope.channels


def test_fitspec_refuses_what_cannot_be_fitted() -> None:
    """An unknown preset or family, or a rate outside (0, 1), is refused when built."""
    with pytest.raises(ValueError, match="preset"):
        FitSpec(preset="nope")
    with pytest.raises(ValueError, match="family"):
        FitSpec(family="nope")
    with pytest.raises(ValueError, match="false-alarm"):
        FitSpec().replace(far=1.5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=80), st.integers(1, 6))
def test_a_vol_only_channel_batch_equals_streaming(values: list[float], window: int) -> None:
    """The auto preset's steps for a moving channel (vol alone, no level step keeping the
    channel's history) beside a stationary one: batch transform equals the streaming step."""
    columns = {"a": np.asarray(values, dtype=np.float64), "b": np.asarray(values[::-1])}
    steps = preset_steps("auto", ["a", "b"], window, {"a": "trending", "b": "stationary"})
    pipeline = Pipeline.fit(columns, steps)
    batch = pipeline.feature_rows(columns)
    state: dict[str, object] = {}
    online = [
        pipeline.step_features(state, {"a": a, "b": b})
        for a, b in zip(columns["a"].tolist(), columns["b"].tolist(), strict=True)
    ]
    assert np.allclose(batch, online, rtol=1e-12, atol=1e-12, equal_nan=True)
