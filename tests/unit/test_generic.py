"""Generic models on any machine's data: training, thresholds, families, online == offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factorywatch.channels import canonical
from factorywatch.contracts import Telemetry
from factorywatch.detector.batch_scoring import score
from factorywatch.errors import DatasetError
from factorywatch.model import artifact
from factorywatch.model.calibration import folds
from factorywatch.model.generic import (
    DEFAULT_WINDOW,
    fit_columns,
    fit_recording,
    forward_scores,
    score_recording,
)
from factorywatch.model.pipeline import Pipeline, Step
from factorywatch.model.recording import Recording
from factorywatch.sensors.scenarios import generate

T0 = 1_700_000_000.0


def recording(kinds: list[str], seed: int, rows: int = 1200) -> Recording:
    """A scenario run as an in-memory recording (channel names mapped)."""
    run = generate(kinds, seed=seed, rows=rows)
    columns = {canonical(c): np.array(v) for c, v in run.values.items()}
    return Recording(
        path=Path(f"run{seed}.csv"),
        sha256="-",
        channels=list(columns),
        columns=columns,
        labels=np.array(run.labels),
    )


def first(n: int, rows: int) -> np.ndarray:
    """A training mask of the first ``n`` of ``rows`` rows."""
    mask = np.zeros(rows, dtype=np.bool_)
    mask[:n] = True
    return mask


@pytest.mark.slow
def test_false_alarm_rate_holds_after_training() -> None:
    """Trained on 400 normal rows at the default target (2 %), later normal rows alarm on no
    more than the target."""
    alarms, total = 0, 0
    for seed in (11, 12, 13):
        rec = recording([], seed, rows=1400)
        model = fit_recording(rec, first(400, rec.rows), trees=100)
        flagged = score_recording(model, rec.columns).flagged[400:]
        alarms, total = alarms + int(flagged.sum()), total + len(flagged)
    assert alarms / total <= 0.02


@pytest.mark.parametrize("family", ["iforest", "pca"])
def test_calibration_scores_look_forward_in_time_only(family: str) -> None:
    """Each block after the first is scored by a model of the blocks before it: what comes
    later (here, a wild last block) changes no earlier block's calibration score."""
    rng = np.random.default_rng(3)
    columns = {"a": rng.normal(size=400), "b": rng.normal(size=400)}
    pipeline = Pipeline.fit(columns, [Step(op="raw", channel=c) for c in columns])
    named = pipeline.feature_rows(columns)
    fold = folds(400)
    wild = named.copy()
    wild[fold == 4] += 50.0
    calm = forward_scores(pipeline, named, fold, family=family, seed=0, trees=50)
    later_wild = forward_scores(pipeline, wild, fold, family=family, seed=0, trees=50)
    middle = (fold >= 1) & (fold <= 3)
    assert np.array_equal(calm[middle], later_wild[middle])
    assert not np.array_equal(calm[fold == 0], later_wild[fold == 0])  # scored by later blocks


@pytest.mark.parametrize("family", ["iforest", "pca"])
def test_anomalies_are_found(family: str) -> None:
    """A step change and a stuck sensor are flagged; normal rows mostly are not (the
    ``window`` rows after an episode still hold it in their windows: not counted)."""
    rec = recording(["step_change", "stuck_sensor"], seed=3)
    model = fit_recording(rec, first(400, rec.rows), family=family, trees=100)
    flagged = score_recording(model, rec.columns).flagged[400:]
    labels = rec.labels[400:].astype(bool)  # type: ignore[index]
    assert flagged[labels].mean() >= 0.7
    echo = np.zeros_like(labels)
    for end in np.flatnonzero(labels[:-1] & ~labels[1:]) + 1:
        echo[end : end + DEFAULT_WINDOW] = True
    assert flagged[~labels & ~echo].mean() <= 0.03


def test_constant_and_huge_values_are_handled() -> None:
    """A channel constant in training is left to the envelope; a huge value stays finite."""
    rec = recording([], seed=5, rows=600)
    rec.columns["valve_open"] = np.ones(rec.rows)
    rec.channels.append("valve_open")
    model = fit_recording(rec, first(400, rec.rows), trees=50)
    assert "valve_open" not in model.pipeline.channels
    assert model.card.params["constant_channels"] == "valve_open"
    columns = {c: v.copy() for c, v in rec.columns.items()}
    columns["valve_open"][500] = 0.0
    columns["current"][550] = 1e300
    scored = score_recording(model, columns)
    assert scored.flagged[500]
    assert scored.flagged[550]
    assert np.isfinite(scored.score).all()


def test_too_little_training_data_is_a_clear_error() -> None:
    """Training on a handful of rows fails with a message, not a numpy error."""
    rec = recording([], seed=6, rows=200)
    with pytest.raises(DatasetError, match="too few"):
        fit_recording(rec, first(10, rec.rows))


@pytest.mark.parametrize(
    ("family", "likelihood"),
    [("iforest", False), ("pca", False), ("mahalanobis", False), ("iforest", True)],
)
def test_batch_scoring_streams_the_same_scores(
    tmp_path: Path, family: str, likelihood: bool
) -> None:
    """Saved, loaded and fed v2 readings with the CSV's raw names, the detector's batch scoring
    gives each machine exactly the batch evaluation's scores (windows and the anomaly
    likelihood's state kept per machine)."""
    rec = recording(["noise_burst"], seed=8, rows=700)
    model = fit_recording(rec, first(400, rec.rows), family=family, trees=50, likelihood=likelihood)
    artifact.save_generic(tmp_path, model.scorer, model.card)
    loaded = artifact.load(tmp_path, model.card.version)
    expected = score_recording(model, rec.columns)
    run = generate(["noise_burst"], seed=8, rows=700)  # the same values, raw names
    readings = [
        Telemetry.model_validate(
            {
                "schema_version": 2,
                "machine_id": machine,
                "line": "line1",
                "seq": i,
                "ts": T0 + i,
                "readings": {name: values[i] for name, values in run.values.items()},
            }
        )
        for i in range(700)
        for machine in ("pump-1", "pump-2")  # two machines interleaved, one state each
    ]
    verdicts = []
    for start in range(0, len(readings), 64):  # in batches, as the detector receives them
        batch = readings[start : start + 64]
        verdicts += score(loaded, batch, [0.0] * len(batch), explain_top_k=3)
    for machine in ("pump-1", "pump-2"):
        got = np.array([v.score for v in verdicts if v.machine_id == machine])
        assert np.allclose(got, expected.score, rtol=1e-9)
        status = [v.status == "ALERT" for v in verdicts if v.machine_id == machine]
        assert status == expected.flagged.tolist()


def test_calibration_window_fits_on_live_columns() -> None:
    """fit_columns trains on a machine's first readings alone (PCA: numpy only)."""
    rec = recording([], seed=21, rows=300)
    model = fit_columns(rec.columns, family="pca", name="pump-1")
    assert model.card.data.rows == 300
    assert model.card.scorer_family == "pca"
    assert score_recording(model, rec.columns).flagged.mean() < 0.05


def test_the_mahalanobis_family_sees_a_broken_relationship() -> None:
    """Two channels that move together in training: a reading that keeps each within its
    own range but breaks their relationship scores far above every training row."""
    rng = np.random.default_rng(4)
    base = rng.normal(0.0, 1.0, 500)
    columns = {"a": base + rng.normal(0, 0.05, 500), "b": base + rng.normal(0, 0.05, 500)}
    model = fit_columns(columns, family="mahalanobis", preset="point", name="m1")
    assert model.card.scorer_family == "mahalanobis"
    broken = {"a": np.array([1.5]), "b": np.array([-1.5])}
    together = {"a": np.array([1.5]), "b": np.array([1.5])}
    assert score_recording(model, broken).score[0] > 10 * model.card.threshold
    assert score_recording(model, together).score[0] < model.card.threshold
