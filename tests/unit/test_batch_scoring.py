"""batch_scoring.score: one verdict per reading, ALERT iff score > threshold, explanations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector.batch_scoring import score
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.dataset import Dataset, load
from factorywatch.model.train import fit
from factorywatch.sensors.simulator import MachineSimulator
from tests.support import reading as ai4i_reading
from tests.support import small_ai4i_csv

T0 = 1.7e9


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """600 simulated AI4I-shaped readings (``tests.support.small_ai4i_csv``)."""
    return load(small_ai4i_csv(tmp_path_factory.mktemp("data") / "small.csv"), verify=False)


def trained(
    dataset: Dataset, directory: Path, feature_set: str, n_estimators: int = 20
) -> LoadedModel:
    """Fit, save, promote and load a model exactly as the detector would get it."""
    forest, card = fit(dataset, feature_set=feature_set, n_estimators=n_estimators, seed=0)
    artifact.save(directory, forest, card)
    artifact.promote(directory, card.version)
    return artifact.load(directory)


@pytest.fixture(scope="module")
def prototype(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny model on the prototype's features (air temperature and speed)."""
    return trained(dataset, tmp_path_factory.mktemp("prototype"), "prototype")


@pytest.fixture(scope="module")
def physics(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny model on the default physics features."""
    return trained(dataset, tmp_path_factory.mktemp("physics"), "physics")


def typical(rpm: float = 1500.0, seq: int = 0, machine: str = "mill-01") -> Telemetry:
    """An L-type reading with typical values (air 300 K, process 310 K, 40 Nm, 100 min)."""
    return ai4i_reading(machine, seq, rpm, ts=T0 + seq)


def mixed_batch(n: int = 400) -> list[Telemetry]:
    """Simulated readings of three machines with plenty of anomalies among them."""
    sims = [MachineSimulator(f"m{i}", "line1", seed=i, anomaly_rate=0.3) for i in range(3)]
    return [sims[i % 3].next(T0 + i) for i in range(n)]


def test_empty_batch_gives_no_verdicts(prototype: LoadedModel) -> None:
    """Scoring no readings returns an empty list."""
    assert score(prototype, [], [], explain_top_k=3) == []


@pytest.mark.parametrize("model_name", ["prototype", "physics"])
def test_one_verdict_per_reading_in_order(model_name: str, request: pytest.FixtureRequest) -> None:
    """Verdicts come back one per reading, in input order, with the reading's identity."""
    model: LoadedModel = request.getfixturevalue(model_name)
    batch = mixed_batch()
    verdicts = score(model, batch, [0.0] * len(batch), explain_top_k=3)
    assert len(verdicts) == len(batch)
    for reading, verdict in zip(batch, verdicts, strict=True):
        assert (verdict.machine_id, verdict.line, verdict.seq, verdict.reading_ts) == (
            reading.machine_id,
            reading.line,
            reading.seq,
            reading.ts,
        )
        assert verdict.model_version == model.version
        assert verdict.threshold == model.card.threshold


@pytest.mark.parametrize("model_name", ["prototype", "physics"])
def test_status_is_alert_iff_score_above_threshold(
    model_name: str, request: pytest.FixtureRequest
) -> None:
    """ALERT exactly when the score exceeds the threshold or the reading leaves the training
    envelope; both statuses occur."""
    model: LoadedModel = request.getfixturevalue(model_name)
    batch = mixed_batch()
    verdicts = score(model, batch, [0.0] * len(batch), explain_top_k=3)
    for v in verdicts:
        assert (v.status == "ALERT") == (v.score > v.threshold or v.outside_training is not None)
        assert 0.0 < v.score <= 1.0
    assert {v.status for v in verdicts} == {"ALERT", "NORMAL"}


def test_score_equal_to_threshold_is_normal(prototype: LoadedModel) -> None:
    """The comparison is strict: a score exactly at the threshold is NORMAL."""
    # A fast reading inside the training envelope: outside it a reading is an ALERT whatever
    # its score, and the small model's readings reach 2,565 rpm (the real dataset's 2,886).
    reading = typical(rpm=2400.0)
    exact = score(prototype, [reading], [0.0], explain_top_k=3)[0].score
    at_cut = dataclasses.replace(
        prototype, card=prototype.card.model_copy(update={"threshold": exact})
    )
    verdict = score(at_cut, [reading], [0.0], explain_top_k=3)[0]
    assert verdict.outside_training is None
    assert verdict.score == verdict.threshold
    assert verdict.status == "NORMAL"


@pytest.fixture(scope="module")
def headroom(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny model on the default feature set (``headroom``)."""
    return trained(dataset, tmp_path_factory.mktemp("headroom"), "headroom")


@pytest.mark.parametrize("model_name", ["physics", "headroom"])
def test_batch_verdicts_equal_single_verdicts(
    model_name: str, request: pytest.FixtureRequest
) -> None:
    """A batch of one (what a low rate gives: the envelope's one-row path) judges each
    reading exactly as a batch does: the same score bits, status, channels outside the
    training envelope and explanation."""
    model: LoadedModel = request.getfixturevalue(model_name)
    batch = mixed_batch(120)

    def judged(verdicts: list[Verdict]) -> list[dict[str, object]]:
        return [v.model_dump(exclude={"latency_ms"}) for v in verdicts]

    together = judged(score(model, batch, [0.0] * len(batch), explain_top_k=3))
    alone = [judged(score(model, [r], [0.0], explain_top_k=3))[0] for r in batch]
    assert together == alone
    assert [v["score"] for v in together] == [v["score"] for v in alone]  # bit for bit
    assert any(v["outside_training"] for v in together)  # both envelope paths were taken


@pytest.mark.parametrize("top_k", [0, 1, 2, 3, 16])
def test_explanation_only_on_alert_and_at_most_top_k(physics: LoadedModel, top_k: int) -> None:
    """Only ALERT verdicts explain themselves, with at most explain_top_k model features."""
    batch = mixed_batch()
    verdicts = score(physics, batch, [0.0] * len(batch), explain_top_k=top_k)
    for v in verdicts:
        if v.status == "NORMAL" or top_k == 0:
            assert v.explanation is None
        else:
            assert v.explanation is not None
            assert 1 <= len(v.explanation) <= top_k
            assert len(v.explanation) == min(top_k, len(physics.card.features))
            assert {c.feature for c in v.explanation} <= set(physics.card.features)
            zs = [abs(c.z) for c in v.explanation]
            assert zs == sorted(zs, reverse=True)


def test_rpm_spike_alerts_and_typical_reading_is_normal(prototype: LoadedModel) -> None:
    """The prototype's 2800 rpm reading is ALERT, explained by speed; a typical one is NORMAL."""
    spike, normal = score(
        prototype, [typical(rpm=2800.0, seq=0), typical(seq=1)], [0.0, 0.0], explain_top_k=3
    )
    assert spike.status == "ALERT"
    assert spike.explanation is not None
    assert spike.explanation[0].feature == "rotational_speed_rpm"
    assert spike.explanation[0].value == 2800.0
    assert spike.explanation[0].z > 3.0
    assert normal.status == "NORMAL"
    assert normal.explanation is None
    assert spike.score > normal.score


def test_typical_reading_is_normal_for_physics_model(physics: LoadedModel) -> None:
    """A typical reading is NORMAL under the physics features too."""
    assert score(physics, [typical()], [0.0], explain_top_k=3)[0].status == "NORMAL"


def test_latency_is_measured_from_receipt(prototype: LoadedModel) -> None:
    """latency_ms is the perf-clock time from each reading's receipt to scoring, in ms."""
    verdicts = score(
        prototype,
        [typical(seq=0), typical(seq=1)],
        [9.75, 9.9995],
        explain_top_k=0,
        perf_clock=lambda: 10.0,
    )
    assert [v.latency_ms for v in verdicts] == [250.0, 0.5]


def test_verdicts_encode_to_strict_json(physics: LoadedModel) -> None:
    """Every verdict of a mixed batch encodes without NaN and decodes back equal."""
    batch = mixed_batch(100)
    for v in score(physics, batch, [0.0] * len(batch), explain_top_k=3):
        assert type(v).model_validate_json(v.encode()) == v


def test_a_reading_outside_the_training_envelope_is_an_alert_that_names_it(
    physics: LoadedModel,
) -> None:
    """A process temperature 20 K above anything in training: ALERT, the quantities named."""
    hot = typical()
    hot = hot.model_copy(update={"readings": {**hot.readings, "process_temperature_k": 330.0}})
    [normal, verdict] = score(physics, [typical(), hot], [0.0, 0.0], explain_top_k=3)
    assert normal.outside_training is None
    assert verdict.status == "ALERT"
    assert verdict.outside_training == ["process_temperature_k", "temp_diff_k"]
    assert verdict.explanation, "an envelope ALERT explains itself like any other"
