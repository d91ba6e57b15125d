"""The surprise rule (``model.pipeline`` step 6): streaming equals batch, it survives a
restore, it fires on a spike in a calm stretch below the threshold, and it can be left out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factorywatch.model.artifact import card_summary
from factorywatch.model.generic import Trained, fit_columns, forward_far, score_recording
from factorywatch.model.pipeline import State

TRAIN = 400


def _calm(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    base = rng.normal(size=n)
    return {"a": 10.0 + base + 0.3 * rng.normal(size=n), "b": 20.0 + 2 * base + rng.normal(size=n)}


@pytest.fixture(scope="module")
def trained() -> Trained:
    """A windowed forest with the default rules (following threshold, surprise)."""
    return fit_columns(_calm(np.random.default_rng(5), TRAIN), trees=30, seed=5)


def test_new_cards_have_the_rule_and_no_surprise_leaves_it_out(trained: Trained) -> None:
    """The default card carries the rule (threshold -log10 of one in a thousand);
    ``--no-surprise`` and the likelihood score do not."""
    rule = trained.card.pipeline.surprise if trained.card.pipeline else None
    assert rule is not None
    assert rule.threshold == pytest.approx(3.0)
    assert trained.card.params["surprise_rate"] == pytest.approx(0.001)
    columns = _calm(np.random.default_rng(6), TRAIN)
    without = fit_columns(columns, trees=10, seed=6, surprise=None)
    likelihood = fit_columns(columns, trees=10, seed=6, likelihood=True)
    for card in (without.card, likelihood.card):
        assert card.pipeline is not None
        assert card.pipeline.surprise is None
        assert card.params["surprise_rate"] is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=600),
    st.integers(0, 600),
)
def test_streaming_equals_batch_across_a_restore(
    trained: Trained, scores: list[float], cut: int
) -> None:
    """``surprise_step`` reading by reading, with the state written to JSON and read back at
    ``cut`` (a checkpoint), flags exactly the rows ``Pipeline.surprises`` flags."""
    pipeline = trained.pipeline
    batch = pipeline.surprises(np.asarray(scores, dtype=np.float64))
    state: State = {}
    streamed = []
    for i, value in enumerate(scores):
        if i == cut:
            state = json.loads(json.dumps(state))
        streamed.append(pipeline.surprise_step(state, value) is not None)
    assert streamed == batch.tolist()


def test_a_spike_in_a_calm_stretch_is_an_alert_below_the_threshold(trained: Trained) -> None:
    """After a long calm stretch a short burst of readings that score a little above the
    machine's recent level, but not above the card's threshold, is surprising; the same
    readings scored without the rule stay NORMAL."""
    rng = np.random.default_rng(7)
    later = _calm(rng, 1400)
    later["a"][1200:1215] += 3.0  # 10 noise sigmas of `a` but within b's relationship range
    scores = score_recording(trained, later)
    assert scores.surprise is not None
    assert scores.surprise[1200:1230].any()
    assert not scores.surprise[:1200].any() or scores.surprise[:1200].mean() < 0.01
    quiet = fit_columns(_calm(np.random.default_rng(5), TRAIN), trees=30, seed=5, surprise=None)
    plain = score_recording(quiet, later)
    assert plain.surprise is not None
    assert not plain.surprise.any()
    assert (scores.flagged | ~plain.flagged).all(), "the rule only adds ALERTs"


def test_the_forward_estimate_counts_the_rules_alerts_too() -> None:
    """``train``'s forward-in-time false-alarm rate counts what the deployed rules would
    raise on the last training block: a burst there under the threshold but unusual for the
    earlier blocks' scores raises the estimate only when the surprise rule is on."""
    rng = np.random.default_rng(9)
    n, folds = 1000, 5
    scores = 0.45 + 0.01 * rng.normal(size=n)
    scores[900:915] += 0.015  # under a threshold set on the tail, far above the level
    fold = np.minimum(np.arange(n) * folds // n, folds - 1).astype(np.intp)
    plain = forward_far(scores, fold, 0.01)
    with_rule = forward_far(scores, fold, 0.01, surprise=0.001)
    assert with_rule > plain
    assert with_rule - plain >= 5 / 200  # a third of the burst at least


def test_models_list_names_the_threshold_rules(trained: Trained) -> None:
    """`models list` (``card_summary``) says that a model's threshold follows, at what
    rarity its surprise rule fires and after how long an alarm it re-baselines; a model
    without the rules says none of it."""
    summary = card_summary(trained.card)
    assert "threshold follows normal drift up by at most" in summary
    assert "surprise rule: a recent score level rarer than 1 in 1,000" in summary
    assert f"re-baselines after an alarm open {TRAIN:,} readings" in summary
    columns = _calm(np.random.default_rng(8), TRAIN)
    bare = card_summary(
        fit_columns(columns, trees=10, seed=8, surprise=None, follow=False, rebaseline=False).card
    )
    assert "surprise" not in bare
    assert "follows" not in bare
    assert "re-baseline" not in bare
