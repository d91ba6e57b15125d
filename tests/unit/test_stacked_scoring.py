"""Routes to windowed forests scored together give the verdicts each route's own call gives."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector.batch_scoring import Part, Received, score, score_parts
from factorywatch.detector.engine import Engine, EngineSettings
from factorywatch.detector.router import Router
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.asset import GroupSpec
from factorywatch.model.forest_stack import ForestStack
from factorywatch.model.generic import fit_columns
from factorywatch.model.pipeline import State
from factorywatch.topics import Topics

TOPICS = Topics("unitstack")
NOW = time.time()
CHANNELS = ("a", "b", "c")


def _normal(rng: np.random.Generator, n: int, channels: tuple[str, ...]) -> dict[str, np.ndarray]:
    base = rng.normal(size=n)
    return {c: 10.0 * (i + 1) + base * (i + 1) + rng.normal(size=n) for i, c in enumerate(channels)}


def _model(tmp: Path, seed: int, family: str = "iforest", **kwargs: Any) -> LoadedModel:
    """A windowed model fitted on normal readings and loaded as the detector does (a fixed
    threshold: these tests are about routing; ``test_threshold_follow`` follows)."""
    columns = _normal(np.random.default_rng(seed), 400, CHANNELS)
    trained = fit_columns(
        columns, family=family, trees=10 + seed, seed=seed, follow=False, **kwargs
    )
    folder = tmp / f"m{seed}"
    artifact.save_generic(folder, trained.scorer, trained.card)
    return artifact.load(folder, trained.card.version)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[LoadedModel]:
    """Five forests (one with a wider window, one with no smoothing) and a PCA model."""
    tmp = tmp_path_factory.mktemp("stack")
    forests = [_model(tmp, seed) for seed in range(3)]
    forests.append(_model(tmp, 3, window=9))
    forests.append(_model(tmp, 4, smooth=1))
    return [*forests, _model(tmp, 5, family="pca")]


def _messages(count: int, machines: int, seed: int, start: int) -> list[Received]:
    """Readings of ``machines`` machines in turn; every 17th far outside training."""
    columns = _normal(np.random.default_rng(seed), count, CHANNELS)
    out = []
    for i in range(count):
        values = {c: float(columns[c][i]) for c in CHANNELS}
        if i % 17 == 5:
            values["b"] += 400.0
        machine = f"m{i % machines:02d}"
        reading = Telemetry(
            machine_id=machine, line="line1", seq=start + i, ts=NOW, readings=values
        )
        out.append(
            Received(TOPICS.telemetry("line1", machine), reading.encode(), NOW, 0.0, start + i)
        )
    return out


def _comparable(verdict: Verdict) -> dict[str, Any]:
    data = verdict.model_dump()
    del data["latency_ms"]  # a duration, not a judgement
    return data


def test_engine_verdicts_equal_each_routes_own_scoring(models: list[LoadedModel]) -> None:
    """Machines with their own forests (and a PCA model, a group and the default) get, batch
    after batch, exactly the verdicts ``score`` gives each route's readings on its own."""
    router = Router(models[0], {"g": GroupSpec(machines=["m1*"])})
    engine = Engine(models[0], TOPICS, EngineSettings(explain_top_k=3), router=router)
    engine.bind_group("g", models[1])
    own = {f"m{k:02d}": models[k // 2 % len(models)] for k in range(0, 24, 2)}
    for machine, model in own.items():
        engine.bind(machine, model)
    windows: dict[str, State] = {}
    got, expected = [], []
    for batch in range(4):
        messages = _messages(150, 24, seed=batch, start=1000 * batch)
        for size in (1, 40, 109):  # a part of a single reading too
            chunk, messages = messages[:size], messages[size:]
            routes: dict[str, tuple[LoadedModel, list[Telemetry]]] = {}
            for message in chunk:
                reading = Telemetry.model_validate_json(message.payload)
                route = engine.router.route(reading.machine_id, reading.line)
                assert route.model is not None
                routes.setdefault(route.key, (route.model, []))[1].append(reading)
            for model, readings in routes.values():
                verdicts = score(model, readings, [0.0] * len(readings), explain_top_k=3,
                                 states=windows)  # fmt: skip
                expected += [_comparable(v) for v in verdicts]
            outcomes = engine.handle(chunk, NOW)
            got += [_comparable(v) for o in outcomes for v in o.verdicts]
    by_reading = {(v["machine_id"], v["seq"]): v for v in expected}
    assert len(by_reading) == len(got) == 600
    assert [by_reading[(v["machine_id"], v["seq"])] for v in got] == got
    alerts = [v for v in got if v["status"] == "ALERT"]
    assert alerts
    assert all(v["explanation"] for v in alerts)
    assert len({v["model_version"] for v in got}) == len(models)
    assert len(engine._stack) == len(models) - 1


def test_score_parts_refuses_a_model_it_cannot_stack(models: list[LoadedModel]) -> None:
    """A PCA model's readings are refused with the model named, not misread as a forest's."""
    reading = Telemetry(
        machine_id="m", line="l", seq=1, ts=NOW, readings=dict.fromkeys(CHANNELS, 1.0)
    )
    with pytest.raises(ValueError, match="not a windowed flat forest"):
        score_parts([Part(models[-1], [reading], [0.0], {})], ForestStack(), explain_top_k=3)
