"""Recall per injected anomaly kind, on a model trained by the real CLI (no broker needed).

Each kind is forced on 200 readings of a simulated machine and scored by the detector's core;
the figures are printed (``pytest -s``) and those the README claims are asserted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import get_args

import pytest

from factorywatch.contracts import AnomalyKind
from factorywatch.detector.batch_scoring import score
from factorywatch.model import artifact
from factorywatch.sensors.simulator import MachineSimulator

pytestmark = pytest.mark.integration

READINGS = 200
# What the README promises per kind (recall on forced single readings).
FLOORS = {
    "power": 0.95,
    "overstrain": 0.95,
    "stuck_sensor": 0.95,
    "drift": 0.95,  # outside the training envelope of the temperature difference
    "heat_dissipation": 0.9,
    "rpm_spike": 0.7,
}


def test_recall_per_anomaly_kind(model_dir: Path) -> None:
    """Stuck sensors, drift, power, overstrain and heat failures are caught; spikes mostly."""
    model = artifact.load(model_dir)
    recall: dict[str, float] = {}
    kinds: list[AnomalyKind | None] = [*get_args(AnomalyKind), None]
    for kind in kinds:
        sim = MachineSimulator("kinds-1", "line1", seed=5, anomaly_rate=0.0)
        now = time.time()
        readings = [sim.next(now + i, inject=kind) for i in range(READINGS)]
        verdicts = score(model, readings, [0.0] * READINGS, explain_top_k=0)
        recall[kind or "none"] = sum(v.status == "ALERT" for v in verdicts) / READINGS
    print(f"\nALERT share per forced kind ({READINGS} readings each): {recall}")
    for name, floor in FLOORS.items():
        assert recall[name] >= floor, (name, recall)
    assert recall["none"] <= 0.1  # normal readings: about the 3 % false-alarm budget


def test_drift_episodes_in_a_stream_are_caught_once_past_the_envelope(model_dir: Path) -> None:
    """Drifts ramping up from +2 K: most of their readings are ALERTs, normal ones are not."""
    model = artifact.load(model_dir)
    sim = MachineSimulator("drift-1", "line1", seed=4, anomaly_rate=0.1, anomalies=["drift"])
    now = time.time()
    readings = [sim.next(now + i) for i in range(3000)]
    verdicts = score(model, readings, [0.0] * len(readings), explain_top_k=0)
    pairs = list(zip(readings, verdicts, strict=True))
    drift = [v.status == "ALERT" for r, v in pairs if r.injected]
    normal = [v.status == "ALERT" for r, v in pairs if not r.injected]
    recall, false_alarms = sum(drift) / len(drift), sum(normal) / len(normal)
    print(f"\ndrift: {len(drift)} readings, {recall:.2f} flagged; normal {false_alarms:.3f}")
    assert recall >= 0.8
    assert false_alarms <= 0.1
