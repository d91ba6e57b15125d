"""The sensors' MQTT shell: one MQTT client per machine publishing readings at QoS 1.

While the broker is unreachable paho keeps QoS 1 messages in a bounded in-memory buffer
(``buffer_size`` per machine) and sends them when the connection returns. A reading that
does not fit is dropped, counted (``buffer_full``) and logged: never silently.

End-to-end acknowledgement: a broker's PUBACK is not the end of a reading's way (a broker
killed before its next save loses what it acknowledged since). Each machine's publisher keeps
every reading until the detector's answer about it — its verdict or its dead letter, both
read on the machine's own topics — is heard (:mod:`factorywatch.sensors.pending`), and sends
the unanswered ones again after a reconnect (with those answered in the last
``resend_answered_s`` before the connection was lost, whose verdicts a killed broker may have
lost on the way to other consumers), and while connected when a later reading was answered
first. The detector answers a repeated reading with the verdict it already gave.

One machine id, one process: each machine's client is fenced (:mod:`factorywatch.fencing`).
When a second process starts publishing as the same machine, the broker hands it the
connection; the older process learns from the newer lease and stops with the remedy
(:class:`SensorFencedError`) instead of reconnecting and kicking the other off every second.
"""

from __future__ import annotations

import json
import re
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
from factorywatch.sensors.pending import DEFAULT_CAPACITY, PendingReadings, Released, Unanswered
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

log = structlog.get_logger("sensors")

#: a dead letter names the rejected reading only inside its payload excerpt
_EXCERPT_SEQ = re.compile(rb'"seq"\s*:\s*(\d{1,19})')
#: seconds between two looks for overdue readings
_OVERDUE_EVERY_S = 1.0
#: default: a reading acknowledged this long ago, unanswered while a later one was, goes again
DEFAULT_REPUBLISH_AFTER_S = 10.0
#: default: readings answered this long before a lost connection are sent again after the
#: reconnect (their verdicts may have been lost on the way to other consumers): a few of the
#: broker's 1 s autosave intervals
DEFAULT_RESEND_ANSWERED_S = 5.0


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
    #: readings whose verdict (or dead letter) was heard: answered end to end
    answered: int = 0
    #: sends again of unanswered readings (after a reconnect, or overdue); not in ``sent``
    resent: int = 0
    #: unanswered readings let go: the oldest when the pending set was full, and readings
    #: sent ``max_sends`` times without an answer
    unanswered_dropped: int = 0
    #: readings still without an answer when the publisher closed
    unanswered_at_close: int = 0

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


def wait_for_pubacks(
    stats: PublishStats,
    lock: threading.Lock,
    timeout_s: float,
    also: Callable[[], bool] = lambda: True,
) -> None:
    """Return once every message sent has its PUBACK (acknowledged or refused) and ``also()``
    holds, or after ``timeout_s``; ``lock`` guards both (paho's thread counts the PUBACKs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with lock:
            if stats.acknowledged + stats.refused >= stats.sent and also():
                return
        time.sleep(0.02)  # polling the PUBACK count, bounded by the deadline


class SensorPublisher:
    """Publishes one machine's readings; ``close()`` waits for the broker's PUBACKs.

    ``pending_size`` bounds the readings kept until their answer; ``republish_after_s`` is
    how long an acknowledged reading may stay unanswered, while a later one was answered,
    before it is sent again (0: only after a reconnect); readings answered less than
    ``resend_answered_s`` before a lost connection are sent again, once, after the reconnect.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        machine_id: str,
        *,
        buffer_size: int,
        on_fenced: Callable[[str, str], None] | None = None,
        pending_size: int = DEFAULT_CAPACITY,
        republish_after_s: float = DEFAULT_REPUBLISH_AFTER_S,
        resend_answered_s: float = DEFAULT_RESEND_ANSWERED_S,
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
        #: the detector's answers about this machine's readings (the ACL lets a machine read
        #: only its own verdicts and dead letters)
        self.answer_filters = self.topics.answers_filters(machine_id)
        self.pending = PendingReadings(pending_size)
        self.republish_after_s = republish_after_s
        self.resend_answered_s = resend_answered_s
        self._reading_of_mid: dict[int, int] = {}  # readings' packet ids awaiting their PUBACK
        self._resend_mids: set[int] = set()  # ... of which sends again (not in ``stats.sent``)
        self._early: dict[int, bool] = {}  # PUBACKs that beat their packet id's registration
        self._next_overdue_check = 0.0
        self._connects = 0
        self._lost_at: float | None = None  # monotonic time the connection was last lost
        self.rejections: dict[str, int] = {}  # dead-letter reason -> count
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_answer
        self.client.on_disconnect = self._on_disconnect
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
            self._connects += 1
            reconnect = self._connects > 1
        # QoS 0: a missed answer costs one more send of its reading, nothing else.
        client.subscribe([(f, 0) for f in self.answer_filters])
        if reconnect:
            # The broker may be a new one that lost what the old one acknowledged: send every
            # acknowledged, unanswered reading again (after the SUBSCRIBE, so its answer is
            # heard), and those answered just before the connection was lost (their verdicts
            # may not have reached other consumers). Readings without a PUBACK are paho's.
            with self._lock:
                lost_at = self._lost_at if self._lost_at is not None else time.monotonic()
                again, released = self.pending.after_reconnect(
                    time.monotonic(),
                    answered_since=(
                        lost_at - self.resend_answered_s if self.resend_answered_s > 0 else None
                    ),
                )
            self._send_again(again, released, "reconnect")

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        with self._lock:
            self._lost_at = time.monotonic()

    def _send_again(self, again: list[Unanswered], released: Released, why: str) -> None:
        """Publish ``again`` once more (not under our lock: paho calls ``on_publish`` under
        its own, which then takes ours)."""
        for entry in again:
            info = self.client.publish(entry.topic, entry.payload, qos=fwmqtt.QOS)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                continue  # stays pending, unacknowledged: the next reconnect will not see it
            with self._lock:
                self._resend_mids.add(info.mid)
                self._register(info.mid, entry.seq, resend=True)
        with self._lock:
            self.stats.resent += len(again)
            self.stats.unanswered_dropped += len(released.given_up)
        if again:
            log.info("readings_sent_again", machine_id=self.machine_id, count=len(again), why=why)
        if released.given_up:
            log.warning(
                "readings_unanswered",
                machine_id=self.machine_id,
                count=len(released.given_up),
                first_seq=released.given_up[0],
                sends=self.pending.max_sends,
            )

    def _register(self, mid: int, seq: int, *, resend: bool) -> None:
        """Tie a packet id to its reading (under the lock); apply a PUBACK that came first.

        Only the publishing thread's registrations can race their PUBACK, one at a time (a
        resend from ``on_connect`` runs on paho's thread, which reads the PUBACK later); at a
        reading's registration any other early PUBACK is of a message that is no reading (the
        fence's lease): forget those.
        """
        early = self._early.pop(mid, None)
        if not resend:
            self._early.clear()
        if early is None:
            self._reading_of_mid[mid] = seq
            return
        self._puback(mid, seq, ok=early, resend=resend)

    def _puback(self, mid: int, seq: int, *, ok: bool, resend: bool) -> None:
        """Under the lock: count a reading's PUBACK and move it on in the pending set."""
        if resend:  # not in ``sent``: its refusal is an unanswered reading let go
            self._resend_mids.discard(mid)
            self.stats.unanswered_dropped += not ok
        elif ok:
            self.stats.acknowledged += 1
        else:
            self.stats.refused += 1
        if ok:
            self.pending.acknowledged(seq)
        else:
            self.pending.discard(seq)  # refused (e.g. denied): no answer will ever come

    def _on_answer(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/verdict"):
            try:
                seq = int(json.loads(msg.payload)["seq"])
            except (ValueError, KeyError, TypeError):
                return
            with self._lock:
                if self.pending.answered(seq, time.monotonic()):
                    self.stats.answered += 1
            return
        self._on_deadletter(msg)

    def _on_deadletter(self, msg: mqtt.MQTTMessage) -> None:
        try:
            letter = DeadLetter.model_validate_json(msg.payload)
        except ValidationError:
            return
        found = _EXCERPT_SEQ.search(letter.payload_excerpt.encode())
        with self._lock:
            self.stats.rejected += 1
            self.rejections[letter.reason] = self.rejections.get(letter.reason, 0) + 1
            if found is not None and self.pending.answered(int(found[1]), time.monotonic()):
                self.stats.answered += 1
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
        ok = not fwmqtt.reason_failed(reason)
        with self._lock:
            if mid in self._status_mids:  # a status, not a reading
                self._status_mids.discard(mid)
                return
            seq = self._reading_of_mid.pop(mid, None)
            if seq is None:
                self._early[mid] = ok  # its publish() has not registered the packet id yet
                return
            self._puback(mid, seq, ok=ok, resend=mid in self._resend_mids)

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
        now = time.monotonic()
        with self._lock:  # pending before the publish: its answer may come at once
            dropped = self.pending.sent(reading.seq, topic, payload, now)
            self.stats.unanswered_dropped += len(dropped)
        if dropped:
            log.warning(
                "pending_full",
                machine_id=self.machine_id,
                dropped_seq=dropped[0],
                capacity=self.pending.capacity,
                dropped_so_far=self.pending.dropped,
            )
        info = self.client.publish(topic, payload, qos=fwmqtt.QOS)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            with self._lock:
                self.pending.discard(reading.seq)
            self.stats.buffer_full += 1
            log.warning("buffer_full", machine_id=self.machine_id, seq=reading.seq)
            return False
        with self._lock:
            self.stats.sent += 1
            self._register(info.mid, reading.seq, resend=False)
        if self.republish_after_s > 0 and now >= self._next_overdue_check:
            self._next_overdue_check = now + _OVERDUE_EVERY_S
            with self._lock:
                again, released = self.pending.overdue(now, self.republish_after_s)
            if again or released.given_up:
                self._send_again(again, released, "overdue")
        return True

    def close(self, timeout_s: float = 30.0) -> PublishStats:
        """Wait until every sent reading is acknowledged (or the timeout), then disconnect."""
        if self.fenced is not None:  # no offline status: the machine is online, elsewhere
            self.client.loop_stop()
            with self._lock:
                return PublishStats(**vars(self.stats))
        wait_for_pubacks(self.stats, self._lock, timeout_s, lambda: not self._resend_mids)
        with self._lock:  # before the offline status, whose PUBACK is not a reading's
            self.stats.unanswered_at_close = len(self.pending)
            result = PublishStats(**vars(self.stats))
        if result.unanswered_at_close:
            log.info(
                "readings_unanswered_at_close",
                machine_id=self.machine_id,
                count=result.unanswered_at_close,
            )
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
    pending_size: int = DEFAULT_CAPACITY,
    republish_after_s: float = DEFAULT_REPUBLISH_AFTER_S,
    resend_answered_s: float = DEFAULT_RESEND_ANSWERED_S,
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
        SensorPublisher(
            broker,
            m,
            buffer_size=buffer_size,
            on_fenced=on_fenced,
            pending_size=pending_size,
            republish_after_s=republish_after_s,
            resend_answered_s=resend_answered_s,
        )
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
