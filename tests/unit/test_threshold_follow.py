"""A machine's threshold follows its normal score level: offline == engine, bounded, journaled."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine, EngineSettings
from factorywatch.model import artifact
from factorywatch.model.alert_rule import AlertRule
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.generic import Trained, fit_columns, score_recording
from factorywatch.model.threshold import Follow
from factorywatch.topics import Topics

TOPICS = Topics("unitfollow")
NOW = time.time()
CHANNELS = ("a", "b", "c")
TRAIN = 400


def _stream(rng: np.random.Generator, n: int, shift: float) -> dict[str, np.ndarray]:
    """Three related channels; after the training rows, channel ``a`` wanders off by up to
    ``shift`` of its noise while the others do not (a score level that rises while normal)."""
    base = rng.normal(size=n)
    columns = {
        c: 10.0 * (i + 1) + base * (i + 1) + rng.normal(size=n) for i, c in enumerate(CHANNELS)
    }
    ramp = np.clip((np.arange(n) - TRAIN) / 600.0, 0.0, 1.0)
    columns["a"] = columns["a"] + shift * ramp
    return columns


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trained, LoadedModel]:
    """A windowed forest with the default (following) threshold, as fitted and as loaded by
    the detector; without re-baselining (``test_rebaseline.py``), so that a drift's long
    alarm stays one."""
    columns = _stream(np.random.default_rng(1), TRAIN, 0.0)
    trained = fit_columns(columns, trees=40, seed=1, rebaseline=False)
    assert trained.card.follow() is not None
    folder = tmp_path_factory.mktemp("follow")
    artifact.save_generic(folder, trained.scorer, trained.card)
    return trained, artifact.load(folder, trained.card.version)


def _messages(columns: dict[str, np.ndarray]) -> list[Received]:
    n = len(columns["a"])
    out = []
    for i in range(n):
        reading = Telemetry(
            machine_id="m1",
            line="line1",
            seq=i,
            ts=NOW,
            readings={c: float(columns[c][i]) for c in CHANNELS},
        )
        out.append(Received(TOPICS.telemetry("line1", "m1"), reading.encode(), NOW, 0.0, i))
    return out


def _verdicts(engine: Engine, messages: list[Received]) -> list[Verdict]:
    return [v for o in engine.handle(messages, NOW) for v in o.verdicts]


def test_engine_follows_exactly_as_the_offline_scoring_and_across_a_restore(
    fitted: tuple[Trained, LoadedModel],
) -> None:
    """The detector judges each reading by the threshold ``score_recording`` (evaluate) uses,
    carries it in the verdict, and a snapshot restored mid-stream goes on where it was."""
    trained, model = fitted
    columns = _stream(np.random.default_rng(2), 1500, shift=2.5)
    offline = score_recording(trained, columns)
    follow = model.card.follow()
    assert follow is not None
    assert offline.surprise is not None
    flags, thresholds = follow.flags(
        offline.score.tolist(),
        (offline.outside | offline.surprise).tolist(),
        model.card.threshold,
        model.card.clear_threshold,
    )
    assert flags == offline.flagged.tolist()

    messages = _messages(columns)
    first = Engine(model, TOPICS, EngineSettings(explain_top_k=0))
    got = []
    for start in range(0, 900, 150):
        got += _verdicts(first, messages[start : start + 150])
    restored = Engine(model, TOPICS, EngineSettings(explain_top_k=0))
    restored.restore(first.snapshot())
    for start in range(900, 1500, 100):
        got += _verdicts(restored, messages[start : start + 100])

    assert [v.seq for v in got] == list(range(1500))
    assert [v.status == "ALERT" for v in got] == flags
    assert [v.threshold for v in got] == thresholds
    assert [v.score for v in got] == offline.score.tolist()
    # it mattered: the level rose, and readings above the card's threshold stayed NORMAL
    assert max(thresholds) > model.card.threshold
    assert any(v.status == "NORMAL" and v.score > model.card.threshold for v in got), (
        "no reading was kept NORMAL by the followed threshold"
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 2.0), st.booleans()), min_size=1, max_size=400),
    st.floats(0.05, 1.0),
    st.floats(1.0, 500.0),
)
def test_the_threshold_never_falls_below_the_cards_nor_rises_past_its_cap(
    rows: list[tuple[float, bool]], spread: float, span: float
) -> None:
    """Following never makes a machine more sensitive than trained, nor deaf: the threshold
    stays within [card, card + cap x spread], and neither ALERT readings nor NORMAL ones
    during an open alert move the level."""
    threshold = 1.0
    follow = Follow(median=threshold - spread, spread=spread, span=span)
    scores = [s for s, _ in rows]
    outside = [o for _, o in rows]
    flags, thresholds = follow.flags(scores, outside, threshold)
    assert all(threshold <= t <= threshold + follow.cap * spread + 1e-12 for t in thresholds)
    rule = AlertRule()
    for i in range(1, len(rows)):
        rule.step(flags[i - 1], True)
        if flags[i - 1] or rule.open:  # never on an ALERT, never while an alert is open
            assert thresholds[i] == thresholds[i - 1]


def test_cards_without_following_keep_a_fixed_threshold(tmp_path: Path) -> None:
    """``--no-follow`` (``FitSpec.follow=False``) writes a card whose threshold stays put."""
    columns = _stream(np.random.default_rng(3), TRAIN, 0.0)
    trained = fit_columns(columns, trees=20, seed=3, follow=False)
    assert trained.card.follow() is None
    later = _stream(np.random.default_rng(4), 1200, shift=2.5)
    scores = score_recording(trained, later)
    assert scores.surprise is not None
    assert (
        scores.flagged.tolist()
        == ((scores.score > trained.card.threshold) | scores.outside | scores.surprise).tolist()
    )
