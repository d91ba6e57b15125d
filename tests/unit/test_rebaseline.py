"""Re-baselining after a sustained alarm (``model.rebaseline``): offline and in the engine.

A machine trained on its normal readings moves to a new level for good. Without the policy
its alert never clears; with it, once the alert has been open for as many readings as the
model was trained on, the alert clears, the machine recalibrates on its next readings and is
scored by the model fitted on them. The pure engine does exactly what ``replay`` (what
``evaluate`` counts) says, reading by reading, across a snapshot restore mid-window.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import DeadLetter, Telemetry, ThresholdCommand, Verdict
from factorywatch.detector import calibration_window
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine, EngineSettings, Inbound, Outcome
from factorywatch.model import artifact, rebaseline, streams
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.fitspec import FitSpec
from factorywatch.model.generic import Trained, fit_columns, score_recording
from factorywatch.topics import Topics

TOPICS = Topics("unitrebase")
NOW = time.time()
CHANNELS = ("a", "b")
TRAIN = 120
SPEC = FitSpec(family="pca")


def _stream(seed: int, normal: int, shifted: int) -> dict[str, np.ndarray]:
    """``normal`` readings around the training level, then ``shifted`` readings at a level
    eight standard deviations higher (a new operating point)."""
    rng = np.random.default_rng(seed)
    n = normal + shifted
    base = rng.normal(size=n)
    columns = {c: 10.0 * (i + 1) + base + rng.normal(size=n) for i, c in enumerate(CHANNELS)}
    for values in columns.values():
        values[normal:] += 8.0 * np.std(values[:normal])
    return columns


def _head(columns: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {c: v[:n].copy() for c, v in columns.items()}


def _tail(columns: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {c: v[n:].copy() for c, v in columns.items()}


@pytest.fixture(scope="module")
def stream() -> dict[str, np.ndarray]:
    """Training rows, 150 normal readings, then 900 at the new level."""
    return _stream(7, TRAIN + 150, 900)


@pytest.fixture(scope="module")
def trained(stream: dict[str, np.ndarray]) -> Trained:
    return fit_columns(_head(stream, TRAIN), SPEC)


def test_the_card_names_its_training_rows_and_its_fit(trained: Trained) -> None:
    """N is the model's training rows; ``spec_of`` gives back the spec it was fitted with;
    ``--no-rebaseline`` (``FitSpec.rebaseline=False``) writes no N."""
    assert trained.card.rebaseline_readings() == TRAIN
    assert rebaseline.spec_of(trained.card) == SPEC
    for spec in (
        FitSpec(family="pca", preset="point", smooth=3, far=0.05, surprise=None, follow=False),
        FitSpec(family="pca", likelihood=True, window=7, seed=4),
    ):
        card = fit_columns(_head(_stream(1, TRAIN, 0), TRAIN), spec).card
        assert rebaseline.spec_of(card) == spec
    off = fit_columns(_head(_stream(1, TRAIN, 0), TRAIN), SPEC.replace(rebaseline=False))
    assert off.card.rebaseline_readings() is None


def test_a_sustained_move_re_baselines_and_the_new_level_is_normal(
    stream: dict[str, np.ndarray], trained: Trained
) -> None:
    """Without the policy the alarm opened by the move never clears (every reading after
    it ALERT); with it, the alarm clears after N readings open, N readings recalibrate and
    the new level is NORMAL (a share of ALERT readings like the training rows' target)."""
    after = _tail(stream, TRAIN)
    moved = 150
    fixed = score_recording(trained, after)
    assert fixed.flagged[moved + 20 :].mean() > 0.99
    assert streams.alarms(fixed.flagged) == [int(np.argmax(fixed.flagged[moved:])) + moved + 2]

    replayed = rebaseline.replay(trained, after)
    scores = replayed.scores
    assert scores.calibrating is not None
    assert scores.calm is not None
    last = rebaseline.sustained(fixed.flagged.tolist(), (fixed.score <= 1e300).tolist(), TRAIN)
    assert last is not None
    first = rebaseline.sustained(
        fixed.flagged.tolist(),
        (fixed.score <= (trained.card.clear_threshold or np.inf)).tolist(),
        TRAIN,
    )
    assert first == last  # the scores stay above the clear threshold: it never clears
    window = np.flatnonzero(scores.calibrating)
    assert window.tolist() == list(range(last + 1, last + 1 + TRAIN))
    # identical to the fixed model until the re-baseline
    np.testing.assert_array_equal(scores.flagged[: last + 1], fixed.flagged[: last + 1])
    np.testing.assert_array_equal(scores.score[: last + 1], fixed.score[: last + 1])
    assert not scores.flagged[window].any()
    assert [start for start, _ in replayed.parts] == [0, last + 1 + TRAIN]
    new_level = scores.flagged[last + 1 + TRAIN :]
    assert new_level.mean() < 0.1
    # the move's alarm, cleared by the re-baseline; at the new level, a model fitted on
    # 120 readings for a 2 % target raises the odd alarm, not a standing one
    raised = streams.alarms(scores.flagged, clear=scores.calm, calibrating=scores.calibrating)
    assert raised[0] == streams.alarms(fixed.flagged)[0] < last
    assert all(r > last + TRAIN for r in raised[1:])
    assert len(raised) <= 3


def _message(seq: int, values: dict[str, float]) -> Received:
    reading = Telemetry(
        machine_id="press-1", line="line1", seq=seq, ts=NOW + seq * 0.001, readings=values
    )
    return Received(
        TOPICS.telemetry("line1", "press-1"), reading.encode(), NOW, time.perf_counter(), seq
    )


def _loaded(folder: Path, trained: Trained) -> LoadedModel:
    artifact.save_generic(folder, trained.scorer, trained.card)
    return artifact.load(folder, trained.card.version)


def _feed(engine: Engine, rows: list[dict[str, float]], start: int, batch: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for at in range(0, len(rows), batch):
        chunk = rows[at : at + batch]
        outcomes += engine.handle([_message(start + at + i, r) for i, r in enumerate(chunk)], NOW)
    return outcomes


def test_the_engine_re_baselines_exactly_as_replay_says(
    stream: dict[str, np.ndarray], trained: Trained, tmp_path: Path
) -> None:
    """The pure engine, fed the same readings in batches: the same verdicts as ``replay``
    up to the re-baseline; the alert cleared there (its event says why); N CALIBRATING
    verdicts, a snapshot restore among them; one fit request with the card's spec on exactly
    those readings; once its model is bound, the same scores and statuses as ``replay``."""
    after = _tail(stream, TRAIN)
    rows = [dict(zip(CHANNELS, r, strict=True)) for r in zip(*after.values(), strict=True)]
    replayed = rebaseline.replay(trained, after).scores
    assert replayed.calibrating is not None
    window = np.flatnonzero(replayed.calibrating)
    start, end = int(window[0]), int(window[-1]) + 1

    engine = Engine(_loaded(tmp_path / "default", trained), TOPICS, EngineSettings())
    outcomes = _feed(engine, rows[: start + 40], 0, 25)
    verdicts: list[Verdict] = [v for o in outcomes for v in o.verdicts]
    events = [e for o in outcomes for e in o.events]
    notices = [n for o in outcomes for n in o.notices]
    assert [v.status == "ALERT" for v in verdicts[:start]] == replayed.flagged[:start].tolist()
    assert [v.score for v in verdicts[:start]] == replayed.score[:start].tolist()
    raised = streams.alarms(replayed.flagged, clear=replayed.calm, calibrating=replayed.calibrating)
    assert [e.seq for e in events if e.event == "ALERT_RAISED"] == [r for r in raised if r < start]
    assert events[-1].event == "ALERT_CLEARED"
    assert events[-1].seq == start - 1
    assert events[-1].note is not None
    assert "re-baselined" in events[-1].note
    assert sum(e.event == "ALERT_CLEARED" for e in events) == len(events) // 2
    assert [n["event"] for n in notices] == ["rebaseline_started"]
    assert {v.status for v in verdicts[start:]} == {"CALIBRATING"}

    # a restart mid-window: the window and the policy's state come back from the snapshot
    restored = Engine(_loaded(tmp_path / "default2", trained), TOPICS, EngineSettings())
    restored.restore(engine.snapshot())
    outcomes = _feed(restored, rows[start + 40 : end + 30], start + 40, 25)
    verdicts = [v for o in outcomes for v in o.verdicts]
    assert {v.status for v in verdicts} == {"CALIBRATING"}  # fitting: the model is not bound
    (request,) = restored.take_fit_requests()
    assert request.spec == rebaseline.spec_of(trained.card)
    assert request.leaving == trained.card.version
    assert request.channels == CHANNELS
    assert [list(r) for r in request.rows] == [
        [rows[i][c] for c in CHANNELS] for i in range(start, end)
    ]
    fitted = calibration_window.fit(request)
    restored.bind("press-1", _loaded(tmp_path / "own", fitted))

    outcomes = _feed(restored, rows[end + 30 :], end + 30, 25)
    served = [v for o in outcomes for v in o.verdicts]
    assert {v.model_version for v in served} == {fitted.card.version}
    # fresh state from the first reading it scores: replay's tail from that reading
    offline = score_recording(fitted, _tail(after, end + 30))
    assert [v.score for v in served] == offline.score.tolist()
    assert [v.status == "ALERT" for v in served] == offline.flagged.tolist()
    clear = fitted.card.clear_threshold
    assert clear is not None
    tail_alarms = streams.alarms(offline.flagged, clear=offline.score <= clear)
    assert [e.seq for o in outcomes for e in o.events if e.event == "ALERT_RAISED"] == [
        end + 30 + r for r in tail_alarms
    ]


def test_off_in_the_settings_the_alarm_stays_open(
    stream: dict[str, np.ndarray], trained: Trained, tmp_path: Path
) -> None:
    """``rebaseline=False`` (no model directory, or FACTORYWATCH_DETECTOR_REBASELINE=false):
    the alert stays open and no window starts."""
    after = _tail(stream, TRAIN)
    rows = [dict(zip(CHANNELS, r, strict=True)) for r in zip(*after.values(), strict=True)]
    engine = Engine(
        _loaded(tmp_path / "default", trained), TOPICS, EngineSettings(rebaseline=False)
    )
    outcomes = _feed(engine, rows, 0, 50)
    events = [e.event for o in outcomes for e in o.events]
    assert events[-1] == "ALERT_RAISED"  # the move's, open for good
    assert "CALIBRATING" not in {v.status for o in outcomes for v in o.verdicts}
    assert engine.take_fit_requests() == []


def _threshold(action: str, at: float) -> Inbound:
    body = ThresholdCommand(machine_id="press-1", action=action, by="ann", at=at)  # type: ignore[arg-type]
    return Inbound(f"{TOPICS.root}/commands/line1/press-1/threshold", body.encode(), NOW, 0.0)


def test_an_operator_recalibrates_a_machine_now(
    stream: dict[str, np.ndarray], trained: Trained, tmp_path: Path
) -> None:
    """``factorywatch threshold M --recalibrate``: the machine's open alert clears at once
    (the note names who), its next N readings are CALIBRATING and fit its new model with
    its card's spec; the same command again changes nothing; a detector that cannot
    re-baseline dead-letters it with the reason."""
    after = _tail(stream, TRAIN)
    rows = [dict(zip(CHANNELS, r, strict=True)) for r in zip(*after.values(), strict=True)]
    moved = 150
    engine = Engine(_loaded(tmp_path / "default", trained), TOPICS, EngineSettings())
    _feed(engine, rows[: moved + 30], 0, 30)
    assert engine.record("press-1").alert_id is not None  # the move opened an alert
    outcomes = engine.handle([_threshold("recalibrate", NOW + 1)], NOW)
    (cleared,) = [e for o in outcomes for e in o.events]
    assert cleared.event == "ALERT_CLEARED"
    assert cleared.note == "recalibrated by ann: its normal operation has changed"
    assert [n["event"] for o in outcomes for n in o.notices] == ["rebaseline_started"]
    again = engine.handle([_threshold("recalibrate", NOW + 1)], NOW)
    assert [e for o in again for e in o.events] == []
    assert [p for o in again for p in o.publishes] == []
    outcomes = _feed(engine, rows[moved + 30 : moved + 30 + TRAIN], moved + 30, 40)
    assert {v.status for o in outcomes for v in o.verdicts} == {"CALIBRATING"}
    (request,) = engine.take_fit_requests()
    assert request.spec == rebaseline.spec_of(trained.card)
    assert len(request.rows) == TRAIN

    off = Engine(_loaded(tmp_path / "default2", trained), TOPICS, EngineSettings(rebaseline=False))
    _feed(off, rows[:10], 0, 10)
    refused = off.handle([_threshold("recalibrate", NOW + 2)], NOW)
    reasons = [
        DeadLetter.model_validate_json(p.payload).reason
        for o in refused
        for p in o.publishes
        if "/deadletter" in p.topic
    ]
    assert reasons == ["cannot_recalibrate"]
