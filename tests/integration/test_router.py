"""A model per machine through the real CLI, a real Mosquitto and the real detector process.

Two pumps behave differently: ``pump-a`` runs at five times the plant's flow and has its own
model (``factorywatch train --csv ... --machine pump-a``); ``pump-b`` is new and calibrates
its model on its first readings live. The detector is killed with SIGKILL mid-calibration and
restarted: the readings it had counted still count, and no reading is lost or answered twice.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import Verdict
from factorywatch.detector import calibration_window
from factorywatch.model import artifact
from factorywatch.model.asset import CalibrateSpec
from factorywatch.model.generic import fit_columns, score_recording
from factorywatch.topics import Topics
from tests.support import (
    CLI,
    END_MARKER,
    PROJECT_DIR,
    Collector,
    Proc,
    duplicated,
    not_marker,
    verdict_counts,
)

pytestmark = pytest.mark.integration
WINDOW = 60
CHANNELS = ("flow_rate", "pressure_bar")


def cli(*args: str) -> str:
    """Run the real factorywatch command; fail loudly with its output."""
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=PROJECT_DIR, check=False, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def pump(n: int, seed: int, level: float) -> list[dict[str, float]]:
    """``n`` normal readings of a pump whose flow sits at ``level`` (pressure follows)."""
    rng = np.random.default_rng(seed)
    flow = level + rng.normal(scale=0.05 * level, size=n)
    pressure = 0.2 * flow + rng.normal(scale=0.01 * level, size=n)
    return [
        {"flow_rate": round(float(f), 5), "pressure_bar": round(float(p), 5)}
        for f, p in zip(flow, pressure, strict=True)
    ]


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CHANNELS))
        writer.writeheader()
        writer.writerows(rows)


def test_per_machine_model_and_live_calibration_survive_kill9(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    mqtt_args: list[str],
    collector: Callable[..., Collector],
    topic_root: str,
) -> None:
    """pump-a is scored by its own model (the plant model would flag its every reading),
    pump-b gets CALIBRATING verdicts counting 1..60 across a kill -9, then its own model
    fitted on exactly those readings; every reading gets exactly one verdict."""
    models = tmp_path / "models"
    plant_rows = pump(400, 1, 10.0)
    trained = fit_columns({c: np.array([r[c] for r in plant_rows]) for c in CHANNELS}, family="pca")
    artifact.save_generic(models, trained.scorer, trained.card)
    artifact.promote(models, plant := trained.card.version)
    write_csv(tmp_path / "pump-a.csv", pump(400, 2, 50.0))
    own_a = cli(
        "train", "--csv", str(tmp_path / "pump-a.csv"), "--machine", "pump-a",
        "--family", "pca", "--model-dir", str(models),
    )  # fmt: skip
    assert artifact.current_version(models) == plant
    assert artifact.routed_versions(models) == {("machine", "pump-a"): own_a}
    config = tmp_path / "assets.yaml"
    config.write_text(f"calibrate:\n  readings: {WINDOW}\n  family: pca\n  machines: [pump-b]\n")
    topics = Topics(topic_root)
    sink = collector(topics.verdict("+", "+"))

    def detect() -> Proc:
        proc = spawn(
            "detect",
            *mqtt_args,
            "--model-dir",
            str(models),
            "--asset-config",
            str(config),
            "--client-id",
            "det-router",
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            "0",
        )
        proc.wait_log("telemetry_subscribed")
        return proc

    readings_a = pump(40, 3, 50.0)
    readings_b = pump(120, 4, 10.0 * 3)
    now = time.time()

    def send(machine: str, seq: int, values: dict[str, float]) -> None:
        wire = {
            "schema_version": 2,
            "machine_id": machine,
            "line": "line1",
            "seq": seq,
            "ts": now + seq * 0.001,
            "readings": values,
        }
        info = sink.client.publish(topics.telemetry("line1", machine), json.dumps(wire), qos=1)
        info.wait_for_publish(10)

    def verdicts_of(machine: str) -> list[Verdict]:
        return [
            Verdict.model_validate_json(m.payload)
            for m in sink.matching(lambda m: m.topic.endswith(f"/{machine}/verdict"))
        ]

    markers: list[int] = []

    def end_marker() -> None:
        """A reading after the others; once its verdict is here, theirs are too (the detector
        answers in delivery order)."""
        markers.append(len(markers))
        send(END_MARKER, markers[-1], readings_a[0])
        found = sink.wait_for(lambda m: f"/{END_MARKER}/" in m.topic, count=len(markers))
        assert len(found) >= len(markers), "no verdict for the end marker"

    first = detect()
    for seq in range(20):
        send("pump-a", seq, readings_a[seq])
    for seq in range(30):
        send("pump-b", seq, readings_b[seq])
    sink.wait_for(lambda m: m.topic.endswith("/pump-b/verdict"), count=30)
    # Two round trips: every verdict before them is confirmed, journaled and acknowledged.
    end_marker()
    end_marker()
    first.kill()
    second = detect()
    for seq in range(30, 90):
        send("pump-b", seq, readings_b[seq])
    second.wait_log("calibration_model_served")  # fitted off the loop, saved, bound
    for seq in range(90, 120):
        send("pump-b", seq, readings_b[seq])
    for seq in range(20, 40):
        send("pump-a", seq, readings_a[seq])
    sink.wait_for(lambda m: m.topic.endswith("/pump-b/verdict"), count=120, timeout=60)
    sink.wait_for(lambda m: m.topic.endswith("/pump-a/verdict"), count=40, timeout=60)
    end_marker()

    counts = verdict_counts(sink.matching(not_marker))
    assert duplicated(counts) == {}, second.log()
    assert sorted(counts) == sorted(
        [("pump-a", s) for s in range(40)] + [("pump-b", s) for s in range(120)]
    )
    a = verdicts_of("pump-a")
    as_plant = score_recording(trained, {c: np.array([r[c] for r in readings_a]) for c in CHANNELS})
    assert as_plant.flagged.all()  # served by the plant's model, pump-a would always alarm
    assert {v.model_version for v in a} == {own_a}
    assert sum(v.status == "ALERT" for v in a) <= 2
    b = sorted(verdicts_of("pump-b"), key=lambda v: v.seq)
    seen = [v.calibration.seen for v in b if v.calibration is not None]
    assert seen[:WINDOW] == list(range(1, WINDOW + 1))  # across the kill: counted once each
    assert set(seen[WINDOW:]) <= {WINDOW}  # while the fit ran: still CALIBRATING, not counted
    own_b = artifact.current_version(artifact.route_dir(models, "machine", "pump-b"))
    assert own_b is not None, second.log()
    served = [v for v in b if v.calibration is None]
    assert served, second.log()
    assert {v.model_version for v in served} == {own_b}
    assert [v.seq for v in b] == list(range(120))
    # The saved model is the one an offline fit on exactly the first 60 readings gives.
    offline = calibration_window.fit(
        calibration_window.FitRequest(
            machine="pump-b",
            line="line1",
            channels=CHANNELS,
            rows=tuple(tuple(r[c] for c in CHANNELS) for r in readings_b[:WINDOW]),
            spec=CalibrateSpec(readings=WINDOW, family="pca").fit_spec(),
        )
    )
    folder = artifact.route_dir(models, "machine", "pump-b")
    card = artifact.read_card(folder / own_b / artifact.CARD_FILE)
    assert card.threshold == pytest.approx(offline.card.threshold, rel=1e-12)
    assert second.terminate() == 0
