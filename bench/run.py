"""``python -m bench.run``: throughput and latency against the relay ceiling, in one run.

Starts its own Mosquitto (the project's config, open mode, a free port, a temporary work
directory), trains a model into a temporary model directory with the real CLI, then measures:

a. the bare relay ceiling at QoS 1 (``bench.relay``: subscribe and republish, nothing else);
b. the detector (``factorywatch detect``, default fast scorer) with 10 and 1,000 machines;
c. the naive path: the detector with scikit-learn on one message at a time
   (``FACTORYWATCH_DETECTOR_SCORER=sklearn``, ``FACTORYWATCH_DETECTOR_BATCH_MAX=1``);
d. end-to-end latency (publish -> verdict received) at 100 and 1,000 msg/s and at 80 % of
   the detector's measured maximum, each with 10, 100 and 1,000 machines;
e. peak memory (``VmHWM``) of the processes under test;
f. readings/s with batched payloads, when ``TelemetryBatch`` and ``Topics.batch`` exist.

Every measurement uses a fresh topic root and a fresh detector client id (the detector keeps
a persistent session). Figures go to ``<out>/bench.json`` and ``<out>/bench.md``; nothing is
asserted. ``--quick`` shrinks everything for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt

from bench import relay as relay_module
from bench.load import (
    PROJECT_DIR,
    Publisher,
    Reading,
    ReadingSource,
    Received,
    SubscriberProcess,
    line_name,
    percentile,
)
from factorywatch import contracts
from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker, free_port, mosquitto_binary
from factorywatch.settings import (
    DEFAULT_DATA_DIR,
    BrokerSettings,
    DetectorSettings,
)
from factorywatch.topics import Topics

DETECTOR_READY: Final = "telemetry_subscribed"
DATASET_FILES: Final = ("ai4i2020.csv", "predictive_maintenance.csv")
# Goals of the issue, as ratios measured in one run.
GOAL_VS_RELAY: Final = 0.8
GOAL_VS_NAIVE: Final = 20.0
GOAL_P99_MS: Final = 10.0
# "No loss of throughput" with 1,000 machines, allowing for run-to-run noise on 2 cores.
GOAL_MACHINES_RATIO: Final = 0.95
LATENCY_MACHINES: Final = (10, 100, 1000)
# Scale-out by production line: this many relays / detectors, one per line, on one broker.
SHARDS: Final = 2
FIXED_RATES: Final = (100.0, 1000.0)
QUICK_NOTE: Final = " (--quick: smoke-test sizes, not figures to quote)"


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


# -- processes under test -------------------------------------------------------------------
def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: no inherited FACTORYWATCH_* settings, the project on path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORYWATCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    return {**env, **(extra or {})}


def proc_status_mb(pid: int, field: str) -> float | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak resident memory) in MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024.0 if found else None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (``/proc/stat``, not idle/iowait)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class Server:
    """A relay or detector process with its output in a log file."""

    def __init__(
        self, kind: str, command: list[str], log_file: Path, cwd: Path, env: dict[str, str]
    ) -> None:
        self.kind = kind
        self.log_file = log_file
        self.metrics_port: int | None = None
        with log_file.open("wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env
            )

    @property
    def pid(self) -> int:
        """Process id."""
        return self.process.pid

    def wait_log(self, needle: str, timeout_s: float = 60.0) -> None:
        """Wait until the log shows ``needle``; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_file.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_file.read_text(errors="replace")[-3000:]
        self.kill()
        raise RuntimeError(f"{self.kind} did not report {needle!r}:\n{tail}")

    def peak_mb(self) -> float | None:
        """Peak resident memory so far (``VmHWM``)."""
        return proc_status_mb(self.pid, "VmHWM")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL when it does not stop. Return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL and reap (clean-up after a failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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
class CpuWindow:
    """CPU seconds of the processes involved in one measurement, over a wall-clock window.

    A name may stand for several processes (shards): their CPU seconds are added up.
    """

    pids: dict[str, list[int]]
    start_wall: float = 0.0
    start: dict[str, float | None] | None = None
    result: dict[str, float | None] | None = None
    start_busy: float | None = None
    used_s: dict[str, float] | None = None

    def begin(self) -> None:
        """Start the window."""
        self.start_wall = time.perf_counter()
        self.start = {name: self._cpu(pid) for name, pid in self.pids.items()}
        self.start_busy = system_busy_s()

    def end(self, subscriber_cpu_s: float | None = None) -> dict[str, float | None]:
        """Close it: CPU use of each process in % of one core over the window."""
        wall = max(time.perf_counter() - self.start_wall, 1e-9)
        start = self.start or {}
        out: dict[str, float | None] = {}
        self.used_s = {}
        for name, pid in self.pids.items():
            before, after = start.get(name), self._cpu(pid)
            if before is None or after is None:
                out[name] = None
            else:
                self.used_s[name] = after - before
                out[name] = (after - before) / wall * 100
        if subscriber_cpu_s is not None:  # whole life of the subscriber (start-up included)
            out["subscriber"] = subscriber_cpu_s / wall * 100
        busy = system_busy_s()
        if busy is not None and self.start_busy is not None:
            # everything else on the machine (other users' processes, the kernel's own work)
            ours = sum(v for v in out.values() if v is not None)
            out["other"] = max(0.0, (busy - self.start_busy) / wall * 100 - ours)
        self.result = {k: (None if v is None else round(v, 1)) for k, v in out.items()}
        return self.result

    def per_message_us(self, name: str, messages: int) -> float | None:
        """CPU microseconds process ``name`` spent per message in the window."""
        used = (self.used_s or {}).get(name)
        return round(used / messages * 1e6, 1) if used is not None and messages else None

    @staticmethod
    def _cpu(pids: list[int]) -> float | None:
        total = 0.0
        for pid in pids:
            if pid == os.getpid():
                times = os.times()
                used: float | None = times.user + times.system
            else:
                used = proc_cpu_s(pid)
            if used is None:
                return None
            total += used
        return total


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

    def start_relay(self, root: str, folder: Path, *, lines: str | None = None) -> Server:
        """A ``bench.relay`` process on ``root`` (only ``lines``, if given), subscribed."""
        command = [sys.executable, "-m", "bench.relay", "--port", str(self.broker.port)]
        command += ["--root", root, *(["--lines", lines] if lines else [])]
        server = Server(
            "relay",
            command,
            folder / f"relay{'-' + lines if lines else ''}.log",
            folder,
            _child_env(),
        )
        server.wait_log(relay_module.READY, 30.0)
        return server

    def start_detector(
        self, root: str, folder: Path, *, naive: bool = False, lines: str | None = None
    ) -> Server:
        """A ``factorywatch detect`` process on ``root`` with a fresh client id, subscribed.

        With ``lines`` it is a shard that subscribes to those production lines only.
        """
        # Metrics stay on (as deployed), on a free loopback port: no clash with anything else
        # on the machine, and the run can read the detector's own batch sizes.
        metrics_port = free_port()
        extra = {
            "FACTORYWATCH_DETECTOR_METRICS_HOST": "127.0.0.1",
            "FACTORYWATCH_DETECTOR_METRICS_PORT": str(metrics_port),
        }
        if naive:
            extra |= {
                "FACTORYWATCH_DETECTOR_SCORER": "sklearn",
                "FACTORYWATCH_DETECTOR_BATCH_MAX": "1",
            }
        command = [
            sys.executable,
            "-m",
            "factorywatch.cli",
            "--log-format",
            "json",
            "detect",
            "--port",
            str(self.broker.port),
            "--topic-root",
            root,
            "--model-dir",
            str(self.model_dir),
            "--client-id",
            f"bench-detector-{uuid.uuid4().hex[:8]}",
            "--state-dir",
            str(folder / "state"),
            *(["--lines", lines] if lines else []),
        ]
        server = Server(
            "naive" if naive else "detector",
            command,
            folder / f"detector{'-' + lines if lines else ''}.log",
            folder,
            _child_env(extra),
        )
        server.metrics_port = metrics_port
        server.wait_log(DETECTOR_READY, 60.0)
        return server

    def _note_peak(self, name: str, value: float | None) -> None:
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
    ) -> Iterator[tuple[Shards, SubscriberProcess, Publisher, dict[str, Any]]]:
        """Server(s) under test, subscriber process and publisher; all stopped afterwards.

        ``shards`` > 1 starts one server per production line (``line1``, ``line2``, ...).
        The dict yielded last is filled when the measurement ends: the servers' peak memory
        and, for a detector, what its own metrics say (mean batch size, processing time).
        """
        server = Shards(kind)
        try:
            for shard in range(shards):
                lines = line_name(shard) if shards > 1 else None
                if kind == "relay":
                    server.members.append(self.start_relay(root, folder, lines=lines))
                else:
                    server.members.append(
                        self.start_detector(root, folder, naive=kind == "naive", lines=lines)
                    )
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
            self._note_peak(kind if shards == 1 else f"{kind} x{shards}", peak)
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
        self, kind: str, machines: int, count: int, *, shards: int = 1
    ) -> dict[str, Any]:
        """Publish ``count`` readings as fast as possible; msgs/s to the last verdict.

        ``shards`` > 1: the machines are spread over that many lines, one server per line.
        """
        root, folder = self.fresh(f"{kind}-{machines}-x{shards}")
        source = self.source(machines, shards)
        readings, topics = source.take(count), source.topics(root)
        slowest = 30.0 if kind == "naive" else 200.0  # msgs/s, only to bound the wait
        deadline = count / slowest + 60.0
        with self._measurement(
            kind, root, folder, expect=count, idle_s=10.0, deadline_s=deadline, shards=shards
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
        return {**row, **figures}

    def batch_throughput(self, machines: int, count: int) -> dict[str, Any]:
        """Readings/s when a gateway sends ``TelemetryBatch`` payloads (one verdict each)."""
        support = batch_support()
        if isinstance(support, str):
            return {"readings_per_s": None, "note": support}
        model, topic_of = support
        root, folder = self.fresh(f"batch-{machines}")
        source = self.source(machines)
        readings = source.take(count)
        gateways = self.plan.publishers
        batches, per_batch = make_batches(readings, gateways, model, topic_of(Topics(root)))
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
        self, rate: float, machines: int, label: str, *, kind: str = "detector"
    ) -> dict[str, Any]:
        """Publish at a fixed ``rate``; latency from publish to verdict received."""
        count = max(50, round(rate * self.plan.latency_s))
        root, folder = self.fresh(f"latency-{kind}-{round(rate)}-{machines}")
        source = self.source(machines)
        readings, topics = source.take(count), source.topics(root)
        with self._measurement(
            kind,
            root,
            folder,
            expect=count,
            idle_s=5.0,
            deadline_s=self.plan.latency_s * 3 + 60.0,
        ) as (server, subscriber, publisher, figures):
            window = CpuWindow(self._pids(server))
            window.begin()
            sent_at = publisher.paced(readings, topics, rate)
            received = subscriber.result(self.plan.latency_s * 3 + 90.0)
            cpu = window.end(received.cpu_s)
            publisher.wait_settled(30.0)
            acknowledged = publisher.acknowledged
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
        return {"through": kind, **row, **figures}


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
        "max_ms": _round(max(latencies, default=math.nan)),
        "cpu_pct": cpu,
    }


def _round(value: float, digits: int = 2) -> float | None:
    return None if math.isnan(value) else round(value, digits)


# -- batched payloads (another engineer's feature; used only when it exists) ---------------
BatchSupport = tuple[Any, Callable[[Topics], Callable[[str, str], str]]]


def batch_support() -> BatchSupport | str:
    """``(TelemetryBatch, topic builder)`` when the code base has them, else why not."""
    model = getattr(contracts, "TelemetryBatch", None)
    if model is None or not callable(getattr(Topics, "batch", None)):
        return (
            "not measured: factorywatch.contracts.TelemetryBatch and Topics.batch(line, "
            "gateway) are not in this code base yet"
        )

    def topic_of(topics: Topics) -> Callable[[str, str], str]:
        build: Callable[[str, str], str] = topics.batch
        return build

    return model, topic_of


def make_batches(
    readings: Sequence[Reading],
    gateways: int,
    model: Any,
    topic: Callable[[str, str], str],
) -> tuple[list[tuple[int, str, bytes]], int]:
    """Pack readings into ``TelemetryBatch`` payloads of up to 1,000 readings.

    A batch holds as many readings as ``MAX_BATCH_READINGS`` and ``MAX_BATCH_BYTES`` allow
    (1,000 and 512 KiB today); each payload is validated and encoded by the model itself.
    Batches go round robin to ``gateways`` gateways (``gw0``, ``gw1``, ...).
    """
    limit = int(getattr(contracts, "MAX_BATCH_BYTES", contracts.MAX_PAYLOAD_BYTES))
    most = int(getattr(contracts, "MAX_BATCH_READINGS", 1000))
    biggest = max(len(r.payload) for r in readings[:1000]) + 1
    per_batch = max(1, min(most, 1000, (limit - 64) // biggest))
    out: list[tuple[int, str, bytes]] = []
    for n, start in enumerate(range(0, len(readings), per_batch)):
        chunk = readings[start : start + per_batch]
        raw = b'{"schema_version":1,"readings":[' + b",".join(r.payload for r in chunk) + b"]}"
        payload = model.model_validate_json(raw).encode()
        if len(payload) > limit:
            raise ValueError(f"batch of {len(chunk)} readings is {len(payload)} B > {limit} B")
        gateway = n % gateways
        out.append((gateway, topic(line_name(0), f"gw{gateway}"), payload))
    return out, per_batch


# -- helpers --------------------------------------------------------------------------------
DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"


class SysWatcher:
    """A standing subscription to the broker's dropped-messages counter for the whole run.

    Mosquitto publishes ``$SYS`` values when they change (every ``sys_interval``) with a
    60 s expiry, so asking only at the end could miss it: this watcher sees every change.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.values: list[int] = []
        self.client = fwmqtt.new_client(settings, f"bench-sys-{uuid.uuid4().hex[:8]}")
        self._waiter = fwmqtt.ConnectWaiter()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        fwmqtt.connect(self.client, settings, self._waiter)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._waiter.record(reason)
        client.subscribe(DROPPED_TOPIC, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.values.append(int(msg.payload.decode()))
        except ValueError:
            return

    def dropped(self) -> int | None:
        """Highest value seen (None: the broker never published it)."""
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

    def value(name: str) -> float | None:
        found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    def mean(prefix: str, scale: float = 1.0) -> float | None:
        total, count = value(f"{prefix}_sum"), value(f"{prefix}_count")
        return round(total / count * scale, 3) if total is not None and count else None

    return {
        "batches": value("factorywatch_batch_size_count"),
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
        env=_child_env(),
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: training failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def environment(command: str, load_at_start: Sequence[float]) -> dict[str, Any]:
    """Where and how the figures were measured."""
    version = subprocess.run(
        [mosquitto_binary(), "-h"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"mosquitto version (\S+)", version)
    cpu_model = None
    try:
        model_line = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = model_line.group(1).strip() if model_line else None
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "paho_mqtt": metadata.version("paho-mqtt"),
        "mosquitto": found.group(1) if found else None,
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(v, 2) for v in load_at_start],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "command": command,
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# -- the whole run --------------------------------------------------------------------------
def _show(row: dict[str, Any]) -> None:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in row["cpu_pct"].items() if v is not None)
    progress(
        f"  {row['target']}: {_fmt(row['msgs_per_s'])} msg/s, "
        f"{row['unique_verdicts']:,}/{row['acknowledged']:,} verdicts, lost {row['lost']}, "
        f"duplicates {row['duplicates']} (CPU: {cpu})"
    )


def throughput_rounds(bench: Bench, plan: Plan) -> list[dict[str, Any]]:
    """Relay, detector (one process and one per line) and naive runs, in alternating rounds."""
    runs: list[dict[str, Any]] = []
    count = plan.throughput_msgs

    def run(label: str, what: str, kind: str, machines: int, shards: int = 1) -> None:
        progress(f"measuring {what} ({machines:,} machines, {count:,} messages) ...")
        runs.append(bench.throughput(kind, machines, count, shards=shards))
        runs[-1]["target"] = label
        _show(runs[-1])

    for round_no in range(1, plan.repeats + 1):
        tag = f"round {round_no}/{plan.repeats}"
        run("relay", f"relay ceiling, {tag}", "relay", 10)
        run("detector", f"detector, {tag}", "detector", 10)
        for kind in ("relay", "detector"):
            run(f"{kind} x{SHARDS}", f"{SHARDS} {kind}s, one per line, {tag}", kind, 10, SHARDS)
        run("detector-1000", f"detector, {tag}", "detector", 1000)
    progress(f"measuring naive per-message scikit-learn path ({plan.naive_msgs:,} messages) ...")
    runs.append(bench.throughput("naive", 10, plan.naive_msgs))
    _show(runs[-1])
    return runs


def measure(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Every measurement, in order; returns the report."""
    runs = throughput_rounds(bench, plan)

    def show_latency(row: dict[str, Any]) -> None:
        progress(
            f"  {row['through']}: p50 {_fmt(row['p50_ms'], 2)} ms, p99 {_fmt(row['p99_ms'], 2)} "
            f"ms, max {_fmt(row['max_ms'], 2)} ms, sent {row['sent']:,} at "
            f"{_fmt(row['achieved_msgs_per_s'])} msg/s, lost {row['lost']}"
        )

    def rates_of(target: str) -> list[float | None]:
        return [r["msgs_per_s"] for r in runs if r["target"] == target]

    def cpu_of(target: str) -> float | None:
        return _median([r.get("server_cpu_us_per_msg") for r in runs if r["target"] == target])

    relay = _median(rates_of("relay"))
    detector = _median(rates_of("detector"))
    relay_sharded = _median(rates_of(f"relay x{SHARDS}"))
    detector_sharded = _median(rates_of(f"detector x{SHARDS}"))
    ceiling = max((r for r in (relay, relay_sharded) if r is not None), default=None)
    detector_1000 = _median(rates_of("detector-1000"))
    naive = _median(rates_of("naive"))

    rates: list[tuple[float, str]] = [(r, f"{r:,.0f} msg/s") for r in plan.fixed_rates]
    if detector:
        rates.append((0.8 * detector, "80 % of detector max"))
    latency_rows = []
    relay_rate = plan.fixed_rates[-1]
    progress(
        f"measuring latency through the bare relay at {relay_rate:,.0f} msg/s, 100 machines "
        "(the floor: broker and client library only) ..."
    )
    latency_rows.append(bench.latency(relay_rate, 100, f"{relay_rate:,.0f} msg/s", kind="relay"))
    show_latency(latency_rows[-1])
    for rate, label in rates:
        for machines in plan.latency_machines:
            progress(
                f"measuring latency at {rate:,.0f} msg/s ({label}), {machines:,} machines, "
                f"{plan.latency_s:g} s ..."
            )
            latency_rows.append(bench.latency(rate, machines, label))
            show_latency(latency_rows[-1])

    progress(f"measuring batched payloads ({plan.batch_readings:,} readings, 100 machines) ...")
    batch = bench.batch_throughput(100, plan.batch_readings)
    if batch.get("readings_per_s") is None:
        progress(f"  batched payloads: {batch.get('note') or 'no figure (see bench.json)'}")
    else:
        progress(
            f"  {_fmt(batch['readings_per_s'])} readings/s "
            f"({batch['readings_per_batch']} readings per batch), lost {batch['lost']}"
        )
    if bench.broker.process is not None:
        bench._note_peak("broker", proc_status_mb(bench.broker.process.pid, "VmHWM"))

    at_1000 = {
        str(r["machines"]): r["p99_ms"]
        for r in latency_rows
        if r["target_msgs_per_s"] == 1000.0 and r["through"] == "detector"
    }
    p99_at_1000 = max((v for v in at_1000.values() if v is not None), default=None)
    ratios = {
        "detector_vs_relay": _ratio(detector, relay),
        "sharded_detector_vs_best_relay": _ratio(detector_sharded, ceiling),
        "detector_vs_naive": _ratio(detector, naive),
        "machines_1000_vs_10": _ratio(detector_1000, detector),
    }
    return {
        "relay_msgs_per_s": relay,
        "detector_msgs_per_s": detector,
        "detector_1000_machines_msgs_per_s": detector_1000,
        "shards": SHARDS,
        "relay_sharded_msgs_per_s": relay_sharded,
        "detector_sharded_msgs_per_s": detector_sharded,
        "naive_msgs_per_s": naive,
        "cpu_us_per_msg": {
            "relay": cpu_of("relay"),
            "detector": cpu_of("detector"),
            "detector_sharded": cpu_of(f"detector x{SHARDS}"),
            "detector_1000_machines": cpu_of("detector-1000"),
            "naive": cpu_of("naive"),
            "batch": batch.get("server_cpu_us_per_msg"),
        },
        "p99_ms_at_1000": p99_at_1000,
        "p99_ms_at_1000_by_machines": at_1000,
        "machines": latency_rows,
        "batch_readings_per_s": batch.get("readings_per_s"),
        "batch": batch,
        "peak_memory_mb": dict(bench.peak_mb),
        "ratios": ratios,
        "goals": goals(ratios, p99_at_1000),
        "throughput_runs": runs,
        "lost_in_throughput_runs": sum(r["lost"] for r in runs),
    }


def goals(ratios: dict[str, float | None], p99_at_1000: float | None) -> list[dict[str, Any]]:
    """The issue's goals next to what was measured (informational: nothing is asserted)."""

    def row(name: str, target: str, value: float | None, met: bool | None) -> dict[str, Any]:
        return {"goal": name, "target": target, "measured": value, "met": met}

    vs_relay, vs_naive = ratios["detector_vs_relay"], ratios["detector_vs_naive"]
    machines, sharded = ratios["machines_1000_vs_10"], ratios["sharded_detector_vs_best_relay"]
    return [
        row(
            "detector vs relay (QoS 1), one process each",
            f">= {GOAL_VS_RELAY}",
            vs_relay,
            None if vs_relay is None else vs_relay >= GOAL_VS_RELAY,
        ),
        row(
            f"{SHARDS} detectors (one per line) vs the best relay set-up (1 or {SHARDS})",
            f">= {GOAL_VS_RELAY}",
            sharded,
            None if sharded is None else sharded >= GOAL_VS_RELAY,
        ),
        row(
            "detector vs naive path",
            f">= {GOAL_VS_NAIVE:g}",
            vs_naive,
            None if vs_naive is None else vs_naive >= GOAL_VS_NAIVE,
        ),
        row(
            "p99 at 1,000 msg/s (worst machine count), ms",
            f"<= {GOAL_P99_MS:g}",
            p99_at_1000,
            None if p99_at_1000 is None else p99_at_1000 <= GOAL_P99_MS,
        ),
        row(
            "1,000 vs 10 machines throughput",
            f">= {GOAL_MACHINES_RATIO} (no loss, within noise)",
            machines,
            None if machines is None else machines >= GOAL_MACHINES_RATIO,
        ),
    ]


# -- output ---------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


CPU_LABELS: Final = {
    "relay": "relay process",
    "detector": "detector process, 10 machines",
    "detector_sharded": f"detector processes ({SHARDS} shards, all of them), 10 machines",
    "detector_1000_machines": "detector process, 1,000 machines",
    "naive": "naive detector process",
    "batch": "detector process, batched payloads (per reading)",
}


def _cpu_text(cpu: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v is not None)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the command first, then every figure."""
    env = report["environment"]
    lines = [
        "# Benchmark: detector vs the bare relay ceiling",
        "",
        f"Produced by `{env['command']}` on {env['date']}, "
        f"in {report['runtime_s']:.0f} s{QUICK_NOTE if report['quick'] else ''}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| relay ceiling, QoS 1 (msg/s) | {_fmt(report['relay_msgs_per_s'])} |",
        f"| detector, fast scorer, 10 machines (msg/s) | {_fmt(report['detector_msgs_per_s'])} |",
        "| detector, fast scorer, 1,000 machines (msg/s) | "
        f"{_fmt(report['detector_1000_machines_msgs_per_s'])} |",
        f"| {report['shards']} relays, one per line (msg/s) | "
        f"{_fmt(report['relay_sharded_msgs_per_s'])} |",
        f"| {report['shards']} detectors, one per line (msg/s) | "
        f"{_fmt(report['detector_sharded_msgs_per_s'])} |",
        f"| naive per-message scikit-learn path (msg/s) | {_fmt(report['naive_msgs_per_s'])} |",
        f"| p99 latency at 1,000 msg/s, worst machine count (ms) | "
        f"{_fmt(report['p99_ms_at_1000'], 2)} |",
        f"| batched payloads (readings/s) | {_fmt(report['batch_readings_per_s'])} |",
        f"| messages lost in throughput runs | {_fmt(report['lost_in_throughput_runs'])} |",
        f"| broker-dropped messages ($SYS) | {_fmt(report['broker_dropped'])} |",
    ]
    for name, value in report["cpu_us_per_msg"].items():
        label = CPU_LABELS.get(name, name)
        lines.append(f"| CPU per message, {label} (µs, median) | {_fmt(value, 1)} |")
    for name, value in report["peak_memory_mb"].items():
        lines.append(f"| peak memory, {name} (VmHWM, MB) | {_fmt(value, 1)} |")
    lines += ["", "## Goals (ratios in this run)", "", "| goal | target | measured | met |"]
    lines.append("|---|---|---:|---|")
    for goal in report["goals"]:
        lines.append(
            f"| {goal['goal']} | {goal['target']} | {_fmt(goal['measured'], 2)} | "
            f"{_fmt(goal['met'])} |"
        )
    lines += [
        "",
        "## Latency: publish -> verdict received (end to end)",
        "",
        "| through | rate | target msg/s | achieved msg/s | machines | sent | received | lost | "
        "p50 ms | p99 ms | max ms | CPU % (one core = 100) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["machines"]:
        lines.append(
            f"| {r['through']} | {r['rate']} | {_fmt(r['target_msgs_per_s'])} | "
            f"{_fmt(r['achieved_msgs_per_s'])} "
            f"| {_fmt(r['machines'])} | {_fmt(r['sent'])} | {_fmt(r['received'])} | "
            f"{_fmt(r['lost'])} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | "
            f"{_fmt(r['max_ms'], 2)} | {_cpu_text(r['cpu_pct'])} |"
        )
    lines += [
        "",
        "## Throughput runs (the figures above are the medians of these rounds)",
        "",
        "| target | machines | messages | seconds | msg/s | acknowledged | unique verdicts | "
        "lost | duplicates | detector mean batch | CPU µs/msg | peak MB | "
        "CPU % (one core = 100) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["throughput_runs"]:
        metrics = r.get("detector_metrics") or {}
        lines.append(
            f"| {r['target']} | {_fmt(r['machines'])} | {_fmt(r['messages'])} | "
            f"{_fmt(r['seconds'], 2)} | {_fmt(r['msgs_per_s'])} | {_fmt(r['acknowledged'])} | "
            f"{_fmt(r['unique_verdicts'])} | {_fmt(r['lost'])} | {_fmt(r['duplicates'])} | "
            f"{_fmt(metrics.get('mean_batch_size'), 1)} | "
            f"{_fmt(r.get('server_cpu_us_per_msg'), 1)} | {_fmt(r.get('server_peak_mb'), 1)} | "
            f"{_cpu_text(r['cpu_pct'])} |"
        )
    batch = report["batch"]
    if batch.get("readings_per_s") is None:
        lines += ["", f"Batched payloads: {batch.get('note') or 'no figure'}."]
    else:
        lines += [
            "",
            f"Batched payloads: {_fmt(batch['messages'])} "
            f"readings in {_fmt(batch['batches'])} batches of up to "
            f"{batch['readings_per_batch']} readings, {_fmt(batch['readings_per_s'])} readings/s, "
            f"lost {_fmt(batch['lost'])}.",
        ]
    lines += [
        "",
        "## Set-up",
        "",
        report["setup"],
        "",
        f"Machine: {env['cpu_count']} CPUs ({env['cpu_model'] or 'unknown model'}), "
        f"Python {env['python']}, paho-mqtt {env['paho_mqtt']}, Mosquitto {env['mosquitto']}, "
        f"{env['platform']}. Load average (1, 5, 15 min) at start "
        f"{env['load_average_at_start']}, at end {env['load_average_at_end']}.",
        "",
    ]
    return "\n".join(lines)


def setup_text(plan: Plan) -> str:
    """How the figures were measured (in the report, so nobody has to guess)."""
    return (
        "Everything runs on this one machine and shares its CPUs: Mosquitto (the project's "
        "`broker/mosquitto.conf`, open mode: anonymous, no TLS, persistence saved every "
        "second), the process under test, the publisher (the benchmark process, "
        f"{plan.publishers} paho clients, clean sessions, QoS 1, up to 1,000 in flight each) "
        "and a subscriber in its own process (QoS 1 on `<root>/alerts/+/+/verdict`). Readings "
        "come from the simulator (anomaly rate 0.02) and are encoded before timing. Throughput "
        "= messages / (first publish -> last distinct verdict received); the relay republishes "
        "each reading unchanged, the detector decodes, validates, scores and publishes a "
        "verdict, and acknowledges each reading only after its verdict's PUBACK (persistent "
        "session, manual ack). Loss = broker-acknowledged readings - distinct verdicts. "
        "Latency = receipt time in the subscriber - publish time in the publisher "
        "(CLOCK_MONOTONIC in both). In throughput runs the publisher keeps at most "
        f"{_fmt(plan.window)} readings outstanding (published, no verdict yet), so the "
        "broker's queue stays bounded (a persistence snapshot rewrites the whole backlog). "
        f"Sharded runs ('x{SHARDS}'): the same 10 machines spread over {SHARDS} production "
        f"lines and {SHARDS} relays or detectors, each subscribed to one line "
        "(`--lines`), all on the one broker; their CPU figures add up the shards. "
        "Each measurement has a fresh topic root and a fresh "
        "detector client id; the detector runs with its defaults (INFO logging, fast scorer, "
        f"batch_max {DetectorSettings.model_fields['batch_max'].default}, metrics on, here on "
        "a free loopback port; the mean batch size comes from them). The relay latency row is "
        "the floor that the broker, paho and this load generator set. Naive path: the same "
        "detector with FACTORYWATCH_DETECTOR_SCORER=sklearn and "
        "FACTORYWATCH_DETECTOR_BATCH_MAX=1. Batched payloads: TelemetryBatch messages of up "
        "to 1,000 readings from gateways, at most four batches outstanding. CPU % is per "
        "process over the measurement window (100 = one core); the subscriber's includes "
        "its start-up; 'other' is everything else busy on the machine in that window (other "
        "users' processes, the kernel), which makes the figures noisier."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, help="AI4I CSV to train on (default: data/)")
    parser.add_argument(
        "--no-verify", action="store_true", help="accept a dataset whose sha256 is unknown"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    dataset = find_dataset(args.dataset)
    command = shlex.join(["python", "-m", "bench.run", *(argv or sys.argv[1:])])
    began = time.perf_counter()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="factorywatch-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "model"
        progress(f"training a model on {dataset} ...")
        version = train(dataset, model_dir, no_verify=args.no_verify)
        bench = Bench(workdir, model_dir, plan)
        progress(f"starting mosquitto on 127.0.0.1:{bench.broker.port} ...")
        bench.broker.start()
        watcher: SysWatcher | None = None
        try:
            watcher = SysWatcher(bench.settings("sys"))
            report = measure(bench, plan)
            time.sleep(1.5)  # one more $SYS interval, so the final count is published
            report["broker_dropped"] = watcher.dropped()
        finally:
            if watcher is not None:
                watcher.close()
            bench.broker.stop()
    report = {
        **report,
        "model_version": version,
        "quick": bool(args.quick),
        "runtime_s": round(time.perf_counter() - began, 1),
        "setup": setup_text(plan),
        "environment": environment(command, load_at_start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    text = markdown(report)
    (args.out / "bench.md").write_text(text)
    print(text)
    progress(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
