"""The detector shell with routes: a calibration window fitted off the loop, saved, re-bound."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector.mosquitto_shell import DetectorService
from factorywatch.detector.transport import MemoryTransport
from factorywatch.errors import DatasetError
from factorywatch.model import artifact
from factorywatch.model.asset import load_asset
from factorywatch.model.generic import fit_columns
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics

ROOT = "unitrouteshell"
TOPICS = Topics(ROOT)
CONFIG = """
groups:
  pumps: {machines: ["pump-*"]}
calibrate:
  readings: 60
  family: pca
  machines: ["new-*"]
"""


def _values(n: int, seed: int, level: float) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    return [
        {"flow": level + float(base[i] + rng.normal()), "pressure": 2 * level + float(base[i])}
        for i in range(n)
    ]


def _shell(models: Path, state: Path, config: Path) -> tuple[DetectorService, MemoryTransport]:
    transport = MemoryTransport()
    settings = DetectorSettings(
        client_id="det-route",
        state_dir=state,
        metrics_port=0,
        asset_config=config,
        checkpoint_records_every_s=60.0,  # calibration rows are journaled at once anyway
    )
    service = DetectorService(
        settings,
        BrokerSettings(topic_root=ROOT),
        models,
        artifact.load(models),
        transport=transport,
    )
    service.start()
    return service, transport


def _send(service: DetectorService, transport: MemoryTransport, machine: str, seq: int,
          values: dict[str, float]) -> None:  # fmt: skip
    reading = Telemetry(machine_id=machine, line="line1", seq=seq, ts=time.time(), readings=values)
    transport.deliver(TOPICS.telemetry("line1", machine), reading.encode())
    service.turn(timeout=0.0)


def _verdicts(*transports: MemoryTransport) -> list[Verdict]:
    return [
        Verdict.model_validate_json(p.payload)
        for t in transports
        for p in t.published
        if p.topic.endswith("/verdict")
    ]


def test_calibration_survives_a_crash_is_fitted_off_the_loop_and_rebound(tmp_path: Path) -> None:
    """Killed mid-calibration (no shutdown), a restarted shell counts on; the full window is
    fitted by the worker while readings keep getting CALIBRATING verdicts, saved as the
    machine's own model and served; a second restart binds it from disk."""
    models = tmp_path / "models"
    default = fit_columns(
        {k: np.array([v[k] for v in _values(300, 1, 10.0)]) for k in ("flow", "pressure")},
        family="pca",
    )
    artifact.save_generic(models, default.scorer, default.card)
    artifact.promote(models, default.card.version)
    config = tmp_path / "assets.yaml"
    config.write_text(CONFIG)
    values = _values(120, 2, 50.0)
    first, t1 = _shell(models, tmp_path / "state", config)
    for seq in range(25):
        _send(first, t1, "new-1", seq, values[seq])
    first.checkpoint.close()  # kill -9: no shutdown, no snapshot
    # Journaled as it was counted: each reading after the first (whose record the first turn's
    # snapshot holds) as a row of its own, not the whole growing window again per reading.
    journal = (tmp_path / "state").glob("det-route.journal.*")
    kinds = [line.split(b" ", 1)[0] for path in journal for line in path.read_bytes().splitlines()]
    assert kinds.count(b"C") == 24
    assert kinds.count(b"S") == 0
    second, t2 = _shell(models, tmp_path / "state", config)
    for seq in range(25, 65):  # the window fills at 60; 5 more while (or after) it fits
        _send(second, t2, "new-1", seq, values[seq])
    deadline = time.monotonic() + 120
    while second.engine.router.machine_models.get("new-1") is None:
        assert time.monotonic() < deadline, "the calibration fit did not finish"
        second.turn(timeout=0.05)
    served = 65
    for seq in range(served, served + 3):
        _send(second, t2, "new-1", seq, values[seq])
    verdicts = _verdicts(t1, t2)
    assert [v.seq for v in verdicts] == list(range(served + 3))
    seen = [v.calibration.seen for v in verdicts if v.calibration is not None]
    assert seen[:60] == list(range(1, 61))
    assert set(seen[60:]) <= {60}
    own = artifact.current_version(artifact.route_dir(models, "machine", "new-1"))
    assert own is not None
    assert {v.model_version for v in verdicts[-3:]} == {own}
    assert {v.status for v in verdicts[-3:]} <= {"NORMAL", "ALERT"}
    # The window the fit saw is exactly the first 60 readings: an offline fit agrees.
    offline = fit_columns(
        {k: np.array([v[k] for v in values[:60]]) for k in ("flow", "pressure")}, family="pca"
    )
    card = artifact.read_card(
        artifact.route_dir(models, "machine", "new-1") / own / artifact.CARD_FILE
    )
    assert card.threshold == pytest.approx(offline.card.threshold, rel=1e-12)
    assert card.data.rows == 60
    second.shutdown(drain_timeout_s=1.0)
    third, t3 = _shell(models, tmp_path / "state", config)
    _send(third, t3, "new-1", 500, values[0])
    assert _verdicts(t3)[-1].model_version == own
    assert third.engine.record("new-1").calibration is None
    third.shutdown(drain_timeout_s=1.0)


def test_asset_config_errors_name_the_problem(tmp_path: Path) -> None:
    """A calibrate section naming an undefined group, or too small a window, is refused."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("calibrate: {readings: 100, groups: [nope]}\n")
    with pytest.raises(DatasetError, match="nope"):
        load_asset(bad, need_channels=False)
    bad.write_text("calibrate: {readings: 10}\n")
    with pytest.raises(DatasetError, match="greater than or equal to 50"):
        load_asset(bad, need_channels=False)
    good = tmp_path / "good.json"  # JSON is YAML: what the detector image reads
    good.write_text('{"groups": {"pumps": ["pump-*"]}, "calibrate": {"readings": 50}}')
    asset = load_asset(good, need_channels=False)
    assert asset.group_specs()["pumps"].matches("pump-3", "line9")
