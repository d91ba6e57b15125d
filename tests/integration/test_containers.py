"""docker-compose.yml and the Dockerfile, checked statically and their commands run for real.

No Docker engine runs here, so every command a container would run is run by these tests as
a local process against a real Mosquitto with the same config file the broker container
mounts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from factorywatch.broker import LocalBroker, free_port
from factorywatch.contracts import Verdict
from factorywatch.credentials import init_secrets
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.conftest import DatasetChoice
from tests.support import PROJECT_DIR, Collector, Proc

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
    """The compose file has the secured broker with a healthcheck and the roles waiting for it."""
    compose = _compose()
    services = compose["services"]
    broker = services["broker"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert broker["healthcheck"]["test"][0] == "CMD-SHELL"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
    assert (PROJECT_DIR / mounts["/mosquitto/config/mosquitto.conf"]).resolve() == (
        PROJECT_DIR / "broker" / "mosquitto.conf"
    )
    # The ACL is broker/acl plus the registry's gateway and detector blocks (broker init).
    assert mounts["/mosquitto/config/acl"] == "./secrets/acl"
    assert "/mosquitto/data" in mounts, "broker persistence lives on a volume"
    sensors = [name for name in services if name.startswith("sensor-")]
    assert len(sensors) == 3
    declared = compose["secrets"]
    for name in ["detector", *sensors]:
        svc = services[name]
        depends = svc.get("depends_on", compose["x-factorywatch"]["depends_on"])
        wanted = "broker" if name == "detector" else "detector"
        assert depends[wanted]["condition"] == "service_healthy"
        assert svc["environment"]["FACTORYWATCH_MQTT_HOST"] == "broker"
        assert svc["command"][0] == "factorywatch"
        for secret in svc["secrets"]:
            assert secret["source"] in declared
            assert declared[secret["source"]]["file"].startswith("./secrets/"), "never committed"
    for sensor in sensors:
        env = services[sensor]["environment"]
        assert env["FACTORYWATCH_MQTT_PORT"] == "8883", "machines talk TLS"
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
    ignored = (PROJECT_DIR / ".gitignore").read_text().splitlines()
    assert "/secrets/" in ignored


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


def _localise(
    env: dict[str, str], svc: dict[str, Any], run_secrets: Path, broker: LocalBroker
) -> dict[str, str]:
    """A container's environment for a local process: secrets, host and ports mapped."""
    out = {k: str(v) for k, v in env.items()}
    ports = {"1883": str(broker.port), "8883": str(broker.tls_port)}
    out["FACTORYWATCH_MQTT_HOST"] = "127.0.0.1"
    out["FACTORYWATCH_MQTT_PORT"] = ports[out["FACTORYWATCH_MQTT_PORT"]]
    for key, value in out.items():
        if value.startswith("/run/secrets"):
            out[key] = value.replace("/run/secrets", str(run_secrets))
    return out


def _mount_secrets(
    compose: dict[str, Any], svc: dict[str, Any], secrets_dir: Path, target_dir: Path
) -> None:
    """Do what compose does with `secrets:`: each source file appears as /run/secrets/<target>."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for secret in svc.get("secrets", []):
        source = compose["secrets"][secret["source"]]["file"].removeprefix("./secrets/")
        (target_dir / secret["target"]).write_bytes((secrets_dir / source).read_bytes())


@pytest.mark.integration
def test_broker_healthcheck_command_passes_on_the_secured_broker(tmp_path: Path) -> None:
    """The compose healthcheck (mosquitto_sub as `healthcheck` on $SYS) succeeds for real."""
    secrets_dir = tmp_path / "secrets"
    init_secrets(secrets_dir, ())
    with LocalBroker(tmp_path / "b", secrets_dir=secrets_dir) as broker:
        shell = _compose()["services"]["broker"]["healthcheck"]["test"][1]
        command = (
            shell.replace("$$", "$")
            .replace("/mosquitto/secrets", str(secrets_dir))
            .replace("mosquitto_sub ", f"mosquitto_sub -p {broker.port} ", 1)
        )
        done = subprocess.run(["sh", "-c", command], capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "uptime was printed"


@pytest.mark.integration
@pytest.mark.slow
def test_every_container_command_runs_against_the_project_broker(
    spawn: Callable[..., Proc],
    test_data: DatasetChoice,
    tmp_path: Path,
) -> None:
    """Detector (training on first start) and the three sensors, as compose runs them, secured."""
    compose = _compose()
    services = compose["services"]
    machines = [
        services[n]["command"][services[n]["command"].index("--machine-id") + 1]
        for n in services
        if n.startswith("sensor-")
    ]
    secrets_dir = tmp_path / "secrets"
    init_secrets(secrets_dir, tuple(machines))
    metrics_port = free_port()
    with LocalBroker(tmp_path / "broker", secrets_dir=secrets_dir) as broker:
        viewer = BrokerSettings().with_overrides(
            port=broker.port, username="viewer", secrets_dir=secrets_dir
        )
        col = Collector(viewer, [Topics().alerts_filter], "compose-viewer")
        try:
            procs = []
            for name in ["detector", *[n for n in services if n.startswith("sensor-")]]:
                svc = services[name]
                run_secrets = tmp_path / "run-secrets" / name
                _mount_secrets(compose, svc, secrets_dir, run_secrets)
                env = _localise(svc["environment"], svc, run_secrets, broker)
                if name == "detector":
                    env.update(
                        {
                            "FACTORYWATCH_DETECTOR_METRICS_PORT": str(metrics_port),
                            "FACTORYWATCH_DATA_DIR": str(tmp_path / "data"),
                            "FACTORYWATCH_MODEL_DIR": str(tmp_path / "models"),
                            "FACTORYWATCH_DETECTOR_STATE_DIR": str(tmp_path / "state"),
                            "FACTORYWATCH_DATASET": str(test_data.path),
                        }
                    )
                    extra = [] if test_data.verified else ["--no-verify"]
                    proc = spawn(*svc["command"][1:], *extra, env=env, name=name)
                    proc.wait_log("telemetry_subscribed", timeout=180)
                    assert (tmp_path / "models" / "current").is_file(), "trained on first start"
                    health = [
                        arg.replace("9108", str(metrics_port))
                        for arg in svc["healthcheck"]["test"][1:]
                    ]
                    health[0] = sys.executable  # the image's `python`
                    done = subprocess.run(health, capture_output=True, timeout=30, check=False)
                    assert done.returncode == 0, done.stderr
                else:
                    proc = spawn(*svc["command"][1:], env=env, name=name)
                procs.append(proc)
            deadline = time.monotonic() + 60
            seen: set[str] = set()
            while seen != set(machines) and time.monotonic() < deadline:
                seen = {
                    Verdict.model_validate_json(m.payload).machine_id
                    for m in col.matching(lambda m: m.topic.endswith("/verdict"))
                }
                time.sleep(0.2)
            assert seen == set(machines)
            for proc in reversed(procs):
                assert proc.terminate() == 0, proc.log()[-2000:]
        finally:
            col.close()
