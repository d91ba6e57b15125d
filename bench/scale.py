"""``python -m bench.scale`` (``make scale``): 1-3 detectors on the NATS cluster and on Mosquitto.

Everything runs here, on loopback, with the real CLI as detectors:

a. the 3-node NATS JetStream cluster (``factorywatch.cluster.LocalNatsCluster``, 6 partitions,
   R3) with 1, 2 and 3 ``detect --engine jetstream`` processes splitting the partitions;
b. one Mosquitto (the project's config, open) with 1, 2 and 3 ``detect --lines`` shards;
c. ``kill -9`` of the node leading the MQTT layer's message stream mid-stream (one detector,
   steady load): readings lost, and how long the devices' PUBACKs stalled (recovery time).

Each throughput run publishes the same readings (``--readings`` over ``--machines`` machines
on 6 lines) from two MQTT 3.1.1 devices as fast as PUBACKs allow and waits until every reading
has its verdict: throughput = readings / (last verdict - first publish). Loss = readings the
server acknowledged without a verdict. CPU seconds of the detectors and of the brokers give
the per-core capacity the README's sizing uses. Figures go to ``reports/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.harness import bench_env, find_dataset, train
from bench.report import write_files
from bench.system import proc_cpu_s
from factorywatch.broker import LocalBroker
from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.contracts import Verdict
from factorywatch.detector.jetstream import connect, provision
from factorywatch.partitions import ClusterLayout, assign
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics

PARTITIONS = 6
LINES = 6


def _mqtt_endpoints(cluster: LocalNatsCluster) -> str:
    """``--nats-mqtt``: every node's MQTT listener (the detectors' retained state goes there)."""
    return ",".join(f"127.0.0.1:{n.ports.mqtt}" for n in cluster.nodes)


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[scale] {message}", file=sys.stderr, flush=True)


@dataclass
class Detector:
    """A ``factorywatch detect`` process and its log."""

    process: subprocess.Popen[bytes]
    log: Path

    def wait_log(self, needle: str, timeout_s: float = 120.0) -> None:
        """Wait until the log says ``needle``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"detector did not log {needle!r}: {self.log.read_text()[-2000:]}")

    def cpu_s(self) -> float:
        """CPU seconds used so far."""
        return proc_cpu_s(self.process.pid) or 0.0

    def stop(self) -> None:
        """SIGTERM and reap."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def spawn_detector(args: list[str], log: Path) -> Detector:
    """Start ``factorywatch detect`` with ``args``."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "factorywatch.cli", "--log-format", "json", "detect", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=bench_env(),
        )
    return Detector(process, log)


def readings(machines: int, count: int) -> list[tuple[str, bytes, str]]:
    """``(topic, payload, key)`` of ``count`` readings spread over machines on 6 lines."""
    now = time.time() - count / machines - 10
    sims = [
        MachineSimulator(f"m{i:05d}", f"line{i % LINES}", seed=i, anomaly_rate=0.0)
        for i in range(machines)
    ]
    out = []
    topics = Topics("root")
    for n in range(count):
        sim = sims[n % machines]
        reading = sim.next(now + n / machines)
        key = f"{reading.machine_id}:{reading.seq}"
        out.append((topics.telemetry(reading.line, reading.machine_id), reading.encode(), key))
    return out


def retopic(items: list[tuple[str, bytes, str]], root: str) -> list[tuple[str, bytes, str]]:
    """The same readings under topic root ``root``."""
    return [(root + t.removeprefix("root"), p, k) for t, p, k in items]


def publish_all(devices: list[MqttDevice], items: list[tuple[str, bytes, str]]) -> float:
    """Publish round robin over the devices, wait for every PUBACK; the first publish time."""
    started = time.monotonic()
    threads = []
    for d, device in enumerate(devices):
        mine = items[d :: len(devices)]

        def run(device: MqttDevice = device, mine: list[tuple[str, bytes, str]] = mine) -> None:
            for topic, payload, key in mine:
                device.publish(topic, payload, key)

        threads.append(threading.Thread(target=run, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for d, device in enumerate(devices):
        if not device.wait_acked(len(items[d :: len(devices)]), timeout_s=600):
            raise SystemExit("devices not acknowledged within 600 s")
    return started


class VerdictCounter:
    """An MQTT 3.1.1 subscriber counting distinct verdicts (reading keys) and when."""

    def __init__(self, port: int, root: str) -> None:
        self.keys: set[str] = set()
        self.received = 0
        self.last_at = 0.0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"counter-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{root}/alerts/+/+/verdict", qos=1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise SystemExit("verdict counter not subscribed")

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        verdict = json.loads(msg.payload)
        with self._cond:
            self.received += 1
            self.keys.add(f"{verdict['machine_id']}:{verdict['seq']}")
            self.last_at = time.monotonic()
            self._cond.notify_all()

    def wait(self, count: int, timeout_s: float) -> bool:
        """Wait for ``count`` distinct verdicts."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.keys) >= count, timeout_s)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


# -- the NATS cluster ----------------------------------------------------------------------------
def _run_async(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


def cluster_drained(cluster: LocalNatsCluster) -> tuple[int, int]:
    """``(pending, unacknowledged)`` over every partition's consumer."""
    layout = cluster.layout

    async def main() -> tuple[int, int]:
        nc = await connect(cluster.servers, name="scale-probe")
        try:
            js = nc.jetstream(timeout=10)
            pending = unacked = 0
            for p in range(layout.partitions):
                info = await js.consumer_info(layout.input_stream, layout.consumer(p))
                pending += info.num_pending or 0
                unacked += info.num_ack_pending or 0
            return pending, unacked
        finally:
            await nc.close()

    result: tuple[int, int] = _run_async(main)
    return result


def stored_verdict_keys(cluster: LocalNatsCluster) -> tuple[set[str], int]:
    """Distinct reading keys of the verdicts in the output stream, and their message count."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: PLC0415

    layout = cluster.layout

    async def main() -> tuple[set[str], int]:
        nc = await connect(cluster.servers, name="scale-reader")
        keys: set[str] = set()
        count = 0
        try:
            js = nc.jetstream(timeout=10)
            sub = await js.pull_subscribe(
                f"{layout.root}.alerts.*.*.verdict",
                stream=layout.output_stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.NONE,
                    deliver_policy=DeliverPolicy.ALL,
                    inactive_threshold=30.0,
                ),
            )
            while True:
                try:
                    msgs = await sub.fetch(2000, timeout=2.0)
                except TimeoutError:
                    break
                for msg in msgs:
                    verdict = Verdict.model_validate_json(msg.data)
                    keys.add(f"{verdict.machine_id}:{verdict.seq}")
                    count += 1
                if msgs and msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            await nc.close()
        return keys, count

    result: tuple[set[str], int] = _run_async(main)
    return result


def read_verdicts_retrying(
    cluster: LocalNatsCluster, timeout_s: float = 120.0
) -> tuple[set[str], int]:
    """``stored_verdict_keys``, retried while the cluster is still electing after a kill."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return stored_verdict_keys(cluster)
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            progress(f"output stream not readable yet: {exc!r}")
            time.sleep(1.0)  # backoff before asking the cluster again


def _provision(cluster: LocalNatsCluster) -> None:
    async def main() -> None:
        nc = await connect(cluster.servers, name="scale-provision")
        try:
            await provision(nc.jetstream(timeout=10), cluster.layout)
        finally:
            await nc.close()

    _run_async(main)


def _broker_cpu(pids: list[int]) -> float:
    return sum(proc_cpu_s(pid) or 0.0 for pid in pids)


def run_cluster(
    work: Path, model_dir: Path, detectors: int, items: list[tuple[str, bytes, str]]
) -> dict[str, Any]:
    """Throughput of ``detectors`` JetStream detectors on a fresh 3-node cluster."""
    root = f"s{uuid.uuid4().hex[:8]}"
    items = retopic(items, root)
    cluster = LocalNatsCluster(
        work / f"nats-{detectors}", layouts=(ClusterLayout(root, partitions=PARTITIONS),)
    ).start()
    procs: list[Detector] = []
    devices: list[MqttDevice] = []
    try:
        _provision(cluster)
        for i in range(detectors):
            parts = ",".join(map(str, assign(PARTITIONS, detectors, i)))
            args = ["--engine", "jetstream", "--nats-servers", ",".join(cluster.servers)]
            args += ["--topic-root", root, "--partition-count", str(PARTITIONS)]
            args += ["--partitions", parts, "--model-dir", str(model_dir)]
            args += ["--client-id", f"det-{i}", "--metrics-port", "0"]
            args += ["--nats-mqtt", _mqtt_endpoints(cluster)]
            procs.append(spawn_detector(args, work / f"cluster-{detectors}-det-{i}.log"))
        for proc in procs:
            proc.wait_log("jetstream_detector_started")
        devices = [
            MqttDevice(f"dev-{d}", cluster.nodes[d].ports.mqtt, max_inflight=500) for d in (0, 1)
        ]
        for device in devices:
            device.wait_connected()
        pids = [n.process.pid for n in cluster.nodes if n.process is not None]
        cpu0 = [p.cpu_s() for p in procs]
        broker0 = _broker_cpu(pids)
        started = publish_all(devices, items)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and cluster_drained(cluster) != (0, 0):
            time.sleep(0.05)
        finished = time.monotonic()
        keys, _ = read_verdicts_retrying(cluster)
        acked = {k for d in devices for k in d.acked}
        detector_cpu = sum(p.cpu_s() - c for p, c in zip(procs, cpu0, strict=True))
        broker_cpu = _broker_cpu(pids) - broker0
        wall = finished - started
        return _row("nats-jetstream", detectors, items, acked, keys, wall, detector_cpu, broker_cpu)
    finally:
        for device in devices:
            device.close()
        for proc in procs:
            proc.stop()
        cluster.stop()


def _row(  # noqa: PLR0917 - one row's figures
    engine: str,
    detectors: int,
    items: list[tuple[str, bytes, str]],
    acked: set[str],
    keys: set[str],
    wall: float,
    detector_cpu: float,
    broker_cpu: float,
) -> dict[str, Any]:
    n = len(items)
    return {
        "engine": engine,
        "detectors": detectors,
        "readings": n,
        "acked": len(acked),
        "verdicts": len(keys),
        "lost": len(acked - keys),
        "wall_s": round(wall, 2),
        "readings_per_s": round(n / wall, 1),
        "detector_cpu_s": round(detector_cpu, 2),
        "broker_cpu_s": round(broker_cpu, 2),
        "readings_per_detector_cpu_s": round(n / detector_cpu, 1) if detector_cpu else None,
        "readings_per_broker_cpu_s": round(n / broker_cpu, 1) if broker_cpu else None,
    }


def run_mosquitto(
    work: Path, model_dir: Path, detectors: int, items: list[tuple[str, bytes, str]]
) -> dict[str, Any]:
    """Throughput of ``detectors`` line-sharded detectors on one Mosquitto."""
    root = f"s{uuid.uuid4().hex[:8]}"
    items = retopic(items, root)
    broker = LocalBroker(work / f"mosquitto-{detectors}").start()
    procs: list[Detector] = []
    devices: list[MqttDevice] = []
    counter = None
    try:
        for i in range(detectors):
            lines = ",".join(f"line{n}" for n in range(LINES) if n % detectors == i)
            args = ["--port", str(broker.port), "--topic-root", root, "--lines", lines]
            args += ["--model-dir", str(model_dir), "--client-id", f"det-{root}-{i}"]
            args += ["--state-dir", str(work / f"state-{root}-{i}"), "--metrics-port", "0"]
            procs.append(spawn_detector(args, work / f"mosquitto-{detectors}-det-{i}.log"))
        for proc in procs:
            proc.wait_log("telemetry_subscribed")
        counter = VerdictCounter(broker.port, root)
        devices = [MqttDevice(f"dev-{d}", broker.port, max_inflight=500) for d in (0, 1)]
        for device in devices:
            device.wait_connected()
        assert broker.process is not None
        cpu0 = [p.cpu_s() for p in procs]
        broker0 = _broker_cpu([broker.process.pid])
        started = publish_all(devices, items)
        counter.wait(len(items), 600)
        finished = counter.last_at
        acked = {k for d in devices for k in d.acked}
        detector_cpu = sum(p.cpu_s() - c for p, c in zip(procs, cpu0, strict=True))
        broker_cpu = _broker_cpu([broker.process.pid]) - broker0
        keys = set(counter.keys)
        wall = finished - started
        return _row("mosquitto", detectors, items, acked, keys, wall, detector_cpu, broker_cpu)
    finally:
        if counter is not None:
            counter.close()
        for device in devices:
            device.close()
        for proc in procs:
            proc.stop()
        broker.stop()


def run_node_kill(  # noqa: PLR0915 - one scenario, start to end
    work: Path, model_dir: Path, rate_hz: float, seconds: float
) -> dict[str, Any]:
    """kill -9 of the node leading the MQTT message stream, mid-stream, one detector."""
    root = f"s{uuid.uuid4().hex[:8]}"
    items = retopic(readings(60, int(rate_hz * seconds)), root)
    cluster = LocalNatsCluster(
        work / "nats-kill", layouts=(ClusterLayout(root, partitions=PARTITIONS),)
    ).start()
    proc = None
    devices: list[MqttDevice] = []
    try:
        _provision(cluster)

        async def leader_name() -> str:
            nc = await connect(cluster.servers, name="scale-probe")
            try:
                info = await nc.jetstream(timeout=10).stream_info(cluster.layout.input_stream)
                return str(info.cluster.leader if info.cluster else "")
            finally:
                await nc.close()

        leader = _run_async(leader_name)
        victim = next(n for n in cluster.nodes if n.name == leader)
        others = [n for n in cluster.nodes if n is not victim]
        args = ["--engine", "jetstream", "--nats-servers", ",".join(cluster.servers)]
        args += ["--topic-root", root, "--partition-count", str(PARTITIONS)]
        args += ["--model-dir", str(model_dir), "--client-id", "det-kill", "--metrics-port", "0"]
        args += ["--nats-mqtt", _mqtt_endpoints(cluster)]
        proc = spawn_detector(args, work / "kill-det.log")
        proc.wait_log("jetstream_detector_started")
        devices = [MqttDevice(f"dev-{n.name}", n.ports.mqtt, max_inflight=200) for n in others]
        for device in devices:
            device.wait_connected()
        started = time.monotonic()
        killed_at = 0.0
        for n, (topic, payload, key) in enumerate(items):
            devices[n % 2].publish(topic, payload, key)
            if not killed_at and n >= len(items) // 3:
                cluster.kill(victim)
                killed_at = time.monotonic()
            wait = started + (n + 1) / rate_hz - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the load
        for d, device in enumerate(devices):
            device.wait_acked(len(items[d::2]), timeout_s=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if cluster_drained(cluster) == (0, 0):
                    break
            except Exception as exc:
                progress(f"cluster not answering yet: {exc!r}")
            time.sleep(0.2)
        keys, stored = read_verdicts_retrying(cluster)
        acked = {k for d in devices for k in d.acked}
        after = sorted(t for d in devices for t in d.acked_at if t >= killed_at)
        stall = max((b - a for a, b in zip([killed_at, *after], after, strict=False)), default=None)
        return {
            "scenario": "nats node kill -9 (leader of the MQTT message stream), 1 detector",
            "rate_hz": rate_hz,
            "readings": len(items),
            "acked": len(acked),
            "verdicts": len(keys),
            "verdict_messages_stored": stored,
            "lost": len(acked - keys),
            "longest_puback_stall_after_kill_s": round(stall, 2) if stall else None,
            "device_reconnects": sum(d.connects - 1 for d in devices),
        }
    finally:
        for device in devices:
            device.close()
        if proc is not None:
            proc.stop()
        cluster.stop()


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    rows = report["throughput"]
    out = [
        "# Scale-out: detectors on a 3-node NATS JetStream cluster vs one Mosquitto",
        "",
        f"Command: `{report['command']}` on {report['host']['cpus']} CPUs "
        f"({report['host']['platform']}), {report['generated']}.",
        "",
        f"Each run: {rows[0]['readings']} readings over {report['machines']} machines "
        "(6 lines), two MQTT 3.1.1 devices publishing QoS 1 as fast as PUBACKs allow; "
        "throughput = readings / (last verdict - first publish).",
        "",
        "| engine | detectors | readings/s | lost | verdicts | detector CPU s | "
        "broker CPU s | readings per detector-CPU-s | readings per broker-CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['engine']} | {r['detectors']} | {r['readings_per_s']} | {r['lost']} | "
            f"{r['verdicts']}/{r['acked']} | {r['detector_cpu_s']} | {r['broker_cpu_s']} | "
            f"{r['readings_per_detector_cpu_s']} | {r['readings_per_broker_cpu_s']} |"
        )
    ratios = report["ratios"]
    out += ["", "Ratios (throughput relative to 1 detector on the same engine):", ""]
    out += [f"- {k}: {v}" for k, v in ratios.items()]
    kill = report.get("node_kill")
    if kill:
        out += ["", "## NATS node kill -9 mid-stream", ""]
        out += [f"- {k}: {v}" for k, v in kill.items()]
    out += ["", "## What 2 cores hide", "", report["caveat"], ""]
    return "\n".join(out)


CAVEAT = (
    "Every process here (three nats-server nodes or one Mosquitto, up to three detectors, "
    "the two devices and the verdict reader) shares the same 2 CPUs, and other work on the "
    "machine competes too. Adding detectors therefore cannot add cores: the 2- and "
    "3-detector rows show what partitioning costs and whether work spreads, not the speed-up "
    "a plant gets with one core per detector. On the cluster each reading is also replicated "
    "three times by three nodes on these same cores (R3), which a real 3-machine cluster "
    "pays on separate machines. The per-CPU-second columns are the inputs for sizing; the "
    "absolute readings/s are a floor."
)


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and write the reports."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--readings", type=int, default=6000)
    parser.add_argument("--machines", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--quick", action="store_true", help="small runs (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.readings, args.machines = 600, 30
    dataset = find_dataset(args.dataset)
    with tempfile.TemporaryDirectory(prefix="fw-scale-") as tmp:
        work = Path(tmp)
        model_dir = work / "models"
        model_dir.mkdir()
        progress("training the model")
        no_verify = args.no_verify or "ai4i2020" not in dataset.name
        train(dataset, model_dir, no_verify=no_verify)
        items = readings(args.machines, args.readings)
        rows = []
        for engine, run in (("cluster", run_cluster), ("mosquitto", run_mosquitto)):
            for detectors in (1, 2, 3):
                progress(f"{engine}: {detectors} detector(s)")
                rows.append(run(work, model_dir, detectors, items))
                progress(json.dumps(rows[-1]))
        progress("cluster: node kill -9 mid-stream")
        kill = run_node_kill(work, model_dir, 200.0, 15.0 if not args.quick else 6.0)
        progress(json.dumps(kill))
    base = {r["engine"]: r["readings_per_s"] for r in rows if r["detectors"] == 1}
    ratios = {
        f"{r['engine']} x{r['detectors']}": round(r["readings_per_s"] / base[r["engine"]], 2)
        for r in rows
    }
    ratios["cluster x1 / mosquitto x1"] = round(base["nats-jetstream"] / base["mosquitto"], 2)
    report = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "make scale" + (" (--quick)" if args.quick else ""),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "machines": args.machines,
        "partitions": PARTITIONS,
        "throughput": rows,
        "ratios": ratios,
        "node_kill": kill,
        "mosquitto_kill": "see reports/faults.json (make faults): broker kill -9 scenarios",
        "caveat": CAVEAT,
    }
    write_files(args.out, "scale", report, markdown(report), progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
