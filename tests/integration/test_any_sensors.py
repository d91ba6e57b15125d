"""Any machine, any sensors, through the real CLI and a real broker and detector.

A scenario run of a generic pump (channel names as a plant system writes them) trains a model
with ``factorywatch train --csv``; ``factorywatch evaluate --csv`` reports on labelled runs;
a real detector serving the model answers version 2 readings carrying the raw names with
exactly the scores the offline evaluation computes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import Verdict
from factorywatch.model import artifact
from factorywatch.model.generic import Trained, score_recording
from factorywatch.model.recording import load_recording
from factorywatch.sensors.scenarios import generate, write_csv
from factorywatch.topics import Topics
from tests.support import CLI, PROJECT_DIR, Collector, Proc

pytestmark = pytest.mark.integration
TRAIN_ROWS = 300


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real factorywatch command; fail loudly with its output."""
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=PROJECT_DIR, check=False, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _train_and_serve(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    mqtt_args: list[str],
    path: Path,
    client_id: str,
    *train_args: str,
) -> tuple[Trained, Proc]:
    """`train --csv` on ``path`` (50 trees, the first TRAIN_ROWS rows), then a detector serving
    the model; the model as offline scoring sees it and the subscribed detector."""
    models = tmp_path / "models"
    cli("train", "--csv", str(path), *train_args, "--train-rows", str(TRAIN_ROWS),
        "--trees", "50", "--model-dir", str(models))  # fmt: skip
    loaded = artifact.load(models)
    detector = spawn(
        "detect",
        *mqtt_args,
        "--model-dir",
        str(models),
        "--client-id",
        client_id,
        "--state-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        "0",
    )
    detector.wait_log("telemetry_subscribed")
    return Trained(scorer=loaded.scorer, card=loaded.card), detector  # type: ignore[arg-type]


def test_train_and_evaluate_any_csv(tmp_path: Path) -> None:
    """train --csv saves a generic model; evaluate --csv writes the streams report."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, kind in enumerate(["step_change", "stuck_sensor"]):
        write_csv(
            generate([kind], seed=seed, train_rows=TRAIN_ROWS, rows=700), runs / f"{kind}.csv"
        )
    models = tmp_path / "models"
    out = cli(
        "train",
        "--csv",
        str(runs / "step_change.csv"),
        "--time-column",
        "datetime",
        "--train-rows",
        str(TRAIN_ROWS),
        "--trees",
        "50",
        "--model-dir",
        str(models),
    )
    version = out.stdout.strip().splitlines()[-1]
    card = artifact.read_card(models / version / artifact.CARD_FILE)
    assert card.pipeline is not None
    assert "volume_flow_rate_rms" in card.channels
    assert "anomaly" not in card.channels  # a label-like column is never a channel
    assert artifact.current_version(models) == version
    report = tmp_path / "reports"
    cli(
        "evaluate",
        "--csv",
        str(runs),
        "--label-column",
        "anomaly",
        "--time-column",
        "datetime",
        "--train-rows",
        str(TRAIN_ROWS),
        "--trees",
        "50",
        "--out",
        str(report),
    )
    document = json.loads((report / "streams.json").read_text())
    summary = document["configs"][0]["summary"]
    assert summary["runs"] == 2
    assert summary["events"] == 2
    runs_tp = sum(int(r["tp"]) for r in document["configs"][0]["runs"])
    assert summary["tp"] == runs_tp  # counts are summed over runs
    assert summary["f1"] > 0.5
    assert summary["far"] < 0.05
    assert (report / "streams.md").read_text().startswith("# Streams evaluation")
    assert (report / "streams.png").stat().st_size > 0


def test_detector_serves_a_csv_model_over_the_broker(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    mqtt_args: list[str],
    collector: Callable[..., Collector],
    topic_root: str,
) -> None:
    """v2 readings with raw tag names get verdicts whose scores equal the offline ones."""
    path = tmp_path / "pump.csv"
    run = generate(["noise_burst"], seed=4, train_rows=TRAIN_ROWS, rows=500)
    write_csv(run, path)
    trained, detector = _train_and_serve(
        tmp_path, spawn, mqtt_args, path, "det-any", "--time-column", "datetime"
    )
    rec = load_recording(path, time_column="datetime")
    assert trained.card.pipeline is not None
    expected = score_recording(trained, rec.columns).score
    topics = Topics(topic_root)
    sink = collector(topics.verdict("line1", "pump-1"))
    now = time.time()
    for i in range(rec.rows):
        wire = {
            "schema_version": 2,
            "machine_id": "pump-1",
            "line": "line1",
            "seq": i,
            "ts": now + i * 0.001,
            "readings": {name: float(f"{values[i]:.5g}") for name, values in run.values.items()},
        }
        sink.client.publish(topics.telemetry("line1", "pump-1"), json.dumps(wire), qos=1)
    got = sink.wait_for(lambda _m: True, count=rec.rows, timeout=120)
    verdicts = sorted((Verdict.model_validate_json(m.payload) for m in got), key=lambda v: v.seq)
    assert [v.seq for v in verdicts] == list(range(rec.rows)), detector.log()
    scores = np.array([v.score for v in verdicts])
    assert np.allclose(scores, expected, rtol=1e-9)
    assert {v.model_version for v in verdicts} == {trained.card.version}


def test_replay_publishes_any_csv_through_the_broker(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    mqtt_args: list[str],
    collector: Callable[..., Collector],
    topic_root: str,
) -> None:
    """`factorywatch replay --csv` publishes a plant CSV; the detector scores every row."""
    path = tmp_path / "pump.csv"
    write_csv(generate(["step_change"], seed=9, train_rows=TRAIN_ROWS, rows=450), path)
    trained, detector = _train_and_serve(tmp_path, spawn, mqtt_args, path, "det-replay")
    rec = load_recording(path, label_column="anomaly")
    expected = score_recording(trained, rec.columns)
    sink = collector(Topics(topic_root).verdict("line1", "pump-9"))
    replay = spawn(
        "replay", *mqtt_args, "--csv", str(path), "--machine-id", "pump-9", "--rate", "200"
    )
    got = sink.wait_for(lambda _m: True, count=rec.rows, timeout=120)
    assert replay.process.wait(timeout=60) == 0, replay.log()
    verdicts = sorted((Verdict.model_validate_json(m.payload) for m in got), key=lambda v: v.seq)
    assert len(verdicts) == rec.rows, detector.log()
    alerts = np.array([v.status == "ALERT" for v in verdicts])
    assert alerts.tolist() == expected.flagged.tolist()
    assert rec.labels is not None
    assert alerts[rec.labels.astype(bool)].mean() > 0.5  # the step change is caught
