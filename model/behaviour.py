"""Each channel's behaviour over the training rows: stationary, trending, stepping, seasonal
(pure).

The training rows are cut into ``BLOCKS`` contiguous blocks in time. The spread of the
block medians is compared with the typical within-block spread (the median of the blocks'
scaled MADs): a shift of more than ``SHIFT_LIMIT`` of it means the level moved while the
machine was normal. Blocks whose medians rise (or fall) monotonically make a **trending**
channel (thermal drift, a load that settles), others a **stepping** one (set-point
changes). A channel whose level holds is **seasonal** when its autocorrelation, after the
first lag where it falls below zero, comes back above ``SEASONAL_ACF`` (a repeating cycle
shorter than the training part), else **stationary**.

The decision is stored in the model card (``params["behaviour"]``) and picks each channel's
features (``model.generic.preset_steps``): a channel that is not stationary in level gets
its deviation from a slow baseline instead of its level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Behaviour = Literal["stationary", "trending", "stepping", "seasonal"]
BLOCKS: Final = 4
SHIFT_LIMIT: Final = 2.5
SEASONAL_ACF: Final = 0.5
MIN_ROWS: Final = 4 * BLOCKS


def _mad(values: FloatArray) -> float:
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def level_shift(values: FloatArray, blocks: int = BLOCKS) -> tuple[float, FloatArray]:
    """(spread of the block medians / within-block scale, the block medians)."""
    x = np.asarray(values, dtype=np.float64)
    parts = np.array_split(x, blocks)
    medians = np.array([float(np.median(p)) for p in parts])
    scales = [_mad(p) for p in parts]
    within = float(np.median(scales))
    if within <= 0.0:
        within = float(np.std(x)) / 4.0 if np.std(x) > 0 else 0.0
    spread = float(np.ptp(medians))
    if within <= 0.0:
        return (0.0 if spread == 0.0 else float("inf")), medians
    return spread / within, medians


def seasonal_strength(values: FloatArray) -> float:
    """Largest autocorrelation after the first lag where it drops below zero (0 when it
    never does within a quarter of the rows)."""
    x = np.asarray(values, dtype=np.float64)
    x = x - x.mean()
    denom = float(np.dot(x, x))
    if denom <= 0.0:
        return 0.0
    lags = len(x) // 4
    acf = np.array([float(np.dot(x[:-k], x[k:])) / denom for k in range(1, lags + 1)])
    below = np.flatnonzero(acf < 0.0)
    if len(below) == 0:
        return 0.0
    rest = acf[below[0] :]
    return float(rest.max()) if len(rest) else 0.0


def characterise(values: FloatArray) -> Behaviour:
    """One channel's behaviour over its training rows (see the module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < MIN_ROWS:
        return "stationary"
    shift, medians = level_shift(x)
    if shift > SHIFT_LIMIT:
        steps = np.diff(medians)
        if np.all(steps > 0) or np.all(steps < 0):
            return "trending"
        return "stepping"
    if seasonal_strength(x) > SEASONAL_ACF:
        return "seasonal"
    return "stationary"


def characterise_all(columns: Mapping[str, FloatArray]) -> dict[str, Behaviour]:
    """``characterise`` of every channel."""
    return {c: characterise(v) for c, v in columns.items()}
