"""The feature pipeline: named steps from a machine's readings to the scorer's feature row.

Saved in the model card (``Pipeline.spec``) and run by the same code offline (``transform``
over a frame) and online (``step`` over one reading, with the machine's window state).

1. Every channel is standardised with robust statistics of the training rows
   (``z = (x - median) / scale``, scale = 1.4826 MAD, else the standard deviation, else
   ``1e-6 * max(1, |median|)``), then clipped to ``[-Z_CLIP, Z_CLIP]``: a huge or absurd
   value stays finite and extreme instead of overflowing a window sum.
2. Steps (``Step.op``) turn standardised channels into features:

   ``raw``    z itself                           ``mean``/``std``/``min``/``max``  over the
   ``logstd`` ln(std + 0.001) over the window   (mean, std, logstd, min, max: window)
   ``dev``    z minus the mean of the previous    last ``window`` readings (current included)
              ``window`` readings (baseline)    ``roc``    z minus the previous z
   ``flat``   share of the last ``window`` steps in which the raw value did not change
              (1.0 = stuck sensor)
   ``derived`` a named physical quantity of raw channels (``model.features.DERIVED``, the
              AI4I preset);  ``encode`` an attribute through a code table (``product_type``)
   ``base``   the mean of the last ``window`` z minus the machine's slow baseline level,
              in units of its slow baseline spread: an exponentially weighted mean and
              variance of z with time constant ``span`` readings (level started at the
              machine's first z, spread at the training scale; the spread follows
              ``SPREAD_SPANS`` times slower), updated only while the reading is within
              ``BASE_STEP`` spreads of the level: a fault does not become the new normal,
              while slow normal drift (warm-up, a load that settles) is followed. Kept in
              the window state (``b<step>:<channel>`` = [level, variance]), journaled and
              checkpointed with it; ``baseline_moves`` says how far each level has moved
              (in training scales).
   ``vol``    logstd over the window minus its own slow baseline (an exponential mean
              that holds while the gap is beyond ``VOL_GATE``; ``v<step>:<channel>``,
              started at the first full window): a change of variability, relative to what
              the machine has shown lately.

3. Warm-up: a windowed feature is valid once its window is full: ``window`` readings for
   mean/std/logstd/min/max, ``window`` earlier readings for ``dev``, ``window`` changes for
   ``flat``, one earlier reading for ``roc`` (``min_periods``). Before that it is imputed
   with its training centre given what is known (``PipelineSpec.fill``, learnt by ``fit``
   on the training rows where every window was full): a least-squares line on the valid
   features of the same channel (on the first reading: its z), so the imputed value keeps
   the usual relationship with them (a rolling mean near z's share of it, a log std at its
   typical level) and the whitened row looks ordinary. A partial window (one reading: std 0,
   log std far below anything in training) thus contributes nothing and a new machine does
   not alarm on its first readings. Batch and streaming apply the same rule, ``fit`` to the
   first rows of each training machine too. ``Pipeline.warmup`` says how many readings a
   machine needs before every window is full. A spec without ``fill`` (a card from before
   the rule) keeps the old partial-window statistics.
4. Score smoothing (``smooth`` > 1): the verdict's score is the mean of the machine's last
   ``smooth`` raw scores (``smooth_scores`` / ``smooth_step``), over the scores so far while
   fewer than ``smooth`` exist (those scores come from imputed, typical features).
5. Anomaly likelihood (``likelihood``, after smoothing; the rule of Numenta's HTM anomaly
   likelihood, Ahmad et al. 2017): the mean of the machine's last ``short`` scores is compared
   with the distribution of such means over its last ``long`` readings (their mean and
   standard deviation, Numenta's ``estimateNormal``, kept as per-block moments; cards from
   before ``Likelihood.estimate``: median and 1.4826 MAD of the values), re-estimated every
   ``every`` readings, and the output is ``-log10`` of its Gaussian tail probability: 2 = a
   recent level seen once in a hundred, 3 = once in a thousand (the threshold for a target
   rate is ``likelihood_threshold``). A score level that moves with the process (drift) is
   thus judged against the machine's recent scores, not against training's. The long window
   starts with the training scores (``Likelihood.prior``, in the card), so a machine is never
   judged blind; it is kept in the window state (``lk:*``), journaled and checkpointed with it.
6. Surprise (``surprise``, new cards by default): the same likelihood of the smoothed scores,
   kept beside the score instead of replacing it (state ``sp:*``), with its own threshold
   (``Surprise.threshold``, -log10 of ``SURPRISE_RATE``). A reading whose recent score level
   is that unusual for the machine's own recent scores is an ALERT whatever the score, as a
   reading outside the training envelope is: a spike in a calm stretch stands out against
   the machine's recent scores long before it reaches a threshold set on training's tail,
   which a bounded score (the Isolation Forest's saturates near 1) may never cross.

The window state of one machine is a plain JSON-serialisable dict (lists of floats), so the
engine can snapshot and restore it. The batch ``transform`` treats each machine (``groups``)
as its own sequence, in row order, and equals ``step`` applied row by row (property test).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from factorywatch.model.features import DERIVED, TYPE_CODE

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
State = dict[str, Any]  # one machine's window state: JSON-serialisable

Z_CLIP: Final = 1e6
WHITEN_FLOOR: Final = 1e-3
WINDOW_OPS: Final = (
    "mean",
    "std",
    "logstd",
    "min",
    "max",
    "dev",
    "roc",
    "flat",
    "base",
    "vol",
)
Op = Literal[
    "raw",
    "mean",
    "std",
    "logstd",
    "min",
    "max",
    "dev",
    "roc",
    "flat",
    "derived",
    "encode",
    "base",
    "vol",
]
# ``base``: a slow baseline (EWMA of z with time constant ``span`` readings) that a reading
# more than BASE_STEP spreads away does not move, so a fault never becomes the new normal
# while a slow drift of normal operation is followed.
BASE_STEP: Final = 3.0
# The spread follows SPREAD_SPANS times slower than the level: a fault that lasts a while
# must not teach the baseline that such swings are usual before it is over.
SPREAD_SPANS: Final = 5
BASE_FLOOR: Final = 1e-4
# ``vol``: its baseline holds while the window's log std is more than VOL_GATE from it
# (about three standard deviations of the log std of a five-reading window).
VOL_GATE: Final = 1.0  # the baseline variance never falls below (0.01 training scales)²
DEFAULT_SPAN: Final = 50
# logstd = ln(std + LOGSTD_FLOOR) of standardised values: a stuck sensor (std 0) lands far
# below anything noisy, a noise burst far above; both on a scale a forest splits evenly.
LOGSTD_FLOOR: Final = 1e-3


class Step(BaseModel):
    """One named feature: an operation on a channel (or a derived quantity, an attribute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Op
    channel: str = Field(description="channel, derived quantity name, or attribute")
    window: int = Field(default=1, ge=1, le=10_000)
    codes: dict[str, float] | None = None  # encode only
    span: int = Field(default=DEFAULT_SPAN, ge=1, le=1_000_000)  # base only

    @property
    def name(self) -> str:
        """The feature name (``flow_rate``, ``flow_rate__mean10``, ``product_type_code``)."""
        if self.op in {"raw", "derived"}:
            return self.channel
        if self.op == "encode":
            return f"{self.channel}_code"
        if self.op == "roc":
            return f"{self.channel}__roc"
        if self.op == "base":
            return f"{self.channel}__base{self.window}_{self.span}"
        return f"{self.channel}__{self.op}{self.window}"


class Whitening(BaseModel):
    """A fitted linear decorrelation of the feature row (principal axes, unit variance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[float]
    scale: list[float]
    rotation: list[list[float]]  # (features, components): columns are principal axes
    sd: list[float]  # each component's standard deviation over the fitting rows


class Fill(BaseModel):
    """Warm-up: while a machine has sent ``readings`` readings, feature ``step`` (not yet
    valid) is ``intercept + sum(coef[i] * feature[inputs[i]])`` over valid features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    readings: int = Field(ge=1)
    step: int = Field(ge=0)
    intercept: float
    inputs: list[int] = []
    coef: list[float] = []


# Anomaly likelihood (Numenta's AnomalyLikelihood defaults: an averaging window of 10 raw
# scores, the distribution re-estimated every 100 readings; its historic window, 8640, is
# bounded here to 1000 readings so a machine's journaled state stays small).
LIKELIHOOD_SHORT: Final = 10
LIKELIHOOD_LONG: Final = 1000
LIKELIHOOD_EVERY: Final = 100
# The spread never falls below this share of the training spread: a machine whose recent
# scores are all alike must not turn a small wobble into a certain anomaly.
LIKELIHOOD_FLOOR: Final = 0.1
# What new cards' likelihood keeps in its long window and how it estimates its distribution
# (``Likelihood.of`` / ``Likelihood.estimate``).
LIKELIHOOD_ESTIMATE: Final = "normal"
# -log10 of the smallest tail probability reported (a finite ceiling for an extreme level).
LIKELIHOOD_CAP: Final = 300.0


class Likelihood(BaseModel):
    """Anomaly likelihood of the smoothed scores (step 5 of the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    short: int = Field(default=LIKELIHOOD_SHORT, ge=1, le=1000)
    long: int = Field(default=LIKELIHOOD_LONG, ge=2, le=10_000)
    every: int = Field(default=LIKELIHOOD_EVERY, ge=1, le=10_000)
    # the training scores' short means, in time order: the long window's first contents
    prior: list[float] = Field(min_length=2)
    # How the long window's distribution is estimated: median and 1.4826 MAD of its values
    # (cards before ``estimate``; the state keeps the values), or their mean and standard
    # deviation (Numenta's ``estimateNormal``), kept as the count, mean and squared
    # deviations of each block of ``every`` values (``long / every`` blocks and the open
    # one: a few dozen numbers per machine instead of ``long``). With "normal" a heavy tail
    # of normal scores widens the spread instead of being ignored, so a machine whose
    # scores are often spiky is not judged against its quietest half.
    estimate: Literal["robust", "normal"] = "robust"


# The surprise's rate: a recent score level seen once in a thousand readings (step 6).
SURPRISE_RATE: Final = 0.001


class Surprise(BaseModel):
    """The surprise rule of step 6: a likelihood of the smoothed scores and its threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    likelihood: Likelihood
    threshold: float = Field(gt=0.0)


class PipelineSpec(BaseModel):
    """What the model card stores: channels, their robust scales, steps, smoothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: list[str]
    center: list[float]
    scale: list[float]
    steps: list[Step]
    smooth: int = Field(default=1, ge=1, le=1000)
    attributes: list[str] = []
    whiten: Whitening | None = None
    # Warm-up imputation rules (see ``Fill``); None = none (cards from before the rule).
    fill: list[Fill] | None = None
    # Anomaly likelihood of the scores (module doc, step 5); None = the smoothed score itself.
    likelihood: Likelihood | None = None
    # The surprise rule (module doc, step 6); None = none (cards from before the rule).
    surprise: Surprise | None = None


def min_periods(step: Step) -> int:
    """Readings of a machine (current included) before ``step``'s value is valid."""
    if step.op in ("dev", "flat"):
        return step.window + 1
    if step.op == "base":
        return 1
    if step.op == "roc":
        return 2
    if step.op in WINDOW_OPS:
        return step.window
    return 1


def robust_scale(values: FloatArray) -> tuple[float, float]:
    """Median and a scale that is never zero (MAD, else std, else relative epsilon)."""
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * 1.4826
    if mad > 0 and math.isfinite(mad):
        return median, mad
    std = float(np.std(values))
    if std > 0 and math.isfinite(std):
        return median, std
    return median, 1e-6 * max(1.0, abs(median))


class Pipeline:
    """Fitted pipeline: ``transform`` a frame, or ``step`` one reading with window state."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.channels = tuple(spec.channels)
        self._index = {c: i for i, c in enumerate(self.channels)}
        self._center = np.asarray(spec.center, dtype=np.float64)
        self._scale = np.asarray(spec.scale, dtype=np.float64)
        self.features = [s.name for s in spec.steps]
        self._whiten: tuple[FloatArray, FloatArray, FloatArray] | None = None
        # A new machine's likelihood states (step 5, step 6), worked out once per model (the
        # long window's blocks come from the card's prior: up to a thousand values) and
        # copied for each machine; key: the state keys' prefix.
        self._starts: dict[str, State] = {}
        if spec.likelihood is not None:
            self._starts[LIKELIHOOD_PREFIX] = likelihood_start(spec.likelihood)
        if spec.surprise is not None:
            self._starts[SURPRISE_PREFIX] = likelihood_start(
                spec.surprise.likelihood, SURPRISE_PREFIX
            )
        if spec.whiten is not None:
            w = spec.whiten
            rotation = np.asarray(w.rotation, dtype=np.float64) / np.asarray(w.sd)
            self._whiten = (np.asarray(w.mean), np.asarray(w.scale), rotation)
        # Per channel, how many past standardised values the windows need.
        self._keep: dict[str, int] = {}
        self._flat_channels = frozenset(s.channel for s in spec.steps if s.op == "flat")
        self._scales = [
            (c, float(m), float(sc))
            for c, m, sc in zip(self.channels, spec.center, spec.scale, strict=True)
        ]
        for s in spec.steps:
            if s.op in WINDOW_OPS:
                need = s.window + 1 if s.op in ("dev", "flat") else max(s.window, 2)
                self._keep[s.channel] = max(self._keep.get(s.channel, 0), need)
        # The streaming step's plan, worked out once: (state key of z history, keep, state
        # key of raw history or None) per windowed channel; (op, step, z key) per step.
        self._histories = [
            (f"z:{c}", c, keep, f"x:{c}" if c in self._flat_channels else None)
            for c, keep in self._keep.items()
        ]
        # mean, std and logstd of one channel and window share one pass over the window (a
        # "moment" slot); the plan says per step where its value comes from.
        self._moments: list[tuple[str, int]] = []
        self._plan: list[tuple[int, Any, Step]] = []
        self._make_plan(spec)
        self._init_fill(spec)

    def _make_plan(self, spec: PipelineSpec) -> None:
        """The streaming step's plan: where each step's value comes from."""
        for j, s in enumerate(spec.steps):
            if s.op == "raw":
                self._plan.append((_RAW, s.channel, s))
            elif s.op in _MOMENT_OPS or s.op in ("base", "vol"):
                slot = (f"z:{s.channel}", s.window)
                if slot not in self._moments:
                    self._moments.append(slot)
                if s.op in _MOMENT_OPS:
                    self._plan.append((_MOMENT_CODES[s.op], self._moments.index(slot), s))
                else:  # the window's mean or log std from the shared pass, then the baseline
                    code = _BASE if s.op == "base" else _VOL
                    self._plan.append((code, (self._moments.index(slot), baseline_key(j, s)), s))
            else:
                self._plan.append((_OTHER, baseline_key(j, s), s))

    def _init_fill(self, spec: PipelineSpec) -> None:
        """The warm-up imputation rules and the channel whose history counts readings."""
        # Warm-up imputation: readings seen -> [(feature, intercept, ((input, coef), ...))].
        self._fill: dict[int, list[tuple[int, float, tuple[tuple[int, float], ...]]]] = {}
        for f in spec.fill or []:
            if f.step >= len(spec.steps) or any(i >= len(spec.steps) for i in f.inputs):
                raise ValueError(f"pipeline fill refers to a step that does not exist: {f}")
            if len(f.inputs) != len(f.coef):
                raise ValueError(f"pipeline fill needs one coefficient per input: {f}")
            terms = tuple(zip(f.inputs, f.coef, strict=True))
            self._fill.setdefault(f.readings, []).append((f.step, f.intercept, terms))
        # The channel with the longest min periods: readings are counted on its history.
        needs = [(min_periods(s), s.channel) for s in spec.steps if s.op in WINDOW_OPS]
        self._full, channel = max(needs, default=(1, ""))
        self._count_key = f"z:{channel}"

    @classmethod
    def fit(
        cls,
        columns: Mapping[str, FloatArray],
        steps: Sequence[Step],
        *,
        smooth: int = 1,
        groups: Sequence[str] | None = None,
    ) -> Pipeline:
        """Learn each used channel's robust centre and scale from the training columns, and
        the warm-up fill (``_fit_fill``) from the rows where every window was full
        (``groups``: the machine of each row, each in order; none = one sequence)."""
        channels: dict[str, None] = {}
        attributes: dict[str, None] = {}
        for s in steps:
            if s.op == "derived":
                channels.update(dict.fromkeys(DERIVED[s.channel][1]))
            elif s.op == "encode":
                attributes[s.channel] = None
            else:
                channels[s.channel] = None
        center, scale = [], []
        for c in channels:
            m, sc = robust_scale(np.asarray(columns[c], dtype=np.float64))
            center.append(m)
            scale.append(sc)
        spec = PipelineSpec(
            channels=list(channels),
            center=center,
            scale=scale,
            steps=list(steps),
            smooth=smooth,
            attributes=list(attributes),
        )
        plain = cls(spec)
        rows = plain.feature_rows(columns, groups=groups)
        full = rows[_positions(groups, len(rows)) + 1 >= plain._full]
        return cls(spec.model_copy(update={"fill": _fit_fill(spec.steps, full)}))

    def with_whitening(self, features: FloatArray) -> Pipeline:
        """This pipeline plus a whitening fitted on the (pre-whitening) ``features`` rows.

        The scorer then sees the features on their principal axes, each scaled to unit
        variance: a reading that breaks the usual relationship between channels (a pressure
        that does not follow the flow) stands out on a residual axis, where an
        axis-parallel scorer such as the Isolation Forest can isolate it. Components with
        (almost) no variance are floored at ``WHITEN_FLOOR`` of the mean variance.
        """
        x = np.asarray(features, dtype=np.float64)
        mean = x.mean(axis=0)
        spread = x.std(axis=0)
        scale = np.where(spread > 1e-12, spread, 1.0)
        z = (x - mean) / scale
        cov = np.atleast_2d(np.cov(z, rowvar=False)) if len(z) > 1 else np.eye(z.shape[1])
        variances, axes = np.linalg.eigh(cov)
        order = np.argsort(variances)[::-1]
        variances, axes = variances[order], axes[:, order]
        floor = max(WHITEN_FLOOR * float(np.mean(np.maximum(variances, 0.0))), 1e-12)
        sd = np.sqrt(np.maximum(variances, floor))
        whitening = Whitening(
            mean=mean.tolist(), scale=scale.tolist(), rotation=axes.tolist(), sd=sd.tolist()
        )
        return Pipeline(self.spec.model_copy(update={"whiten": whitening}))

    @property
    def whitening(self) -> tuple[FloatArray, FloatArray, FloatArray] | None:
        """(mean, scale, rotation) of the whitening ``project`` applies, if any."""
        return self._whiten

    def project(self, features: FloatArray) -> FloatArray:
        """Named feature rows -> the scorer's input (whitened when the spec says so)."""
        if self._whiten is None:
            return features
        mean, scale, rotation = self._whiten
        out: FloatArray = np.clip(((features - mean) / scale) @ rotation, -Z_CLIP, Z_CLIP)
        return out

    @property
    def required_channels(self) -> tuple[str, ...]:
        """Channels a reading must carry."""
        return self.channels

    @property
    def warmup(self) -> int:
        """Readings of a machine before every window (and the score smoothing) is full: the
        verdicts on those readings use imputed (training-centre) windowed features."""
        needs = [min_periods(s) for s in self.spec.steps]
        return max([*needs, self.spec.smooth, 1]) - 1

    # -- batch -----------------------------------------------------------------------------
    def standardise(self, columns: Mapping[str, FloatArray]) -> dict[str, FloatArray]:
        """Robust z of every channel, clipped to ``Z_CLIP``."""
        out = {}
        for i, c in enumerate(self.channels):
            z = (np.asarray(columns[c], dtype=np.float64) - self._center[i]) / self._scale[i]
            out[c] = np.clip(z, -Z_CLIP, Z_CLIP)
        return out

    def transform(
        self,
        columns: Mapping[str, FloatArray],
        *,
        attributes: Mapping[str, Sequence[str]] | None = None,
        groups: Sequence[str] | None = None,
    ) -> FloatArray:
        """The scorer's input for every row: ``project(feature_rows(...))``."""
        return self.project(self.feature_rows(columns, attributes=attributes, groups=groups))

    def feature_rows(
        self,
        columns: Mapping[str, FloatArray],
        *,
        attributes: Mapping[str, Sequence[str]] | None = None,
        groups: Sequence[str] | None = None,
    ) -> FloatArray:
        """The ``(n, n_features)`` named features; each group (machine) is its own sequence."""
        n = len(next(iter(columns.values()))) if columns else 0
        if groups is None:
            return self._transform_one(columns, attributes, n)
        keys = np.asarray(groups)
        out = np.empty((n, len(self.features)), dtype=np.float64)
        for key in dict.fromkeys(keys.tolist()):
            rows = np.flatnonzero(keys == key)
            cols = {c: np.asarray(v)[rows] for c, v in columns.items()}
            picked = rows.tolist()
            attrs = {a: [v[r] for r in picked] for a, v in (attributes or {}).items()}
            out[rows] = self._transform_one(cols, attrs, len(rows))
        return out

    def _transform_one(
        self,
        columns: Mapping[str, FloatArray],
        attributes: Mapping[str, Sequence[str]] | None,
        n: int,
    ) -> FloatArray:
        z = self.standardise(columns)
        out = np.empty((n, len(self.features)), dtype=np.float64)
        for j, s in enumerate(self.spec.steps):
            if s.op == "derived":
                raw = {c: np.asarray(columns[c], dtype=np.float64) for c in DERIVED[s.channel][1]}
                out[:, j] = DERIVED[s.channel][0](raw)
            elif s.op == "encode":
                codes = s.codes or TYPE_CODE
                values = (attributes or {}).get(s.channel, [""] * n)
                out[:, j] = [codes.get(v, math.nan) for v in values]
            elif s.op == "raw":
                out[:, j] = z[s.channel]
            elif s.op == "flat":
                out[:, j] = _flat(np.asarray(columns[s.channel], dtype=np.float64), s.window)
            elif s.op == "vol":
                vstate: State = {}
                vkey = baseline_key(j, s)
                logstds = _window_op("logstd", z[s.channel], s.window).tolist()
                out[:, j] = [
                    _vol_step(vstate, vkey, v, s.span) if i + 1 >= s.window else 0.0
                    for i, v in enumerate(logstds)
                ]
            elif s.op == "base":
                state: State = {}
                key = baseline_key(j, s)
                means = _window_op("mean", z[s.channel], s.window).tolist()
                out[:, j] = [
                    _base_step(state, key, v, m, s.span)
                    for v, m in zip(z[s.channel].tolist(), means, strict=True)
                ]
            else:
                out[:, j] = _window_op(s.op, z[s.channel], s.window)
        if self._fill:  # warm-up: partial windows -> imputed
            for i in range(min(n, self._full - 1)):
                self._impute(i + 1, out[i])
        return out

    # -- streaming -------------------------------------------------------------------------
    def step(
        self,
        state: State,
        row: Mapping[str, float],
        attributes: Mapping[str, str] | None = None,
    ) -> list[float]:
        """The scorer's input row for one reading; updates ``state`` (the machine's windows)."""
        features = self.step_features(state, row, attributes)
        if self._whiten is None:
            return features
        projected: list[float] = self.project(np.asarray([features]))[0].tolist()
        return projected

    def step_features(
        self,
        state: State,
        row: Mapping[str, float],
        attributes: Mapping[str, str] | None = None,
    ) -> list[float]:
        """The named feature row of one reading; updates ``state`` (the machine's windows)."""
        z: dict[str, float] = {}
        for c, center, scale in self._scales:
            value = (float(row[c]) - center) / scale
            # clipped as np.clip does (a NaN stays NaN); comparisons beat min/max calls
            z[c] = Z_CLIP if value > Z_CLIP else -Z_CLIP if value < -Z_CLIP else value
        # Append the current value to each channel's history first (windows include it);
        # raw values are kept only where a flat-line step compares them.
        for zkey, c, keep, xkey in self._histories:
            zs: list[float] = state.setdefault(zkey, [])
            zs.append(z[c])
            if len(zs) > keep:
                del zs[:-keep]
            if xkey is not None:
                raws: list[float] = state.setdefault(xkey, [])
                raws.append(float(row[c]))
                if len(raws) > keep:
                    del raws[:-keep]
        moments = [_mean_std(state[zkey][-window:]) for zkey, window in self._moments]
        features: list[float] = []
        for code, arg, s in self._plan:
            if code == _RAW:
                features.append(z[arg])
            elif code == _MEAN:
                features.append(moments[arg][0])
            elif code == _LOGSTD:
                features.append(math.log(moments[arg][1] + LOGSTD_FLOOR))
            elif code == _STD:
                features.append(moments[arg][1])
            else:
                features.append(
                    _baseline_feature(code, arg, s, state=state, z=z, moments=moments)
                    if code >= _BASE
                    else self._step_one(s, state, row, z, attributes, key=arg)
                )
        if self._fill and (seen := len(state[self._count_key])) < self._full:
            self._impute(seen, features)
        return features

    def _impute(self, seen: int, features: Any) -> None:
        """Warm-up: after ``seen`` readings, each feature whose window is not yet full takes
        its fitted value given the valid ones (the same arithmetic in batch and streaming)."""
        for j, intercept, terms in self._fill.get(seen, ()):
            value = intercept
            for k, c in terms:
                value += c * float(features[k])
            features[j] = value

    def _step_one(  # noqa: PLR0911 - one return per operation reads best
        self,
        s: Step,
        state: State,
        row: Mapping[str, float],
        z: Mapping[str, float],
        attributes: Mapping[str, str] | None,
        *,
        key: str,
    ) -> float:
        if s.op == "raw":
            return z[s.channel]
        if s.op == "derived":
            func, inputs = DERIVED[s.channel]
            return float(func({c: np.array([float(row[c])]) for c in inputs})[0])
        if s.op == "encode":
            return (s.codes or TYPE_CODE).get((attributes or {}).get(s.channel, ""), math.nan)
        history = state[f"z:{s.channel}"]
        if s.op == "base":
            window = history[-s.window :]
            return _base_step(state, key, z[s.channel], _mean(window), s.span)
        if s.op == "vol":
            if len(history) < s.window:
                return 0.0
            logstd = _from_moments("logstd", _mean_std(history[-s.window :]))
            return _vol_step(state, key, logstd, s.span)
        if s.op == "flat":
            return _flat_tail(state[f"x:{s.channel}"], s.window)
        if s.op == "roc":
            return history[-1] - history[-2] if len(history) > 1 else 0.0
        if s.op == "dev":
            past = history[-s.window - 1 : -1]
            return history[-1] - _mean(past) if past else 0.0
        window = history[-s.window :]
        if s.op in _MOMENT_OPS:
            return _from_moments(s.op, _mean_std(window))
        if s.op == "min":
            return float(min(window))
        return float(max(window))

    # -- score smoothing and likelihood ----------------------------------------------------
    def smooth_scores(self, scores: FloatArray, groups: Sequence[str] | None = None) -> FloatArray:
        """Batch score post-processing per machine: the mean of its last ``smooth`` scores,
        then its anomaly likelihood when the spec has one (equals ``smooth_step``)."""
        k = self.spec.smooth
        if k <= 1 and self.spec.likelihood is None:
            return scores
        keys = np.zeros(len(scores), dtype=np.intp) if groups is None else np.asarray(groups)
        out = np.empty_like(scores)
        for key in dict.fromkeys(keys.tolist()):
            rows = np.flatnonzero(keys == key)
            values = _window_op("mean", scores[rows], k) if k > 1 else scores[rows]
            if self.spec.likelihood is not None:
                values = likelihood_scores(self.spec.likelihood, values)
            out[rows] = values
        return out

    def smooth_step(self, state: State, score: float) -> float:
        """Streaming score post-processing over the machine's state (``smooth_scores``)."""
        k = self.spec.smooth
        value = float(score)
        if k > 1:
            recent: list[float] = state.setdefault("scores", [])
            recent.append(value)
            del recent[:-k]
            value = _mean(recent)
        if self.spec.likelihood is not None:
            self._start(state, LIKELIHOOD_PREFIX)
            value = likelihood_step(self.spec.likelihood, state, value)
        return value

    def _start(self, state: State, prefix: str) -> None:
        """Give a machine's state its likelihood part under ``prefix`` when it has none (a
        copy of the model's start: what ``likelihood_step`` would work out from the prior)."""
        if _state_keys(prefix)[1] not in state:
            state.update(_fresh_copy(self._starts[prefix]))

    def surprises(self, scores: FloatArray, groups: Sequence[str] | None = None) -> BoolArray:
        """Per row, whether the surprise rule makes it an ALERT (equals ``surprise_step``);
        all False without the rule. ``scores`` are smoothed (``smooth_scores``)."""
        rule = self.spec.surprise
        if rule is None:
            return np.zeros(len(scores), dtype=np.bool_)
        return surprise_flags(rule, scores, groups)

    def surprise_step(self, state: State, score: float) -> float | None:
        """Streaming surprise of one smoothed ``score`` over the machine's state: its value
        (-log10 tail probability) when above the rule's threshold, else None."""
        rule = self.spec.surprise
        if rule is None:
            return None
        self._start(state, SURPRISE_PREFIX)
        value = likelihood_step(rule.likelihood, state, score, prefix=SURPRISE_PREFIX)
        return value if value > rule.threshold else None


def surprise_flags(
    rule: Surprise, scores: FloatArray, groups: Sequence[str] | None = None
) -> BoolArray:
    """Per row, whether ``rule`` makes it an ALERT: each machine's (``groups``) smoothed
    ``scores`` in order, from a fresh state (``Pipeline.surprise_step`` row by row)."""
    keys = np.zeros(len(scores), dtype=np.intp) if groups is None else np.asarray(groups)
    out = np.zeros(len(scores), dtype=np.bool_)
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        state: State = {}
        values = [
            likelihood_step(rule.likelihood, state, v, prefix=SURPRISE_PREFIX)
            for v in scores[rows].tolist()
        ]
        out[rows] = np.asarray(values, dtype=np.float64) > rule.threshold
    return out


#: the state keys' prefix of the likelihood (step 5) and of the surprise (step 6)
LIKELIHOOD_PREFIX: Final = "lk"
SURPRISE_PREFIX: Final = "sp"


def _fresh_copy(state: State) -> State:
    """A copy of a likelihood start state whose lists (and lists of lists) are new."""
    return {
        k: [list(x) if isinstance(x, list) else x for x in v] if isinstance(v, list) else v
        for k, v in state.items()
    }


def likelihood_start(spec: Likelihood, prefix: str = LIKELIHOOD_PREFIX) -> State:
    """A machine's likelihood state before its first score: the long window holds the
    training scores' short means, the distribution is theirs."""
    history = spec.prior[-spec.long :]
    state: State = {
        f"{prefix}:r": [],
        f"{prefix}:p": list(_distribution(spec, history, _prior_spread(spec))),
        f"{prefix}:n": 0,
    }
    if spec.estimate == "robust":
        state[f"{prefix}:h"] = list(history)
        return state
    # the prior in blocks of ``every`` counted from its end: the window the list form would
    # hold at each re-estimation is then a whole number of blocks
    cut = len(history) % spec.every
    chunks = [history[:cut]] if cut else []
    chunks += [history[i : i + spec.every] for i in range(cut, len(history), spec.every)]
    state[f"{prefix}:b"] = [list(_moments(chunk)) for chunk in chunks][-_blocks(spec) :]
    state[f"{prefix}:c"] = [0, 0.0, 0.0]
    return state


def likelihood_step(
    spec: Likelihood, state: State, score: float, *, prefix: str = LIKELIHOOD_PREFIX
) -> float:
    """``-log10`` of the Gaussian tail probability of the mean of the last ``short`` scores
    under the distribution estimated before this reading; then the long window takes the
    mean and, every ``every`` readings, the distribution is estimated again (Numenta's
    order: a reading is judged by what came before it)."""
    r_key, p_key, n_key, h_key, b_key, c_key = _state_keys(prefix)
    if p_key not in state:
        state.update(likelihood_start(spec, prefix))
    recent: list[float] = state[r_key]
    recent.append(float(score))
    del recent[: -spec.short]
    level = _mean(recent)
    centre, spread = state[p_key]
    out = _tail_score((level - centre) / spread)
    state[n_key] = int(state[n_key]) + 1
    due = state[n_key] % spec.every == 0
    if spec.estimate == "robust":
        history: list[float] = state[h_key]
        history.append(level)
        del history[: -spec.long]
        if due:
            state[p_key] = list(_robust_normal(history, _prior_spread(spec)))
        return out
    if math.isfinite(level):  # Welford: the open block's count, mean, squared deviations
        block = state[c_key]
        block[0] = n = int(block[0]) + 1
        delta = level - block[1]
        block[1] += delta / n
        block[2] += delta * (level - block[1])
    if due:
        blocks: list[list[float]] = state[b_key]
        blocks.append(state[c_key])
        del blocks[: -_blocks(spec)]
        state[c_key] = [0, 0.0, 0.0]
        state[p_key] = list(_pooled(blocks, _prior_spread(spec)))
    return out


@functools.cache
def _state_keys(prefix: str) -> tuple[str, str, str, str, str, str]:
    """The likelihood state's keys under ``prefix`` (recent, distribution, count, history,
    blocks, open block)."""
    return tuple(f"{prefix}:{k}" for k in "rpnhbc")  # type: ignore[return-value]


def _blocks(spec: Likelihood) -> int:
    """How many closed blocks of ``every`` values make the long window."""
    return max(1, math.ceil(spec.long / spec.every))


def _moments(values: Sequence[float]) -> tuple[int, float, float]:
    """Count, mean and sum of squared deviations of the finite ``values``."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return 0, 0.0, 0.0
    mean = float(np.mean(x))
    return len(x), mean, float(np.sum((x - mean) ** 2))


def _pooled(blocks: Sequence[Sequence[float]], floor: float) -> tuple[float, float]:
    """Mean and standard deviation of the values the ``blocks`` (count, mean, squared
    deviations) summarise (Chan et al.'s pairwise combination), the spread never below
    ``floor`` nor a tiny positive value."""
    n, mean, m2 = 0, 0.0, 0.0
    for count, block_mean, block_m2 in blocks:
        if not count:
            continue
        total = n + int(count)
        delta = block_mean - mean
        mean += delta * count / total
        m2 += block_m2 + delta * delta * n * count / total
        n = total
    if n == 0:
        return 0.0, max(floor, 1e-12)
    return mean, max(math.sqrt(max(m2, 0.0) / n), floor, 1e-12 * max(1.0, abs(mean)))


def likelihood_scores(spec: Likelihood, scores: FloatArray) -> FloatArray:
    """Batch form of ``likelihood_step`` over one machine's scores in order."""
    state = likelihood_start(spec)
    return np.array([likelihood_step(spec, state, v) for v in scores.tolist()], dtype=np.float64)


def likelihood_for(
    scores: FloatArray,
    groups: Sequence[str] | None = None,
    *,
    estimate: Literal["robust", "normal"] = LIKELIHOOD_ESTIMATE,
) -> Likelihood:
    """The likelihood step whose long window starts with the training ``scores`` (smoothed,
    out of sample): each machine's short means in time order, machines one after another,
    at most ``long`` of them, evenly spaced."""
    short, long = LIKELIHOOD_SHORT, LIKELIHOOD_LONG
    keys = np.zeros(len(scores), dtype=np.intp) if groups is None else np.asarray(groups)
    means: list[float] = []
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        means += _window_op("mean", scores[rows], short).tolist()
    if len(means) > long:
        picks = np.linspace(0, len(means) - 1, long).round().astype(np.intp)
        means = [means[i] for i in picks.tolist()]
    return Likelihood(short=short, long=long, prior=[float(v) for v in means], estimate=estimate)


def likelihood_threshold(far: float) -> float:
    """The likelihood's alarm threshold for a target false-alarm rate: ``-log10(far)``, the
    level of a recent score mean seen once in ``1 / far`` readings."""
    return -math.log10(far)


def _prior_spread(spec: Likelihood) -> float:
    """The spread floor: ``LIKELIHOOD_FLOOR`` of the training scores' spread."""
    return LIKELIHOOD_FLOOR * _distribution(spec, spec.prior, 0.0)[1]


def _distribution(spec: Likelihood, values: Sequence[float], floor: float) -> tuple[float, float]:
    """Centre and spread of the long window as ``spec.estimate`` says."""
    if spec.estimate == "robust":
        return _robust_normal(values, floor)
    return _normal(values, floor)


def _normal(values: Sequence[float], floor: float) -> tuple[float, float]:
    """Mean and standard deviation of the finite ``values``, the spread never below
    ``floor`` nor a tiny positive value."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return 0.0, max(floor, 1e-12)
    centre = float(np.mean(x))
    return centre, max(float(np.std(x)), floor, 1e-12 * max(1.0, abs(centre)))


def _robust_normal(values: Sequence[float], floor: float) -> tuple[float, float]:
    """Median and 1.4826 MAD of ``values`` (standard deviation when the MAD is 0), never
    below ``floor`` nor a tiny positive value."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return 0.0, max(floor, 1e-12)
    centre = float(np.median(x))
    spread = 1.4826 * float(np.median(np.abs(x - centre)))
    if not spread > 0.0:
        spread = float(np.std(x))
    return centre, max(spread, floor, 1e-12 * max(1.0, abs(centre)))


def _tail_score(z: float) -> float:
    """``-log10 Q(z)`` (Q the standard normal tail), capped at ``LIKELIHOOD_CAP``; NaN in,
    the cap out (an unreadable score is not a reassuring one)."""
    if not math.isfinite(z):
        return 0.0 if z < 0 else LIKELIHOOD_CAP
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    if tail <= 0.0:
        return LIKELIHOOD_CAP
    return min(-math.log10(tail), LIKELIHOOD_CAP)


_MOMENT_OPS: Final = frozenset({"mean", "std", "logstd"})
# The streaming plan's step codes (``Pipeline._plan``).
_RAW, _MEAN, _STD, _LOGSTD, _OTHER, _BASE, _VOL = range(7)
_MOMENT_CODES: Final = {"mean": _MEAN, "std": _STD, "logstd": _LOGSTD}


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, exactly summed: one helper for both forms."""
    n = len(values)
    m = math.fsum(values) / n
    return m, math.sqrt(math.fsum([(v - m) * (v - m) for v in values]) / n)


def _from_moments(op: str, moments: tuple[float, float]) -> float:
    """``mean``, ``std`` or ``logstd`` from a window's (mean, std)."""
    if op == "mean":
        return moments[0]
    if op == "std":
        return moments[1]
    return math.log(moments[1] + LOGSTD_FLOOR)


def _fit_fill(steps: Sequence[Step], full: FloatArray) -> list[Fill]:
    """Warm-up rules from ``full`` (training feature rows whose windows were all full): for
    each count of readings seen before every window is full, each windowed feature not yet
    valid is fitted by least squares on the valid raw/windowed features of its channel (its
    median alone when none is valid, or too few rows)."""
    needs = [min_periods(s) for s in steps]
    rules: list[Fill] = []
    for seen in range(1, max([*needs, 1])):
        for j, s in enumerate(steps):
            if s.op not in WINDOW_OPS or needs[j] <= seen:
                continue
            inputs = [
                k
                for k, t in enumerate(steps)
                if t.channel == s.channel and t.op in ("raw", *WINDOW_OPS) and needs[k] <= seen
            ]
            target = full[:, j]
            if len(full) <= 2 * (len(inputs) + 1) or not np.isfinite(full[:, inputs]).all():
                inputs = []
            coef: list[float] = []
            if inputs:
                design = np.column_stack([np.ones(len(full)), full[:, inputs]])
                solution = np.linalg.lstsq(design, target, rcond=None)[0]
                intercept, coef = float(solution[0]), [float(c) for c in solution[1:]]
            else:
                intercept = float(np.median(target)) if len(target) else 0.0
            if not (math.isfinite(intercept) and all(math.isfinite(c) for c in coef)):
                intercept, coef, inputs = 0.0, [], []
            rules.append(Fill(readings=seen, step=j, intercept=intercept, inputs=inputs, coef=coef))
    return rules


def _positions(groups: Sequence[str] | None, n: int) -> npt.NDArray[np.intp]:
    """Each row's index within its group's rows (0 = the machine's first reading)."""
    if groups is None:
        return np.arange(n)
    seen: dict[str, int] = {}
    out = np.empty(n, dtype=np.intp)
    for i, key in enumerate(groups):
        position = seen.get(key, 0)
        out[i] = position
        seen[key] = position + 1
    return out


def _baseline_feature(
    code: int,
    arg: tuple[int, str],
    s: Step,
    *,
    state: State,
    z: Mapping[str, float],
    moments: Sequence[tuple[float, float]],
) -> float:
    """A ``base`` or ``vol`` feature from its window's shared (mean, std) pass."""
    slot, key = arg
    if code == _BASE:
        return _base_step(state, key, z[s.channel], moments[slot][0], s.span)
    if len(state[f"z:{s.channel}"]) < s.window:
        return 0.0
    return _vol_step(state, key, math.log(moments[slot][1] + LOGSTD_FLOOR), s.span)


def baseline_key(index: int, step: Step) -> str:
    """Where a machine's window state keeps step ``index``'s slow baseline (one per step, so
    two baseline steps of one channel never share one)."""
    return f"{'b' if step.op == 'base' else 'v'}{index}:{step.channel}"


def baseline_moves(spec: PipelineSpec, state: State) -> dict[str, float]:
    """How far each ``base`` baseline of a machine has moved from the training centre, in
    training scales of its channel (empty before its first reading)."""
    out: dict[str, float] = {}
    for j, s in enumerate(spec.steps):
        held = state.get(baseline_key(j, s))
        if s.op == "base" and held is not None:
            out[s.name] = round(float(held[0]), 3)
    return out


def _base_step(state: State, key: str, z: float, mean: float, span: int) -> float:
    """``mean`` (of the recent z) minus the slow baseline level before this reading, over its
    slow spread; then level and variance follow the reading unless it is more than
    ``BASE_STEP`` spreads away (the same arithmetic in batch and streaming)."""
    held = state.get(key)
    if held is None:
        level, var = (z if math.isfinite(z) else 0.0), 1.0
    else:
        level, var = float(held[0]), float(held[1])
    spread = math.sqrt(var)
    out = (mean - level) / spread
    gap = z - level
    # Frozen while the reading is far from it (a fault, not drift): the baseline never
    # learns an anomaly as the new normal; drift of normal operation stays within reach.
    if abs(gap) <= BASE_STEP * spread:
        level += gap / span
        var += (gap * gap - var) / (SPREAD_SPANS * span)
        var = max(var, BASE_FLOOR)
    state[key] = [level, var]
    return out


def _vol_step(state: State, key: str, logstd: float, span: int) -> float:
    """``logstd`` minus its slow baseline; the baseline then follows with time constant
    ``span`` unless the gap is beyond ``VOL_GATE`` (started at the first full window)."""
    baseline = state.get(key)
    if baseline is None:
        baseline = logstd if math.isfinite(logstd) else 0.0
    gap = logstd - baseline
    # frozen while the variability is far from its baseline (a noise burst, an oscillation)
    state[key] = baseline + gap / span if abs(gap) <= VOL_GATE else baseline
    return gap


def _flat_tail(values: Sequence[float], window: int) -> float:
    """Share of the last ``window`` changes (at most) that were no change."""
    recent = values[-window - 1 :]
    changes = len(recent) - 1
    if changes <= 0:
        return 0.0
    same = sum(1 for a, b in itertools.pairwise(recent) if a == b)
    return same / window


def _flat(values: FloatArray, window: int) -> FloatArray:
    listed = values.tolist()
    return np.array(
        [_flat_tail(listed[max(0, i - window) : i + 1], window) for i in range(len(listed))],
        dtype=np.float64,
    )


def _window_op(op: str, z: FloatArray, window: int) -> FloatArray:
    """Batch form of one windowed operation (same arithmetic as the streaming form)."""
    values = z.tolist()
    out = np.empty(len(values), dtype=np.float64)
    for i in range(len(values)):
        if op == "roc":
            out[i] = values[i] - values[i - 1] if i else 0.0
            continue
        if op == "dev":
            past = values[max(0, i - window) : i]
            out[i] = values[i] - _mean(past) if past else 0.0
            continue
        win = values[max(0, i - window + 1) : i + 1]
        if op in _MOMENT_OPS:
            out[i] = _from_moments(op, _mean_std(win))
        elif op == "min":
            out[i] = min(win)
        else:
            out[i] = max(win)
    return out
