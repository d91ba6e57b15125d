"""What a fresh Python process imports: the detector's model load path leaves scikit-learn
out, and the detector image (no scikit-learn, pandas or pyyaml) still calibrates a PCA
window. A fresh interpreter is the only clean sys.modules, so these start one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from factorywatch.model import artifact


def test_loading_for_the_detector_imports_no_scikit_learn(small_model_dir: Path) -> None:
    """The fast load path leaves scikit-learn and joblib out of the process (memory, start)."""
    code = (
        "import sys; from model import artifact; from pathlib import Path; "
        f"artifact.load(Path({str(small_model_dir)!r})); "
        "print(sorted(m for m in ('sklearn', 'joblib', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"


def test_detector_image_calibrates_pca_and_refuses_iforest_without_training_libraries(
    tmp_path: Path,
) -> None:
    """Without scikit-learn, pandas and pyyaml (the detector image): a JSON asset config is
    read, a PCA window is fitted and saved, and an iforest calibration stops start-up with
    what to do."""
    config = tmp_path / "assets.json"
    config.write_text('{"calibrate": {"readings": 60, "family": "pca", "default": true}}')
    code = f"""
import sys
for m in ('pandas', 'sklearn', 'matplotlib', 'kagglehub', 'yaml'): sys.modules[m] = None
from pathlib import Path
import numpy as np
from factorywatch.detector import calibration_window
from factorywatch.errors import FactorywatchError
from factorywatch.model import artifact
from factorywatch.model.asset import CalibrateSpec, load_asset
asset = load_asset(Path({str(config)!r}), need_channels=False)
calibration_window.check_fittable(asset.calibrate)
rng = np.random.default_rng(0)
rows = tuple(tuple(float(v) for v in rng.normal(size=2)) for _ in range(60))
request = calibration_window.FitRequest("m1", "l1", ("a", "b"), rows, asset.calibrate.fit_spec())
trained = calibration_window.fit(request)
folder = artifact.route_dir(Path({str(tmp_path)!r}), "machine", "m1")
artifact.save_generic(folder, trained.scorer, trained.card)
artifact.promote(folder, trained.card.version)
try:
    calibration_window.check_fittable(CalibrateSpec(readings=60))
except FactorywatchError as exc:
    print("refused:", exc)
print("fitted", trained.card.scorer_family, trained.card.data.rows)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: calibrate.family is iforest, which needs scikit-learn" in done.stdout
    assert done.stdout.strip().endswith("fitted pca 60")
    assert artifact.routed_versions(tmp_path) == {
        ("machine", "m1"): artifact.current_version(tmp_path / "machines" / "m1")
    }


def test_without_scikit_learn_a_forest_does_not_re_baseline_and_says_so(tmp_path: Path) -> None:
    """The detector image cannot refit an Isolation Forest: a machine whose alert stays open
    past its card's N keeps its alert and model (no CALIBRATING verdict), and the engine
    says why once, with the remedy."""
    from factorywatch.model.generic import fit_columns  # noqa: PLC0415 - the parent has sklearn

    rng = np.random.default_rng(3)
    trained = fit_columns({"a": rng.normal(size=60), "b": rng.normal(size=60)}, trees=20)
    artifact.save_generic(tmp_path, trained.scorer, trained.card)
    code = f"""
import json, sys, time
for m in ('pandas', 'sklearn', 'matplotlib', 'kagglehub', 'yaml'): sys.modules[m] = None
from pathlib import Path
from factorywatch.contracts import Telemetry
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine
from factorywatch.model import artifact
from factorywatch.topics import Topics
topics = Topics("fresh")
engine = Engine(artifact.load(Path({str(tmp_path)!r}), {trained.card.version!r}), topics)
now = time.time()
out = []
for seq in range(200):
    values = {{"a": 9.0, "b": 9.0}}
    reading = Telemetry(machine_id="m1", line="l1", seq=seq, ts=now, readings=values)
    message = Received(topics.telemetry("l1", "m1"), reading.encode(), now, 0.0, seq)
    out += engine.handle([message], now)
print(json.dumps({{
    "notices": [n["event"] for o in out for n in o.notices],
    "events": [e.event for o in out for e in o.events],
    "statuses": sorted({{v.status for o in out for v in o.verdicts}}),
    "remedy": [n.get("remedy") for o in out for n in o.notices],
}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["notices"] == ["rebaseline_unavailable"]
    assert "factorywatch[train]" in result["remedy"][0]
    assert result["events"] == ["ALERT_RAISED"]
    assert result["statuses"] == ["ALERT"]
