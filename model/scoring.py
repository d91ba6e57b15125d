"""Scorers: the one place the score direction is fixed (higher = more anomalous).

The score is the Isolation Forest anomaly score s(x, n) of Liu et al. in (0, 1]:
``-IsolationForest.score_samples(x)``. About 0.5 is ordinary; near 1 is isolated quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

FloatArray = npt.NDArray[np.float64]


class Scorer(Protocol):
    """Anything that scores a feature matrix, higher = more anomalous."""

    def score(self, features: FloatArray) -> FloatArray:
        """Return one anomaly score per row of ``features``."""
        ...


class SklearnScorer:
    """Scores with scikit-learn itself (the reference; about 3 ms per call)."""

    def __init__(self, forest: IsolationForest) -> None:
        self.forest = forest

    def score(self, features: FloatArray) -> FloatArray:
        """Return ``-score_samples``: the paper's anomaly score, higher = more anomalous."""
        return np.asarray(-self.forest.score_samples(features), dtype=np.float64)


def robust_center_scale(features: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per-column median and MAD-based scale (never zero) of a training matrix."""
    center = np.median(features, axis=0)
    mad = np.median(np.abs(features - center), axis=0) * 1.4826
    spread = np.std(features, axis=0)
    scale = np.where(mad > 0, mad, np.where(spread > 0, spread, 1.0))
    return center.astype(np.float64), scale.astype(np.float64)


def explain(
    rows: FloatArray, center: FloatArray, scale: FloatArray, top_k: int
) -> list[list[tuple[int, float]]]:
    """Per row: indices and robust z-scores of the ``top_k`` features farthest from training.

    One vectorised call for all rows of a ``(n_rows, n_features)`` matrix. Every z is finite:
    one that overflows (a saturated feature over a small scale) is saturated at the largest
    float with its sign, so an explanation never carries ``null``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        z = (rows - center) / scale
    if not np.isfinite(z).all():
        limit = float(np.finfo(np.float64).max)
        z = np.nan_to_num(z, nan=limit, posinf=limit, neginf=-limit)
    order = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :top_k]
    picked = np.take_along_axis(z, order, axis=1)
    return [
        list(zip(indices, values, strict=True))
        for indices, values in zip(order.tolist(), picked.tolist(), strict=True)
    ]
