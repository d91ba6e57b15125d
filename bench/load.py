"""Load generation and measurement helpers for the benchmarks.

* ``make_readings``: pre-encoded ``Telemetry`` payloads of N simulated machines (round robin,
  anomaly rate 0.02), generated before any timing starts.
* ``Publisher``: one or more paho clients that publish those payloads at QoS 1, either as
  fast as possible (throughput) or paced at a fixed rate (latency), recording
  ``perf_counter`` at each publish and counting the broker's PUBACKs.
* ``SubscriberProcess``: a subscriber in its own process (``python -m bench.load subscribe``)
  so that receiving does not compete with publishing for one GIL. It records the
  ``perf_counter`` of the first receipt of every ``(machine_id, seq)`` on the verdict topics
  (for the relay the payload is the reading itself, which carries the same two keys) and
  counts duplicates. ``perf_counter`` is ``CLOCK_MONOTONIC`` on Linux, so times taken in two
  processes on one machine can be subtracted.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol

import paho.mqtt.client as mqtt

from factorywatch import mqtt as fwmqtt
from factorywatch.channels import map_names
from factorywatch.contracts import Telemetry
from factorywatch.errors import BrokerError
from factorywatch.launch import Launched, LaunchError, child_env
from factorywatch.sensors import scenarios
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

PROJECT_DIR = Path(__file__).resolve().parents[1]

ANOMALY_RATE: Final = 0.02
SUBSCRIBER_READY: Final = "subscriber_ready"

Key = tuple[str, int]


# -- readings -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reading:
    """One pre-encoded reading: which machine (index) sent it, its key and its bytes."""

    machine: int
    machine_id: str
    seq: int
    payload: bytes

    @property
    def key(self) -> Key:
        """``(machine_id, seq)``: what identifies the reading and its verdict."""
        return (self.machine_id, self.seq)


def line_name(index: int) -> str:
    """Production line ``index`` (from 0): ``line1``, ``line2``, ..."""
    return f"line{index + 1}"


def machine_ids(count: int) -> list[str]:
    """``count`` machine ids ``m0000``, ``m0001``, ..."""
    return [f"m{i:04d}" for i in range(count)]


class ReadingSource:
    """Pre-generated readings of ``machines`` simulated machines, in round-robin order.

    ``take(n)`` returns the first ``n`` (generating more when needed): each reading of a
    machine has the next sequence number. Topics are not part of a reading, so one source
    serves measurements under different topic roots. With ``lines`` > 1 the machines are
    spread over production lines ``line1``, ``line2``, ... (machine ``i`` on line
    ``i % lines + 1``), which detectors can be sharded by.
    """

    def __init__(self, machines: int, *, seed: int = 0, lines: int = 1) -> None:
        self.ids = machine_ids(machines)
        self.lines = [line_name(i % max(1, lines)) for i in range(machines)]
        self._sims = [
            MachineSimulator(m, line, seed=seed + i, anomaly_rate=ANOMALY_RATE, seq_start=0)
            for i, (m, line) in enumerate(zip(self.ids, self.lines, strict=True))
        ]
        self._readings: list[Reading] = []

    def take(self, count: int) -> list[Reading]:
        """The first ``count`` readings (event time: now, so the detector accepts them)."""
        now = time.time()
        machines = len(self._sims)
        while len(self._readings) < count:
            index = len(self._readings) % machines
            reading = self._sims[index].next(now)
            self._readings.append(Reading(index, reading.machine_id, reading.seq, reading.encode()))
        return self._readings[:count]

    def topics(self, root: str) -> list[str]:
        """Telemetry topic of each machine (by index) under ``root``."""
        topics = Topics(root)
        return [topics.telemetry(line, m) for line, m in zip(self.lines, self.ids, strict=True)]


class Source(Protocol):
    """What a throughput run publishes: readings in order, and each machine's topic."""

    def take(self, count: int) -> list[Reading]:
        """The first ``count`` readings."""
        ...

    def topics(self, root: str) -> list[str]:
        """Telemetry topic of each machine (by index) under ``root``."""
        ...


class ChannelSource:
    """Readings of ``machines`` generic 8-channel machines (``sensors.scenarios``), round robin.

    Version 2 readings with the scenario pump's channels in normal operation, for a model
    trained with ``factorywatch train --csv`` on the same machine (``bench.features``).
    """

    def __init__(self, machines: int, *, seed: int = 0) -> None:
        self.ids = machine_ids(machines)
        self.line = line_name(0)
        self.seed = seed
        self.names = map_names(scenarios.CHANNELS)
        self._readings: list[Reading] = []

    def take(self, count: int) -> list[Reading]:
        """The first ``count`` readings (event time: now, so the detector accepts them)."""
        if len(self._readings) < count:
            machines = len(self.ids)
            rows = -(-count // machines)
            runs = [
                scenarios.generate([], seed=self.seed + i, train_rows=0, rows=rows)
                for i in range(machines)
            ]
            now = time.time()
            self._readings = []
            for n in range(count):
                index, row = n % machines, n // machines
                reading = Telemetry(
                    machine_id=self.ids[index],
                    line=self.line,
                    seq=row,
                    ts=now,
                    readings={
                        self.names[c]: round(runs[index].values[c][row], 5)
                        for c in scenarios.CHANNELS
                    },
                )
                self._readings.append(Reading(index, reading.machine_id, row, reading.encode()))
        return self._readings[:count]

    def topics(self, root: str) -> list[str]:
        """Telemetry topic of each machine (by index) under ``root``."""
        topics = Topics(root)
        return [topics.telemetry(self.line, m) for m in self.ids]


# -- a counter shared between processes ------------------------------------------------------
class SharedCounter:
    """An unsigned 64-bit counter in a memory-mapped file, shared by two processes.

    The subscriber process writes how many distinct verdicts it has received; the publisher
    reads it to keep a bounded number of readings outstanding.
    """

    def __init__(self, path: Path, *, create: bool) -> None:
        self.path = path
        if create:
            path.write_bytes(bytes(8))
        with path.open("r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), 8)

    def get(self) -> int:
        """The current value."""
        value: int = struct.unpack_from("<Q", self._map, 0)[0]
        return value

    def set(self, value: int) -> None:
        """Store ``value`` (one aligned 8-byte write)."""
        struct.pack_into("<Q", self._map, 0, value)

    def close(self) -> None:
        """Unmap the file."""
        self._map.close()


# -- publishing -----------------------------------------------------------------------------
class Publisher:
    """Several paho clients publishing at QoS 1; a machine always uses the same client.

    Clients keep paho's defaults from ``new_client`` (1000 messages in flight each, unbounded
    local queue), so a burst is queued in paho rather than refused.
    """

    def __init__(self, settings: BrokerSettings, *, clients: int = 1) -> None:
        tag = uuid.uuid4().hex[:8]
        self.settings = settings
        self.clients = [
            fwmqtt.new_client(settings, f"bench-pub-{tag}-{i}") for i in range(max(1, clients))
        ]
        self._waiters = [fwmqtt.ConnectWaiter() for _ in self.clients]
        self._lock = threading.Condition()
        self.acknowledged = 0
        self.refused = 0
        self.sent = 0
        for client, waiter in zip(self.clients, self._waiters, strict=True):
            client.on_connect = self._recorder(waiter)
            client.on_publish = self._on_publish

    @staticmethod
    def _recorder(waiter: fwmqtt.ConnectWaiter) -> Any:
        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            waiter.record(reason)

        return on_connect

    def _on_publish(self, _c: mqtt.Client, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            if fwmqtt.reason_failed(reason):
                self.refused += 1
            else:
                self.acknowledged += 1
            if self.acknowledged + self.refused >= self.sent:
                self._lock.notify_all()

    def start(self) -> Publisher:
        """Connect every client (clean sessions)."""
        for client, waiter in zip(self.clients, self._waiters, strict=True):
            fwmqtt.connect(client, self.settings, waiter)
        return self

    def blast(
        self,
        readings: Sequence[Reading],
        topics: Sequence[str],
        *,
        window: int | None = None,
        answered: Callable[[], int] | None = None,
    ) -> float:
        """Publish every reading as fast as possible; return ``perf_counter`` at the first.

        With ``window`` and ``answered`` (how many have been answered so far), at most
        ``window`` readings are outstanding at any time (closed-loop load): the broker's
        queue stays bounded instead of growing with the burst.
        """
        clients, n = self.clients, len(self.clients)
        # When the window is full, wait (1 ms naps) until a quarter of it has been answered:
        # fewer wake-ups than one per answer, and the pipeline stays at least 3/4 full.
        low_water = (window - max(1, window // 4)) if window is not None else 0
        started = time.perf_counter()
        for i, r in enumerate(readings):
            if window is not None and answered is not None and i - answered() >= window:
                while i - answered() > low_water:
                    time.sleep(0.001)
            clients[r.machine % n].publish(topics[r.machine], r.payload, qos=1)
        self.sent += len(readings)
        return started

    def paced(self, readings: Sequence[Reading], topics: Sequence[str], rate: float) -> list[float]:
        """Publish at ``rate`` messages/s; return the ``perf_counter`` of each publish.

        Messages that are due are sent together after each nap; each one's time is taken
        just before its ``publish()``, so a late message is measured from when it went out.
        """
        clients, n = self.clients, len(self.clients)
        sent_at = [0.0] * len(readings)
        start = time.perf_counter() + 0.01
        i, total = 0, len(readings)
        while i < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * rate) + 1)
            while i < due:
                r = readings[i]
                sent_at[i] = time.perf_counter()
                clients[r.machine % n].publish(topics[r.machine], r.payload, qos=1)
                i += 1
            if i < total:
                # Naps of at least 1 ms: above 1,000 msg/s a few messages go out together
                # instead of one wake-up per message (which would eat the CPU under test).
                wait = start + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(max(wait, 0.001))
        self.sent += total
        return sent_at

    def wait_settled(self, timeout_s: float) -> bool:
        """Wait until every published message got its PUBACK (or the timeout)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self.acknowledged + self.refused >= self.sent, timeout_s
            )

    def close(self) -> None:
        """Disconnect every client."""
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


# -- subscribing (in its own process) -------------------------------------------------------
@dataclass
class Received:
    """What a subscriber process saw."""

    messages: int = 0
    duplicates: int = 0
    undecodable: int = 0
    first_at: dict[Key, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0

    @property
    def unique(self) -> int:
        """Distinct ``(machine_id, seq)`` received."""
        return len(self.first_at)

    @property
    def last_at(self) -> float:
        """``perf_counter`` of the latest first receipt (0 when nothing arrived)."""
        return max(self.first_at.values(), default=0.0)


def _verdict_filter(root: str) -> str:
    return f"{root}/alerts/+/+/verdict"


class _Recorder:
    """The paho side of the subscriber process."""

    def __init__(
        self, settings: BrokerSettings, expect: int, counter: SharedCounter | None
    ) -> None:
        self.expect = expect
        self.counter = counter
        self.result = Received()
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self.last_message = time.monotonic()
        self.waiter = fwmqtt.ConnectWaiter()
        self.client = fwmqtt.new_client(settings, f"bench-sub-{uuid.uuid4().hex[:8]}")
        self.filter = _verdict_filter(settings.topic_root)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.waiter.record(reason)
        if not reason.is_failure:
            client.subscribe(self.filter, qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _m: int, codes: Any, _p: Any) -> None:
        if not any(fwmqtt.reason_failed(c) for c in codes):
            self.subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        at = time.perf_counter()
        self.last_message = time.monotonic()
        result = self.result
        result.messages += 1
        try:
            body = json.loads(msg.payload)
            key = (str(body["machine_id"]), int(body["seq"]))
        except (ValueError, KeyError, TypeError):
            result.undecodable += 1
            return
        if key in result.first_at:
            result.duplicates += 1
            return
        result.first_at[key] = at
        unique = len(result.first_at)
        if self.counter is not None:
            self.counter.set(unique)
        if unique >= self.expect:
            self.done.set()


def subscribe_main(args: argparse.Namespace) -> int:
    """``python -m bench.load subscribe``: record verdict receipts, then write them as JSON.

    Stops when ``--expect`` distinct keys arrived, when nothing arrived for ``--idle``
    seconds after the first message (loss), at ``--deadline`` seconds, or on SIGTERM.
    """
    settings = BrokerSettings().with_overrides(port=args.port, topic_root=args.root)
    counter = SharedCounter(args.counter, create=False) if args.counter else None
    rec = _Recorder(settings, args.expect, counter)
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    fwmqtt.connect(rec.client, settings, rec.waiter)
    if not rec.subscribed.wait(10):
        raise BrokerError("subscription not acknowledged")
    print(SUBSCRIBER_READY, flush=True)
    deadline = time.monotonic() + args.deadline
    while not (stop.is_set() or rec.done.is_set()) and time.monotonic() < deadline:
        if rec.result.messages and time.monotonic() - rec.last_message > args.idle:
            break
        rec.done.wait(0.05)
    rec.client.disconnect()
    rec.client.loop_stop()
    result = rec.result
    times = os.times()
    out = {
        "messages": result.messages,
        "duplicates": result.duplicates,
        "undecodable": result.undecodable,
        "cpu_s": times.user + times.system,
        "max_rss_mb": _peak_rss_mb(),
        "first_at": [[m, s, t] for (m, s), t in result.first_at.items()],
    }
    Path(args.out).write_text(json.dumps(out))
    return 0


def _peak_rss_mb() -> float:
    import resource  # noqa: PLC0415  (POSIX only; imported where it is needed)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class SubscriberProcess:
    """Runs ``python -m bench.load subscribe`` and reads back what it recorded."""

    def __init__(
        self,
        port: int,
        root: str,
        *,
        expect: int,
        out: Path,
        idle_s: float = 5.0,
        deadline_s: float = 300.0,
    ) -> None:
        self.out = out
        out.unlink(missing_ok=True)
        self.log_file = out.with_suffix(".log")
        self.counter = SharedCounter(out.with_suffix(".count"), create=True)
        command = [
            sys.executable,
            "-m",
            "bench.load",
            "subscribe",
            "--port",
            str(port),
            "--root",
            root,
            "--expect",
            str(expect),
            "--out",
            str(out),
            "--idle",
            str(idle_s),
            "--deadline",
            str(deadline_s),
            "--counter",
            str(self.counter.path),
        ]
        self.process = Launched(
            command,
            self.log_file,
            cwd=PROJECT_DIR,
            env=child_env({"PYTHONPATH": str(PROJECT_DIR)}),
            name="subscriber",
        )
        try:
            self.process.wait_log(SUBSCRIBER_READY, 30.0)
        except LaunchError:
            self.kill()
            raise

    def result(self, timeout_s: float) -> Received:
        """Wait for the process to finish (SIGTERM it at ``timeout_s``) and load its record."""
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.terminate(30)
        if not self.out.is_file():
            raise BrokerError(f"subscriber wrote no record: {self.process.log()[-2000:]}")
        data = json.loads(self.out.read_text())
        return Received(
            messages=int(data["messages"]),
            duplicates=int(data["duplicates"]),
            undecodable=int(data["undecodable"]),
            first_at={(str(m), int(s)): float(t) for m, s, t in data["first_at"]},
            cpu_s=float(data["cpu_s"]),
            max_rss_mb=float(data["max_rss_mb"]),
        )

    def answered(self) -> int:
        """Distinct verdicts received so far (read live from the shared counter)."""
        return self.counter.get()

    def kill(self) -> None:
        """Stop it at once (clean-up after a failure) and release the counter."""
        self.process.kill()
        self.counter.close()


# -- statistics -----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.load``."""
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("subscribe", help="record verdict receipts (used by bench.run)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--expect", type=int, required=True, help="distinct keys to wait for")
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON record")
    p.add_argument("--idle", type=float, default=5.0, help="stop after this long without news")
    p.add_argument("--deadline", type=float, default=300.0, help="stop after this long")
    p.add_argument("--counter", type=Path, help="file of a SharedCounter to keep up to date")
    args = parser.parse_args(argv)
    return subscribe_main(args)


if __name__ == "__main__":
    sys.exit(main())
