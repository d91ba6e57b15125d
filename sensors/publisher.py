"""The sensors' MQTT shell: one MQTT client per machine publishing readings at QoS 1.

While the broker is unreachable paho keeps QoS 1 messages in a bounded in-memory buffer
(``buffer_size`` per machine) and sends them when the connection returns. A reading that
does not fit is dropped, counted (``buffer_full``) and logged: never silently.

One machine id, one process: each machine's client is fenced (:mod:`factorywatch.fencing`).
When a second process starts publishing as the same machine, the broker hands it the
connection; the older process learns from the newer lease and stops with the remedy
(:class:`SensorFencedError`) instead of reconnecting and kicking the other off every second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from pydantic import ValidationError

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import ClientStatus, DeadLetter, Telemetry
from factorywatch.errors import FactorywatchError, PayloadError
from factorywatch.fencing import Fence
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

log = structlog.get_logger("sensors")


class SensorFencedError(FactorywatchError):
    """Another process publishes as one of this process's machines; this one stopped."""


def fenced_remedy(machine_id: str, reason: str) -> str:
    """What to tell the operator of a sensor process that lost its machine id."""
    return (
        f"another sensor process started publishing as machine {machine_id!r} ({reason}); "
        "this one stopped instead of fighting it for the machine's connection. Run one "
        "sensor process per machine id: stop the other one, or start this one with its own "
        "--machine-id (and `factorywatch broker add-user <id>` for it)"
    )


@dataclass
class PublishStats:
    """What one machine's publisher did."""

    sent: int = 0
    acknowledged: int = 0
    refused: int = 0
    buffer_full: int = 0
    oversize: int = 0
    #: readings the detector dead-lettered (heard on the machine's own dead-letter topic)
    rejected: int = 0

    def add(self, other: PublishStats) -> None:
        """Accumulate another machine's figures."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def count_puback(self, reason: Any) -> None:
        """Count one PUBACK: refused when its reason code is a failure, else acknowledged."""
        if fwmqtt.reason_failed(reason):
            self.refused += 1
        else:
            self.acknowledged += 1


class Pacer:
    """Ticks at a fixed rate from its creation: ``wait`` blocks (until ``stop`` is set at the
    latest) for the next tick; a caller more than a second behind starts again from now rather
    than bursting to catch up."""

    def __init__(self, rate_hz: float) -> None:
        self.interval = 1.0 / rate_hz
        self.next_tick = time.monotonic()

    def wait(self, stop: threading.Event) -> None:
        """Block until the next tick (or ``stop``)."""
        self.next_tick += self.interval
        delay = self.next_tick - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        elif delay < -1.0:
            self.next_tick = time.monotonic()  # fell behind: do not burst to catch up


def wait_for_pubacks(stats: PublishStats, lock: threading.Lock, timeout_s: float) -> None:
    """Return once every message sent has its PUBACK (acknowledged or refused), or after
    ``timeout_s``; ``lock`` guards ``stats`` (paho's thread counts the PUBACKs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with lock:
            if stats.acknowledged + stats.refused >= stats.sent:
                return
        time.sleep(0.02)  # polling the PUBACK count, bounded by the deadline


class SensorPublisher:
    """Publishes one machine's readings; ``close()`` waits for the broker's PUBACKs."""

    def __init__(
        self,
        broker: BrokerSettings,
        machine_id: str,
        *,
        buffer_size: int,
        on_fenced: Callable[[str, str], None] | None = None,
    ) -> None:
        self.topics = Topics(broker.topic_root)
        self.machine_id = machine_id
        # A machine logs in as itself: the broker's ACL lets it write only its own topic.
        if broker.authenticates:
            broker = broker.with_overrides(username=machine_id)
        self.broker = broker
        self.stats = PublishStats()
        self._status_topic = self.topics.status("sensor", machine_id)
        offline = ClientStatus(role="sensor", client_id=machine_id, state="offline").encode()
        self.client = fwmqtt.new_client(
            broker,
            f"sensor-{machine_id}",
            will=(self._status_topic, offline),
            max_queued=buffer_size,
        )
        self._waiter = fwmqtt.ConnectWaiter()
        self._lock = threading.Lock()
        self._status_mids: set[int] = set()
        self._deadletters = f"{self.topics.root}/deadletter/+/{machine_id}"
        self.rejections: dict[str, int] = {}  # dead-letter reason -> count
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_deadletter
        #: why another process took this machine over (None while this one holds it)
        self.fenced: str | None = None
        self._on_fenced = on_fenced
        Fence(self.client, self.topics.lease("sensor", machine_id), self._fence_lost)

    def _fence_lost(self, reason: str) -> None:
        """Paho's thread: a newer process holds the machine id. Leave at once (reconnecting
        would kick it off) and tell the owner."""
        self.fenced = reason
        log.error(
            "sensor_fenced",
            machine_id=self.machine_id,
            reason=reason[:200],
            remedy="run one sensor process per machine id",
        )
        self.client.disconnect()
        if self._on_fenced is not None:
            self._on_fenced(self.machine_id, reason)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._waiter.record(reason)
        if reason.is_failure:
            log.error("broker_refused", machine_id=self.machine_id, reason=str(reason))
            return
        online = ClientStatus(
            role="sensor", client_id=self.machine_id, state="online", ts=time.time()
        )
        # Called on paho's network thread, which also reads the PUBACK later: no race here.
        info = client.publish(self._status_topic, online.encode(), qos=fwmqtt.QOS, retain=True)
        with self._lock:
            self._status_mids.add(info.mid)
        # The detector's word on this machine's rejected readings (the ACL lets a machine read
        # only its own dead letters): nothing it refuses goes unnoticed by the sensor.
        client.subscribe(self._deadletters, qos=0)

    def _on_deadletter(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            letter = DeadLetter.model_validate_json(msg.payload)
        except ValidationError:
            return
        with self._lock:
            self.stats.rejected += 1
            self.rejections[letter.reason] = self.rejections.get(letter.reason, 0) + 1
        remedy = (
            " (a reused sequence number: restart the sensor with a new --seq-start)"
            if letter.reason == "duplicate_id"
            else ""
        )
        log.warning(
            "reading_rejected",
            machine_id=self.machine_id,
            reason=letter.reason,
            detail=letter.detail[:200] + remedy,
        )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            if mid in self._status_mids:  # a status, not a reading
                self._status_mids.discard(mid)
                return
            self.stats.count_puback(reason)

    def start(self) -> None:
        """Connect (bounded retries); afterwards paho reconnects by itself."""
        fwmqtt.connect(self.client, self.broker, self._waiter)

    def publish(self, reading: Telemetry) -> bool:
        """Queue one reading at QoS 1; False (counted, logged) when it cannot be queued."""
        if self.fenced is not None:
            return False  # the machine is another process's now
        try:
            payload = fwmqtt.check_size(reading.encode())
        except PayloadError as error:
            self.stats.oversize += 1
            log.error("reading_refused", machine_id=self.machine_id, reason=error.reason)
            return False
        topic = self.topics.telemetry(reading.line, reading.machine_id)
        info = self.client.publish(topic, payload, qos=fwmqtt.QOS)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.stats.buffer_full += 1
            log.warning("buffer_full", machine_id=self.machine_id, seq=reading.seq)
            return False
        self.stats.sent += 1
        return True

    def close(self, timeout_s: float = 30.0) -> PublishStats:
        """Wait until every sent reading is acknowledged (or the timeout), then disconnect."""
        if self.fenced is not None:  # no offline status: the machine is online, elsewhere
            self.client.loop_stop()
            with self._lock:
                return PublishStats(**vars(self.stats))
        wait_for_pubacks(self.stats, self._lock, timeout_s)
        with self._lock:  # before the offline status, whose PUBACK is not a reading's
            result = PublishStats(**vars(self.stats))
        offline = ClientStatus(
            role="sensor", client_id=self.machine_id, state="offline", ts=time.time()
        )
        info = self.client.publish(self._status_topic, offline.encode(), qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):
            log.warning("offline_status_not_sent", machine_id=self.machine_id)
        self.client.disconnect()
        self.client.loop_stop()
        return result


def run(
    broker: BrokerSettings,
    streams: Sequence[Callable[[float], Telemetry | None]],
    machine_ids: Sequence[str],
    *,
    rate_hz: float,
    count: int | None,
    buffer_size: int,
    stop: threading.Event,
) -> PublishStats:
    """Publish ``count`` readings per machine (forever when None) at ``rate_hz`` each.

    ``streams[i]`` is called with the event time and returns machine i's next reading
    (``None`` when it has no more).
    """
    fenced: list[tuple[str, str]] = []

    def on_fenced(machine_id: str, reason: str) -> None:
        fenced.append((machine_id, reason))
        stop.set()

    publishers = [
        SensorPublisher(broker, m, buffer_size=buffer_size, on_fenced=on_fenced)
        for m in machine_ids
    ]
    for pub in publishers:
        pub.start()
    log.info("sensors_started", machines=list(machine_ids), rate_hz=rate_hz, count=count)
    pacer = Pacer(rate_hz)
    produced = 0
    active = list(range(len(publishers)))
    try:
        while active and not stop.is_set() and (count is None or produced < count):
            now = time.time()
            for i in list(active):
                reading = streams[i](now)
                if reading is None:
                    active.remove(i)
                    continue
                publishers[i].publish(reading)
            produced += 1
            pacer.wait(stop)
    finally:
        total = PublishStats()
        for pub in publishers:
            total.add(pub.close())
        log.info("sensors_stopped", **vars(total))
    if fenced:
        raise SensorFencedError(fenced_remedy(*fenced[0]))
    return total
