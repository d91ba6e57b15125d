"""Warm-up: a machine's first readings, while its feature windows fill, do not alarm.

A windowed model sees a new machine (or a machine after a model change: its windows start
over) with windows of one or two readings: their standard deviation is ~0, far below
anything in training. The pipeline imputes such a feature from the valid ones until its
window is full (``model/pipeline.py``), so those verdicts are as quiet as any other.
"""

from __future__ import annotations

import pytest

from bench.warmup import WINDOW, warmup_alerts

MACHINES = 200
FAR = 0.01
MARGIN = 0.02  # sampling slack over 1,000 verdicts (the target rate is an average)


@pytest.mark.parametrize("preset", ["windowed", "full"])
def test_a_new_machine_does_not_alarm_while_its_windows_fill(preset: str) -> None:
    """200 never-seen machines send their first ``window`` readings, drawn from the training
    distribution, through ``detector.batch_scoring.score``: the ALERT share stays within the model's
    target false-alarm rate plus sampling slack (without the warm-up rule: 37 %, and every
    machine's first verdict an ALERT)."""
    counts = warmup_alerts(preset, machines=MACHINES, readings=WINDOW, far=FAR)
    assert len(counts) == WINDOW
    assert sum(counts) <= (FAR + MARGIN) * MACHINES * WINDOW, counts
    assert counts[0] <= (FAR + MARGIN) * MACHINES, counts
