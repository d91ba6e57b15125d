"""The history recorder: alert events, ALERT verdicts, feedback and readings into the store.

A durable MQTT subscriber (fixed client id, persistent session, QoS 1, manual ack): a
message is acknowledged to the broker only after the database committed it, so a recorder
restart loses nothing and a redelivery is stored once (the store's inserts are idempotent).
Runs as the ``monitor`` account by default, the one the ACL lets read the command topics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog

from factorywatch import contracts
from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import (
    DEFAULT_MAX_PAST_SKEW_S,
    AlertEvent,
    FeedbackCommand,
    Telemetry,
    Verdict,
)
from factorywatch.detector.registry import Registry
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.history_store import HistoryError, HistorySettings, HistoryStore
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

log = structlog.get_logger("factorywatch.recorder")

FLUSH_EVERY_S: Final = 0.5
PRUNE_EVERY_S: Final = 3600.0
RETRY_MIN_S: Final = 1.0
RETRY_MAX_S: Final = 30.0
SESSION_EXPIRY_S: Final = 7 * 24 * 3600


@dataclass
class Pending:
    """Decoded messages waiting for one database transaction, with their MQTT ids to ack."""

    events: list[AlertEvent] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    readings: list[Telemetry] = field(default_factory=list)
    feedback: list[tuple[str, FeedbackCommand]] = field(default_factory=list)
    acks: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.acks)

    def extend(self, later: Pending) -> None:
        """Append ``later``'s messages after this one's."""
        self.events += later.events
        self.verdicts += later.verdicts
        self.readings += later.readings
        self.feedback += later.feedback
        self.acks += later.acks


def _describe(row: Any) -> str:
    """Which row it was, for the log (machine and seq or alert id)."""
    if isinstance(row, (Telemetry, Verdict, AlertEvent)):
        return f"{row.machine_id}:{row.seq}"
    if isinstance(row, FeedbackCommand):
        return f"{row.machine_id}:{row.alert_id}"
    return type(row).__name__


def decode(
    topics: Topics, topic: str, payload: bytes, now: float, registry: Registry | None = None
) -> AlertEvent | Verdict | FeedbackCommand | list[Telemetry | PayloadError] | None:
    """One message of the subscribed trees as a contract, ``None`` if not one we keep.

    Every bound of the wire contracts is checked (``contracts.decode``) against ``now``, the
    recorder's clock at receipt, and readings pass the detector's identity rule: with a
    ``registry``, a reading is kept only if its sender (the topic's last level) may speak
    for its machine, so a gateway's forged reading for another machine (which the detector
    dead-letters) is not stored and cannot take the real reading's place. A batch gives each
    reading, or why it was refused. Raises ``PayloadError`` for a message unusable whole.
    """
    if topic.startswith(f"{topics.root}/alerts/"):
        line, machine, leaf = topics.parse_alert(topic)
        msg: AlertEvent | Verdict
        if leaf == "event":
            msg = contracts.decode(AlertEvent, payload, now=now)
        elif leaf == "verdict":
            msg = contracts.decode(Verdict, payload, now=now)
            if msg.status != "ALERT":
                return None
        else:
            return None
        if (msg.line, msg.machine_id) != (line, machine):
            raise PayloadError("topic_mismatch", topic)
        return msg
    if topic.startswith(f"{topics.root}/commands/"):
        line, machine = topics.parse_feedback(topic)
        cmd = contracts.decode(FeedbackCommand, payload, now=now)
        if cmd.machine_id != machine:
            raise PayloadError("topic_mismatch", topic)
        return cmd
    if topic.startswith(f"{topics.root}/batch/"):
        line, gateway = topics.parse_batch(topic)
        items = contracts.decode_batch(payload, now=now)
        return [_admitted(r, line, gateway, registry) for r in items]
    line, machine = topics.parse_telemetry(topic)
    reading = contracts.decode(Telemetry, payload, now=now, max_past_s=DEFAULT_MAX_PAST_SKEW_S)
    if (reading.line, reading.machine_id) != (line, machine):
        raise PayloadError("topic_mismatch", topic)
    return [_admitted(reading, line, machine, registry)]


def _admitted(
    item: Telemetry | PayloadError, line: str, sender: str, registry: Registry | None
) -> Telemetry | PayloadError:
    """The reading if ``sender`` may publish it on ``line`` (the detector's rule), else why not."""
    if isinstance(item, PayloadError):
        return item
    if item.line != line:
        return PayloadError("topic_mismatch", f"{item.machine_id} is on {item.line}, not {line}")
    refused = registry.check(sender, item.machine_id, line) if registry is not None else None
    if refused is not None:
        return PayloadError(refused, f"{sender!r} may not send for {line}/{item.machine_id}")
    return item


class Recorder:
    """Subscribes to the alerts tree (and feedback, readings) and writes the history store."""

    def __init__(
        self,
        broker: BrokerSettings,
        store: HistoryStore,
        history: HistorySettings,
        *,
        client_id: str = "factorywatch-recorder",
        registry: Registry | None = None,
    ) -> None:
        self.broker, self.store, self.history = broker, store, history
        #: who may speak for which machine (the detector's registry); None: an open broker
        self.registry = registry
        self.topics = Topics(broker.topic_root)
        self.client_id = client_id
        self.stored = 0
        self.rejected = 0
        self._pending = Pending()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._waiter = fwmqtt.ConnectWaiter()
        self._client = fwmqtt.new_client(broker, client_id, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    @property
    def filters(self) -> list[str]:
        """What the recorder subscribes to."""
        root = self.topics.root
        wanted = [
            f"{root}/alerts/+/+/event",
            f"{root}/alerts/+/+/verdict",
            self.topics.feedback_filter,
        ]
        if self.history.record_readings:
            wanted += [self.topics.telemetry_filter, self.topics.batch_filter]
        return wanted

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._waiter.record(rc)
        if not rc.is_failure:
            client.subscribe([(f, fwmqtt.QOS) for f in self.filters])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        failed = [str(c) for c in codes if fwmqtt.reason_failed(c)]
        self._refused = ", ".join(failed) or None
        self._subscribed.set()
        log.info("history_subscribed", filters=self.filters, refused=self._refused)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.receive(msg.topic, bytes(msg.payload), (msg.mid, msg.qos), time.time())

    def receive(self, topic: str, payload: bytes, ack: tuple[int, int], now: float) -> None:
        """Decode one message into the pending transaction (refused ones are logged, and
        acknowledged with it: a message that can never be stored must not come back)."""
        try:
            decoded = decode(self.topics, topic, payload, now, self.registry)
        except Exception as exc:  # the poison-message rule: whatever it is, refuse and go on
            self._refuse(topic, exc)
            decoded = None
        with self._lock:
            p = self._pending
            if isinstance(decoded, AlertEvent):
                p.events.append(decoded)
            elif isinstance(decoded, Verdict):
                p.verdicts.append(decoded)
            elif isinstance(decoded, FeedbackCommand):
                p.feedback.append((self.topics.parse_feedback(topic)[0], decoded))
            elif isinstance(decoded, list):
                for item in decoded:
                    if isinstance(item, PayloadError):
                        self._refuse(topic, item)
                    else:
                        p.readings.append(item)
            p.acks.append(ack)

    def _refuse(self, topic: str, error: Exception) -> None:
        self.rejected += 1
        reason = error.reason if isinstance(error, PayloadError) else "processing_failed"
        log.warning("history_message_rejected", topic=topic, reason=reason, error=str(error)[:200])

    def flush(self) -> int:
        """Commit what is pending, then acknowledge it to the broker.

        A row the database refuses (any error but a lost connection) is logged and skipped,
        the rest of its batch stored. A lost or read-only database raises ``HistoryError``
        with nothing acknowledged: the pending messages wait for the next flush.
        """
        with self._lock:
            batch, self._pending = self._pending, Pending()
        if not batch:
            return 0
        try:
            stored = self._store(batch)
        except HistoryError:
            with self._lock:
                later, self._pending = self._pending, batch
                self._pending.extend(later)
            raise
        for mid, qos in batch.acks:
            if qos > 0:
                self._client.ack(mid, qos)
        self.stored += stored
        if batch.events or batch.feedback:
            log.info(
                "history_stored",
                events=len(batch.events),
                feedback=len(batch.feedback),
                verdicts=len(batch.verdicts),
                readings=len(batch.readings),
            )
        return stored

    def _store(self, batch: Pending) -> int:
        """Write each kind in one go; a kind the database refuses is written row by row."""
        stored = 0
        feedback_lines = sorted({line for line, _ in batch.feedback})
        writes: list[tuple[str, Callable[[Sequence[Any]], None], Sequence[Any]]] = [
            ("event", self.store.add_events, batch.events),
            ("verdict", self.store.add_verdicts, batch.verdicts),
            ("reading", self.store.add_readings, batch.readings),
        ]
        for line in feedback_lines:
            commands = [c for ln, c in batch.feedback if ln == line]
            writes.append(("feedback", partial(self.store.add_feedback, line), commands))
        for kind, write, rows in writes:
            if not rows:
                continue
            try:
                write(rows)
                stored += len(rows)
                continue
            except HistoryError:
                raise
            except Exception as exc:  # any refusal of the data: find the bad row
                log.warning(
                    "history_batch_refused", kind=kind, rows=len(rows), error=str(exc)[:200]
                )
            for row in rows:
                try:
                    write([row])
                    stored += 1
                except HistoryError:
                    raise
                except Exception as exc:  # the poison-message rule: log it, go on
                    self.rejected += 1
                    log.error(
                        "history_row_refused", kind=kind, row=_describe(row), error=str(exc)[:200]
                    )
        return stored

    def prune(self) -> int:
        """Apply the retention now (a lost database: ``HistoryError``)."""
        gone = self.store.prune(
            time.time(),
            retention_days=self.history.retention_days,
            readings_retention_days=self.history.readings_retention_days,
        )
        log.info("history_pruned", rows=gone)
        return gone

    def run(self, stop: threading.Event) -> None:
        """Record until ``stop``.

        Raises ``HistoryError`` if the database cannot be written at start, ``BrokerError``
        if the subscription is refused. A database lost later is retried with a backoff
        (``RETRY_MIN_S`` doubling to ``RETRY_MAX_S``); meanwhile nothing is acknowledged, so
        the broker keeps the readings until they are stored.
        """
        self.store.check_writable()
        fwmqtt.connect(
            self._client, self.broker, self._waiter, persistent_session_s=SESSION_EXPIRY_S
        )
        try:
            if not self._subscribed.wait(10) or self._refused:
                raise BrokerError(f"history subscription refused ({self._refused or 'no SUBACK'})")
            next_prune = time.monotonic()
            wait = FLUSH_EVERY_S
            while not stop.wait(wait):
                wait = self._turn(wait)
                if wait == FLUSH_EVERY_S and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    try:
                        self.prune()
                    except HistoryError as exc:  # the next flush notices and backs off
                        log.error("history_prune_failed", error=str(exc)[:300])
            self._turn(wait)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            log.info("history_recorder_stopped", stored=self.stored, rejected=self.rejected)

    def _turn(self, wait: float) -> float:
        """One flush; the wait before the next (backing off while the database is lost)."""
        try:
            self.flush()
        except HistoryError as exc:
            wait = RETRY_MIN_S if wait == FLUSH_EVERY_S else min(wait * 2, RETRY_MAX_S)
            log.error("history_write_failed", error=str(exc)[:300], retry_in_s=wait)
            return wait
        if wait != FLUSH_EVERY_S:
            log.info("history_write_resumed")
        return FLUSH_EVERY_S
