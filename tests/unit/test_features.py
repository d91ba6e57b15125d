"""Unit tests of the feature engineering: documented physics, channels, batch consistency."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from factorywatch.contracts import (
    AIR_TEMPERATURE,
    PROCESS_TEMPERATURE,
    ROTATIONAL_SPEED,
    TOOL_WEAR,
    TORQUE,
)
from factorywatch.model.features import (
    DEFAULT_FEATURE_SET,
    DERIVED,
    FEATURE_SETS,
    HEADROOM_CAP,
    NOMINAL_POWER_W,
    PRODUCT_TYPE_COLUMN,
    FloatArray,
    compute_features,
    required_channels,
    type_codes,
)


def _columns(
    *,
    air: Sequence[float] = (300.0,),
    process: Sequence[float] = (310.0,),
    rpm: Sequence[float] = (1500.0,),
    torque: Sequence[float] = (40.0,),
    wear: Sequence[float] = (100.0,),
    types: Sequence[str] = ("L",),
) -> dict[str, FloatArray]:
    """Channel columns for hand-made rows (scalars broadcast to the longest argument)."""
    n = max(len(air), len(process), len(rpm), len(torque), len(wear), len(types))

    def col(values: Sequence[float]) -> FloatArray:
        return np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)).copy()

    return {
        AIR_TEMPERATURE: col(air),
        PROCESS_TEMPERATURE: col(process),
        ROTATIONAL_SPEED: col(rpm),
        TORQUE: col(torque),
        TOOL_WEAR: col(wear),
        PRODUCT_TYPE_COLUMN: np.broadcast_to(type_codes(types), (n,)).copy(),
    }


def _one(columns: dict[str, FloatArray], feature: str) -> FloatArray:
    """One feature column."""
    return compute_features(columns, [feature])[:, 0]


def test_power_is_torque_times_angular_speed() -> None:
    """Power is torque x rpm x 2*pi/60 in watts."""
    cols = _columns(torque=(40.0, 10.0), rpm=(1500.0, 2860.0))
    expected = np.array([40.0 * 1500.0, 10.0 * 2860.0]) * 2.0 * np.pi / 60.0
    np.testing.assert_allclose(_one(cols, "power_w"), expected)
    assert _one(cols, "power_w")[0] == pytest.approx(6283.185307, rel=1e-9)


def test_temperature_difference_is_process_minus_air() -> None:
    """The temperature difference is process minus air temperature in kelvin."""
    cols = _columns(air=(298.1, 300.0), process=(308.6, 308.0))
    np.testing.assert_allclose(_one(cols, "temp_diff_k"), [10.5, 8.0])


def test_strain_ratio_uses_the_product_type_limit() -> None:
    """Strain ratio divides wear x torque by 11,000 / 12,000 / 13,000 min*Nm for L / M / H."""
    cols = _columns(wear=(100.0,), torque=(55.0,), types=("L", "M", "H"))
    np.testing.assert_allclose(_one(cols, "strain_min_nm"), [5500.0] * 3)
    np.testing.assert_allclose(
        _one(cols, "strain_ratio"), [5500.0 / 11_000, 5500.0 / 12_000, 5500.0 / 13_000]
    )


def test_heat_margin_is_negative_only_inside_the_failure_corner() -> None:
    """Heat margin < 0 only when BOTH temperature difference < 8.6 K and speed < 1380 rpm."""
    cols = _columns(
        air=(300.0,) * 4,
        process=(308.0, 308.0, 309.0, 308.6),
        rpm=(1300.0, 1500.0, 1300.0, 1380.0),
    )
    margin = _one(cols, "heat_margin")
    assert margin[0] == pytest.approx(max(8.0 / 8.6, 1300.0 / 1380.0) - 1.0)
    assert margin[0] < 0.0
    assert margin[1] > 0.0
    assert margin[2] > 0.0
    assert margin[3] == pytest.approx(0.0, abs=1e-12)


def test_power_margin_is_the_distance_to_the_nearer_window_limit() -> None:
    """Power margin is 0 at 3500 W and 9000 W, negative outside, -1 at zero power."""
    rpm = 1500.0
    watts = np.array([3500.0, 9000.0, 3000.0, 10_000.0, 0.0])
    cols = _columns(torque=(watts / (rpm * 2.0 * np.pi / 60.0)).tolist(), rpm=(rpm,))
    np.testing.assert_allclose(
        _one(cols, "power_margin"), [0.0, 0.0, 3000 / 3500 - 1, 0.9 - 1, -1.0], atol=1e-12
    )
    assert np.isfinite(_one(cols, "power_log_deviation")).all()


def test_log_power_deviation_is_symmetric_around_the_nominal_power() -> None:
    """|ln(P / nominal)| is 0 at the geometric centre and equal at both window limits."""
    rpm = 1500.0
    watts = np.array([NOMINAL_POWER_W, 3500.0, 9000.0])
    cols = _columns(torque=(watts / (rpm * 2.0 * np.pi / 60.0)).tolist(), rpm=(rpm,))
    deviation = _one(cols, "power_log_deviation")
    assert deviation[0] == pytest.approx(0.0, abs=1e-12)
    assert deviation[1] == pytest.approx(deviation[2])
    assert deviation[1] == pytest.approx(0.5 * np.log(9000.0 / 3500.0))


def test_headroom_saturates_safe_readings_and_keeps_risky_ones() -> None:
    """Headroom equals the margin below the cap and the cap above it."""
    cols = _columns(
        air=(300.0,) * 3,
        process=(308.0, 313.0, 309.0),
        rpm=(1300.0, 2500.0, 1400.0),
        torque=(20.0, 40.0, 40.0),
    )
    for margin_name, headroom_name in (
        ("heat_margin", "heat_headroom"),
        ("power_margin", "power_headroom"),
    ):
        margin, headroom = _one(cols, margin_name), _one(cols, headroom_name)
        np.testing.assert_allclose(headroom, np.minimum(margin, HEADROOM_CAP))
    heat = _one(cols, "heat_headroom")
    assert heat[0] < 0.0
    assert heat[1] == HEADROOM_CAP


def test_required_channels_lists_inputs_in_first_use_order() -> None:
    """required_channels returns each input channel once, in first-use order."""
    assert required_channels(FEATURE_SETS["prototype"]) == (AIR_TEMPERATURE, ROTATIONAL_SPEED)
    assert required_channels(FEATURE_SETS["headroom"]) == (
        PROCESS_TEMPERATURE,
        AIR_TEMPERATURE,
        ROTATIONAL_SPEED,
        TORQUE,
        TOOL_WEAR,
    )
    assert required_channels(["power_w", "power_w"]) == (TORQUE, ROTATIONAL_SPEED)


@pytest.mark.parametrize("feature", sorted(DERIVED))
def test_each_derived_feature_needs_only_its_declared_channels(feature: str) -> None:
    """Every derived feature computes from its declared channels plus the product type."""
    full = _columns(types=("L", "M", "H"))
    needed = {ch: full[ch] for ch in required_channels([feature])}
    needed[PRODUCT_TYPE_COLUMN] = full[PRODUCT_TYPE_COLUMN]
    values = compute_features(needed, [feature])
    assert values.shape == (3, 1)
    assert np.isfinite(values).all()


@pytest.mark.parametrize("feature_set", sorted(FEATURE_SETS))
def test_batch_equals_row_by_row(feature_set: str) -> None:
    """Computing a batch gives exactly the rows computed one at a time."""
    rng = np.random.default_rng(7)
    n = 64
    cols = _columns(
        air=rng.normal(300.0, 2.0, n).tolist(),
        process=rng.normal(310.0, 1.5, n).tolist(),
        rpm=rng.uniform(1168.0, 2886.0, n).tolist(),
        torque=rng.uniform(3.8, 76.6, n).tolist(),
        wear=rng.uniform(0.0, 253.0, n).tolist(),
        types=rng.choice(["L", "M", "H"], n).tolist(),
    )
    features = FEATURE_SETS[feature_set]
    batch = compute_features(cols, features)
    assert batch.shape == (n, len(features))
    assert batch.dtype == np.float64
    for i in range(n):
        single = compute_features({k: v[i : i + 1] for k, v in cols.items()}, features)
        np.testing.assert_array_equal(single[0], batch[i])


def test_default_feature_set_is_the_boundary_headroom_set() -> None:
    """The default feature set exists and is the saturated boundary-headroom set."""
    assert DEFAULT_FEATURE_SET == "headroom"
    assert FEATURE_SETS[DEFAULT_FEATURE_SET] == (
        "heat_headroom",
        "power_headroom",
        "strain_ratio",
        TOOL_WEAR,
    )
