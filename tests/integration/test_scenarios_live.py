"""The scenario suite through a real Mosquitto and real detectors equals the offline evaluation.

A small version of ``make scenarios-live``: three labelled runs (one warming up through its
training rows), a global point model served by one detector and per-run models with the
default preset served by another as each run's machine's own model
(the detector's router picks it per reading), every run replayed with ``factorywatch replay
--csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factorywatch.live_evaluation import default_configs, document, evaluate_live, markdown
from factorywatch.model.behaviour import characterise_all
from factorywatch.sensors.scenarios import generate, write_csv

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TRAIN_ROWS = 300


def test_live_verdicts_equal_offline_flags_exactly_once(tmp_path: Path) -> None:
    """Every reading gets exactly one verdict, and its ALERT flag is the offline one."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, kind in enumerate(["step_change", "stuck_sensor"]):
        write_csv(
            generate([kind], seed=seed, train_rows=TRAIN_ROWS, rows=520), runs / f"{kind}.csv"
        )
    # a machine warming up through its training rows: with the default preset its trending
    # temperatures keep only their variability features (streamed live as offline)
    warming = generate(["step_change"], seed=7, train_rows=TRAIN_ROWS, rows=520, drift="warm_up")
    moving = characterise_all(
        {c: np.asarray(v[:TRAIN_ROWS], dtype=np.float64) for c, v in warming.values.items()}
    )
    assert "trending" in moving.values(), moving
    write_csv(warming, runs / "warming_step_change.csv")
    configs = [c for c in default_configs(0.01, 50, 5) if c.name != "per-run point"]
    outcomes, seconds = evaluate_live(
        runs,
        label_column="anomaly",
        time_column="datetime",
        train_rows=TRAIN_ROWS,
        configs=configs,
        workdir=tmp_path / "work",
        parallel=1,  # one detector at a time (see live_evaluation: overload reorders)
    )
    assert [o.config.name for o in outcomes] == ["global point", "per-run auto"]
    for outcome in outcomes:
        d = outcome.delivery
        assert d.readings == 3 * 520
        assert (d.lost, d.duplicates, d.unexpected) == (0, 0, 0), outcome.lost_keys
        assert d.verdicts == d.readings  # exactly one verdict per reading
        assert d.flag_mismatches == 0
        assert d.wrong_model == 0  # every verdict by its run's own model (or the global one)
        for offline, live in zip(outcome.offline, outcome.live, strict=True):
            assert live.name == offline.name
            assert live.scores.flagged.tolist() == offline.scores.flagged.tolist()
            assert np.allclose(live.scores.score, offline.scores.score, rtol=1e-9)
            assert live.counts == offline.counts
            assert live.delays == offline.delays
    windowed = outcomes[1]
    assert len(set(windowed.versions)) == 3  # three models served by one detector
    assert sum(r.counts["tp"] for r in windowed.live) > 0  # the anomalies are caught live
    doc = document(outcomes, command="test", source=str(runs), live_seconds=seconds)
    assert doc["configs"][1]["live"] == doc["configs"][1]["offline"]
    text = markdown(doc)
    assert "| per-run auto | live |" in text
