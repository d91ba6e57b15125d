"""The benchmark's harness: the processes under test, the load, one measurement at a time.

``Bench`` owns one Mosquitto and one trained model; each measurement starts the server(s)
under test (a relay of a given MQTT client, or the detector with a given MQTT version) through
``factorywatch.launch``, a subscriber process and the publisher, and returns one row of
figures. Nothing here decides what to measure (``bench/scenarios.py``) or how to print it
(``bench/report.py``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families

from bench import relay as relay_module
from bench.load import (
    PROJECT_DIR,
    Publisher,
    Reading,
    ReadingSource,
    Received,
    Source,
    SubscriberProcess,
    line_name,
    percentile,
)
from bench.system import CpuWindow, proc_status_mb
from factorywatch import contracts
from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker, free_port
from factorywatch.launch import Launched, child_env, cli_command, module_command
from factorywatch.settings import DEFAULT_DATA_DIR, BrokerSettings
from factorywatch.topics import Topics

DETECTOR_READY: Final = "telemetry_subscribed"
# The detector's MQTT clients: the compiled-codec driver (`detect --transport mqtt5`, the
# default) and paho-mqtt speaking MQTT 5 or 3.1.1, as the environment that selects each.
DETECTOR_CLIENT_ENV: Final = {
    "paho5": {"FACTORYWATCH_MQTT_PROTOCOL": "5", "FACTORYWATCH_DETECTOR_TRANSPORT": "paho"},
    "paho311": {"FACTORYWATCH_MQTT_PROTOCOL": "3.1.1", "FACTORYWATCH_DETECTOR_TRANSPORT": "paho"},
    "mqtt5": {"FACTORYWATCH_MQTT_PROTOCOL": "5", "FACTORYWATCH_DETECTOR_TRANSPORT": "mqtt5"},
}
DETECTOR_DEFAULT_CLIENT: Final = "mqtt5"  # the detector's default transport
RELAY_DEFAULT_CLIENT: Final = "paho5"
DEFAULT: Final = "default"  # a measurement's client: the default of its kind


def resolve_client(kind: str, client: str) -> str:
    """``client``, or for ``DEFAULT`` the default client of a relay or a detector."""
    if client != DEFAULT:
        return client
    return RELAY_DEFAULT_CLIENT if kind == "relay" else DETECTOR_DEFAULT_CLIENT


DATASET_FILES: Final = ("ai4i2020.csv", "predictive_maintenance.csv")
LATENCY_MACHINES: Final = (10, 100, 1000)
FIXED_RATES: Final = (100.0, 1000.0)


def progress(message: str) -> None:
    """A progress line on stderr (``make bench`` shows it as it goes)."""
    print(f"» {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """How much each measurement sends."""

    throughput_msgs: int
    naive_msgs: int
    batch_readings: int
    repeats: int
    latency_s: float
    latency_machines: tuple[int, ...]
    fixed_rates: tuple[float, ...]
    publishers: int = 2
    window: int | None = 1000


FULL: Final = Plan(
    throughput_msgs=40_000,
    naive_msgs=1_000,
    batch_readings=100_000,
    repeats=3,
    latency_s=6.0,
    latency_machines=LATENCY_MACHINES,
    fixed_rates=FIXED_RATES,
)
QUICK: Final = Plan(
    throughput_msgs=3_000,
    naive_msgs=150,
    batch_readings=3_000,
    repeats=1,
    latency_s=1.0,
    latency_machines=(10, 1000),
    fixed_rates=(1000.0,),
)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: no inherited FACTORYWATCH_* settings, the project importable."""
    env = child_env(extra, drop_prefix="FACTORYWATCH_")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    return {**env, **(extra or {})}


class Server(Launched):
    """A relay or detector process under test (``kind`` names it in the report)."""

    def __init__(
        self, kind: str, command: list[str], log_file: Path, cwd: Path, env: dict[str, str]
    ) -> None:
        super().__init__(command, log_file, cwd=cwd, env=env, name=kind)
        self.kind = kind

    def peak_mb(self) -> float | None:
        """Peak resident memory so far (``VmHWM``)."""
        return proc_status_mb(self.pid, "VmHWM")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL when it does not stop. Return the exit code."""
        return self.terminate(timeout_s)


class Shards:
    """The processes under test: one server, or one per production line (``--lines``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.members: list[Server] = []

    @property
    def pids(self) -> list[int]:
        """Process ids of every member."""
        return [m.pid for m in self.members]

    def peak_mb(self) -> float | None:
        """Sum of the members' peak resident memory (``VmHWM``)."""
        peaks = [m.peak_mb() for m in self.members]
        return None if any(p is None for p in peaks) else sum(p for p in peaks if p is not None)

    def detector_metrics(self) -> dict[str, float | None] | None:
        """Batches and mean batch size / processing time over every member's metrics."""
        found = [detector_metrics(m.metrics_port) for m in self.members if m.metrics_port]
        parts = [f for f in found if f is not None and f.get("batches")]
        if not parts:
            return None
        batches = sum(f["batches"] or 0.0 for f in parts)

        def weighted(key: str) -> float | None:
            values = [(f[key], f["batches"] or 0.0) for f in parts if f.get(key) is not None]
            total = sum(w for _, w in values)
            return round(sum(v * w for v, w in values if v) / total, 3) if total else None

        return {
            "batches": batches,
            "mean_batch_size": weighted("mean_batch_size"),
            "mean_processing_ms": weighted("mean_processing_ms"),
        }

    def stop(self) -> int:
        """Stop every member; the worst exit code."""
        return max(m.stop() for m in self.members)

    def kill(self) -> None:
        """SIGKILL every member (clean-up after a failure)."""
        for member in self.members:
            member.kill()


@dataclass
# -- the benchmark --------------------------------------------------------------------------
class Bench:
    """One broker, one model, many measurements."""

    def __init__(self, workdir: Path, model_dir: Path, plan: Plan) -> None:
        self.workdir = workdir
        self.model_dir = model_dir
        self.plan = plan
        self.broker = LocalBroker(workdir / "broker")
        self._sources: dict[tuple[int, int], ReadingSource] = {}
        self._runs = 0
        self.peak_mb: dict[str, float] = {}
        self.window: int | None = plan.window

    # -- set-up ---------------------------------------------------------------------------
    def settings(self, root: str) -> BrokerSettings:
        """Broker settings for one topic root."""
        return BrokerSettings().with_overrides(port=self.broker.port, topic_root=root)

    def fresh(self, what: str) -> tuple[str, Path]:
        """A fresh topic root and a work directory for one measurement."""
        self._runs += 1
        tag = f"{self._runs:02d}-{what}"
        folder = self.workdir / "runs" / tag
        folder.mkdir(parents=True)
        return f"bench{self._runs:02d}{uuid.uuid4().hex[:6]}", folder

    def source(self, machines: int, lines: int = 1) -> ReadingSource:
        """The (cached) pre-generated readings of ``machines`` machines on ``lines`` lines."""
        if (machines, lines) not in self._sources:
            self._sources[machines, lines] = ReadingSource(machines, seed=machines, lines=lines)
        return self._sources[machines, lines]

    def start_relay(
        self,
        root: str,
        folder: Path,
        *,
        client: str = RELAY_DEFAULT_CLIENT,
        lines: str | None = None,
    ) -> Server:
        """A ``bench.relay`` process of ``client`` on ``root`` (only ``lines``), subscribed."""
        command = module_command(
            "bench.relay", "--port", str(self.broker.port), "--root", root, "--client", client
        )
        command += ["--lines", lines] if lines else []
        server = Server(
            "relay",
            command,
            folder / f"relay-{client}{'-' + lines if lines else ''}.log",
            folder,
            bench_env(),
        )
        server.wait_log(relay_module.READY, 30.0)
        return server

    def start_detector(
        self,
        root: str,
        folder: Path,
        *,
        client: str = DETECTOR_DEFAULT_CLIENT,
        naive: bool = False,
        lines: str | None = None,
        model_dir: Path | None = None,
    ) -> Server:
        """A ``factorywatch detect`` process on ``root`` with a fresh client id, subscribed.

        ``client`` is ``mqtt5`` (the compiled-codec transport, the default), ``paho5``
        (paho-mqtt, MQTT 5) or ``paho311`` (paho-mqtt, MQTT 3.1.1). With
        ``lines`` it is a shard that subscribes to those production lines only. It serves
        ``model_dir`` (default: the bench's own model).
        """
        # Metrics stay on (as deployed), on a free loopback port: no clash with anything else
        # on the machine, and the run can read the detector's own batch sizes.
        metrics_port = free_port()
        extra = {
            "FACTORYWATCH_DETECTOR_METRICS_HOST": "127.0.0.1",
            "FACTORYWATCH_DETECTOR_METRICS_PORT": str(metrics_port),
            **DETECTOR_CLIENT_ENV[client],
        }
        if naive:
            extra |= {
                "FACTORYWATCH_DETECTOR_SCORER": "sklearn",
                "FACTORYWATCH_DETECTOR_BATCH_MAX": "1",
            }
        command = cli_command(
            "detect",
            "--port",
            str(self.broker.port),
            "--topic-root",
            root,
            "--model-dir",
            str(model_dir or self.model_dir),
            "--client-id",
            f"bench-detector-{uuid.uuid4().hex[:8]}",
            "--state-dir",
            str(folder / "state"),
            *(["--lines", lines] if lines else []),
        )
        server = Server(
            "naive" if naive else "detector",
            command,
            folder / f"detector-{client}{'-' + lines if lines else ''}.log",
            folder,
            bench_env(extra),
        )
        server.metrics_port = metrics_port
        server.wait_log(DETECTOR_READY, 60.0)
        return server

    def note_peak(self, name: str, value: float | None) -> None:
        """Keep the highest peak memory seen for ``name``."""
        if value is not None:
            self.peak_mb[name] = round(max(self.peak_mb.get(name, 0.0), value), 1)

    @contextmanager
    def _measurement(
        self,
        kind: str,
        root: str,
        folder: Path,
        *,
        expect: int,
        idle_s: float,
        deadline_s: float,
        shards: int = 1,
        client: str = DEFAULT,
        model_dir: Path | None = None,
    ) -> Iterator[tuple[Shards, SubscriberProcess, Publisher, dict[str, Any]]]:
        """Server(s) under test, subscriber process and publisher; all stopped afterwards.

        ``client`` picks the relay's MQTT client or the detector's transport (see
        ``start_relay`` and ``start_detector``; ``DEFAULT``: each one's default). ``shards`` > 1
        starts one server per
        production line (``line1``, ``line2``, ...).
        The dict yielded last is filled when the measurement ends: the servers' peak memory
        and, for a detector, what its own metrics say (mean batch size, processing time).
        """
        client = resolve_client(kind, client)
        server = Shards(kind)
        try:
            for shard in range(shards):
                lines = line_name(shard) if shards > 1 else None
                if kind == "relay":
                    member = self.start_relay(root, folder, client=client, lines=lines)
                else:
                    member = self.start_detector(
                        root,
                        folder,
                        client=client,
                        naive=kind == "naive",
                        lines=lines,
                        model_dir=model_dir,
                    )
                server.members.append(member)
        except BaseException:
            server.kill()
            raise
        subscriber: SubscriberProcess | None = None
        publisher: Publisher | None = None
        figures: dict[str, Any] = {}
        try:
            subscriber = SubscriberProcess(
                self.broker.port,
                root,
                expect=expect,
                out=folder / "received.json",
                idle_s=idle_s,
                deadline_s=deadline_s,
            )
            publisher = Publisher(self.settings(root), clients=self.plan.publishers).start()
            yield server, subscriber, publisher, figures
        finally:
            peak = server.peak_mb()
            name = (
                f"{kind} {client}" if kind == "relay" or client != DETECTOR_DEFAULT_CLIENT else kind
            )
            self.note_peak(name if shards == 1 else f"{name} x{shards}", peak)
            figures["server_peak_mb"] = None if peak is None else round(peak, 1)
            if kind != "relay":
                figures["detector_metrics"] = server.detector_metrics()
            figures["server_exit_code"] = server.stop()
            if publisher is not None:
                publisher.close()
            if subscriber is not None:
                subscriber.kill()

    def _pids(self, server: Shards) -> dict[str, list[int]]:
        assert self.broker.process is not None
        return {
            server.kind: server.pids,
            "broker": [self.broker.process.pid],
            "publisher": [os.getpid()],
        }

    # -- throughput ---------------------------------------------------------------------------
    def throughput(
        self,
        kind: str,
        machines: int,
        count: int,
        *,
        shards: int = 1,
        client: str = DEFAULT,
        source: Source | None = None,
        model_dir: Path | None = None,
    ) -> dict[str, Any]:
        """Publish ``count`` readings as fast as possible; msgs/s to the last verdict.

        ``shards`` > 1: the machines are spread over that many lines, one server per line.
        ``source`` and ``model_dir`` replace the AI4I simulator's readings and the bench's
        model (``bench.features``: any machine's channels, a generic model).
        """
        root, folder = self.fresh(f"{kind}-{client}-{machines}-x{shards}")
        source = source or self.source(machines, shards)
        readings, topics = source.take(count), source.topics(root)
        slowest = 30.0 if kind == "naive" else 200.0  # msgs/s, only to bound the wait
        deadline = count / slowest + 60.0
        # The subscriber's "nothing new for this long: the rest is lost" (a naive detector on
        # a shared machine was seen pausing for more than 10 s).
        idle_s = 60.0 if kind == "naive" else 10.0
        with self._measurement(
            kind,
            root,
            folder,
            expect=count,
            idle_s=idle_s,
            deadline_s=deadline,
            shards=shards,
            client=client,
            model_dir=model_dir,
        ) as (server, subscriber, publisher, figures):
            window = CpuWindow(self._pids(server))
            window.begin()
            started = publisher.blast(
                readings, topics, window=self.window, answered=subscriber.answered
            )
            received = subscriber.result(deadline + 30.0)
            cpu = window.end(received.cpu_s)
            publisher.wait_settled(30.0)
            acknowledged, refused = publisher.acknowledged, publisher.refused
            figures["server_cpu_us_per_msg"] = window.per_message_us(server.kind, count)
            figures["broker_cpu_us_per_msg"] = window.per_message_us("broker", count)
        row = _throughput_row(
            kind,
            machines=machines,
            count=count,
            started=started,
            received=received,
            acknowledged=acknowledged,
            refused=refused,
            cpu=cpu,
        )
        return {**row, "client": client, **figures}

    def batch_throughput(self, machines: int, count: int) -> dict[str, Any]:
        """Readings/s when a gateway sends ``TelemetryBatch`` payloads (one verdict each)."""
        root, folder = self.fresh(f"batch-{machines}")
        source = self.source(machines)
        readings = source.take(count)
        gateways = self.plan.publishers
        batches, per_batch = make_batches(readings, gateways, Topics(root))
        deadline = count / 200.0 + 60.0
        with self._measurement(
            "detector", root, folder, expect=count, idle_s=10.0, deadline_s=deadline
        ) as (server, subscriber, publisher, figures):
            cpu_window = CpuWindow(self._pids(server))
            cpu_window.begin()
            # Closed loop as in the other throughput runs, counted in readings: at least four
            # batches may be outstanding so the detector always has the next one queued.
            outstanding = max(self.window or 0, 4 * per_batch)
            started = time.perf_counter()
            for n, (gateway, topic, payload) in enumerate(batches):
                while n * per_batch - subscriber.answered() >= outstanding:
                    time.sleep(0.001)
                publisher.clients[gateway % len(publisher.clients)].publish(topic, payload, qos=1)
            publisher.sent += len(batches)
            received = subscriber.result(deadline + 30.0)
            cpu = cpu_window.end(received.cpu_s)
            figures["server_cpu_us_per_msg"] = cpu_window.per_message_us(server.kind, count)
            publisher.wait_settled(30.0)
            # readings in acknowledged batches (exact when all were, an upper bound otherwise)
            acknowledged = min(count, publisher.acknowledged * per_batch)
        row = _throughput_row(
            "batch",
            machines=machines,
            count=count,
            started=started,
            received=received,
            acknowledged=acknowledged,
            refused=publisher.refused,
            cpu=cpu,
        )
        row["readings_per_s"] = row.pop("msgs_per_s")
        row["readings_per_batch"] = per_batch
        row["batches"] = len(batches)
        row["batches_acknowledged"] = publisher.acknowledged
        return {**row, **figures}

    # -- latency ------------------------------------------------------------------------------
    def latency(
        self,
        rate: float,
        machines: int,
        label: str,
        *,
        kind: str = "detector",
        client: str = DEFAULT,
    ) -> dict[str, Any]:
        """Publish at a fixed ``rate``; latency from publish to verdict received."""
        count = max(50, round(rate * self.plan.latency_s))
        root, folder = self.fresh(f"latency-{kind}-{client}-{round(rate)}-{machines}")
        source = self.source(machines)
        readings, topics = source.take(count), source.topics(root)
        with self._measurement(
            kind,
            root,
            folder,
            expect=count,
            idle_s=5.0,
            deadline_s=self.plan.latency_s * 3 + 60.0,
            client=client,
        ) as (server, subscriber, publisher, figures):
            window = CpuWindow(self._pids(server))
            window.begin()
            sent_at = publisher.paced(readings, topics, rate)
            received = subscriber.result(self.plan.latency_s * 3 + 90.0)
            cpu = window.end(received.cpu_s)
            publisher.wait_settled(30.0)
            acknowledged = publisher.acknowledged
            figures["server_cpu_us_per_msg"] = window.per_message_us(server.kind, count)
        row = _latency_row(
            rate,
            label=label,
            machines=machines,
            readings=readings,
            sent_at=sent_at,
            received=received,
            acknowledged=acknowledged,
            cpu=cpu,
        )
        return {"through": kind, "client": client, **row, **figures}


def _throughput_row(
    kind: str,
    *,
    machines: int,
    count: int,
    started: float,
    received: Received,
    acknowledged: int,
    refused: int,
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    seconds = received.last_at - started if received.unique else math.nan
    complete = received.unique == count
    return {
        "target": kind,
        "machines": machines,
        "messages": count,
        "seconds": _round(seconds, 3),
        "msgs_per_s": round(count / seconds, 1) if complete and seconds > 0 else None,
        "acknowledged": acknowledged,
        "refused": refused,
        "unique_verdicts": received.unique,
        "duplicates": received.duplicates,
        "lost": acknowledged - received.unique,
        "cpu_pct": cpu,
    }


def _latency_row(
    rate: float,
    *,
    label: str,
    machines: int,
    readings: Sequence[Reading],
    sent_at: Sequence[float],
    received: Received,
    acknowledged: int,
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    latencies = [
        (received.first_at[r.key] - sent_at[i]) * 1000.0
        for i, r in enumerate(readings)
        if r.key in received.first_at
    ]
    span = sent_at[-1] - sent_at[0] if len(sent_at) > 1 else math.nan
    return {
        "rate": label,
        "target_msgs_per_s": round(rate, 1),
        "achieved_msgs_per_s": round((len(sent_at) - 1) / span, 1) if span > 0 else None,
        "machines": machines,
        "sent": len(readings),
        "acknowledged": acknowledged,
        "received": received.unique,
        "lost": len(readings) - received.unique,
        "duplicates": received.duplicates,
        "p50_ms": _round(percentile(latencies, 50)),
        "p99_ms": _round(percentile(latencies, 99)),
        "p999_ms": _round(percentile(latencies, 99.9)),
        "max_ms": _round(max(latencies, default=math.nan)),
        "cpu_pct": cpu,
    }


def _round(value: float, digits: int = 2) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def make_batches(
    readings: Sequence[Reading], gateways: int, topics: Topics
) -> tuple[list[tuple[int, str, bytes]], int]:
    """Pack readings into ``TelemetryBatch`` payloads of up to 1,000 readings.

    A batch holds as many readings as ``MAX_BATCH_READINGS`` and ``MAX_BATCH_BYTES`` allow
    (1,000 and 512 KiB today); each payload is validated and encoded by the model itself.
    Batches go round robin to ``gateways`` gateways (``gw0``, ``gw1``, ...).
    """
    limit, most = contracts.MAX_BATCH_BYTES, contracts.MAX_BATCH_READINGS
    biggest = max(len(r.payload) for r in readings[:1000]) + 1
    per_batch = max(1, min(most, 1000, (limit - 64) // biggest))
    out: list[tuple[int, str, bytes]] = []
    for n, start in enumerate(range(0, len(readings), per_batch)):
        chunk = readings[start : start + per_batch]
        raw = b'{"schema_version":1,"readings":[' + b",".join(r.payload for r in chunk) + b"]}"
        payload = contracts.TelemetryBatch.model_validate_json(raw).encode()
        if len(payload) > limit:
            raise ValueError(f"batch of {len(chunk)} readings is {len(payload)} B > {limit} B")
        gateway = n % gateways
        out.append((gateway, topics.batch(line_name(0), f"gw{gateway}"), payload))
    return out, per_batch


# -- helpers --------------------------------------------------------------------------------
DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
UPTIME_TOPIC: Final = "$SYS/broker/uptime"


class SysWatcher:
    """A standing subscription to the broker's dropped-messages counter for the whole run.

    Mosquitto publishes ``$SYS`` values when they change (every ``sys_interval``) with a
    60 s expiry, so asking only at the end could miss it: this watcher sees every change.
    ``settle`` waits for two more ``$SYS/broker/uptime`` ticks (one per ``sys_interval``):
    after them, a change of the counter during the last measurement has been published.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.values: list[int] = []
        self._ticks = 0
        self._cond = threading.Condition()
        self.client = fwmqtt.new_client(settings, f"bench-sys-{uuid.uuid4().hex[:8]}")
        self._waiter = fwmqtt.ConnectWaiter()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        fwmqtt.connect(self.client, settings, self._waiter)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._waiter.record(reason)
        client.subscribe([(DROPPED_TOPIC, 1), (UPTIME_TOPIC, 1)])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            if msg.topic == UPTIME_TOPIC:
                self._ticks += 1
            else:
                try:
                    self.values.append(int(msg.payload.decode()))
                except ValueError:
                    return
            self._cond.notify_all()

    def settle(self, timeout_s: float = 10.0) -> bool:
        """Wait for two more ``$SYS`` ticks (False if the broker did not publish them)."""
        with self._cond:
            target = self._ticks + 2
            return self._cond.wait_for(lambda: self._ticks >= target, timeout_s)

    def dropped(self) -> int | None:
        """Highest value seen (None: the broker never published it)."""
        with self._cond:
            return max(self.values, default=None)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def detector_metrics(port: int) -> dict[str, float | None] | None:
    """Mean batch size and processing time from the detector's Prometheus endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = {
        sample.name: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }

    def mean(prefix: str, scale: float = 1.0) -> float | None:
        total, count = values.get(f"{prefix}_sum"), values.get(f"{prefix}_count")
        return round(total / count * scale, 3) if total is not None and count else None

    return {
        "batches": values.get("factorywatch_batch_size_count"),
        "mean_batch_size": mean("factorywatch_batch_size"),
        "mean_processing_ms": mean("factorywatch_processing_seconds", 1000.0),
    }


def find_dataset(given: Path | None) -> Path:
    """The dataset to train on: ``--dataset`` or a CSV in ``data/``; else a clear error."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"error: --dataset {given} does not exist")
        return given
    for name in DATASET_FILES:
        candidate = DEFAULT_DATA_DIR / name
        if candidate.is_file():
            return candidate
    raise SystemExit(
        "error: no dataset to train the benchmark's model on. Pass --dataset PATH (the AI4I "
        f"2020 CSV, e.g. ../shared/data/ai4i2020.csv) or put {' or '.join(DATASET_FILES)} "
        f"in {DEFAULT_DATA_DIR}/ (`make train` downloads it there)."
    )


def train(dataset: Path, model_dir: Path, *, no_verify: bool) -> str:
    """Train and promote a model with the real CLI; return its version."""
    command = [
        sys.executable,
        "-m",
        "factorywatch.cli",
        "train",
        "--dataset",
        str(dataset.resolve()),
        "--model-dir",
        str(model_dir),
        *(["--no-verify"] if no_verify else []),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=model_dir.parent,
        env=bench_env(),
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: training failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]
