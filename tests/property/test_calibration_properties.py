"""A calibration window survives a JSON snapshot at any point: the fit sees every reading once."""

from __future__ import annotations

import json
import time
from functools import cache

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from factorywatch.contracts import Telemetry
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine
from factorywatch.detector.router import Router
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.asset import CalibrateSpec
from factorywatch.model.generic import fit_columns
from factorywatch.model.pipeline import Pipeline
from factorywatch.topics import Topics

TOPICS = Topics("propcal")
NEEDED = 50
values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@cache
def _default() -> LoadedModel:
    """A default model (never used by the calibrating machines, but an engine needs one)."""
    rng = np.random.default_rng(0)
    trained = fit_columns({"a": rng.normal(size=100), "b": rng.normal(size=100)}, family="pca")
    card = trained.card
    return LoadedModel(
        card=card,
        scorer=trained.scorer,
        center=np.asarray(card.feature_center),
        scale=np.asarray(card.feature_scale),
        pipeline=Pipeline(card.pipeline) if card.pipeline else None,
    )


def _engine() -> Engine:
    spec = CalibrateSpec(readings=NEEDED, family="pca", default=True)
    return Engine(_default(), TOPICS, router=Router(_default(), None, spec))


def _message(machine: str, seq: int, reading: dict[str, float]) -> Received:
    now = time.time()
    wire = Telemetry(machine_id=machine, line="l1", seq=seq, ts=now, readings=reading)
    return Received(TOPICS.telemetry("l1", machine), wire.encode(), now, time.perf_counter(), seq)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["m1", "m2"]), st.fixed_dictionaries({"x": values, "y": values})),
        min_size=NEEDED,
        max_size=2 * NEEDED + 10,
    ),
    st.data(),
)
def test_window_round_trips_through_json_at_any_point(
    stream: list[tuple[str, dict[str, float]]], data: st.DataObject
) -> None:
    """Stopped at any reading, snapshotted to JSON and restored in a new engine, the
    calibration goes on: each machine's fit request holds its first NEEDED readings, in
    order, each exactly once, and is asked for once."""
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    first = _engine()
    messages = [_message(m, seq, r) for seq, (m, r) in enumerate(stream)]
    first.handle(messages[:cut], time.time())
    requests = first.take_fit_requests()
    second = _engine()
    second.restore(json.loads(json.dumps(first.snapshot())))
    requests += second.take_fit_requests()
    second.handle(messages[cut:], time.time())
    requests += second.take_fit_requests()
    by_machine: dict[str, list[tuple[tuple[float, ...], ...]]] = {}
    for request in requests:
        by_machine.setdefault(request.machine, []).append(request.rows)
    for machine in ("m1", "m2"):
        mine = [(r["x"], r["y"]) for m, r in stream if m == machine]
        expected = [tuple(mine[:NEEDED])] if len(mine) >= NEEDED else []
        got = by_machine.get(machine, [])
        if cut and expected and sum(1 for m, _ in stream[:cut] if m == machine) >= NEEDED:
            # full before the snapshot: asked for before it and again after the restore
            assert got == expected * 2
        else:
            assert got == expected
