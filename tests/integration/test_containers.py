"""docker-compose.yml and the Dockerfiles, checked statically and their commands run locally.

These need no Docker engine: every command a container runs is run here as a local process
against a real Mosquitto with the config file the broker container uses. The live
`docker compose up` is tests/compose/test_compose.py.
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
CLUSTER_COMPOSE = PROJECT_DIR / "docker-compose.cluster.yml"  # the NATS stack, its own project
APP_DOCKERFILE = PROJECT_DIR / "docker" / "Dockerfile"
BROKER_DOCKERFILE = PROJECT_DIR / "docker" / "broker.Dockerfile"
NATS_DOCKERFILE = PROJECT_DIR / "docker" / "nats.Dockerfile"
# Debian's Prometheus and Alertmanager, each running as Debian's `prometheus` user.
MONITORING_DOCKERFILES = {
    "prometheus": PROJECT_DIR / "docker" / "prometheus.Dockerfile",
    "alertmanager": PROJECT_DIR / "docker" / "alertmanager.Dockerfile",
}
BASE = "debian:bookworm-slim"
SECRETS = "${FACTORYWATCH_SECRETS:-./secrets}"


def _compose(path: Path = COMPOSE) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _every_service() -> dict[str, Any]:
    """The services of both stacks (main and cluster) by name; only `train` is in both."""
    return {**_compose(CLUSTER_COMPOSE)["services"], **_compose()["services"]}


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def _mount(volume: str) -> tuple[str, str]:
    """(container path, source) of a short volume spec such as ``./a:/b:ro``."""
    source, target = volume.removesuffix(":ro").rsplit(":", 1)
    return target, source


def _stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage (a stage without a name is called ``final``)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, arg in _dockerfile(path):
        if op == "FROM":
            parts = arg.split()
            current = [(op, arg)]
            stages[parts[2] if len(parts) == 3 else "final"] = current
        else:
            current.append((op, arg))
    return stages


def test_compose_declares_broker_train_detector_and_three_sensors() -> None:
    """Broker, one-shot train, detector and three machines, in order, secrets never committed."""
    compose = _compose()
    services = compose["services"]
    broker = services["broker"]
    assert broker["build"]["dockerfile"] == "docker/broker.Dockerfile"
    assert broker["healthcheck"]["test"][0] == "CMD-SHELL"
    mounts = dict(_mount(v) for v in broker["volumes"])
    assert (PROJECT_DIR / mounts["/mosquitto/config/mosquitto.conf"]).resolve() == (
        PROJECT_DIR / "broker" / "mosquitto.conf"
    )
    # The ACL is broker/acl plus the registry's per-account blocks (broker init).
    assert mounts["/mosquitto/config/acl"] == "${FACTORYWATCH_SECRETS:-./secrets}/acl"
    assert mounts["/mosquitto/data"] == "broker-data", "broker persistence lives on a volume"
    train = services["train"]
    assert train["build"]["target"] == "train"
    assert train["command"] == ["factorywatch", "train", "--if-missing"]
    assert train["restart"] == "no"
    detector = services["detector"]
    assert detector["build"]["target"] == "runtime"
    assert detector["command"] == ["factorywatch", "detect"]
    assert detector["depends_on"] == {
        "broker": {"condition": "service_healthy"},
        "train": {"condition": "service_completed_successfully"},
    }
    # The detector follows the account registry (who may speak for which machine), mounted
    # as the file `broker add-user` rewrites in place.
    assert {s["target"] for s in detector["secrets"]} == {"detector.password", "registry.json"}
    registry_file = detector["environment"]["FACTORYWATCH_DETECTOR_REGISTRY_FILE"]
    assert registry_file == "/run/secrets/registry.json"
    sensors = [name for name in services if name.startswith("sensor-")]
    assert len(sensors) == 3
    declared = compose["secrets"]
    for name in ["detector", *sensors]:
        svc = services[name]
        assert svc["environment"]["FACTORYWATCH_MQTT_HOST"] == "broker"
        assert svc["command"][0] == "factorywatch"
        assert svc["image"] == "factorywatch:latest", "the runtime image, without the train extra"
        for secret in svc["secrets"]:
            assert secret["source"] in declared
            assert declared[secret["source"]]["file"].startswith(f"{SECRETS}/"), "never committed"
    for sensor in sensors:
        assert services[sensor]["depends_on"]["detector"]["condition"] == "service_healthy"
        assert services[sensor]["environment"]["FACTORYWATCH_MQTT_PORT"] == "8883", "TLS"
    named = set(compose["volumes"])
    used = {
        _mount(v)[1]
        for svc in services.values()
        for v in svc.get("volumes", [])
        if not v.startswith((".", "$"))
    }
    assert used <= named, "every named volume is declared"
    ignored = (PROJECT_DIR / ".gitignore").read_text().splitlines()
    assert "/secrets/" in ignored


def test_compose_ports_default_to_loopback_and_avoid_1883() -> None:
    """Every published port binds ${FACTORYWATCH_BIND:-127.0.0.1}, never the host's 1883."""
    services = _every_service()
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    # broker (2), detector metrics, web, prometheus, alertmanager, grafana; cluster stack:
    # the three nodes' MQTT listeners and nats-1's monitoring endpoint
    assert len(published) == 11
    pattern = re.compile(
        r"\$\{FACTORYWATCH_BIND:-([0-9.]+)\}:\$\{(FACTORYWATCH_\w+_PORT):-(\d+)\}:\d+"
    )
    variables, defaults = set(), set()
    for mapping in published:
        match = pattern.fullmatch(mapping)
        assert match is not None, mapping
        assert match.group(1) == "127.0.0.1", mapping
        # not the ports the same programs installed on the host usually hold
        assert match.group(3) not in {"1883", "8883", "9108", "8080", "9090", "9093", "3000"}
        variables.add(match.group(2))
        defaults.add(match.group(3))
    assert len(variables) == len(defaults) == 11, "each port has its own variable and default"


def test_every_container_is_hardened() -> None:
    """Read-only root filesystem, no capabilities, no privilege escalation, for every service."""
    for name, svc in _every_service().items():
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name


def test_operator_services_use_the_ops_image_and_only_their_own_secrets() -> None:
    """Recorder, web and notify run the ops image as the broker accounts they need, no more."""
    compose = _compose()
    services = compose["services"]
    wanted = {
        "recorder": {"history.password"},
        "web": {"web.password", "web-commands.password", "passwd", "registry.json"},
        "notify": {"notify.password"},
    }
    for name, targets in wanted.items():
        svc = services[name]
        assert svc["image"] == "factorywatch-ops:latest", name
        if name == "recorder":  # one service builds the image, the others run it
            assert svc["build"]["target"] == "ops", name
        else:
            assert "build" not in svc, name
            assert svc["pull_policy"] == "never", name
        verb = {"recorder": ["history", "record"], "web": ["web"], "notify": ["notify"]}[name]
        assert svc["command"][: 1 + len(verb)] == ["factorywatch", *verb], name
        assert svc["command"][svc["command"].index("--host") + 1] == "broker", name
        assert {s["target"] for s in svc["secrets"]} == targets, name
        assert svc["depends_on"]["broker"]["condition"] == "service_healthy", name
    history = "sqlite:////var/lib/factorywatch/history.sqlite"
    for name in ("recorder", "web"):
        assert services[name]["environment"]["FACTORYWATCH_HISTORY_URL"] == history
        assert "history:/var/lib/factorywatch" in services[name]["volumes"], "one shared store"
    assert services["web"]["healthcheck"]["test"][-1].count("/healthz") == 1
    notify = services["notify"]["command"]
    assert notify[notify.index("--alertmanager-url") + 1] == "http://alertmanager:9093"
    prometheus = yaml.safe_load((PROJECT_DIR / "deploy/prometheus/prometheus.yml").read_text())
    scraped = [t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]  # fmt: skip
    assert "detector:9108" in scraped, "Prometheus scrapes the detector by its service name"
    grafana = services["grafana"]
    assert grafana["profiles"] == ["grafana"], "Grafana (Docker Hub) only when asked for"


def test_dockerfiles_build_on_bookworm_slim_and_run_non_root() -> None:
    """Every image starts FROM debian:bookworm-slim or an earlier stage and runs as non-root."""
    for path in (
        APP_DOCKERFILE,
        BROKER_DOCKERFILE,
        NATS_DOCKERFILE,
        *MONITORING_DOCKERFILES.values(),
    ):
        stages = _stages(path)
        args = dict(
            arg.split("=", 1) for op, arg in _dockerfile(path) if op == "ARG" and "=" in arg
        )
        assert args["BASE"] == BASE
        for name, instructions in stages.items():
            image = instructions[0][1].split()[0]
            assert image == "${BASE}" or image in stages, f"{path.name} {name} FROM {image}"
            for op, arg in instructions:
                if op == "COPY" and not arg.startswith("--from"):
                    for src in arg.split()[:-1]:
                        assert (PROJECT_DIR / src).exists(), f"COPY source {src} is missing"
    app = _stages(APP_DOCKERFILE)
    compose = _compose()["services"]
    for target, service in (("runtime", "detector"), ("train", "train"), ("ops", "web")):
        instructions = app[target]
        users = [arg for op, arg in instructions if op == "USER"]
        assert users, f"{target} sets a USER"
        assert users[-1].split(":")[0] not in {"root", "0"}
        cmd = [arg for op, arg in instructions if op == "CMD"][-1]
        assert yaml.safe_load(cmd) == compose[service]["command"]
    broker_users = [arg for op, arg in _stages(BROKER_DOCKERFILE)["final"] if op == "USER"]
    assert broker_users == ["mosquitto"]
    nats_users = [arg for op, arg in _stages(NATS_DOCKERFILE)["final"] if op == "USER"]
    assert nats_users == ["10001:10001"]
    for service, path in MONITORING_DOCKERFILES.items():
        final = _stages(path)["final"]
        assert [arg for op, arg in final if op == "USER"] == ["prometheus"], path.name
        assert compose[service]["build"]["dockerfile"] == f"docker/{path.name}"


def test_runtime_image_installs_only_the_core_dependencies() -> None:
    """The runtime venv gets [project.dependencies] and the `cluster` extra (nats-py, for the
    JetStream detector); only the train image gets the `train` extra."""
    app = _stages(APP_DOCKERFILE)
    requirements = " ".join(arg for op, arg in app["build"] if op == "RUN")
    assert "open('/src/runtime.txt', 'w').write(chr(10).join(core + extra['cluster']))" in (
        requirements
    )
    wheels = (PROJECT_DIR / "scripts" / "docker-wheels.sh").read_text()
    assert '".[train,web,cluster]"' in wheels, "the wheelhouse holds nats-py too"
    runtime_run = " ".join(arg for op, arg in app["venv-runtime"] if op == "RUN")
    assert "-r /src/runtime.txt" in runtime_run
    assert "train" not in runtime_run
    assert ("COPY", "--from=venv-runtime /opt/venv /opt/venv") in app["venv"]
    assert app["runtime"][0] == ("FROM", "venv AS runtime")
    assert ("COPY", "--from=venv-train /opt/venv /opt/venv") in app["train"]
    # ops: the same venv layer plus only the files the `web` extra adds (pinned to runtime's)
    assert app["ops"][0] == ("FROM", "venv AS ops")
    assert ("COPY", "--from=venv-ops /delta/ /opt/venv/") in app["ops"]
    ops_run = " ".join(arg for op, arg in app["venv-ops"] if op == "RUN")
    assert "-c /tmp/runtime.lock -r /src/ops.txt" in ops_run
    assert "train" not in ops_run
    # And the final stage (what a plain `docker build` makes) is the runtime one.
    assert list(app)[-1] == "runtime"
    for tool in ("gcc", "build-essential", "python3-pip", "python3-venv"):
        for target in ("python", "venv", "runtime", "ops", "train"):
            text = " ".join(arg for _op, arg in app[target])
            assert tool not in text, f"{tool} in the {target} image"


def test_cluster_stack_three_nodes_disjoint_partitions_and_311_sensors() -> None:
    """The cluster stack: three nodes routed by name, a bootstrap before the detectors, the
    detectors' partitions disjoint and covering every partition, sensors on MQTT 3.1.1."""
    compose = _compose(CLUSTER_COMPOSE)
    services = compose["services"]
    cluster = set(services) - {"train"}
    nodes = ["nats-1", "nats-2", "nats-3"]
    detectors = ["cluster-detector-1", "cluster-detector-2"]
    assert cluster == {"cluster-config", "cluster-bootstrap", "cluster-sensors", *nodes,
                       *detectors}  # fmt: skip
    config = services["cluster-config"]["command"]
    assert config[:3] == ["factorywatch", "cluster", "config"]
    assert config[config.index("--nodes") + 1] == ",".join(nodes)
    count = config[config.index("--partition-count") + 1]
    for node in nodes:
        svc = services[node]
        assert svc["build"]["dockerfile"] == "docker/nats.Dockerfile"
        assert svc["command"] == ["nats-server", "-c", f"/config/{node}.conf"]
        assert "cluster-config:/config:ro" in svc["volumes"]
        assert f"{node}-data:/data" in svc["volumes"], "each node's JetStream store"
        assert svc["networks"]["default"]["aliases"] == ["nats"], "devices reach any node"
        assert svc["depends_on"]["cluster-config"]["condition"] == "service_completed_successfully"
    boot = services["cluster-bootstrap"]
    assert boot["command"][:3] == ["factorywatch", "cluster", "bootstrap"]
    assert {n: c["condition"] for n, c in boot["depends_on"].items()} == dict.fromkeys(
        nodes, "service_healthy"
    )
    owned: list[int] = []
    for name in detectors:
        svc = services[name]
        cmd = svc["command"]
        assert cmd[:4] == ["factorywatch", "detect", "--engine", "jetstream"]
        assert cmd[cmd.index("--partition-count") + 1] == count
        owned += [int(p) for p in cmd[cmd.index("--partitions") + 1].split(",")]
        assert cmd[cmd.index("--client-id") + 1] == name
        registry_file = svc["environment"]["FACTORYWATCH_DETECTOR_REGISTRY_FILE"]
        assert registry_file == "/run/secrets/registry.json", "it follows the registry"
        assert {s["target"] for s in svc["secrets"]} == {"detector.password", "registry.json"}
        assert svc["depends_on"]["cluster-bootstrap"]["condition"] == (
            "service_completed_successfully"
        )
    assert sorted(owned) == list(range(int(count))), "disjoint, and every partition owned"
    sensors = services["cluster-sensors"]
    assert sensors["environment"]["FACTORYWATCH_MQTT_PROTOCOL"] == "3.1.1"
    assert sensors["environment"]["FACTORYWATCH_MQTT_HOST"] == "nats"
    machines = sensors["command"][sensors["command"].index("--machine-id") + 1]
    assert config[config.index("--machines") + 1] == machines
    assert {s["target"] for s in sensors["secrets"]} == {
        f"{m}.password" for m in machines.split(",")
    }
    assert set(sensors["depends_on"]) == set(detectors)


def test_runtime_and_ops_commands_start_without_the_training_libraries() -> None:
    """The CLI of the runtime and ops images (no `train` extra) builds its parser and loads."""
    code = (
        "import sys\n"
        "for m in ('pandas', 'sklearn', 'matplotlib', 'kagglehub'): sys.modules[m] = None\n"
        "from factorywatch.cli import build_parser\n"
        "parser = build_parser()\n"
        "for argv in (['detect'], ['sensor', '--machine-id', 'm1'], ['watch', '--once'],\n"
        "             ['web'], ['history', 'record'], ['notify'],\n"
        "             ['cluster', 'bootstrap', '--nats-servers', 'nats://n:4222']):\n"
        "    parser.parse_args(argv)\n"
        "import factorywatch.detector.mosquitto_shell, factorywatch.web.app\n"
        "import factorywatch.history_recorder\n"
        "print('loaded')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "loaded"


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
        source = compose["secrets"][secret["source"]]["file"].removeprefix(f"{SECRETS}/")
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
    """Train (one-shot), detector and the three sensors, with compose's commands, secured."""
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
    volumes = {
        "FACTORYWATCH_DATA_DIR": str(tmp_path / "data"),
        "FACTORYWATCH_MODEL_DIR": str(tmp_path / "models"),
        "FACTORYWATCH_DETECTOR_STATE_DIR": str(tmp_path / "state"),
    }
    train = services["train"]
    train_env = {**volumes, **train["environment"]}
    train_env["FACTORYWATCH_DATASET_DIR"] = str(test_data.path.parent)
    if not test_data.verified:  # the synthetic stand-in is not under a name train looks for
        train_env["FACTORYWATCH_DATASET"] = str(test_data.path)
    extra = [] if test_data.verified else ["--no-verify"]
    for _ in range(2):  # the second run finds the model and does nothing
        proc = spawn(*train["command"][1:], *extra, env=train_env, name="train")
        assert proc.process.wait(300) == 0, proc.log()[-2000:]
    assert (tmp_path / "models" / "current").is_file(), "the one-shot train promoted a model"
    assert "not training" in proc.log()
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
                    env.update(volumes)
                    env["FACTORYWATCH_DETECTOR_METRICS_PORT"] = str(metrics_port)
                    proc = spawn(*svc["command"][1:], env=env, name=name)
                    proc.wait_log("telemetry_subscribed", timeout=180)
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
