"""Fault-injection fixtures: a persistent verdict collector, tracked sensors, scenario figures.

``tests.support.Collector`` connects with a clean session: after a broker restart it
resubscribes only once paho has reconnected (1-10 s backoff), and verdicts published in that
gap never reach it. The collector here keeps a persistent session (fixed client id,
``clean_start=False``, session expiry), so the broker queues verdicts for it while it is
away, and the persistence file carries its subscription across broker restarts.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.sensors import sparkplug
from factorywatch.sensors.publisher import PublishStats, SensorPublisher
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics, parse_sparkplug, sparkplug_machine_id
from tests.sparkplug_edge import decode
from tests.support import Proc, wait_until

DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
REPORT_ENV: Final = "FACTORYWATCH_FAULTS_REPORT"
DETECTOR_ID: Final = "faults-detector"

Key = tuple[str, int]


# -- verdicts ---------------------------------------------------------------------------------
class VerdictCollector:
    """A real paho subscriber with a persistent session recording every verdict it gets."""

    def __init__(self, settings: BrokerSettings, *, session_expiry_s: int = 3600) -> None:
        topics = Topics(settings.topic_root)
        self._settings = settings
        self._dead_prefix = f"{settings.topic_root}/deadletter/"
        self._marker_prefix = f"{settings.topic_root}/alerts/_marker/"
        self._poke_prefix = f"{settings.topic_root}/poke/"
        self._filters = [topics.alerts_filter, topics.deadletter_filter, DROPPED_TOPIC]
        self._lock = threading.Lock()
        self._keys: list[Key] = []
        self._arrivals: list[float] = []  # time.monotonic() of each verdict, in arrival order
        self._unique: set[Key] = set()
        self._payloads: dict[Key, set[bytes]] = {}  # each reading's distinct verdicts
        self._markers: dict[str, int] = {}  # marker id -> verdicts received before it
        self.dead_letters = 0
        self.dropped_values: list[int] = []
        self.connects = 0
        self.sessions_lost = 0  # reconnects on which the broker had forgotten our session
        self.subscribe_failures = 0
        self._subscribed = threading.Event()
        self._waiter = fwmqtt.ConnectWaiter()
        self.client = fwmqtt.new_client(settings, f"faults-collector-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        fwmqtt.connect(self.client, settings, self._waiter, persistent_session_s=session_expiry_s)
        assert self._subscribed.wait(10), "collector subscription not acknowledged"
        assert self.subscribe_failures == 0, "collector subscription refused"

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self._waiter.record(rc)
        if rc.is_failure:
            return
        with self._lock:
            self.connects += 1
            if self.connects > 1 and not getattr(flags, "session_present", False):
                self.sessions_lost += 1
        client.subscribe([(f, fwmqtt.QOS) for f in self._filters])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(fwmqtt.reason_failed(c) for c in codes):
            self.subscribe_failures += 1
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        with self._lock:
            if msg.topic.endswith("/verdict"):
                data = json.loads(msg.payload)
                key = (str(data["machine_id"]), int(data["seq"]))
                self._keys.append(key)
                self._arrivals.append(now)
                self._unique.add(key)
                self._payloads.setdefault(key, set()).add(bytes(msg.payload))
            elif msg.topic.startswith(self._marker_prefix):
                self._markers[msg.topic[len(self._marker_prefix) :]] = len(self._keys)
            elif msg.topic.startswith(self._dead_prefix):
                self.dead_letters += 1
            elif msg.topic == DROPPED_TOPIC:
                self.dropped_values.append(int(msg.payload))

    # -- reading the record ---------------------------------------------------------------
    @property
    def unique_count(self) -> int:
        """Distinct readings with at least one verdict."""
        with self._lock:
            return len(self._unique)

    def unique_keys(self) -> set[Key]:
        """A copy of the distinct readings with at least one verdict."""
        with self._lock:
            return set(self._unique)

    @property
    def rescored(self) -> int:
        """Readings with two different verdicts: scored twice (a copy of the one verdict, a
        redelivery or an answer from the detector's cache, is the same bytes)."""
        with self._lock:
            return sum(len(p) > 1 for p in self._payloads.values())

    @property
    def duplicates(self) -> int:
        """Verdict messages beyond the first one per reading (at-least-once redelivery)."""
        with self._lock:
            return len(self._keys) - len(self._unique)

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll ``condition()`` (under the lock, every 50 ms) until it holds; False on timeout.

        Polling, not a wake-up per message: re-checking a 10,000-key coverage on each of
        thousands of verdicts a second would starve the network thread that records them.
        Arrival times are taken in ``on_message``, so polling does not blur any figure.
        """

        def held() -> bool:
            with self._lock:
                return condition()

        try:
            return wait_until(held, timeout, "the verdicts", poll_s=0.05)
        except AssertionError:
            return False  # the caller reports what is missing

    def wait_unique(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` distinct readings have verdicts."""
        return self.wait(lambda: len(self._unique) >= count, timeout)

    def wait_covering(self, keys: set[Key], timeout: float) -> set[Key]:
        """Wait until every key has a verdict; return the keys still without one."""
        self.wait(lambda: keys <= self._unique, timeout)
        return keys - self.unique_keys()

    def wait_quiet(self, quiet_s: float, timeout: float) -> None:
        """Wait until no verdict arrived for ``quiet_s`` (for measured, unasserted losses)."""
        self.wait(
            lambda: not self._arrivals or time.monotonic() - self._arrivals[-1] >= quiet_s,
            timeout,
        )

    def mark(self) -> str:
        """Publish a marker into our verdict stream, from a client of its own; return its id.

        The broker delivers to us in order, so every verdict after the marker was published
        after it: after a detector kill, those come from a new detector, not from the backlog
        of the dead one's verdicts still on their way to us.
        """
        marker = uuid.uuid4().hex[:8]
        client = fwmqtt.connected_client(self._settings, f"faults-marker-{marker}")
        info = client.publish(f"{self._marker_prefix}{marker}", b"{}", qos=fwmqtt.QOS)
        info.wait_for_publish(timeout=10)
        client.disconnect()
        client.loop_stop()
        return marker

    def first_verdict_after(self, marker: str, since: float, timeout: float) -> float | None:
        """Seconds from ``since`` (monotonic) to the first verdict received after ``marker``."""
        if not self.wait(
            lambda: marker in self._markers and len(self._keys) > self._markers[marker], timeout
        ):
            return None
        with self._lock:
            return max(0.0, self._arrivals[self._markers[marker]] - since)

    def broker_dropped(self, timeout: float = 3.0) -> int:
        """Highest ``$SYS/broker/publish/messages/dropped`` seen (-1: never seen).

        The broker publishes the counter (retained, within ``sys_interval``) whenever it
        changes, so our standing subscription sees every change. Re-subscribing asks for the
        current value again; it may not come, as Mosquitto gives $SYS messages a 60 s expiry.
        """
        with self._lock:
            seen = len(self.dropped_values)
        self.client.subscribe(DROPPED_TOPIC, qos=fwmqtt.QOS)
        self.wait(lambda: len(self.dropped_values) > seen, timeout)
        with self._lock:
            return max(self.dropped_values, default=-1)

    def poke(self) -> None:
        """Send the broker a SUBSCRIBE to a new filter (a persistence change), without waiting.

        A new filter each time: re-subscribing to an existing one changes nothing, so with
        ``autosave_on_changes`` it would not trigger a save.
        """
        self.client.subscribe(f"{self._poke_prefix}{uuid.uuid4().hex[:12]}", qos=fwmqtt.QOS)

    def close(self) -> None:
        """Disconnect, ending the session (expiry 0) so the broker forgets it."""
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()


# -- sensors ----------------------------------------------------------------------------------
class TrackedPublisher(SensorPublisher):
    """The product's publisher, also recording which readings the broker acknowledged, when.

    ``SensorPublisher`` only counts PUBACKs; to compute loss we need the readings themselves,
    so the client's ``publish`` is wrapped (transparently) to map packet ids to sequence
    numbers. Packet ids do not wrap: a test publishes far fewer than 65,535 per machine.
    """

    def __init__(
        self, broker: BrokerSettings, machine_id: str, *, buffer_size: int, **options: Any
    ) -> None:
        super().__init__(broker, machine_id, buffer_size=buffer_size, **options)
        self._track = threading.Lock()
        self._seq_of_mid: dict[int, int] = {}
        self._acked_at: dict[int, float] = {}
        self.mid_reuses = 0
        self.connected_at: list[float] = []  # monotonic time of each successful CONNACK
        self._raw_publish = self.client.publish
        self.client.publish = self._tracked_publish  # type: ignore[method-assign]

    def _tracked_publish(
        self,
        topic: str,
        payload: mqtt.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        info = self._raw_publish(topic, payload, qos, retain, properties)
        if "/telemetry/" in topic and info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
            assert isinstance(payload, bytes)
            seq = int(json.loads(payload)["seq"])
            with self._track:
                self.mid_reuses += info.mid in self._seq_of_mid
                self._seq_of_mid[info.mid] = seq
        return info

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            with self._track:
                self.connected_at.append(time.monotonic())
        super()._on_connect(client, u, f, reason, p)

    def _on_publish(self, client: mqtt.Client, u: Any, mid: int, reason: Any, p: Any) -> None:
        if not fwmqtt.reason_failed(reason):
            with self._track:
                self._acked_at.setdefault(mid, time.monotonic())
        super()._on_publish(client, u, mid, reason, p)

    def sent(self) -> set[Key]:
        """Readings handed to paho (published at once or buffered)."""
        with self._track:
            return {(self.machine_id, s) for s in self._seq_of_mid.values()}

    def acked_since_reconnect(self) -> set[Key]:
        """Readings acknowledged on a later connection than the first (after a broker restart)."""
        with self._track:
            since = self.connected_at[1] if len(self.connected_at) > 1 else float("inf")
        return {k for k, t in self.acked().items() if t >= since}

    def acked(self) -> dict[Key, float]:
        """Readings the broker acknowledged, with the time (monotonic) of the PUBACK."""
        with self._track:
            return {
                (self.machine_id, s): self._acked_at[m]
                for m, s in self._seq_of_mid.items()
                if m in self._acked_at
            }


class _Stream:
    """What a fault test's background publisher shares: its machines, pace, closing bound,
    stop flag, first error and thread."""

    def __init__(
        self,
        machines: Sequence[str],
        *,
        count: int,
        rate_hz: float,
        close_timeout_s: float,
        thread_name: str,
    ) -> None:
        self.machines = list(machines)
        self.count = count
        self.rate_hz = rate_hz
        self.close_timeout_s = close_timeout_s
        self.stats = PublishStats()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop publishing and wait (bounded by the close timeout) without raising."""
        self.stop.set()
        self._thread.join(self.close_timeout_s + 10)

    def join(self, timeout: float) -> None:
        """Wait until every reading is published and acknowledged (or the close timeout)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._thread.name} still running after {timeout} s"
        if self.error is not None:
            raise self.error


class SensorStream(_Stream):
    """Several machines publishing simulated readings at QoS 1 from a background thread."""

    def __init__(
        self,
        settings: BrokerSettings,
        machines: Sequence[str],
        *,
        count: int,
        rate_hz: float,
        seed: int = 1,
        buffer_size: int = 100_000,
        close_timeout_s: float = 90.0,
        **options: Any,
    ) -> None:
        """``options``: the publisher's delivery settings (``SensorPublisher``'s keywords)."""
        super().__init__(
            machines,
            count=count,
            rate_hz=rate_hz,
            close_timeout_s=close_timeout_s,
            thread_name="sensor stream",
        )
        self.publishers = [
            TrackedPublisher(settings, m, buffer_size=buffer_size, **options) for m in machines
        ]
        self._sims = [
            MachineSimulator(m, "line1", seed=seed + i, anomaly_rate=0.0)
            for i, m in enumerate(machines)
        ]
        self.tick_times: list[float] = []  # monotonic time of each round (one per machine)

    def start(self) -> SensorStream:
        """Connect every machine, then publish in the background."""
        for pub in self.publishers:
            pub.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            interval = 1.0 / self.rate_hz
            next_tick = time.monotonic()
            for _ in range(self.count):
                if self.stop.is_set():
                    break
                now = time.time()
                for pub, sim in zip(self.publishers, self._sims, strict=True):
                    pub.publish(sim.next(now))
                self.tick_times.append(time.monotonic())
                next_tick += interval
                delay = next_tick - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
        except BaseException as exc:  # reported by join(), not lost in a thread
            self.error = exc
        finally:
            for pub in self.publishers:
                try:
                    self.stats.add(pub.close(timeout_s=self.close_timeout_s))
                except BaseException as exc:
                    self.error = self.error or exc

    @property
    def published(self) -> int:
        """Readings published so far (all machines)."""
        return len(self.tick_times) * len(self.machines)

    def sent(self) -> set[Key]:
        """Every reading handed to paho."""
        return set().union(*(p.sent() for p in self.publishers))

    def acked(self) -> dict[Key, float]:
        """Every reading the broker acknowledged, with its PUBACK time."""
        out: dict[Key, float] = {}
        for pub in self.publishers:
            out.update(pub.acked())
        return out

    def acked_since_reconnect(self) -> set[Key]:
        """Readings each machine got acknowledged after it reconnected (broker restarted)."""
        return set().union(*(p.acked_since_reconnect() for p in self.publishers))

    @property
    def reconnects(self) -> int:
        """Successful reconnects of all machines."""
        return sum(max(0, len(p.connected_at) - 1) for p in self.publishers)

    @property
    def mid_reuses(self) -> int:
        """Packet ids seen twice (would make the tracking ambiguous; must stay 0)."""
        return sum(p.mid_reuses for p in self.publishers)


class SparkplugStream(_Stream):
    """The product's Sparkplug edge node (``sensors.sparkplug.publish``, its run loop) with
    several devices in a background thread, recording from the wire which readings (device,
    ``factorywatch/Reading Seq``) went out and which the broker acknowledged, when."""

    def __init__(
        self,
        settings: BrokerSettings,
        devices: Sequence[str],
        *,
        count: int,
        rate_hz: float,
        group: str = "plant1",
        node: str = "edge1",
        seed: int = 1,
        close_timeout_s: float = 90.0,
        **options: Any,
    ) -> None:
        """``options``: the edge node's delivery settings (``EdgeNodeClient``'s keywords)."""
        super().__init__(
            [sparkplug_machine_id(node, d) for d in devices],
            count=count,
            rate_hz=rate_hz,
            close_timeout_s=close_timeout_s,
            thread_name="edge node",
        )
        edge = sparkplug.EdgeNode(group, node, list(devices), bd_seq=0)
        self.shell = sparkplug.EdgeNodeClient(settings, edge, **options)
        self._sims = [
            MachineSimulator(d, group, seed=seed + i, anomaly_rate=0.0, seq_start=1_000_000)
            for i, d in enumerate(devices)
        ]
        self._track = threading.Lock()
        self._key_of_mid: dict[int, Key] = {}
        self._sent: set[Key] = set()
        self._acked_at: dict[Key, float] = {}
        self.connected_at: list[float] = []
        client = self.shell.client
        self._raw_publish = client.publish
        client.publish = self._tracked_publish  # type: ignore[method-assign]
        self._raw_on_connect: Any = client.on_connect
        self._raw_on_publish: Any = client.on_publish
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish

    def _tracked_publish(
        self,
        topic: str,
        payload: mqtt.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        info = self._raw_publish(topic, payload, qos, retain, properties)
        parsed = parse_sparkplug(topic)
        if parsed.kind in ("DBIRTH", "DDATA") and parsed.device is not None:
            assert isinstance(payload, bytes)
            seqs = [m.long_value for m in decode(payload).metrics if m.HasField("long_value")]
            key = (sparkplug_machine_id(parsed.node, parsed.device), int(seqs[0]))
            with self._track:
                self._key_of_mid[info.mid] = key
                self._sent.add(key)
        return info

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            with self._track:
                self.connected_at.append(time.monotonic())
        self._raw_on_connect(client, u, f, reason, p)

    def _on_publish(self, client: mqtt.Client, u: Any, mid: int, reason: Any, p: Any) -> None:
        if not fwmqtt.reason_failed(reason):
            with self._track:
                key = self._key_of_mid.get(mid)
                if key is not None:
                    self._acked_at.setdefault(key, time.monotonic())
        self._raw_on_publish(client, u, mid, reason, p)

    def start(self) -> SparkplugStream:
        """Publish in the background (the run loop connects first)."""
        self._thread.start()
        wait_until(lambda: self.connected_at, 30, "the edge node's connection")
        return self

    def _run(self) -> None:
        try:
            self.stats = sparkplug.publish(
                self.shell, self._sims, rate_hz=self.rate_hz, count=self.count, stop=self.stop
            )
        except BaseException as exc:  # reported by join(), not lost in a thread
            self.error = exc

    @property
    def published(self) -> int:
        """Readings handed to paho so far (births and data, all devices)."""
        with self._track:
            return len(self._sent)

    def sent(self) -> set[Key]:
        """Every reading handed to paho."""
        with self._track:
            return set(self._sent)

    def acked(self) -> dict[Key, float]:
        """Every reading the broker acknowledged (a send or a send again), with the time."""
        with self._track:
            return dict(self._acked_at)

    @property
    def reconnects(self) -> int:
        """Successful reconnects of the edge node."""
        with self._track:
            return max(0, len(self.connected_at) - 1)


# -- detectors ----------------------------------------------------------------------------------
class DetectorRunner:
    """Starts, kills and stops detector processes sharing one client id (one session)."""

    def __init__(self, start: Callable[..., Proc], collector: VerdictCollector) -> None:
        self._start = start
        self._collector = collector
        self.procs: list[Proc] = []
        self.kills = 0
        self.unexpected_exits = 0
        self.first_verdict_s: list[float] = []
        # CPU seconds each restarted process used until its first verdict arrived: what a
        # restart costs, whatever else the machine runs (the wall figure above depends on it)
        self.first_verdict_cpu_s: list[float] = []
        self.subscribed_s: list[float] = []
        self._marker: str | None = None
        self.env: dict[str, str] | None = None  # detector settings for every start

    @property
    def current(self) -> Proc:
        """The most recently started detector."""
        return self.procs[-1]

    def start(self) -> float:
        """Start a detector, wait until it subscribed; return when it was spawned (monotonic)."""
        spawned = time.monotonic()
        self.procs.append(self._start(client_id=DETECTOR_ID, env=self.env))
        self.subscribed_s.append(round(time.monotonic() - spawned, 3))
        return spawned

    def start_and_time(self, timeout: float = 90.0) -> float:
        """Start a detector; record the time from its spawn to its first verdict we receive."""
        marker = self._marker or self._collector.mark()
        self._marker = None
        spawned = self.start()
        delay = self._collector.first_verdict_after(marker, spawned, timeout)
        assert delay is not None, f"no verdict within {timeout} s of a detector (re)start"
        self.first_verdict_s.append(round(delay, 3))
        self.first_verdict_cpu_s.append(round(process_cpu_s(self.current.pid), 2))
        return delay

    def kill(self) -> None:
        """SIGKILL the running detector (a crash) and reap it."""
        if self.current.process.poll() is not None:
            self.unexpected_exits += 1
        self.current.kill()
        self.kills += 1
        self._marker = self._collector.mark()  # the dead detector's verdicts end here

    def stop(self) -> None:
        """SIGTERM the running detector; a non-zero exit counts as a crash."""
        if self.current.process.poll() is not None:
            self.unexpected_exits += 1
        if self.current.terminate() != 0:
            self.unexpected_exits += 1
        self._marker = self._collector.mark()

    @property
    def tracebacks(self) -> int:
        """Python tracebacks in every detector's log."""
        return sum(p.log().count("Traceback") for p in self.procs)

    @property
    def crashes(self) -> int:
        """Detector exits we did not cause, non-zero clean-stop exits and tracebacks."""
        return self.unexpected_exits + self.tracebacks

    def reanswered(self) -> int:
        """Duplicates the detectors answered with the verdict already given (clean stops)."""
        total = 0
        for proc in self.procs:
            for line in proc.log().splitlines():
                if '"detector_stopped"' in line:
                    total += int(json.loads(line).get("reanswered", 0))
        return total

    def journal_duplicates(self) -> int:
        """Redelivered readings the detectors recognised (from clean-stop counters)."""
        total = 0
        for proc in self.procs:
            for line in proc.log().splitlines():
                if '"detector_stopped"' in line:
                    total += int(json.loads(line).get("duplicates", 0))
        return total


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- figures ----------------------------------------------------------------------------------
@dataclass
class Figures:
    """What one fault scenario did to the pipeline."""

    scenario: str
    sent: int
    acked: int
    unique_verdicts: int
    duplicates: int
    lost: int
    dead_lettered: int
    crashes: int
    broker_dropped: int
    first_verdict_after_restart_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def broker_drop_notices(broker: LocalBroker) -> int:
    """Mosquitto's "Outgoing messages are being dropped" notices in its log."""
    try:
        return broker.log_file.read_text(errors="replace").count("are being dropped")
    except OSError:
        return 0


def tally(
    scenario: str,
    *,
    sent: set[Key],
    acked: set[Key],
    collector: VerdictCollector,
    broker: LocalBroker,
    crashes: int,
    started: float,
    first_verdict_s: Sequence[float] = (),
    **details: Any,
) -> Figures:
    """Figures of a scenario from what was sent, acknowledged and answered."""
    answered = collector.unique_keys() & sent
    return Figures(
        scenario=scenario,
        sent=len(sent),
        acked=len(acked),
        unique_verdicts=len(answered),
        duplicates=collector.duplicates,
        lost=len(acked - answered),
        dead_lettered=collector.dead_letters,
        crashes=crashes,
        broker_dropped=collector.broker_dropped(),
        first_verdict_after_restart_s=list(first_verdict_s),
        wall_s=round(time.monotonic() - started, 1),
        details={
            "unexpected_verdicts": len(collector.unique_keys() - sent),
            "broker_drop_notices": broker_drop_notices(broker),
            "collector_sessions_lost": collector.sessions_lost,
            **details,
        },
    )


class FaultReport:
    """Figures of every scenario of the session."""

    def __init__(self) -> None:
        self.rows: list[Figures] = []

    def add(self, figures: Figures) -> Figures:
        """Record one scenario's figures (and print them, visible with ``-s``)."""
        self.rows.append(figures)
        print(f"\n[faults] {json.dumps(asdict(figures))}")
        return figures

    def table(self) -> str:
        """The figures as a fixed-width table."""
        head = (
            f"{'scenario':<50}{'sent':>7}{'acked':>7}{'unique':>7}{'dups':>6}{'lost':>6}"
            f"{'dead':>6}{'crash':>6}{'drops':>6}{'wall s':>8}  first verdict after restart (s)"
            " [its CPU s]"
        )
        lines = [head, "-" * len(head)]
        for f in self.rows:
            firsts = ", ".join(f"{s:.2f}" for s in f.first_verdict_after_restart_s) or "-"
            cpu = f.details.get("first_verdict_cpu_s")
            firsts += f" [{', '.join(f'{c:.2f}' for c in cpu)}]" if cpu else ""
            lines.append(
                f"{f.scenario:<50}{f.sent:>7}{f.acked:>7}{f.unique_verdicts:>7}{f.duplicates:>6}"
                f"{f.lost:>6}{f.dead_lettered:>6}{f.crashes:>6}{f.broker_dropped:>6}"
                f"{f.wall_s:>8.1f}  {firsts}"
            )
        return "\n".join(lines)


REPORT_KEY: Final = pytest.StashKey[FaultReport]()


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    """Collects each scenario's figures; writes them as JSON to $FACTORYWATCH_FAULTS_REPORT."""
    report = FaultReport()
    yield report
    request.config.stash[REPORT_KEY] = report
    target = os.environ.get(REPORT_ENV)
    if target and report.rows:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(f) for f in report.rows], indent=2) + "\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the fault figures table at the end of the session."""
    report = config.stash.get(REPORT_KEY, None)
    if report is None or not report.rows:
        return
    terminalreporter.section("fault-injection figures")
    terminalreporter.write_line(report.table())
    target = os.environ.get(REPORT_ENV)
    if target:
        terminalreporter.write_line(f"written to {target}")


@pytest.fixture
def verdicts(settings: BrokerSettings) -> Iterator[VerdictCollector]:
    """A persistent-session collector of verdicts, dead letters and the broker's drop count."""
    collector = VerdictCollector(settings)
    yield collector
    collector.close()


@pytest.fixture
def streams(settings: BrokerSettings) -> Iterator[Callable[..., SensorStream]]:
    """Factory of started sensor streams; any still running are stopped at the end."""
    made: list[SensorStream] = []

    def make(machines: Sequence[str], **kwargs: Any) -> SensorStream:
        stream = SensorStream(settings, machines, **kwargs)
        made.append(stream)
        return stream.start()

    yield make
    for stream in made:
        stream.stop.set()
    for stream in made:
        stream.shutdown()


@pytest.fixture
def sparkplug_streams(settings: BrokerSettings) -> Iterator[Callable[..., SparkplugStream]]:
    """Factory of started Sparkplug edge-node streams; any still running stop at the end."""
    made: list[SparkplugStream] = []

    def make(devices: Sequence[str], **kwargs: Any) -> SparkplugStream:
        stream = SparkplugStream(settings, devices, **kwargs)
        made.append(stream)
        return stream.start()

    yield make
    for stream in made:
        stream.shutdown()


@pytest.fixture
def detectors(detector: Callable[..., Proc], verdicts: VerdictCollector) -> DetectorRunner:
    """Detector processes with one fixed client id, started and killed at will."""
    return DetectorRunner(detector, verdicts)
