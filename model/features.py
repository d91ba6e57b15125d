"""Feature engineering: one pure, vectorised function used by training AND the detector.

A feature is either a raw channel (any channel name passes through) or a derived physical
quantity from the AI4I channels. Feature sets are named lists of features.
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
TYPE_CODE: Final = {"L": 0.0, "M": 1.0, "H": 2.0}
_RPM_TO_RAD_S: Final = 2.0 * np.pi / 60.0
_LIMITS: Final = np.array([OVERSTRAIN_LIMIT[t] for t in PRODUCT_TYPES])

PRODUCT_TYPE_COLUMN: Final = "product_type_code"


def _temp_diff(c: Columns) -> FloatArray:
    return c[PROCESS_TEMPERATURE] - c[AIR_TEMPERATURE]


def _power(c: Columns) -> FloatArray:
    return c[TORQUE] * c[ROTATIONAL_SPEED] * _RPM_TO_RAD_S


def _strain(c: Columns) -> FloatArray:
    return c[TOOL_WEAR] * c[TORQUE]


def _strain_ratio(c: Columns) -> FloatArray:
    return _strain(c) / _LIMITS[c[PRODUCT_TYPE_COLUMN].astype(np.intp)]


DERIVED: Final[dict[str, tuple[Callable[[Columns], FloatArray], tuple[str, ...]]]] = {
    "temp_diff_k": (_temp_diff, (PROCESS_TEMPERATURE, AIR_TEMPERATURE)),
    "power_w": (_power, (TORQUE, ROTATIONAL_SPEED)),
    "strain_min_nm": (_strain, (TOOL_WEAR, TORQUE)),
    "strain_ratio": (_strain_ratio, (TOOL_WEAR, TORQUE)),
    "product_type_code": (lambda c: c[PRODUCT_TYPE_COLUMN], ()),
}

FEATURE_SETS: Final[dict[str, tuple[str, ...]]] = {
    # The university prototype: air temperature and speed only.
    "prototype": (AIR_TEMPERATURE, ROTATIONAL_SPEED),
    # The five raw channels.
    "raw": (AIR_TEMPERATURE, PROCESS_TEMPERATURE, ROTATIONAL_SPEED, TORQUE, TOOL_WEAR),
    # Physically meaningful quantities the failure mechanisms act on.
    "physics": ("temp_diff_k", "power_w", "strain_ratio", TOOL_WEAR),
}
DEFAULT_FEATURE_SET: Final = "physics"


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
    """
    out = [DERIVED[name][0](columns) if name in DERIVED else columns[name] for name in features]
    return np.column_stack(out).astype(np.float64, copy=False)
