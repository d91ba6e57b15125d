"""Property tests of the feature pipeline: streaming step == batch transform, JSON state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorywatch.model.pipeline import WINDOW_OPS, Likelihood, Pipeline, Step

CHANNELS = ("flow_rate", "pressure")
SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, 1.0, 1e300, -1e300]),  # repeats (stuck) and huge values
)
steps = st.lists(
    st.builds(
        Step,
        op=st.sampled_from(["raw", *WINDOW_OPS]),
        channel=st.sampled_from(CHANNELS),
        window=st.integers(min_value=1, max_value=6),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda s: s.name,
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], list[str]]:
    """Columns of 1-40 readings of up to three machines, interleaved."""
    n = draw(st.integers(min_value=1, max_value=40))
    columns = {c: np.array(draw(st.lists(values, min_size=n, max_size=n))) for c in CHANNELS}
    groups = draw(st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=n, max_size=n))
    return columns, groups


def _fitted(chosen: list[Step], smooth: int, whiten: bool) -> Pipeline:
    rng = np.random.default_rng(0)
    train = {c: rng.normal(10.0, 2.0, 200) for c in CHANNELS}
    pipeline = Pipeline.fit(train, chosen, smooth=smooth)
    if whiten:
        pipeline = pipeline.with_whitening(pipeline.feature_rows(train))
    return pipeline


@SETTINGS
@given(steps, frames(), st.integers(min_value=1, max_value=4), st.booleans())
def test_streaming_equals_batch(
    chosen: list[Step], frame: tuple[dict[str, np.ndarray], list[str]], smooth: int, whiten: bool
) -> None:
    """Stepping each machine's readings one by one gives the batch transform's rows."""
    columns, groups = frame
    pipeline = _fitted(chosen, smooth, whiten)
    batch = pipeline.transform(columns, groups=groups)
    states: dict[str, dict[str, object]] = {}
    streamed = []
    for i, machine in enumerate(groups):
        row = {c: float(columns[c][i]) for c in CHANNELS}
        streamed.append(pipeline.step(states.setdefault(machine, {}), row))
    # whitening is a matrix product, summed in another order for one row than for many:
    # equal up to rounding relative to the row's largest value
    scale = np.maximum(1.0, np.abs(batch).max(axis=1, initial=0.0, where=np.isfinite(batch)))
    tolerance = 1e-9 * scale[:, None]
    assert (
        np.isclose(np.array(streamed), batch, rtol=1e-9, atol=0.0, equal_nan=True)
        | (np.abs(np.array(streamed) - batch) <= tolerance)
    ).all()
    assert np.isfinite(batch).all()
    scores = np.arange(len(groups), dtype=np.float64)
    smoothed = [
        pipeline.smooth_step(states[m], float(s)) for m, s in zip(groups, scores, strict=True)
    ]
    assert np.allclose(smoothed, pipeline.smooth_scores(scores, groups))


likelihoods = st.builds(
    Likelihood,
    short=st.integers(min_value=1, max_value=5),
    long=st.integers(min_value=2, max_value=25),
    every=st.integers(min_value=1, max_value=7),
    prior=st.lists(st.floats(min_value=-5.0, max_value=5.0), min_size=2, max_size=30),
    estimate=st.sampled_from(["robust", "normal"]),
)
scores_and_groups = st.integers(min_value=1, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(
            st.one_of(
                st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
                st.sampled_from([0.0, 0.5, 1e12, float("nan")]),  # ties, extremes, NaN
            ),
            min_size=n,
            max_size=n,
        ),
        st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=n, max_size=n),
    )
)


@SETTINGS
@given(likelihoods, scores_and_groups, st.integers(min_value=1, max_value=3))
def test_likelihood_streaming_equals_batch(
    likelihood: Likelihood, data: tuple[list[float], list[str]], smooth: int
) -> None:
    """The anomaly likelihood stepped per machine, through a JSON snapshot before every
    score, equals the batch scores, and is finite and never negative."""
    raw, groups = data
    pipeline = _fitted([Step(op="raw", channel="flow_rate")], smooth, whiten=False)
    pipeline = Pipeline(pipeline.spec.model_copy(update={"likelihood": likelihood}))
    scores = np.array(raw, dtype=np.float64)
    batch = pipeline.smooth_scores(scores, groups)
    states: dict[str, dict[str, object]] = {}
    streamed = []
    for machine, score in zip(groups, raw, strict=True):
        states = json.loads(json.dumps(states))  # journaled and restored before every score
        streamed.append(pipeline.smooth_step(states.setdefault(machine, {}), score))
    assert np.allclose(np.array(streamed), batch, rtol=1e-12, atol=0.0)
    assert np.isfinite(batch).all()
    assert (batch >= 0.0).all()
    # the state stays bounded: the long window's values, or its blocks' moments
    for state in states.values():
        kept = state["lk:h"] if likelihood.estimate == "robust" else state["lk:b"]
        assert len(kept) <= likelihood.long  # type: ignore[arg-type]


@SETTINGS
@given(steps, frames())
def test_state_survives_a_json_round_trip(
    chosen: list[Step], frame: tuple[dict[str, np.ndarray], list[str]]
) -> None:
    """A machine's window state is plain JSON: snapshot and restore mid-stream changes nothing."""
    columns, groups = frame
    pipeline = _fitted(chosen, 1, whiten=False)
    straight: dict[str, dict[str, object]] = {}
    restored: dict[str, dict[str, object]] = {}
    for i, machine in enumerate(groups):
        row = {c: float(columns[c][i]) for c in CHANNELS}
        a = pipeline.step(straight.setdefault(machine, {}), row)
        restored = json.loads(json.dumps(restored))  # a snapshot before every reading
        b = pipeline.step(restored.setdefault(machine, {}), row)
        assert a == b


def test_warmup_is_the_longest_window() -> None:
    """Warm-up = readings before every window is full: the longest window minus one."""
    pipeline = Pipeline.fit(
        {"flow_rate": np.arange(10.0)},
        [Step(op="raw", channel="flow_rate"), Step(op="mean", channel="flow_rate", window=7)],
        smooth=3,
    )
    assert pipeline.warmup == 6
    assert pipeline.required_channels == ("flow_rate",)


def test_a_partial_window_is_imputed_until_the_window_is_full() -> None:
    """A stuck start (std 0) does not show while the window fills; from the window-th
    reading on the feature is the window's own statistic again (ln 0.001 for std 0)."""
    rng = np.random.default_rng(1)
    pipeline = Pipeline.fit(
        {"flow_rate": rng.normal(10.0, 2.0, 500)},
        [Step(op="raw", channel="flow_rate"), Step(op="logstd", channel="flow_rate", window=5)],
    )
    assert pipeline.spec.fill is not None
    state: dict[str, object] = {}
    logstd = [pipeline.step(state, {"flow_rate": 10.0})[1] for _ in range(6)]
    assert all(v > -1.0 for v in logstd[:4])  # about the training level (ln 1), not ln 0.001
    assert logstd[4] == logstd[5] == pytest.approx(np.log(1e-3))
    assert pipeline.transform({"flow_rate": np.full(6, 10.0)})[:, 1].tolist() == logstd
