"""A detector whose model cannot score the readings it gets says so once, loudly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from factorywatch.contracts import Telemetry
from factorywatch.detector.mosquitto_shell import DetectorService
from factorywatch.detector.transport import MemoryTransport
from factorywatch.logs import configure_logging
from factorywatch.model import artifact
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics
from tests.support import TYPICAL

TOPICS = Topics("unscorable")


def test_readings_of_other_channels_are_reported_once_in_the_log_and_health(
    small_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Readings lacking the model's channels give one error event and a /healthz entry, not
    only dead letters; readings the model can score give neither."""
    transport = MemoryTransport()
    service = DetectorService(
        DetectorSettings(client_id="det-unscorable", state_dir=tmp_path, metrics_port=0),
        BrokerSettings(topic_root="unscorable"),
        small_model_dir,
        artifact.load(small_model_dir),
        transport=transport,
    )
    # JSON lines on stderr whether or not an earlier test cached the module's logger
    # (structlog's capture_logs cannot see a logger cached on first use)
    configure_logging(json=True)
    service.start()
    try:
        other_shape = {"flow_rate": 1.0, "pressure": 2.0}
        now = time.time()
        capsys.readouterr()
        for seq, readings in enumerate([TYPICAL, other_shape, other_shape, other_shape], 1):
            payload = Telemetry(
                machine_id="pump-1",
                line="line1",
                seq=seq,
                ts=now,
                attributes={"product_type": "M"},
                readings=readings,
            ).encode()
            transport.deliver(TOPICS.telemetry("line1", "pump-1"), payload)
            service.turn(timeout=0.0)
            if seq == 1:
                assert "unscorable_readings" not in service.health()[1]
        logs = [
            json.loads(line)
            for line in capsys.readouterr().err.splitlines()
            if line.startswith("{")
        ]
        said = [e for e in logs if e["event"] == "model_cannot_score_readings"]
        assert len(said) == 1
        assert said[0]["level"] == "error"
        assert said[0]["model_version"] == service.model.version
        assert "models promote" in said[0]["hint"]
        unscorable = service.health()[1]["unscorable_readings"]
        assert "lacks channels" in unscorable["detail"]
        assert unscorable["model_version"] == service.model.version
    finally:
        service.shutdown()
