"""Train on any machine's own recording: pipeline -> scorer family -> held-out threshold.

No labels are used. The model is fitted on the training rows of each machine (its first part,
in order); the threshold comes from out-of-sample scores of those rows, each block of time scored by
a model of the blocks before it (``model.calibration``). Channels that are constant
over the fitting rows carry no information for a scorer and are left out (reported in
``card.params["constant_channels"]``); the training envelope, widened by
``ENVELOPE_MARGIN`` of each channel's training range on both sides, still makes a reading
far outside that range an ALERT (it is what catches a constant channel that moves).

Feature presets (``--features``), over every channel c, with window w (``--window``):

* ``point``: z(c) only (a point model: no temporal context);
* ``windowed``: z(c), mean_w(c), logstd_w(c) = ln(rolling std + 0.001) (a stuck
  sensor shows as a rolling std of 0, far below any noisy reading; a noise burst or an
  oscillation as a large one);
* ``full``: as windowed plus flat_w(c) (share of unchanged readings), dev_w(c) (deviation
  from the rolling baseline) and roc(c) (rate of change);
* ``drift``: base(c) (the recent mean's departure from a slow baseline that holds while a
  reading is far from it) and vol(c) (log std against its own slow baseline);
* ``auto`` (default): ``windowed`` for the channels whose level holds over the training
  rows, vol(c) only for the ones that trend or step (``model.behaviour``, stored in the card).

For the Isolation Forest the feature rows are whitened first (``Pipeline.with_whitening``):
on principal axes scaled to unit variance, a reading that breaks the channels' usual
relationship stands out on one axis, which an axis-parallel forest isolates quickly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from factorywatch.errors import DatasetError
from factorywatch.model.artifact import DataInfo, ModelCard, library_versions, new_version
from factorywatch.model.behaviour import Behaviour, characterise_all
from factorywatch.model.calibration import (
    FOLDS,
    MIN_TRAIN_ROWS,
    conformal_quantile,
    folds,
    threshold_for,
)
from factorywatch.model.envelope import Envelope, fit_envelope
from factorywatch.model.families import FittedScorer, fit_scorer
from factorywatch.model.fitspec import (
    DEFAULT_PRESET,
    DEFAULT_SMOOTH,
    DEFAULT_SPEC,
    DEFAULT_TREES,
    DEFAULT_WINDOW,
    PRESETS,
    FitSpec,
)
from factorywatch.model.pipeline import (
    Pipeline,
    Step,
    Surprise,
    likelihood_for,
    likelihood_threshold,
    surprise_flags,
)
from factorywatch.model.scoring import robust_center_scale
from factorywatch.model.threshold import FOLLOW_CAP, FOLLOW_SPAN, ThresholdSpec

if TYPE_CHECKING:  # pandas (the train extra) only where a recording is read
    from factorywatch.model.recording import Recording

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

__all__ = [
    "DEFAULT_PRESET",
    "DEFAULT_SMOOTH",
    "DEFAULT_TREES",
    "DEFAULT_WINDOW",
    "PRESETS",
    "Scores",
    "Trained",
    "fit_columns",
    "fit_recording",
    "preset_steps",
    "score_recording",
]
ENVELOPE_MARGIN: Final = 1.0
CLEAR_RATE: Final = 0.10


def preset_steps(
    preset: str,
    channels: Sequence[str],
    window: int,
    behaviour: Mapping[str, Behaviour] | None = None,
) -> list[Step]:
    """The pipeline steps of ``preset`` over ``channels``.

    ``auto`` (the default): ``windowed`` steps for the channels whose ``behaviour`` over the
    training rows is stationary or seasonal; a channel that trends or steps while the machine
    is normal keeps only its variability against its own slow baseline (``vol``): its level
    moved while normal, so where it goes next says nothing about a fault (a fault shows in
    the other channels' levels, in their relationship, and in this one's variability)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown feature preset {preset!r}; choose from {list(PRESETS)}")
    steps: list[Step] = []
    for c in channels:
        moving = (behaviour or {}).get(c) in ("trending", "stepping")
        if preset == "auto" and moving:
            steps.append(Step(op="vol", channel=c, window=window))
            continue
        if preset == "drift":
            # the level a drifting channel holds is not a fault; its departure from its
            # slow baseline and its short-term variability are
            steps += [
                Step(op="base", channel=c, window=window),
                Step(op="vol", channel=c, window=window),
            ]
            continue
        steps.append(Step(op="raw", channel=c))
        if preset == "point":
            continue
        steps += [
            Step(op="mean", channel=c, window=window),
            Step(op="logstd", channel=c, window=window),
        ]
        if preset == "full":
            steps += [
                Step(op="flat", channel=c, window=window),
                Step(op="dev", channel=c, window=window),
                Step(op="roc", channel=c),
            ]
    return steps


@dataclass(frozen=True)
class Trained:
    """A fitted generic model: its scorer and card (save with ``artifact.save_generic``)."""

    scorer: FittedScorer
    card: ModelCard

    @property
    def pipeline(self) -> Pipeline:
        """The card's pipeline."""
        assert self.card.pipeline is not None
        return Pipeline(self.card.pipeline)


def _folds(groups: Sequence[str], n: int) -> npt.NDArray[np.intp]:
    """Per machine, its rows cut into ``FOLDS`` contiguous blocks in time."""
    keys = np.asarray(groups) if groups else np.zeros(n, dtype=np.intp)
    out = np.zeros(n, dtype=np.intp)
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        out[rows] = folds(len(rows))
    return out


def _per_machine(rows: int, groups: Sequence[str]) -> int:
    """Training rows per machine (at least ``MIN_TRAIN_ROWS``): how long a machine's alarm
    stays open before it re-baselines, and how many readings it then recalibrates on."""
    machines = len(set(groups)) if groups else 1
    return max(MIN_TRAIN_ROWS, rows // machines)


def _fit_scorer(
    pipeline: Pipeline, named: FloatArray, family: str, seed: int, trees: int
) -> tuple[Pipeline, FittedScorer]:
    if family == "iforest":
        pipeline = pipeline.with_whitening(named)
    return pipeline, fit_scorer(family, pipeline.project(named), seed=seed, n_estimators=trees)


def forward_scores(
    base: Pipeline,
    named: FloatArray,
    fold: npt.NDArray[np.intp],
    *,
    family: str,
    seed: int,
    trees: int,
) -> FloatArray:
    """Every training row's out-of-sample score, forward in time as the model will be used:
    each block of ``fold`` scored by a model of the blocks before it (the first block, which
    has none, by a model of the blocks after it)."""
    held_out = np.empty(len(named), dtype=np.float64)
    for f in range(FOLDS):
        inside = fold == f
        fit_rows = fold < f if f > 0 else ~inside
        fold_pipeline, fold_scorer = _fit_scorer(base, named[fit_rows], family, seed, trees)
        held_out[inside] = fold_scorer.score(fold_pipeline.project(named[inside]))
    return held_out


def fit_recording(
    rec: Recording,
    train: BoolArray,
    spec: FitSpec = DEFAULT_SPEC,
    *,
    progress: Callable[[str], None] = lambda _: None,
    **changes: Any,
) -> Trained:
    """Fit a model on the rows ``train`` of ``rec`` (each machine's rows in order) as
    ``spec`` says (``changes``: fields of ``spec`` replaced, ``family="pca"``)."""
    spec = spec.replace(**changes) if changes else spec
    preset, window, smooth, family = spec.preset, spec.window, spec.smooth, spec.family
    far, trees, seed = spec.far, spec.trees, spec.seed
    rows = np.flatnonzero(train)
    columns = {c: rec.columns[c][rows] for c in rec.channels}
    groups = [rec.machines[i] for i in rows.tolist()] if rec.machines else []
    try:
        fold = _folds(groups, len(rows))
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    constant = [c for c in rec.channels if np.ptp(columns[c]) == 0.0]
    used = [c for c in rec.channels if c not in constant]
    if not used:
        raise DatasetError(f"every channel is constant over the training rows: {constant}")
    if constant:
        progress(f"constant over training, watched by the envelope only: {constant}")
    behaviour = characterise_all({c: columns[c] for c in used})
    moving = {c: b for c, b in behaviour.items() if b != "stationary"}
    if moving:
        progress(f"channels that move while normal over the training rows: {moving}")
    base = Pipeline.fit(
        columns,
        preset_steps(preset, used, window, behaviour),
        smooth=smooth,
        groups=groups or None,
    )
    named = base.feature_rows(columns, groups=groups or None)
    progress(
        f"fitting {family} on {len(rows)} rows x {len(base.features)} features; "
        f"calibration scores forward in time over {FOLDS} blocks"
    )
    held_out = forward_scores(base, named, fold, family=family, seed=seed, trees=trees)
    calibration = base.smooth_scores(held_out, groups or None)
    if spec.likelihood:
        # the likelihood's long window starts with these out-of-sample scores, and the
        # threshold is set on their likelihood as a live machine's would be computed
        likelihood = likelihood_for(calibration, groups or None)
        base = Pipeline(base.spec.model_copy(update={"likelihood": likelihood}))
        calibration = base.smooth_scores(held_out, groups or None)
    base = _with_surprise(base, calibration, groups, spec, progress)
    pipeline, scorer = _fit_scorer(base, named, family, seed, trees)
    if spec.likelihood:
        # The likelihood is already a tail probability (-log10): the target rate is its
        # threshold, judged against the machine's recent scores rather than training's.
        cut = likelihood_threshold(far)
        progress(f"threshold {cut:.4f} = -log10 of the false-alarm rate {far}")
        last = fold == FOLDS - 1
        forward = float(np.mean(calibration[last] > cut)) if last.any() else float("nan")
    else:
        cut = threshold_for(calibration, far)
        progress(f"threshold {cut:.4f} (false-alarm rate {far} on out-of-sample training scores)")
        forward = forward_far(
            calibration,
            fold,
            far,
            surprise=spec.surprise_rate,
            groups=groups or None,
        )
    progress(
        f"forward in time: a threshold set on the earlier {FOLDS - 1} blocks raised "
        f"{forward:.2%} false alarms on the last block (target {far:.2%})"
    )
    median = float(np.quantile(calibration, 0.5))
    _say_follow(progress, spec.follow, cut, median)
    in_sample = base.smooth_scores(scorer.score(pipeline.project(named)), groups or None)
    center, scale = robust_center_scale(named)
    # A channel scored by its departure from a slow baseline (or, moving while normal, by its
    # variability only) may leave its training range as normal drift: not the fixed range but
    # its baseline features watch it.
    followed = {st.channel for st in base.spec.steps if st.op in ("base", "vol")}
    watched = [c for c in rec.channels if c not in followed]
    envelope = fit_envelope(columns, watched, margin=ENVELOPE_MARGIN) if watched else None
    card = ModelCard(
        version=new_version(),
        created_at=datetime.now(UTC),
        feature_set=f"csv:{preset}",
        features=pipeline.features,
        channels=list(pipeline.channels),
        threshold=cut,
        clear_threshold=min(cut, conformal_quantile(calibration, CLEAR_RATE)),
        envelope=envelope,
        threshold_spec=ThresholdSpec(method="far", value=far),
        params={
            "family": family,
            "preset": preset,
            "window": window,
            "smooth": smooth,
            "likelihood": spec.likelihood,
            "surprise_rate": spec.surprise_rate,
            "follow_span": FOLLOW_SPAN if spec.follow else None,
            "follow_cap": FOLLOW_CAP if spec.follow else None,
            "rebaseline_readings": _per_machine(len(rows), groups) if spec.rebaseline else None,
            "n_estimators": trees if family == "iforest" else None,
            "random_state": seed,
            "calibration_folds": FOLDS,
            "constant_channels": ",".join(constant) or None,
            "behaviour": ",".join(f"{c}:{b}" for c, b in behaviour.items()) or None,
            "renamed": ",".join(f"{k}->{v}" for k, v in rec.renamed.items()) or None,
        },
        data=DataInfo(
            file=rec.path.name,
            sha256=rec.sha256,
            layout="csv",
            rows=len(rows),
            verified=False,
        ),
        libraries=library_versions(),
        feature_center=center.tolist(),
        feature_scale=scale.tolist(),
        metrics={
            "forward_far": forward,
            "calibration_alert_rate": float(np.mean(calibration > cut)),
            "train_alert_rate": float(np.mean(in_sample > cut)),
            "calibration_score_p50": median,
        },
        pipeline=pipeline.spec,
        scorer_family=family if family in {"pca", "mahalanobis"} else "iforest",
    )
    return Trained(scorer=scorer, card=card)


def _say_follow(progress: Callable[[str], None], follow: bool, cut: float, median: float) -> None:
    """Tell how far a machine's following threshold may rise (when it follows)."""
    if follow and cut > median:
        progress(
            f"each machine's threshold follows its normal score level up, by at most "
            f"{FOLLOW_CAP * (cut - median):.4f} (to {cut + FOLLOW_CAP * (cut - median):.4f}; "
            "--no-follow: fixed)"
        )


def _with_surprise(
    base: Pipeline,
    calibration: FloatArray,
    groups: Sequence[str],
    spec: FitSpec,
    progress: Callable[[str], None],
) -> Pipeline:
    """``base`` with the surprise rule (``model.pipeline``, step 6) when ``spec`` asks for
    it, its long window started with the out-of-sample ``calibration`` scores, as the
    likelihood's is."""
    rate = spec.surprise_rate
    if rate is None:
        return base
    surprise = Surprise(
        likelihood=likelihood_for(calibration, groups or None),
        threshold=likelihood_threshold(rate),
    )
    progress(
        f"a recent score level seen once in {1 / rate:,.0f} readings of the machine's own "
        "is an ALERT too (--surprise-rate R to change, --no-surprise: off)"
    )
    return Pipeline(base.spec.model_copy(update={"surprise": surprise}))


def forward_far(
    calibration: FloatArray,
    fold: npt.NDArray[np.intp],
    far: float,
    *,
    surprise: float | None = None,
    groups: Sequence[str] | None = None,
) -> float:
    """The realized false-alarm rate forward in time: the threshold for ``far`` set on the
    out-of-sample scores of every block but the last (of each machine), measured on the
    last block's scores (the training rows are normal, so every alert there is false).
    With a ``surprise`` rate, a row the surprise rule (its long window started with the
    earlier blocks' scores) makes an ALERT counts too."""
    last = fold == FOLDS - 1
    if last.all() or not last.any():
        return float("nan")
    alerts = calibration[last] > threshold_for(calibration[~last], far)
    if surprise is not None:
        keys = None if groups is None else np.asarray(groups)
        rule = Surprise(
            likelihood=likelihood_for(
                calibration[~last], None if keys is None else keys[~last].tolist()
            ),
            threshold=likelihood_threshold(surprise),
        )
        alerts |= surprise_flags(
            rule, calibration[last], None if keys is None else keys[last].tolist()
        )
    return float(np.mean(alerts))


@dataclass(frozen=True)
class Scores:
    """Batch scores of a recording's rows (each machine in order, from its first row)."""

    score: FloatArray  # smoothed, the one compared with the threshold
    outside: BoolArray  # outside the training envelope
    flagged: BoolArray  # ALERT: score above threshold, outside the envelope or surprising
    # the surprise rule made it an ALERT (``model.pipeline``, step 6); None: not known
    surprise: BoolArray | None = None
    # the score may count toward clearing an open alert (at or below the clear threshold of
    # the model that scored it); None: the one model's ``clear_threshold`` says
    calm: BoolArray | None = None
    # the machine was recalibrating (CALIBRATING: neither ALERT nor NORMAL; ``model.rebaseline``)
    calibrating: BoolArray | None = None


def score_recording(
    model: Trained, columns: dict[str, FloatArray], groups: Sequence[str] | None = None
) -> Scores:
    """Score every row as the detector would stream it (windows and smoothing per machine)."""
    pipeline = model.pipeline
    matrix = pipeline.transform(columns, groups=groups)
    score = pipeline.smooth_scores(model.scorer.score(matrix), groups)
    n = len(score)
    envelope: Envelope | None = model.card.envelope
    outside = np.array(
        [o is not None for o in envelope.outside(columns, n)] if envelope else [False] * n,
        dtype=np.bool_,
    )
    surprise = pipeline.surprises(score, groups)
    always = outside | surprise  # ALERT whatever the score
    threshold = model.card.threshold
    follow = model.card.follow()
    if follow is None:
        direct = (score > threshold) | always
        return Scores(score=score, outside=outside, flagged=direct, surprise=surprise)
    # each machine's threshold follows its normal score level, reading by reading
    flagged = np.empty(n, dtype=np.bool_)
    keys = np.asarray(groups) if groups else np.zeros(n, dtype=np.intp)
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        flags, _ = follow.flags(
            score[rows].tolist(), always[rows].tolist(), threshold, model.card.clear_threshold
        )
        flagged[rows] = flags
    return Scores(score=score, outside=outside, flagged=flagged, surprise=surprise)


def fit_columns(
    columns: dict[str, FloatArray],
    spec: FitSpec = DEFAULT_SPEC,
    *,
    name: str = "live",
    **changes: Any,
) -> Trained:
    """Fit on one machine's readings in order (``{channel: values}``): a calibration window.

    For the engine's live calibration: every row trains. ``family="pca"`` needs numpy only;
    the Isolation Forest needs scikit-learn (the ``train`` extra) to fit.
    """
    from factorywatch.model.recording import Recording  # noqa: PLC0415 - pandas: train extra

    channels = list(columns)
    rows = len(columns[channels[0]]) if channels else 0
    rec = Recording(
        path=Path(f"{name}.live"),
        sha256="-",
        channels=channels,
        columns={c: np.asarray(v, dtype=np.float64) for c, v in columns.items()},
    )
    return fit_recording(rec, np.ones(rows, dtype=np.bool_), spec, **changes)
