"""Warm-up: a machine's first readings, while its feature windows fill, do not alarm.

A windowed model sees a new machine (or a machine after a model change: its windows start
over) with windows of one or two readings: their standard deviation is ~0, far below
anything in training. The pipeline imputes a feature with its training centre until its
window is full (``model/pipeline.py``), so those verdicts are as quiet as any other.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from factorywatch.channels import canonical
from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector.core import score
from factorywatch.model import artifact
from factorywatch.model.generic import fit_columns
from factorywatch.sensors.scenarios import generate

TRAIN_ROWS = 1500
WINDOW = 5
MACHINES = 200
FAR = 0.01
MARGIN = 0.02  # sampling slack over 1,000 verdicts (the rate is an average, not a bound)


@pytest.mark.parametrize("preset", ["windowed", "full"])
def test_a_new_machine_does_not_alarm_while_its_windows_fill(tmp_path: Path, preset: str) -> None:
    """200 never-seen machines send their first ``window`` readings, drawn from the training
    distribution, through ``detector.core.score``: the ALERT share stays within the model's
    target false-alarm rate plus sampling slack (before the warm-up rule: 39 %)."""
    run = generate([], seed=7, train_rows=TRAIN_ROWS, rows=TRAIN_ROWS + MACHINES * WINDOW)
    columns = {canonical(c): np.array(v) for c, v in run.values.items()}
    model = fit_columns(
        {c: v[:TRAIN_ROWS] for c, v in columns.items()},
        preset=preset,
        window=WINDOW,
        far=FAR,
        trees=100,
    )
    models = tmp_path / "models"
    artifact.save_generic(models, model.scorer, model.card)
    artifact.promote(models, model.card.version)
    loaded = artifact.load(models)
    assert loaded.pipeline is not None
    assert loaded.pipeline.warmup == WINDOW - 1 + (preset == "full")
    now = time.time()
    readings = [
        Telemetry(
            machine_id=f"new-{m}",
            line="line1",
            seq=i,
            ts=now + i,
            readings={
                name: values[TRAIN_ROWS + m * WINDOW + i] for name, values in run.values.items()
            },
        )
        for i in range(WINDOW)  # reading i of every machine, in arrival order
        for m in range(MACHINES)
    ]
    states: dict[str, dict[str, object]] = {}
    verdicts: list[Verdict] = score(
        loaded, readings, [0.0] * len(readings), explain_top_k=0, states=states
    )
    assert len(verdicts) == MACHINES * WINDOW
    assert len(states) == MACHINES  # every machine started with empty windows
    alerts = sum(v.status == "ALERT" for v in verdicts)
    first = sum(v.status == "ALERT" for v in verdicts[:MACHINES])
    assert alerts <= (FAR + MARGIN) * len(verdicts), (alerts, first)
