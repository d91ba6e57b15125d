"""Feature engineering: one pure, vectorised function used by training AND the detector.

A feature is either a raw channel (any channel name passes through) or a derived physical
quantity from the AI4I channels. Feature sets are named lists of features.

The default set, ``headroom``, measures how far a reading is from each documented failure
boundary of the AI4I process (heat dissipation, power window, overstrain) plus tool wear.
A margin is a relative distance to the boundary (0 on the boundary, negative beyond it);
a *headroom* is that margin saturated at ``HEADROOM_CAP``: a reading with 25 % or more
room left is simply safe, so the forest spends no splits isolating very safe readings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from factorywatch.contracts import (
    AIR_TEMPERATURE,
    PROCESS_TEMPERATURE,
    ROTATIONAL_SPEED,
    TOOL_WEAR,
    TORQUE,
)

FloatArray = npt.NDArray[np.float64]
Columns = Mapping[str, FloatArray]

PRODUCT_TYPES: Final = ("L", "M", "H")
# Overstrain limits of the AI4I process, in min*Nm, by product type (dataset documentation).
OVERSTRAIN_LIMIT: Final = {"L": 11_000.0, "M": 12_000.0, "H": 13_000.0}
# Heat dissipation fails when BOTH process-air temperature difference and speed are below these.
HDF_MIN_TEMP_DIFF_K: Final = 8.6
HDF_MIN_SPEED_RPM: Final = 1380.0
# The process fails when power leaves this window (W).
PWF_MIN_POWER_W: Final = 3500.0
PWF_MAX_POWER_W: Final = 9000.0
# Geometric centre of the power window: |ln(P / nominal)| is equal at both limits.
NOMINAL_POWER_W: Final = float(np.sqrt(PWF_MIN_POWER_W * PWF_MAX_POWER_W))
# Margins above this relative headroom count as "safe" and saturate.
HEADROOM_CAP: Final = 0.25
TYPE_CODE: Final = {"L": 0.0, "M": 1.0, "H": 2.0}
_RPM_TO_RAD_S: Final = 2.0 * np.pi / 60.0
_LIMITS: Final = np.array([OVERSTRAIN_LIMIT[t] for t in PRODUCT_TYPES])
_TINY_POWER_W: Final = 1e-9

PRODUCT_TYPE_COLUMN: Final = "product_type_code"
# Where an overflowing (or huge raw) feature saturates: the largest float32, the precision
# the forest compares in (scikit-learn's trees and FlatForest cast to float32).
FEATURE_LIMIT: Final = float(np.finfo(np.float32).max)


def _temp_diff(c: Columns) -> FloatArray:
    return c[PROCESS_TEMPERATURE] - c[AIR_TEMPERATURE]


def _power(c: Columns) -> FloatArray:
    return c[TORQUE] * c[ROTATIONAL_SPEED] * _RPM_TO_RAD_S


def _strain(c: Columns) -> FloatArray:
    return c[TOOL_WEAR] * c[TORQUE]


def _strain_ratio(c: Columns) -> FloatArray:
    limit: FloatArray = _LIMITS[c[PRODUCT_TYPE_COLUMN].astype(np.intp)]
    return _strain(c) / limit


def _power_log_deviation(c: Columns) -> FloatArray:
    """``|ln(P / nominal)|``: 0 at the window's centre, ln(sqrt(9000/3500)) at both limits."""
    power = np.maximum(_power(c), _TINY_POWER_W)
    deviation: FloatArray = np.abs(np.log(power / NOMINAL_POWER_W))
    return deviation


def _heat_margin(c: Columns) -> FloatArray:
    """Relative distance from the heat-dissipation failure region (< 0 inside it).

    The region is a conjunction (temperature difference AND speed too low), so the reading
    is as safe as the better of the two relative margins.
    """
    return (
        np.maximum(_temp_diff(c) / HDF_MIN_TEMP_DIFF_K, c[ROTATIONAL_SPEED] / HDF_MIN_SPEED_RPM)
        - 1.0
    )


def _power_margin(c: Columns) -> FloatArray:
    """Relative distance from the nearer limit of the power window (< 0 outside it)."""
    power = _power(c)
    upper = np.divide(PWF_MAX_POWER_W, power, out=np.full_like(power, np.inf), where=power > 0.0)
    return np.minimum(power / PWF_MIN_POWER_W, upper) - 1.0


def _heat_headroom(c: Columns) -> FloatArray:
    return np.minimum(_heat_margin(c), HEADROOM_CAP)


def _power_headroom(c: Columns) -> FloatArray:
    return np.minimum(_power_margin(c), HEADROOM_CAP)


_HEAT_INPUTS: Final = (PROCESS_TEMPERATURE, AIR_TEMPERATURE, ROTATIONAL_SPEED)
_POWER_INPUTS: Final = (TORQUE, ROTATIONAL_SPEED)

DERIVED: Final[dict[str, tuple[Callable[[Columns], FloatArray], tuple[str, ...]]]] = {
    "temp_diff_k": (_temp_diff, (PROCESS_TEMPERATURE, AIR_TEMPERATURE)),
    "power_w": (_power, _POWER_INPUTS),
    "strain_min_nm": (_strain, (TOOL_WEAR, TORQUE)),
    "strain_ratio": (_strain_ratio, (TOOL_WEAR, TORQUE)),
    "product_type_code": (lambda c: c[PRODUCT_TYPE_COLUMN], ()),
    "power_log_deviation": (_power_log_deviation, _POWER_INPUTS),
    "heat_margin": (_heat_margin, _HEAT_INPUTS),
    "power_margin": (_power_margin, _POWER_INPUTS),
    "heat_headroom": (_heat_headroom, _HEAT_INPUTS),
    "power_headroom": (_power_headroom, _POWER_INPUTS),
}

FEATURE_SETS: Final[dict[str, tuple[str, ...]]] = {
    # The university prototype: air temperature and speed only.
    "prototype": (AIR_TEMPERATURE, ROTATIONAL_SPEED),
    # The five raw channels.
    "raw": (AIR_TEMPERATURE, PROCESS_TEMPERATURE, ROTATIONAL_SPEED, TORQUE, TOOL_WEAR),
    # Physically meaningful quantities the failure mechanisms act on.
    "physics": ("temp_diff_k", "power_w", "strain_ratio", TOOL_WEAR),
    # As physics, with power folded around the centre of its safe window.
    "log_power": ("temp_diff_k", "power_log_deviation", "strain_ratio", TOOL_WEAR),
    # Relative distances to the documented failure boundaries (unbounded on the safe side).
    "margins": ("heat_margin", "power_margin", "strain_ratio", TOOL_WEAR),
    # The margins saturated at HEADROOM_CAP: only closeness to a boundary stands out.
    "headroom": ("heat_headroom", "power_headroom", "strain_ratio", TOOL_WEAR),
}
DEFAULT_FEATURE_SET: Final = "headroom"


def required_channels(features: Sequence[str]) -> tuple[str, ...]:
    """Channels a reading must carry to compute ``features`` (in first-use order)."""
    needed: dict[str, None] = {}
    for name in features:
        inputs = DERIVED[name][1] if name in DERIVED else (name,)
        needed.update(dict.fromkeys(inputs))
    return tuple(needed)


def type_codes(product_types: Sequence[str]) -> FloatArray:
    """Encode product types L/M/H as 0/1/2."""
    return np.array([TYPE_CODE[t] for t in product_types], dtype=np.float64)


def compute_features(columns: Columns, features: Sequence[str]) -> FloatArray:
    """Return the ``(n, len(features))`` matrix of ``features`` from channel columns.

    ``columns`` maps channel names (and ``product_type_code``) to equal-length float arrays.
    Every value is finite and fits a float32: a feature that overflows (torque 1e308 times a
    speed) or is beyond ``FEATURE_LIMIT`` saturates there with its sign (NaN counts as
    +``FEATURE_LIMIT``: as far from normal as a value can be).
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out = [DERIVED[name][0](columns) if name in DERIVED else columns[name] for name in features]
    rows = len(out[0]) if out else 0
    if all(isinstance(c, np.ndarray) and c.shape == (rows,) for c in out):
        # the usual case, columns of one length: filled in place (np.column_stack's checks
        # and copies cost more than the arithmetic for a few rows); the same float64 values
        matrix = np.empty((rows, len(out)), dtype=np.float64)
        for j, column in enumerate(out):
            matrix[:, j] = column
    else:
        matrix = np.column_stack(out).astype(np.float64, copy=False)
    return saturate(matrix)


def saturate(values: FloatArray) -> FloatArray:
    """``values`` clipped to +-``FEATURE_LIMIT``, NaN as +``FEATURE_LIMIT`` (copied if needed)."""
    with np.errstate(invalid="ignore"):
        if (np.abs(values) <= FEATURE_LIMIT).all():  # False for NaN and inf too
            return values
    return np.clip(np.nan_to_num(values, nan=FEATURE_LIMIT), -FEATURE_LIMIT, FEATURE_LIMIT)
