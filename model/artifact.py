"""Versioned model artifacts: ``<model_dir>/<version>/{model.joblib,forest.npz,card.json}``.

The model card carries everything needed to trust the artifact: feature names and order,
threshold and how it was chosen, the training data's sha256, library versions, metrics.
Loading checks the card against this code and fails with a typed error. ``current`` names
the promoted version.

Models of one machine or one group (served by the detector's router,
``detector/router.py``) live in the same layout one level down:
``<model_dir>/machines/<machine>/<version>`` and ``<model_dir>/groups/<group>/<version>``,
each folder with its own ``current`` (``route_dir``, ``routed_versions``).

``model.joblib`` is the fitted scikit-learn forest (pickled); ``forest.npz`` holds the same
trees flattened into plain arrays. The detector's fast scorer loads only the arrays: no
unpickling, and neither scikit-learn nor joblib is imported (measured: 308 -> 208 MB
resident after start-up, imports 1.2 -> 0.4 s). Artifacts saved before ``forest.npz``
existed are flattened from ``model.joblib`` on load.
"""

from __future__ import annotations

import os
import platform
import secrets
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

import factorywatch
from factorywatch.errors import ModelMismatchError, ModelNotFoundError
from factorywatch.model.envelope import Envelope
from factorywatch.model.families import FittedScorer, load_scorer
from factorywatch.model.fastforest import FlatForest
from factorywatch.model.features import DERIVED, required_channels
from factorywatch.model.pipeline import Pipeline, PipelineSpec, State
from factorywatch.model.promotions import Action, Promotion, read_log, record, rollback_target
from factorywatch.model.scoring import FloatArray, Scorer, SklearnScorer
from factorywatch.model.threshold import Follow, ThresholdSpec

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

FORMAT_VERSION: Final = 1
ScorerKind = Literal["fast", "sklearn"]
CURRENT: Final = "current"
MODEL_FILE: Final = "model.joblib"
FLAT_FILE: Final = "forest.npz"
PCA_FILE: Final = "pca.npz"
MAHALANOBIS_FILE: Final = "mahalanobis.npz"
SCORER_FILES: Final = {"iforest": FLAT_FILE, "pca": PCA_FILE, "mahalanobis": MAHALANOBIS_FILE}
CARD_FILE: Final = "card.json"
RouteKind = Literal["machine", "group"]
ROUTE_FOLDERS: Final[dict[RouteKind, str]] = {"machine": "machines", "group": "groups"}


class DataInfo(BaseModel):
    """Which data trained the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    sha256: str
    layout: str
    rows: int
    verified: bool


class ModelCard(BaseModel):
    """Metadata persisted beside every model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = FORMAT_VERSION
    version: str
    created_at: datetime
    feature_set: str
    features: list[str]
    channels: list[str]
    threshold: float
    # Lower edge of the alert hysteresis (model.threshold.clear_threshold); cards written
    # before it existed have none, and then an alert clears on readings below ``threshold``.
    clear_threshold: float | None = None
    # The channels' training range (model.envelope); none in cards that predate it.
    envelope: Envelope | None = None
    threshold_spec: ThresholdSpec
    params: dict[str, int | float | str | None]
    data: DataInfo
    libraries: dict[str, str]
    feature_center: list[float]
    feature_scale: list[float]
    metrics: dict[str, float] = {}
    # Generic models (``factorywatch train --csv``): the feature pipeline and the scorer
    # family. AI4I-preset cards have no pipeline and features from model.features.
    pipeline: PipelineSpec | None = None
    scorer_family: Literal["iforest", "pca", "mahalanobis"] = "iforest"

    def rebaseline_readings(self) -> int | None:
        """N of re-baselining (``model.rebaseline``): how many live verdicts an alert stays
        open after before the machine re-baselines, and how many readings it then
        recalibrates on; None for a card that does not re-baseline (not a generic one, or
        fitted with ``--no-rebaseline``)."""
        value = self.params.get("rebaseline_readings")
        return None if value is None or self.pipeline is None else int(value)

    def follow(self) -> Follow | None:
        """The card's following threshold (``model.threshold.Follow``): cards that name its
        span and cap in ``params`` and carry their median calibration score; None for the
        others (their threshold stays fixed)."""
        span, cap = self.params.get("follow_span"), self.params.get("follow_cap")
        median = self.metrics.get("calibration_score_p50")
        if span is None or cap is None or median is None:
            return None
        spread = self.threshold - median
        if not (np.isfinite(spread) and spread > 0.0):
            return None
        return Follow(median=median, spread=spread, span=float(span), cap=float(cap))


def new_version(now: datetime | None = None) -> str:
    """A sortable, unique version id such as ``20261124T204400Z-3f9a``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(2)}"


def library_versions() -> dict[str, str]:
    """Versions that decide whether a pickled forest can be trusted."""
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "factorywatch": factorywatch.__version__,
    }
    try:  # a PCA model calibrated live in the detector image is fitted without scikit-learn
        import sklearn  # noqa: PLC0415 - only training and unpickling need scikit-learn
    except ImportError:
        return versions
    return {**versions, "scikit-learn": sklearn.__version__}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: its card and a scorer."""

    card: ModelCard
    scorer: Scorer
    center: FloatArray
    scale: FloatArray
    pipeline: Pipeline | None = None
    # Interim home of each machine's window state (machine id -> state) until the engine
    # keeps it in its keyed per-machine state; ``detector.batch_scoring.score`` uses it by default.
    states: dict[str, State] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """The model version id."""
        return self.card.version


def save(model_dir: Path, forest: IsolationForest, card: ModelCard) -> Path:
    """Write an artifact directory for ``card.version``; return its path."""
    import joblib  # noqa: PLC0415 - see the module docstring

    target = model_dir / card.version
    target.mkdir(parents=True, exist_ok=False)
    joblib.dump(forest, target / MODEL_FILE)
    FlatForest.from_sklearn(forest).save(target / FLAT_FILE)
    (target / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    return target


def save_generic(model_dir: Path, scorer: FittedScorer, card: ModelCard) -> Path:
    """Write a generic model (pipeline in the card, scorer arrays beside it)."""
    target = model_dir / card.version
    target.mkdir(parents=True, exist_ok=False)
    scorer.save(target / SCORER_FILES[card.scorer_family])
    (target / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    return target


def promote(
    model_dir: Path,
    version: str,
    *,
    scorer: ScorerKind = "fast",
    by: str = "factorywatch",
    action: Action = "promote",
) -> None:
    """Point ``current`` at ``version`` atomically (the detector picks it up live) and
    record who did it in the folder's promotion log (``model.promotions``).

    The artifact is first loaded exactly as the detector loads it and scores one row
    (``validate``): a model the detector could not load is never made current.
    """
    if not _is_version_name(version) or not (model_dir / version / CARD_FILE).is_file():
        raise ModelNotFoundError(f"no model {version} in {model_dir}")
    validate(model_dir, version, scorer=scorer)
    previous = current_version(model_dir)
    tmp = model_dir / f".{CURRENT}.{os.getpid()}"
    tmp.write_text(version + "\n")
    tmp.replace(model_dir / CURRENT)
    entry = Promotion(at=time.time(), by=by, action=action, version=version, previous=previous)
    record(model_dir, entry)


def rollback(model_dir: Path, *, scorer: ScorerKind = "fast", by: str = "factorywatch") -> str:
    """Make the version promoted before the current one current again; return it.

    Raises ``ModelNotFoundError`` when there is nothing to return to.
    """
    current = current_version(model_dir)
    target = rollback_target(read_log(model_dir), current, list_versions(model_dir))
    if target is None:
        raise ModelNotFoundError(
            f"nothing to roll back to in {model_dir}: "
            + (f"no version was current before {current}" if current else "no current model")
        )
    promote(model_dir, target, scorer=scorer, by=by, action="rollback")
    return target


def _is_version_name(version: str) -> bool:
    return (
        bool(version) and version not in (".", "..") and "/" not in version and "\\" not in version
    )


def card_summary(card: ModelCard) -> str:
    """When a model was trained, on what data, and its figures, in one line."""
    trained = card.created_at.strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"trained {trained} on {card.data.file} ({card.data.rows} rows)"]
    metrics = card.metrics
    if "train_alert_rate" in metrics:
        parts.append(f"alarms on {metrics['train_alert_rate']:.1%} of training readings")
    if "forward_far" in metrics and card.threshold_spec.method == "far":
        parts.append(
            f"forward in time {metrics['forward_far']:.2%} false alarms "
            f"(target {card.threshold_spec.value:.2%})"
        )
    follow = card.follow()
    if follow is not None:
        parts.append(
            f"threshold follows normal drift up by at most {follow.cap * follow.spread:.4f}"
        )
    rate = card.params.get("surprise_rate")
    if isinstance(rate, int | float) and rate > 0:
        parts.append(f"surprise rule: a recent score level rarer than 1 in {1 / rate:,.0f}")
    readings = card.rebaseline_readings()
    if readings is not None:
        parts.append(f"re-baselines after an alarm open {readings:,} readings")
    leaving = card.params.get("rebaselined_from")
    if leaving:
        parts.append(f"re-baselined from {leaving}")
    moving = [b for b in str(card.params.get("behaviour") or "").split(",") if b]
    moving = [b for b in moving if not b.endswith(":stationary")]
    if moving:
        parts.append("channels moving while normal: " + ", ".join(moving))
    if "label_roc_auc" in metrics:
        parts.append(
            f"vs failure labels: ROC-AUC {metrics['label_roc_auc']:.3f}, "
            f"precision {metrics['label_precision']:.2f}, "
            f"recall {metrics['label_recall']:.2f} (in-sample)"
        )
    return "; ".join(parts)


def validate(model_dir: Path, version: str, *, scorer: ScorerKind = "fast") -> LoadedModel:
    """Load ``version`` as the detector does and score its training centre; raise
    ``ModelMismatchError`` when it cannot be used (corrupt card, arrays, or scores)."""
    model = load(model_dir, version, scorer=scorer)
    card = model.card
    numbers = [card.threshold, *card.feature_center, *card.feature_scale]
    if card.clear_threshold is not None:
        numbers.append(card.clear_threshold)
    if not all(np.isfinite(numbers)) or not (model.scale > 0).all():
        raise ModelMismatchError(f"model {version}: card holds non-finite numbers or scales <= 0")
    centre = model.center.reshape(1, -1)
    if model.pipeline is not None:  # a generic model scores the pipeline's projection
        centre = model.pipeline.project(centre)
    try:
        scores = model.scorer.score(centre)
    except (ValueError, IndexError) as exc:
        raise ModelMismatchError(f"model {version} cannot score: {exc}") from exc
    # Isolation Forest scores lie in (0, 1]; PCA and Mahalanobis scores are >= 0, unbounded.
    ok = bool(np.isfinite(scores).all())
    if card.scorer_family == "iforest":
        ok = ok and 0.0 < float(scores[0]) <= 1.0
    else:
        ok = ok and float(scores[0]) >= 0.0
    if not ok:
        raise ModelMismatchError(f"model {version} scores {scores.tolist()}, out of range")
    return model


def current_version(model_dir: Path) -> str | None:
    """The promoted version, or ``None`` when nothing was promoted yet."""
    pointer = model_dir / CURRENT
    try:
        return pointer.read_text().strip() or None
    except FileNotFoundError:
        return None


def route_dir(model_dir: Path, kind: RouteKind, name: str) -> Path:
    """The model folder of one machine or one group (its versions and its ``current``)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{name!r} cannot name a {kind} model folder")
    return model_dir / ROUTE_FOLDERS[kind] / name


def routed_versions(model_dir: Path) -> dict[tuple[RouteKind, str], str]:
    """The promoted version of every machine's and group's own model, by (kind, name)."""
    found: dict[tuple[RouteKind, str], str] = {}
    for kind, folder in ROUTE_FOLDERS.items():
        base = model_dir / folder
        if not base.is_dir():
            continue
        for path in sorted(base.iterdir()):
            version = current_version(path) if path.is_dir() else None
            if version is not None:
                found[(kind, path.name)] = version
    return found


def list_versions(model_dir: Path) -> list[str]:
    """All artifact versions in ``model_dir``, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if (p / CARD_FILE).is_file())


def read_card(path: Path) -> ModelCard:
    """Read and validate a card file."""
    try:
        return ModelCard.model_validate_json(path.read_text())
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"no model card at {path}") from exc
    except (ValidationError, UnicodeDecodeError) as exc:
        raise ModelMismatchError(
            f"model card {path} is not a format {FORMAT_VERSION} card: {exc}"
        ) from exc


def _check_card(card: ModelCard, n_features: int) -> None:
    """The card's features fit this code and the scorer's input width."""
    if card.pipeline is not None:
        pipeline = Pipeline(card.pipeline)
        if pipeline.features != card.features or list(pipeline.channels) != card.channels:
            raise ModelMismatchError(f"model {card.version}: pipeline and features disagree")
        if n_features != len(card.features) or len(card.feature_center) != n_features:
            raise ModelMismatchError(f"model {card.version} expects {n_features} features")
        return
    unknown = [f for f in card.features if f not in DERIVED and f not in card.channels]
    if unknown or list(required_channels(card.features)) != card.channels:
        raise ModelMismatchError(f"model {card.version} features {card.features} do not fit")
    if n_features != len(card.features) or len(card.feature_center) != n_features:
        raise ModelMismatchError(
            f"model {card.version} expects {n_features} features, "
            f"its card lists {len(card.features)}"
        )


def _unpickle(card: ModelCard, path: Path) -> IsolationForest:
    """The pickled scikit-learn forest, if this scikit-learn can trust it."""
    import joblib  # noqa: PLC0415 - see the module docstring
    from sklearn.ensemble import IsolationForest  # noqa: PLC0415

    ours = library_versions()["scikit-learn"].split(".")[:2]
    theirs = card.libraries.get("scikit-learn", "?").split(".")[:2]
    if ours != theirs:
        raise ModelMismatchError(
            f"model {card.version} was trained with scikit-learn {'.'.join(theirs)}, this is "
            f"{'.'.join(ours)}: retrain with `factorywatch train`"
        )
    try:
        forest = joblib.load(path)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model {card.version} has a card but no {MODEL_FILE}") from exc
    except Exception as exc:  # unpickling can raise anything
        raise ModelMismatchError(f"cannot unpickle model {card.version}: {exc}") from exc
    if not isinstance(forest, IsolationForest):
        raise ModelMismatchError(f"model {card.version} is not an IsolationForest")
    _check_card(card, int(getattr(forest, "n_features_in_", -1)))
    return forest


def _flat(card: ModelCard, path: Path) -> FlatForest:
    """The flattened forest saved beside the pickle (no scikit-learn needed)."""
    try:
        flat = FlatForest.load(path)
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelMismatchError(f"model {card.version}: unreadable {FLAT_FILE}: {exc}") from exc
    _check_card(card, flat.n_features)
    return flat


def load(
    model_dir: Path, version: str | None = None, *, scorer: ScorerKind = "fast"
) -> LoadedModel:
    """Load ``version`` (default: the promoted one) and check it against this code.

    ``scorer="sklearn"`` scores with scikit-learn itself (the prototype's per-message path,
    kept for benchmarks and cross-checks); ``"fast"`` uses the flattened forest, read from
    ``forest.npz`` (or flattened from the pickle for artifacts that predate it).
    """
    chosen = version or current_version(model_dir)
    if chosen is None:
        raise ModelNotFoundError(
            f"no promoted model in {model_dir}: run `factorywatch train` first"
        )
    card = read_card(model_dir / chosen / CARD_FILE)
    if card.pipeline is not None:
        return _load_generic(card, model_dir / chosen)
    flat_file = model_dir / chosen / FLAT_FILE
    chosen_scorer: Scorer
    if scorer == "fast" and flat_file.is_file():
        chosen_scorer = _flat(card, flat_file)
    elif scorer == "fast":
        chosen_scorer = make_scorer(_unpickle(card, model_dir / chosen / MODEL_FILE))
    else:
        chosen_scorer = SklearnScorer(_unpickle(card, model_dir / chosen / MODEL_FILE))
    return LoadedModel(
        card=card,
        scorer=chosen_scorer,
        center=np.asarray(card.feature_center, dtype=np.float64),
        scale=np.asarray(card.feature_scale, dtype=np.float64),
    )


def _load_generic(card: ModelCard, folder: Path) -> LoadedModel:
    path = folder / SCORER_FILES[card.scorer_family]
    try:
        scorer = load_scorer(card.scorer_family, path)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model {card.version} has a card but no {path.name}") from exc
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelMismatchError(f"model {card.version}: unreadable {path.name}: {exc}") from exc
    _check_card(card, int(getattr(scorer, "n_features", -1)))
    return LoadedModel(
        card=card,
        scorer=scorer,
        center=np.asarray(card.feature_center, dtype=np.float64),
        scale=np.asarray(card.feature_scale, dtype=np.float64),
        pipeline=Pipeline(card.pipeline) if card.pipeline else None,
    )


def make_scorer(forest: IsolationForest) -> Scorer:
    """The fastest scorer available for ``forest``."""
    return FlatForest.from_sklearn(forest)
