"""Scorer families with a ``fit`` side: Isolation Forest (default), PCA residuals and the
Mahalanobis distance with a shrunk covariance.

Every family fits on a feature matrix and scores rows, higher = more anomalous, and saves
itself to one ``.npz`` file of plain arrays (no pickle). The evaluation scores every family
the same way (``model.streams``).

* ``iforest``: scikit-learn's ``IsolationForest`` fitted, then flattened
  (``model.fastforest.FlatForest``) for scoring; score s(x) in (0, 1].
* ``pca``: principal components of the standardised features (enough to explain
  ``PCA_VARIANCE`` of the variance, at most ``d - 1`` so a residual space exists). Two
  classic statistics of multivariate process monitoring: Hotelling's T² (distance inside the
  component space) and Q / SPE (squared prediction error, distance from it). The score is
  ``max(T² / T²_ref, Q / Q_ref)`` with the references the training rows' 99th percentiles,
  so 1.0 means "as far as the 1 % most unusual training rows" in either sense.
* ``mahalanobis``: the squared Mahalanobis distance of the standardised features from their
  training mean under a Ledoit-Wolf shrunk covariance (``sklearn.covariance.LedoitWolf``:
  well conditioned with few rows or correlated features), divided by the training rows' 99th
  percentile. A fault that breaks the channels' usual relationship moves it even when each
  channel stays in its own range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, Protocol

import numpy as np
import numpy.typing as npt

from factorywatch.model.fastforest import FlatForest

FloatArray = npt.NDArray[np.float64]
Family = Literal["iforest", "pca", "mahalanobis"]
FAMILIES: Final[tuple[str, ...]] = ("iforest", "pca", "mahalanobis")
DEFAULT_FAMILY: Final = "iforest"
PCA_VARIANCE: Final = 0.95
REFERENCE_QUANTILE: Final = 0.99
_MIN_SCALE: Final = 1e-6


class FittedScorer(Protocol):
    """A fitted scorer: one score per row, higher = more anomalous; saves to ``.npz``."""

    def score(self, features: FloatArray) -> FloatArray:
        """Return one anomaly score per row of ``features``."""
        ...

    def save(self, path: Path) -> None:
        """Write the fitted arrays to ``path``."""
        ...


def fit_scorer(
    family: str,
    features: FloatArray,
    *,
    seed: int = 0,
    n_estimators: int = 200,
    max_samples: int = 512,
) -> FittedScorer:
    """Fit a scorer of ``family`` on the training feature matrix."""
    if family == "iforest":
        from sklearn.ensemble import IsolationForest  # noqa: PLC0415 - training only

        forest = IsolationForest(
            n_estimators=n_estimators,
            max_samples=min(max_samples, len(features)),
            random_state=seed,
            n_jobs=1,
        ).fit(features)
        return FlatForest.from_sklearn(forest)
    if family == "pca":
        return PcaScorer.fit(features)
    if family == "mahalanobis":
        return MahalanobisScorer.fit(features)
    raise ValueError(f"unknown scorer family {family!r}; choose from {list(FAMILIES)}")


def load_scorer(family: str, path: Path) -> FittedScorer:
    """Load a scorer of ``family`` saved with ``save``."""
    if family == "iforest":
        return FlatForest.load(path)
    if family == "pca":
        return PcaScorer.load(path)
    if family == "mahalanobis":
        return MahalanobisScorer.load(path)
    raise ValueError(f"unknown scorer family {family!r}")


def _standardised(features: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """The training matrix, its column means and scales, and its standardised rows."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), _MIN_SCALE)
    return x, mean, scale, (x - mean) / scale


def _save_arrays(path: Path, **arrays: FloatArray) -> None:
    """Plain arrays into one ``.npz`` file (no pickle)."""
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


class PcaScorer:
    """Hotelling T² and Q (SPE) residuals of a principal component model."""

    def __init__(
        self,
        *,
        mean: FloatArray,
        scale: FloatArray,
        components: FloatArray,
        variances: FloatArray,
        t2_ref: float,
        q_ref: float,
    ) -> None:
        self.mean = mean
        self.scale = scale
        self.components = components  # (k, d)
        self.variances = variances  # (k,)
        self.t2_ref = t2_ref
        self.q_ref = q_ref

    @classmethod
    def fit(cls, features: FloatArray) -> PcaScorer:
        """Fit on a training matrix (rows = readings)."""
        x, mean, scale, z = _standardised(features)
        _, singular, vt = np.linalg.svd(z, full_matrices=False)
        variances = singular**2 / max(len(z) - 1, 1)
        share = np.cumsum(variances) / max(float(variances.sum()), _MIN_SCALE)
        d = z.shape[1]
        k = int(np.searchsorted(share, PCA_VARIANCE) + 1)
        k = max(1, min(k, d - 1)) if d > 1 else 1
        model = cls(
            mean=mean,
            scale=scale,
            components=vt[:k].copy(),
            variances=np.maximum(variances[:k], _MIN_SCALE**2),
            t2_ref=1.0,
            q_ref=1.0,
        )
        t2, q = model.statistics(x)
        model.t2_ref = max(float(np.quantile(t2, REFERENCE_QUANTILE)), _MIN_SCALE)
        model.q_ref = max(float(np.quantile(q, REFERENCE_QUANTILE)), _MIN_SCALE)
        return model

    @property
    def n_features(self) -> int:
        """Width of the feature rows this scorer takes."""
        return int(self.mean.shape[0])

    def statistics(self, features: FloatArray) -> tuple[FloatArray, FloatArray]:
        """T² and Q of each row."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        t = z @ self.components.T
        t2 = np.sum(t * t / self.variances, axis=1)
        residual = z - t @ self.components
        q = np.sum(residual * residual, axis=1)
        return t2, q

    def score(self, features: FloatArray) -> FloatArray:
        """``max(T² / T²_ref, Q / Q_ref)``: higher = more anomalous."""
        t2, q = self.statistics(features)
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.maximum(t2 / self.t2_ref, q / self.q_ref)
        return np.nan_to_num(out, nan=np.inf)

    def save(self, path: Path) -> None:
        """Write the arrays to ``path`` (``.npz``)."""
        _save_arrays(
            path,
            mean=self.mean,
            scale=self.scale,
            components=self.components,
            variances=self.variances,
            refs=np.array([self.t2_ref, self.q_ref]),
        )

    @classmethod
    def load(cls, path: Path) -> PcaScorer:
        """Read a scorer written by ``save``."""
        with np.load(path, allow_pickle=False) as data:
            refs = data["refs"]
            return cls(
                mean=data["mean"],
                scale=data["scale"],
                components=data["components"],
                variances=data["variances"],
                t2_ref=float(refs[0]),
                q_ref=float(refs[1]),
            )


class MahalanobisScorer:
    """Squared Mahalanobis distance under a Ledoit-Wolf shrunk covariance."""

    def __init__(
        self, *, mean: FloatArray, scale: FloatArray, precision: FloatArray, ref: float
    ) -> None:
        self.mean = mean
        self.scale = scale
        self.precision = precision  # (d, d): the inverse of the shrunk covariance
        self.ref = ref

    @classmethod
    def fit(cls, features: FloatArray) -> MahalanobisScorer:
        """Fit on a training matrix (rows = readings)."""
        from sklearn.covariance import LedoitWolf  # noqa: PLC0415 - training only

        x, mean, scale, z = _standardised(features)
        covariance = LedoitWolf(assume_centered=True).fit(z).covariance_
        model = cls(mean=mean, scale=scale, precision=np.linalg.pinv(covariance), ref=1.0)
        model.ref = max(float(np.quantile(model.distances(x), REFERENCE_QUANTILE)), _MIN_SCALE)
        return model

    @property
    def n_features(self) -> int:
        """Width of the feature rows this scorer takes."""
        return int(self.mean.shape[0])

    def distances(self, features: FloatArray) -> FloatArray:
        """The squared Mahalanobis distance of each row."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        distances: FloatArray = np.einsum("ij,jk,ik->i", z, self.precision, z)
        return distances

    def score(self, features: FloatArray) -> FloatArray:
        """Distance over the training reference: higher = more anomalous."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = self.distances(features) / self.ref
        return np.nan_to_num(out, nan=np.inf)

    def save(self, path: Path) -> None:
        """Write the arrays to ``path`` (``.npz``)."""
        _save_arrays(
            path,
            mean=self.mean,
            scale=self.scale,
            precision=self.precision,
            ref=np.array([self.ref]),
        )

    @classmethod
    def load(cls, path: Path) -> MahalanobisScorer:
        """Read a scorer written by ``save``."""
        with np.load(path, allow_pickle=False) as data:
            return cls(
                mean=data["mean"],
                scale=data["scale"],
                precision=data["precision"],
                ref=float(data["ref"][0]),
            )
