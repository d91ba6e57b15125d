"""The router and live calibration in the pure engine: routes, CALIBRATING, restore, drift."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector import calibration_window
from factorywatch.detector.batch_scoring import CALIBRATING_VERSION, Received
from factorywatch.detector.engine import Engine, EngineSettings, Outcome
from factorywatch.detector.router import Router
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.asset import CalibrateSpec, GroupSpec
from factorywatch.model.generic import fit_columns
from factorywatch.topics import Topics

TOPICS = Topics("unitroute")
NOW = time.time()


def _normal(rng: np.random.Generator, n: int, channels: tuple[str, ...]) -> dict[str, np.ndarray]:
    base = rng.normal(size=n)
    return {c: 10.0 * (i + 1) + base * (i + 1) + rng.normal(size=n) for i, c in enumerate(channels)}


def _model(tmp_path: Path, name: str, channels: tuple[str, ...], seed: int) -> LoadedModel:
    """A PCA model fitted on normal readings of ``channels`` and loaded as the detector does."""
    trained = fit_columns(_normal(np.random.default_rng(seed), 300, channels), family="pca")
    folder = tmp_path / name
    artifact.save_generic(folder, trained.scorer, trained.card)
    return artifact.load(folder, trained.card.version)


def _message(machine: str, seq: int, values: dict[str, float], line: str = "line1") -> Received:
    reading = Telemetry(
        machine_id=machine, line=line, seq=seq, ts=NOW + seq * 0.001, readings=values
    )
    return Received(
        TOPICS.telemetry(line, machine), reading.encode(), NOW, time.perf_counter(), seq
    )


def _verdicts(outcomes: list[Outcome]) -> list[Verdict]:
    return [v for o in outcomes for v in o.verdicts]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """A default model on channels a, b; a group model and a machine model on x, y."""
    tmp = tmp_path_factory.mktemp("models")
    return {
        "default": _model(tmp, "default", ("a", "b"), 1),
        "group": _model(tmp, "group", ("x", "y"), 2),
        "machine": _model(tmp, "machine", ("x", "y"), 3),
    }


def test_machines_route_to_their_own_model_then_group_then_default(
    models: dict[str, LoadedModel],
) -> None:
    """One batch of three machines is scored by three models: a machine's own model wins
    over its group's, a group's over the default; each record names the version that scored
    it, and readings carry only their own model's channels."""
    router = Router(models["default"], {"pumps": GroupSpec(machines=["pump-*"])})
    engine = Engine(models["default"], TOPICS, router=router)
    assert router.trivial
    engine.bind_group("pumps", models["group"])
    engine.bind("pump-9", models["machine"])
    assert not router.trivial
    batch = [
        _message("mill-1", 1, {"a": 10.0, "b": 20.0}),
        _message("pump-1", 2, {"x": 10.0, "y": 20.0}),
        _message("pump-9", 3, {"x": 10.0, "y": 20.0}),
        _message("mill-1", 4, {"x": 10.0, "y": 20.0}),  # lacks its model's channels
    ]
    outcomes = engine.handle(batch, NOW)
    by_machine = {v.machine_id: v.model_version for v in _verdicts(outcomes)}
    assert by_machine == {
        "mill-1": models["default"].version,
        "pump-1": models["group"].version,
        "pump-9": models["machine"].version,
    }
    assert [e.reason for e in outcomes[3].rejected] == ["missing_channel"]
    assert engine.record("pump-9").model == models["machine"].version
    assert engine.record("mill-1").model == models["default"].version


def test_line_and_pattern_groups(models: dict[str, LoadedModel]) -> None:
    """A group holds machines by glob pattern or by whole production line, first group wins."""
    groups = {
        "presses": GroupSpec(lines=["line2"]),
        "pumps": GroupSpec(machines=["pump-?"]),
    }
    router = Router(models["default"], groups)
    router.bind_group("pumps", models["group"])
    router.bind_group("presses", models["machine"])
    assert router.route("pump-1", "line1").key == "group:pumps"
    assert router.route("pump-1", "line2").key == "group:presses"
    assert router.route("pump-10", "line1").key == "default"
    with pytest.raises(KeyError):
        router.bind_group("nope", models["group"])


def _calibrating_engine(models: dict[str, LoadedModel], readings: int = 60) -> Engine:
    spec = CalibrateSpec(readings=readings, family="pca", machines=["new-*"])
    return Engine(
        models["default"], TOPICS, EngineSettings(), router=Router(models["default"], None, spec)
    )


def _stream(n: int, start: int = 0, seed: int = 7) -> list[dict[str, float]]:
    columns = _normal(np.random.default_rng(seed), start + n, ("x", "y"))
    return [{c: float(v[i]) for c, v in columns.items()} for i in range(start, start + n)]


def test_calibrating_verdicts_then_the_fitted_model_serves(
    models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    """A calibrating machine's first N readings get CALIBRATING verdicts counting up to N
    (the alert window counts none of them), one fit request is made with exactly those
    readings in order, readings while it fits stay CALIBRATING and are not added, and once
    bound the machine's own model scores it; other machines are scored all along."""
    engine = _calibrating_engine(models)
    values = _stream(70)
    progress = []
    for seq, v in enumerate(values[:60]):
        out = engine.handle(
            [_message("new-1", seq, v), _message("mill-1", 1000 + seq, {"a": 10.0, "b": 20.0})], NOW
        )
        (calibrating_verdict, scored) = _verdicts(out)
        assert scored.model_version == models["default"].version
        assert calibrating_verdict.status == "CALIBRATING"
        assert calibrating_verdict.model_version == CALIBRATING_VERSION
        assert calibrating_verdict.calibration is not None
        progress.append(
            (calibrating_verdict.calibration.seen, calibrating_verdict.calibration.fitting)
        )
    assert progress == [(i, i == 60) for i in range(1, 61)]
    assert len(engine.record("new-1").window) == 0  # the k-of-n window counted none
    (request,) = engine.take_fit_requests()
    assert engine.take_fit_requests() == []
    assert request.machine == "new-1"
    assert [dict(zip(request.channels, row, strict=True)) for row in request.rows] == values[:60]
    out = engine.handle([_message("new-1", 60 + i, values[60 + i]) for i in range(5)], NOW)
    assert [(v.status, v.calibration.seen if v.calibration else None) for v in _verdicts(out)] == [
        ("CALIBRATING", 60)
    ] * 5
    assert engine.take_fit_requests() == []  # one fit per window
    trained = calibration_window.fit(request)
    folder = artifact.route_dir(tmp_path, "machine", "new-1")
    artifact.save_generic(folder, trained.scorer, trained.card)
    fitted = artifact.load(folder, trained.card.version)
    engine.bind("new-1", fitted)
    assert engine.record("new-1").calibration is None
    out = engine.handle([_message("new-1", 65 + i, values[65 + i]) for i in range(5)], NOW)
    verdicts = _verdicts(out)
    assert {v.model_version for v in verdicts} == {fitted.version}
    assert {v.status for v in verdicts} <= {"NORMAL", "ALERT"}
    assert trained.card.data.rows == 60


def test_calibration_window_survives_snapshot_and_restore(models: dict[str, LoadedModel]) -> None:
    """Restored from a JSON snapshot mid-calibration, a new engine counts on from where the
    old one stopped, and the fit request holds every reading exactly once; a redelivered
    reading is not counted twice."""
    values = _stream(60)
    first = _calibrating_engine(models)
    first.handle([_message("new-1", i, values[i]) for i in range(25)], NOW)
    snapshot = json.loads(json.dumps(first.snapshot()))
    second = _calibrating_engine(models)
    second.restore(snapshot)
    again = second.handle([_message("new-1", 24, values[24])], NOW)  # redelivered, not deduped
    progress = _verdicts(again)[0].calibration
    assert progress is not None
    assert progress.seen == 25
    out = second.handle([_message("new-1", i, values[i]) for i in range(25, 60)], NOW)
    assert [v.calibration.seen for v in _verdicts(out) if v.calibration] == list(range(26, 61))
    (request,) = second.take_fit_requests()
    assert [dict(zip(request.channels, row, strict=True)) for row in request.rows] == values


def test_a_full_window_restored_asks_for_its_fit_again(models: dict[str, LoadedModel]) -> None:
    """A crash while the fit ran: the restored engine asks for the fit again, once; a
    machine whose model was saved before the crash (bound first) drops its window instead."""
    values = _stream(60)
    first = _calibrating_engine(models)
    first.handle([_message("new-1", i, values[i]) for i in range(60)], NOW)
    first.handle([_message("new-2", i, values[i]) for i in range(60)], NOW)
    assert len(first.take_fit_requests()) == 2
    snapshot = json.loads(json.dumps(first.snapshot()))
    second = _calibrating_engine(models)
    second.bind("new-2", models["machine"])
    second.restore(snapshot)
    assert [r.machine for r in second.take_fit_requests()] == ["new-1"]
    assert second.states["new-2"].calibration is None
    second.fit_failed("new-1")
    assert [r.machine for r in second.take_fit_requests()] == ["new-1"]
    plain = Engine(models["default"], TOPICS)  # calibration no longer configured
    plain.restore(snapshot)
    assert plain.take_fit_requests() == []
    assert plain.states["new-1"].calibration is None


def test_forget_drops_machines_and_their_fits_and_records_bring_them_back(
    models: dict[str, LoadedModel],
) -> None:
    """A lost partition's machines are forgotten (records and pending fit requests; the others
    stay); reading their records back later (the partition returns) restores the window and
    asks for its fit again."""
    values = _stream(60)
    engine = _calibrating_engine(models)
    engine.handle([_message("new-1", i, values[i]) for i in range(60)], NOW)
    engine.handle([_message("new-2", i, values[i]) for i in range(30)], NOW)
    engine.handle([_message("mill-1", 0, {"a": 10.0, "b": 20.0})], NOW)
    saved = [json.loads(json.dumps(engine.record(m).snapshot())) for m in ("new-1", "new-2")]
    assert engine.forget(["new-1", "new-2", "never-seen"]) == 2
    assert sorted(r.machine_id for r in engine.records(engine.machines())) == ["mill-1"]
    assert engine.take_fit_requests() == []  # new-1's full window: not fitted here any more
    assert [r.machine_id for r in engine.take_dirty()] == ["mill-1"]
    engine.restore_records(saved)
    assert [r.machine for r in engine.take_fit_requests()] == ["new-1"]
    out = engine.handle([_message("new-2", 30, values[30])], NOW)
    progress = _verdicts(out)[0].calibration
    assert progress is not None
    assert progress.seen == 31


def test_calibration_channels_from_the_first_reading(models: dict[str, LoadedModel]) -> None:
    """Without configured channels a window takes its first reading's; a later reading that
    lacks one is dead-lettered (missing_channel), not counted."""
    engine = _calibrating_engine(models)
    engine.handle([_message("new-1", 1, {"x": 1.0, "y": 2.0})], NOW)
    (outcome,) = engine.handle([_message("new-1", 2, {"x": 1.0})], NOW)
    assert [e.reason for e in outcome.rejected] == ["missing_channel"]
    calibration = engine.record("new-1").calibration
    assert calibration is not None
    assert len(calibration["rows"]) == 1


def test_drift_is_tracked_per_machine_model(models: dict[str, LoadedModel]) -> None:
    """A machine whose own model sees readings far from its training drifts on its own
    route; the default model's drift window is untouched."""
    engine = Engine(models["default"], TOPICS, EngineSettings(drift_window=50), router=None)
    engine.bind("pump-9", models["machine"])
    far_away = {"x": 500.0, "y": -500.0}
    engine.handle([_message("pump-9", i, far_away) for i in range(60)], NOW)
    changes = engine.check_route_drift()
    assert [(key, version, change) for key, version, change, _ in changes] == [
        ("machine:pump-9", models["machine"].version, "drift_started")
    ]
    assert engine.check_drift()[1].readings == 0
    snapshot = json.loads(json.dumps(engine.snapshot()))
    restored = Engine(models["default"], TOPICS, EngineSettings(drift_window=50))
    restored.bind("pump-9", models["machine"])
    restored.restore(snapshot)
    assert restored.drifts["machine:pump-9"].drifting
