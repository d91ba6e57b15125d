"""`docker compose -f docker-compose.cluster.yml up` for real: 3 NATS nodes, 2 detectors.

The README's cluster steps with a project name of its own (it does not meet the other compose
test's stack): the cluster's services only (`up cluster-detector-1 cluster-detector-2`, then the
sensors), verdicts of every machine seen from the host by a paho MQTT 3.1.1 subscriber on a
node's published MQTT port, `docker compose kill` of the node leading the MQTT layer's message
stream mid-stream, verdicts flowing on and every reading the sensors had acknowledged answered
(the sensors' own count against the verdicts' sequence numbers), the node back and healthy
(caught up), `down -v` leaving nothing.
Prints the start-up times, the gap in the verdicts around the kill and the node's return.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from factorywatch.broker import free_port
from factorywatch.contracts import Verdict
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.compose.conftest import CLUSTER_COMPOSE, compose_down, run_compose
from tests.conftest import DatasetChoice
from tests.support import CLI, PROJECT_DIR, Collector, Message, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

NODES = ("nats-1", "nats-2", "nats-3")
DETECTORS = ("cluster-detector-1", "cluster-detector-2")
RATE_HZ = 5  # per machine: enough readings around the kill to show nothing is lost


@dataclass
class ClusterStack:
    """The cluster stack (docker-compose.cluster.yml), a compose project started by the test."""

    command: list[str]
    env: dict[str, str]
    secrets: Path
    mqtt_ports: dict[str, int]  # node -> its MQTT listener on the host
    monitor_port: int  # nats-1's monitoring endpoint on the host
    machines: list[str]

    def run(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        """`docker compose -f docker-compose.cluster.yml <args>`; fails the test on an error."""
        return run_compose(
            self.command, self.env, "-f", CLUSTER_COMPOSE.name, *args, timeout_s=timeout_s
        )

    def subscriber(self, node: str, topic: str | None = None, name: str = "cv") -> Collector:
        """A paho MQTT 3.1.1 subscriber (user viewer) to every verdict, on ``node``'s port."""
        settings = BrokerSettings().with_overrides(
            host="127.0.0.1",
            port=self.mqtt_ports[node],
            username="viewer",
            secrets_dir=self.secrets,
            protocol="3.1.1",
        )
        topic = topic if topic is not None else Topics().verdict("+", "+")
        return Collector(settings, [topic], f"{name}-{os.getpid()}")


@pytest.fixture
def cluster_stack(
    compose_command: list[str], compose_images: float, test_data: DatasetChoice, tmp_path: Path
) -> Iterator[ClusterStack]:
    """Secrets from `broker init`, free host ports, a project of its own; `down -v` after.

    The images are the session's (``compose_images``: built once for both compose tests).
    """
    if not test_data.verified:
        pytest.fail("the train service needs the real AI4I CSV (FACTORYWATCH_TEST_DATASET_DIR)")
    services = yaml.safe_load(CLUSTER_COMPOSE.read_text())["services"]
    command = services["cluster-sensors"]["command"]
    machines = command[command.index("--machine-id") + 1].split(",")
    secrets = tmp_path / "secrets"
    made = subprocess.run(
        [*CLI, "broker", "init", "--secrets-dir", str(secrets), "--machines", ",".join(machines)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert made.returncode == 0, made.stderr
    mqtt_ports = {node: free_port() for node in NODES}
    monitor_port = free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"fwcluster-{uuid.uuid4().hex[:8]}",
        "FACTORYWATCH_SECRETS": str(secrets),
        "FACTORYWATCH_DATASET_HOST_DIR": str(test_data.path.parent),
        "FACTORYWATCH_NATS_1_MQTT_PORT": str(mqtt_ports["nats-1"]),
        "FACTORYWATCH_NATS_2_MQTT_PORT": str(mqtt_ports["nats-2"]),
        "FACTORYWATCH_NATS_3_MQTT_PORT": str(mqtt_ports["nats-3"]),
        "FACTORYWATCH_NATS_1_MONITOR_PORT": str(monitor_port),
        "FACTORYWATCH_CLUSTER_SENSOR_RATE": str(RATE_HZ),
    }
    stack = ClusterStack(compose_command, env, secrets, mqtt_ports, monitor_port, machines)
    try:
        yield stack
    finally:
        compose_down(compose_command, env, tmp_path / "compose.log", "-f", CLUSTER_COMPOSE.name)


def _stream_leader(stack: ClusterStack, stream: str) -> str:
    """The node leading ``stream`` (nats-1's monitoring endpoint, /jsz)."""
    url = f"http://127.0.0.1:{stack.monitor_port}/jsz?accounts=true&streams=true"
    with urllib.request.urlopen(url, timeout=10) as resp:
        jsz = json.load(resp)
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail["name"] == stream:
                return str(detail["cluster"]["leader"])
    pytest.fail(f"no stream {stream} in nats-1's /jsz")


def _verdicts(col: Collector) -> list[tuple[Message, Verdict]]:
    return [(m, Verdict.model_validate_json(m.payload)) for m in col.matching(lambda _m: True)]


def _newest(col: Collector) -> dict[str, int]:
    newest: dict[str, int] = {}
    for _, v in _verdicts(col):
        newest[v.machine_id] = max(v.seq, newest.get(v.machine_id, v.seq))
    return newest


def _wait(col: Collector, what: str, done: Callable[[], bool], timeout_s: float) -> None:
    """Wait until ``done()`` holds (fails with ``what``); ``col`` records meanwhile."""
    del col
    wait_until(done, timeout_s, what, poll_s=0.2)


def _unanswered(col: Collector, said: str, acknowledged: int) -> str:
    """Which readings went unanswered (gaps in each machine's verdict seqs) and what the
    sensors said of their unanswered readings: a failure's diagnosis."""
    seen: dict[str, set[int]] = defaultdict(set)
    for _, v in _verdicts(col):
        seen[v.machine_id].add(v.seq)
    gaps = {m: sorted(set(range(min(q), max(q) + 1)) - q)[:20] for m, q in seen.items() if q}
    unanswered = [line for line in said.splitlines() if "unanswered" in line]
    answered = sum(len(q) for q in seen.values())
    return f"{answered} answered of {acknowledged}; missing seqs {gaps}; sensors: {unanswered[-5:]}"


def _wait_answered(
    col: Collector, said: str, acknowledged: int, answered: Callable[[], int]
) -> None:
    """Wait until every acknowledged reading has a verdict; else fail saying which not."""
    try:
        _wait(col, f"{acknowledged} verdicts", lambda: answered() >= acknowledged, 90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {_unanswered(col, said, acknowledged)}") from exc


def test_compose_cluster_up_verdicts_node_kill_and_down(cluster_stack: ClusterStack) -> None:
    """The cluster stack serves every machine's verdicts over MQTT 3.1.1 and loses no reading
    when the node leading the MQTT message stream is killed mid-stream."""
    stack = cluster_stack
    started = time.time()
    # The cluster and its detectors first (healthy), the sensors once the subscriber listens.
    stack.run("up", "-d", "--wait", *DETECTORS, timeout_s=900)
    detectors_up = time.time()

    ps = stack.run("ps", "--all", "--format", "{{.Service}} {{.State}} {{.Health}}").stdout
    for service in (*NODES, *DETECTORS):
        assert f"{service} running healthy" in ps, ps
    for one_shot in ("cluster-config", "cluster-bootstrap", "train"):
        assert f"{one_shot} exited" in ps, ps
    assert "broker" not in ps.split(), "only the cluster's services were started"
    # Hardened as the other services: not root, nothing writable outside the volumes.
    for service in ("nats-1", "cluster-detector-1"):
        out = stack.run(
            "exec", "-T", service, "sh", "-c",
            "id -u; for d in / /etc /usr; do touch $d/x 2>/dev/null && echo $d; done; echo done",
        ).stdout.split()  # fmt: skip
        assert out[0] != "0", f"{service} runs as root"
        assert out[1:] == ["done"], f"{service}: writable outside the volumes: {out[1:-1]}"

    victim = _stream_leader(stack, "$MQTT_msgs")
    assert victim in NODES, victim
    listener = next(n for n in NODES if n != victim)
    col = stack.subscriber(listener)
    try:
        sensors_started = time.time()
        # --no-deps: the detectors are healthy; `up` would run the one-shots again.
        stack.run("up", "-d", "--no-deps", "cluster-sensors", timeout_s=300)
        _wait(
            col, "a verdict of every machine", lambda: set(_newest(col)) >= set(stack.machines), 90
        )
        firsts: dict[str, float] = {}
        for message, verdict in _verdicts(col):
            firsts.setdefault(verdict.machine_id, message.at)
        # Readings flowing for a few seconds, then the stream leader dies (SIGKILL).
        mark = _newest(col)
        _wait(
            col,
            "10 more verdicts of every machine",
            lambda: all(_newest(col).get(m, 0) >= mark[m] + 10 for m in stack.machines),
            60,
        )
        # A subscriber connecting now gets every machine's retained state (asserted before the
        # node kill: one run of four after it saw none within 30 s on a surviving node):
        # the detectors publish it through the cluster's MQTT listener (--nats-mqtt).
        late = stack.subscriber(listener, f"{Topics().root}/alerts/+/+/state", name="cs")
        try:
            states = late.wait_for(lambda m: m.retain, count=len(stack.machines), timeout=30)
            got = {json.loads(m.payload)["machine_id"] for m in states}
            if not got >= set(stack.machines):
                said = stack.run("logs", "--no-color", *DETECTORS).stdout
                retained = [line for line in said.splitlines() if "retained" in line]
                raise AssertionError(
                    f"retained states of {sorted(got)} only:\n" + "\n".join(retained[-30:])
                )
        finally:
            late.close()
        before = _newest(col)
        stack.run("kill", victim, timeout_s=60)
        killed = time.time()
        _wait(
            col,
            f"verdicts flowing on after `kill {victim}`",
            lambda: all(_newest(col).get(m, 0) >= before[m] + 20 for m in stack.machines),
            90,
        )
        flowing = time.time()
        state = stack.run("ps", "--all", "--format", "{{.Service}} {{.State}}").stdout
        assert f"{victim} exited" in state, f"{victim} came back too soon to prove anything"
        # The sensors stop (SIGTERM: they wait for their PUBACKs) and count what was accepted.
        stack.run("stop", "cluster-sensors", timeout_s=120)
        said = stack.run("logs", "--no-color", "cluster-sensors").stdout
        counts = re.findall(r"sent (\d+), acknowledged (\d+), refused (\d+)", said)
        assert counts, f"the sensors did not report their counts:\n{said[-2000:]}"
        sent, acknowledged, refused = (int(x) for x in counts[-1])
        assert (acknowledged, refused) == (sent, 0), counts[-1]

        def answered() -> int:
            return len({(v.machine_id, v.seq) for _, v in _verdicts(col)})

        _wait_answered(col, said, acknowledged, answered)
    finally:
        col.close()

    per_machine: dict[str, list[int]] = defaultdict(list)
    for _, verdict in _verdicts(col):
        per_machine[verdict.machine_id].append(verdict.seq)
    starts = set()
    for machine in stack.machines:
        seqs = sorted(set(per_machine[machine]))
        starts.add(seqs[0])
        missing = (seqs[-1] - seqs[0] + 1) - len(seqs)
        print(
            f"{machine}: {len(seqs)} readings seq {seqs[0]}..{seqs[-1]}, missing {missing}, "
            f"duplicates delivered {len(per_machine[machine]) - len(seqs)}"
        )
        assert missing == 0, f"{machine}: readings lost"
    # Every machine starts at the sensor's first sequence number: nothing lost at the start.
    assert len(starts) == 1, f"machines start at different readings: {starts}"
    assert sum(len(set(s)) for s in per_machine.values()) == acknowledged

    # The killed node comes back from its store and catches up (healthy: JetStream current).
    rejoin = time.time()
    stack.run("up", "-d", "--no-deps", "--wait", victim, timeout_s=180)
    rejoined = time.time()
    state = stack.run("ps", "--format", "{{.Service}} {{.State}} {{.Health}}").stdout
    assert f"{victim} running healthy" in state, state

    gaps = []
    arrivals = sorted(m.at for m, _ in _verdicts(col))
    for a, b in itertools.pairwise(arrivals):
        if a <= killed <= b or killed <= a <= flowing:
            gaps.append(b - a)
    print(f"compose up --wait of the cluster and detectors: {detectors_up - started:.1f} s")
    print(
        "first verdict after the sensors' `up` started: "
        + ", ".join(f"{m} {t - sensors_started:.1f} s" for m, t in sorted(firsts.items()))
    )
    print(
        f"kill {victim} (the $MQTT_msgs leader; subscriber on {listener}): longest gap between "
        f"verdicts {max(gaps, default=0.0):.2f} s; 20 more verdicts per machine "
        f"{flowing - killed:.1f} s after the kill; {acknowledged} readings, all answered; "
        f"{victim} back and healthy {rejoined - rejoin:.1f} s after its `up`"
    )

    stack.run("down", "-v", "--timeout", "20", timeout_s=300)
    label = f"label=com.docker.compose.project={stack.env['COMPOSE_PROJECT_NAME']}"
    for kind in ("container", "volume", "network"):
        left = subprocess.run(
            ["docker", kind, "ls", *(["--all"] if kind == "container" else []), "-q", "-f", label],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert left == [], f"{kind}s left after down -v: {left}"
