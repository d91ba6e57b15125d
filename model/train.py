"""Training: dataset -> features -> IsolationForest -> calibrated threshold -> model card."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from factorywatch.model.artifact import DataInfo, ModelCard, library_versions, new_version
from factorywatch.model.envelope import fit_envelope
from factorywatch.model.features import FEATURE_SETS, compute_features, required_channels
from factorywatch.model.scoring import SklearnScorer, robust_center_scale
from factorywatch.model.threshold import ThresholdSpec, calibrate, clear_threshold

if TYPE_CHECKING:  # importing this module (for its defaults) stays light: the CLI does
    from sklearn.ensemble import IsolationForest

    from factorywatch.model.dataset import Dataset

DEFAULT_TREES = 300
# Sub-sample size per tree: 1024 (sklearn's "auto" is 256) lets each tree resolve the thin
# regions next to the failure boundaries; it is capped at the number of training rows.
DEFAULT_MAX_SAMPLES = 1024
DEFAULT_MAX_FEATURES = 1.0


def fit(
    dataset: Dataset,
    *,
    feature_set: str,
    n_estimators: int = DEFAULT_TREES,
    max_samples: int | float | str = DEFAULT_MAX_SAMPLES,
    max_features: float = DEFAULT_MAX_FEATURES,
    seed: int = 0,
    threshold: ThresholdSpec | None = None,
    rows: np.ndarray | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[IsolationForest, ModelCard]:
    """Fit a forest on ``rows`` of ``dataset`` (all by default; labels are never used)."""
    from sklearn.ensemble import IsolationForest  # noqa: PLC0415 - see the imports above

    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; choose from {list(FEATURE_SETS)}")
    spec = threshold or ThresholdSpec()
    features = list(FEATURE_SETS[feature_set])
    columns = dataset.columns()
    if rows is not None:
        columns = {name: values[rows] for name, values in columns.items()}
    matrix = compute_features(columns, features)
    progress(f"fitting {n_estimators} trees on {len(matrix)} rows x {len(features)} features")
    # An integer sub-sample larger than the data would make sklearn warn and shrink it anyway.
    samples = min(max_samples, len(matrix)) if isinstance(max_samples, int) else max_samples
    forest = IsolationForest(
        n_estimators=n_estimators,
        max_samples=samples,
        max_features=max_features,
        random_state=seed,
        n_jobs=1,
    ).fit(matrix)
    train_scores = SklearnScorer(forest).score(matrix)
    cut = calibrate(train_scores, spec)
    progress(f"threshold {cut:.4f} ({spec.method}={spec.value})")
    center, scale = robust_center_scale(matrix)
    card = ModelCard(
        version=new_version(),
        created_at=datetime.now(UTC),
        feature_set=feature_set,
        features=features,
        channels=list(required_channels(features)),
        envelope=fit_envelope(columns, required_channels(features)),
        threshold=cut,
        clear_threshold=clear_threshold(train_scores, cut),
        threshold_spec=spec,
        params={
            "n_estimators": n_estimators,
            "max_samples": samples,
            "max_features": max_features,
            "random_state": seed,
        },
        data=DataInfo(
            file=dataset.path.name,
            sha256=dataset.sha256,
            layout=dataset.layout,
            rows=len(matrix),
            verified=dataset.verified,
        ),
        libraries=library_versions(),
        feature_center=center.tolist(),
        feature_scale=scale.tolist(),
        metrics={
            "train_alert_rate": float(np.mean(train_scores > cut)),
            "train_score_p50": float(np.quantile(train_scores, 0.5)),
            "train_score_p99": float(np.quantile(train_scores, 0.99)),
            **_label_figures(dataset, rows, train_scores, cut),
        },
    )
    return forest, card


def _label_figures(
    dataset: Dataset, rows: np.ndarray | None, scores: np.ndarray, cut: float
) -> dict[str, float]:
    """How the fitted model's alarms match the failure labels of its own training rows.

    In-sample (labels were not used to fit): `models list` shows them beside each version;
    `factorywatch evaluate` measures on a hold-out.
    """
    from sklearn.metrics import precision_score, recall_score, roc_auc_score  # noqa: PLC0415

    from factorywatch.model.dataset import LABEL  # noqa: PLC0415

    labels = dataset.frame[LABEL].to_numpy(dtype=np.int64)
    if rows is not None:
        labels = labels[rows]
    if len(np.unique(labels)) < 2:  # both classes are needed for these figures
        return {}
    alarms = scores > cut
    return {
        "label_roc_auc": float(roc_auc_score(labels, scores)),
        "label_precision": float(precision_score(labels, alarms, zero_division=0)),
        "label_recall": float(recall_score(labels, alarms, zero_division=0)),
    }
