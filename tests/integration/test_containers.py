"""docker-compose.yml and the Dockerfile, checked statically and their commands run for real.

No Docker engine runs here, so every command a container would run is run by these tests as
a local process against a real Mosquitto with the same config file the broker container
mounts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from factorywatch.contracts import Verdict
from factorywatch.settings import PROJECT_DIR, BrokerSettings
from factorywatch.topics import Topics
from tests.conftest import DatasetChoice
from tests.support import Collector, Proc

COMPOSE = PROJECT_DIR / "docker-compose.yml"
DOCKERFILE = PROJECT_DIR / "detector" / "Dockerfile"


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_compose_declares_broker_detector_and_three_sensors() -> None:
    """The compose file has the broker with a healthcheck and the roles waiting for it."""
    compose = _compose()
    services = compose["services"]
    broker = services["broker"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert broker["healthcheck"]["test"][0] == "CMD"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
    assert (PROJECT_DIR / mounts["/mosquitto/config/mosquitto.conf"]).resolve() == (
        PROJECT_DIR / "broker" / "mosquitto.conf"
    )
    assert "/mosquitto/data" in mounts, "broker persistence lives on a volume"
    sensors = [name for name in services if name.startswith("sensor-")]
    assert len(sensors) == 3
    for name in ["detector", *sensors]:
        svc = services[name]
        assert svc["depends_on"]["broker"]["condition"] == "service_healthy"
        assert svc["environment"]["FACTORYWATCH_MQTT_HOST"] == "broker"
        assert svc["command"][0] == "factorywatch"
    assert services["detector"]["build"]["dockerfile"] == "detector/Dockerfile"
    assert (
        PROJECT_DIR / services["detector"]["build"]["context"] / "detector/Dockerfile"
    ).is_file()
    named = set(compose["volumes"])
    used = {
        v.split(":")[0]
        for svc in services.values()
        for v in svc.get("volumes", [])
        if not v.startswith(".")
    }
    assert used <= named, "every named volume is declared"


def test_dockerfile_is_slim_non_root_and_copies_what_exists() -> None:
    """The image is python:3.11-slim, runs as a non-root user and copies real paths."""
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users, "the image sets a USER"
    assert users[-1] not in {"root", "0"}
    for op, arg in instructions:
        if op == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert (PROJECT_DIR / src).exists(), f"COPY source {src} is missing"
    cmd = [arg for op, arg in instructions if op == "CMD"][-1]
    compose_cmd = _compose()["services"]["detector"]["command"]
    assert yaml.safe_load(cmd) == compose_cmd


@pytest.mark.integration
@pytest.mark.slow
def test_every_container_command_runs_against_the_project_broker(
    spawn: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    test_data: DatasetChoice,
    tmp_path: Path,
) -> None:
    """Detector (training on first start) and the three sensor commands from compose work."""
    services = _compose()["services"]
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    env_common = {
        "FACTORYWATCH_MQTT_HOST": "127.0.0.1",
        "FACTORYWATCH_MQTT_PORT": str(settings.port),
        "FACTORYWATCH_MQTT_TOPIC_ROOT": settings.topic_root,
    }
    detector_svc = services["detector"]
    detector_env = {
        **detector_svc["environment"],
        **env_common,
        "FACTORYWATCH_DATA_DIR": str(tmp_path / "data"),
        "FACTORYWATCH_MODEL_DIR": str(tmp_path / "models"),
        "FACTORYWATCH_DETECTOR_STATE_DIR": str(tmp_path / "state"),
        "FACTORYWATCH_DATASET": str(test_data.path),
    }
    extra = [] if test_data.verified else ["--no-verify"]
    detector = spawn(*detector_svc["command"][1:], *extra, env=detector_env, name="detector")
    detector.wait_log("telemetry_subscribed", timeout=180)
    assert (tmp_path / "models" / "current").is_file(), "trained on first start"
    sensors = [
        spawn(
            *services[name]["command"][1:],
            env={**services[name]["environment"], **env_common},
            name=name,
        )
        for name in services
        if name.startswith("sensor-")
    ]
    machines = {
        services[n]["command"][services[n]["command"].index("--machine-id") + 1]
        for n in services
        if n.startswith("sensor-")
    }
    deadline = time.monotonic() + 60
    seen: set[str] = set()
    while seen != machines and time.monotonic() < deadline:
        seen = {
            Verdict.model_validate_json(m.payload).machine_id
            for m in col.matching(lambda m: m.topic.endswith("/verdict"))
        }
        time.sleep(0.2)
    assert seen == machines
    for proc in [*sensors, detector]:
        assert proc.terminate() == 0, proc.log()[-2000:]
