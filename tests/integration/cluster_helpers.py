"""Helpers of the cluster tests: a 3-node NATS cluster, MQTT 3.1.1 devices, stream readers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.contracts import AlertEvent, Verdict
from factorywatch.detector.jetstream import connect, provision
from factorywatch.partitions import ClusterLayout
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.support import Proc, wait_until

T = TypeVar("T")


def run_js(
    cluster: LocalNatsCluster,
    action: Callable[[NatsClient, JetStreamContext], Awaitable[T]],
    *,
    user: str | None = "admin",
) -> T:
    """Connect to the cluster (as ``user`` when it authenticates), run ``action``, close."""

    async def main() -> T:
        password = None
        if cluster.passwords is None:
            user_, password = None, None
        else:
            user_, password = user, cluster.passwords[user or "admin"]
        nc = await connect(
            cluster.servers,
            name="test-client",
            user=user_,
            password=password,
            tls_ca=cluster.tls.ca if cluster.tls else None,
        )
        try:
            return await action(nc, nc.jetstream(timeout=10))
        finally:
            await nc.close()

    return asyncio.run(main())


def provision_layout(cluster: LocalNatsCluster) -> None:
    """Create the layout's streams and bucket (as the detector would)."""

    async def action(_nc: NatsClient, js: JetStreamContext) -> None:
        await provision(js, cluster.layout)

    run_js(cluster, action)


async def read_subjects(js: JetStreamContext, stream: str, subject: str) -> list[tuple[str, bytes]]:
    """Every message of ``stream`` on ``subject`` (a filter), in stream order."""
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
        ),
    )
    found: list[tuple[str, bytes]] = []
    while True:
        try:
            msgs = await sub.fetch(1000, timeout=1.0)
        except TimeoutError:
            break
        found += [(m.subject, m.data) for m in msgs]
        if msgs and msgs[-1].metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    return found


def stored_verdicts(cluster: LocalNatsCluster) -> list[Verdict]:
    """Every verdict the output stream kept (it drops a verdict whose reading id it has)."""
    layout = cluster.layout

    async def action(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, layout.output_stream, f"{layout.root}.alerts.*.*.verdict")

    return [Verdict.model_validate_json(data) for _, data in run_js(cluster, action)]


def stored_events(cluster: LocalNatsCluster) -> list[AlertEvent]:
    """Every alert event in the output stream."""
    layout = cluster.layout

    async def action(_nc: NatsClient, js: JetStreamContext) -> list[tuple[str, bytes]]:
        return await read_subjects(js, layout.output_stream, f"{layout.root}.alerts.*.*.event")

    return [AlertEvent.model_validate_json(data) for _, data in run_js(cluster, action)]


def wait_verdicts(cluster: LocalNatsCluster, count: int, timeout_s: float) -> list[Verdict]:
    """Wait until the output stream holds ``count`` verdicts; return them (maybe fewer)."""
    found: list[Verdict] = []

    def enough() -> bool:
        nonlocal found
        try:
            found = stored_verdicts(cluster)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            return False  # the cluster is still electing a leader after a node was killed
        return len(found) >= count

    # fewer may arrive (a forged reading must get none): the caller counts them
    with contextlib.suppress(AssertionError):
        wait_until(enough, timeout_s, poll_s=0.5)
    return found


@dataclass
class Stream:
    """A thread publishing machines' readings through one MQTT device at a steady pace."""

    device: MqttDevice
    topics: Topics
    machines: list[str]
    per_machine: int
    rate_hz: float
    line: str = "line1"
    published: int = 0
    _thread: threading.Thread | None = None
    keys: list[str] = field(default_factory=list)

    def start(self) -> Stream:
        """Start publishing in the background."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sims = {m: MachineSimulator(m, self.line, seed=i) for i, m in enumerate(self.machines)}
        now = time.time()
        start = time.monotonic()
        for i in range(self.per_machine):
            for machine, sim in sims.items():
                reading = sim.next(now + i * 0.01)
                key = f"{machine}:{reading.seq}"
                self.keys.append(key)
                self.device.publish(
                    self.topics.telemetry(self.line, machine), reading.encode(), key
                )
                self.published += 1
                wait = start + self.published / self.rate_hz - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # pacing the load, not synchronising

    def join(self, timeout_s: float) -> None:
        """Wait until every reading was handed to the device."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "stream did not finish"


class MosquittoSub:
    """The real ``mosquitto_sub`` (MQTT 3.1.1) on one node's MQTT listener, output to a file."""

    def __init__(
        self,
        port: int,
        topic: str,
        out: Path,
        *,
        user: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
    ) -> None:
        self.out = out
        # stdbuf: line-buffered output, so the SUBACK line is there to wait on
        args = ["stdbuf", "-oL", "mosquitto_sub", "-d", "-V", "mqttv311", "-q", "1"]
        args += ["-h", "127.0.0.1", "-p", str(port)]
        args += ["-t", topic, "-v", "-i", f"sub-{out.stem}"]
        if user is not None:
            args += ["-u", user, "-P", password or ""]
        if ca is not None:
            args += ["--cafile", str(ca)]
        with out.open("wb") as fh:
            self.process = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        assert wait_until(lambda: "received SUBACK" in self.text(), 10), self.text()

    def text(self) -> str:
        """What it printed so far."""
        return self.out.read_text(errors="replace")

    def lines(self, suffix: str) -> list[str]:
        """Payload lines of messages whose topic ends with ``suffix``."""
        return [
            line.split(" ", 1)[1]
            for line in self.text().splitlines()
            if " " in line and line.split(" ", 1)[0].endswith(suffix)
        ]

    def close(self) -> None:
        """Stop it (and reap it)."""
        self.process.terminate()
        self.process.wait(10)
        self.process.wait(10)


def retained_messages(
    port: int,
    topic_filter: str,
    expected: int,
    *,
    timeout_s: float = 10.0,
    user: str | None = None,
    password: str | None = None,
    ca: Path | None = None,
) -> dict[str, bytes]:
    """What a NEW MQTT 3.1.1 subscriber gets as retained on ``topic_filter``: topic -> payload.

    Waits until ``expected`` retained topics arrived (or the deadline); only messages with the
    retain flag count (those a late subscriber gets from the server's store).
    """
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    got: dict[str, bytes] = {}
    cond = threading.Condition()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"late-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )
    if user is not None:
        client.username_pw_set(user, password)
    if ca is not None:
        client.tls_set(ca_certs=str(ca))

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        c.subscribe(topic_filter, qos=1)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            with cond:
                got[msg.topic] = bytes(msg.payload)
                cond.notify_all()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        with cond:
            cond.wait_for(lambda: len(got) >= expected, timeout_s)
            return dict(got)
    finally:
        client.disconnect()
        client.loop_stop()


def start_detector(
    spawn: Callable[..., Proc],
    cluster: LocalNatsCluster,
    model_dir: Path,
    *,
    partitions: str = "all",
    client_id: str = "detector-a",
    user: str | None = None,
    password_file: Path | None = None,
    metrics_port: int = 0,
    lease_ttl_s: float | None = None,
    asset_config: Path | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Proc:
    """A real ``factorywatch detect --engine jetstream`` process serving ``partitions``
    (retained state through every node's MQTT listener)."""
    layout: ClusterLayout = cluster.layout
    args = [
        "detect",
        "--engine",
        "jetstream",
        "--nats-servers",
        ",".join(cluster.servers),
        "--topic-root",
        layout.topic_root,
        "--partition-count",
        str(layout.partitions),
        "--partitions",
        partitions,
        "--model-dir",
        str(model_dir),
        "--client-id",
        client_id,
        "--ack-wait",
        "2",
        "--metrics-port",
        str(metrics_port),
        "--nats-mqtt",
        ",".join(f"127.0.0.1:{n.ports.mqtt}" for n in cluster.nodes),
    ]
    if lease_ttl_s is not None:
        args += ["--lease-ttl", str(lease_ttl_s)]
    if asset_config is not None:
        args += ["--asset-config", str(asset_config)]
    if user is not None:
        args += ["--nats-user", user]
    if password_file is not None:
        args += ["--nats-password-file", str(password_file)]
    if cluster.tls is not None:
        args += ["--nats-ca", str(cluster.tls.ca)]
    proc = spawn(*args, name=client_id, env=env)
    proc.metrics_port = metrics_port or None
    if wait:
        proc.wait_log("jetstream_detector_started")
    return proc
