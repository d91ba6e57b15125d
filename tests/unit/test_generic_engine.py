"""A generic (CSV-trained) model in the detector shell: windows live in the keyed state."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from factorywatch.channels import canonical
from factorywatch.contracts import Telemetry, Verdict
from factorywatch.detector.mosquitto_shell import DetectorService
from factorywatch.detector.transport import MemoryTransport
from factorywatch.model import artifact
from factorywatch.model.generic import fit_columns, score_recording
from factorywatch.sensors.scenarios import generate
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics

ROOT = "unitgen"
TOPICS = Topics(ROOT)


def shell(model_dir: Path, state_dir: Path) -> tuple[DetectorService, MemoryTransport]:
    """A detector shell on a memory transport serving the promoted model."""
    transport = MemoryTransport()
    service = DetectorService(
        # Records to the journal every turn: the windows on disk are never behind. (With the
        # default cadence a kill -9 loses at most that many seconds of window updates.)
        DetectorSettings(
            client_id="det-gen",
            state_dir=state_dir,
            metrics_port=0,
            checkpoint_records_every_s=1e-6,
        ),
        BrokerSettings(topic_root=ROOT),
        model_dir,
        artifact.load(model_dir),
        transport=transport,
    )
    service.start()
    return service, transport


def test_windows_survive_a_crash_and_scores_match_offline(tmp_path: Path) -> None:
    """Killed mid-stream and restarted on its state directory, the detector keeps each
    machine's feature windows: every verdict's score equals the offline batch score."""
    run = generate(["noise_burst"], seed=2, train_rows=300, rows=460)
    columns = {canonical(c): np.array(v) for c, v in run.values.items()}
    model = fit_columns({c: v[:300] for c, v in columns.items()}, family="pca")
    models = tmp_path / "models"
    artifact.save_generic(models, model.scorer, model.card)
    artifact.promote(models, model.card.version)
    expected = score_recording(model, columns).score
    now = time.time()

    def send(service: DetectorService, transport: MemoryTransport, i: int) -> None:
        reading = Telemetry(
            machine_id="pump-1",
            line="line1",
            seq=i,
            ts=now + i * 0.001,
            readings={name: values[i] for name, values in run.values.items()},
        )
        transport.deliver(TOPICS.telemetry("line1", "pump-1"), reading.encode())
        service.turn(timeout=0.0)

    first, first_transport = shell(models, tmp_path / "state")
    for i in range(230):
        send(first, first_transport, i)
    first.turn(timeout=0.0)
    first.turn(timeout=0.0)
    features = first.engine.record("pump-1").features
    assert features["model"] == model.card.version
    assert features["z:current"]  # the windows are in the machine's keyed record
    first.checkpoint.close()  # kill -9: no shutdown
    second, second_transport = shell(models, tmp_path / "state")
    for i in range(230, 460):
        send(second, second_transport, i)
    verdicts = [
        Verdict.model_validate_json(p.payload)
        for t in (first_transport, second_transport)
        for p in t.published
        if p.topic.endswith("/verdict")
    ]
    by_seq = {v.seq: v.score for v in verdicts}
    assert sorted(by_seq) == list(range(460))
    assert np.allclose([by_seq[i] for i in range(460)], expected, rtol=1e-9)
    second.checkpoint.close()
