"""The history recorder: alert events, ALERT verdicts, feedback and readings into the store.

A durable MQTT subscriber (fixed client id, persistent session, QoS 1, manual ack): a
message is acknowledged to the broker only after the database committed it, so a recorder
restart loses nothing and a redelivery is stored once (the store's inserts are idempotent).
Runs as the ``monitor`` account by default, the one the ACL lets read the command topics.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog
from pydantic import ValidationError

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import (
    MAX_BATCH_BYTES,
    AlertEvent,
    FeedbackCommand,
    Telemetry,
    TelemetryBatch,
    Verdict,
)
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.history_store import HistorySettings, HistoryStore
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

log = structlog.get_logger("factorywatch.recorder")

FLUSH_EVERY_S: Final = 0.5
PRUNE_EVERY_S: Final = 3600.0
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


def decode(
    topics: Topics, topic: str, payload: bytes
) -> AlertEvent | Verdict | FeedbackCommand | list[Telemetry] | None:
    """One message of the subscribed trees as a contract, ``None`` if not one we keep.

    Raises ``PayloadError`` / ``ValidationError`` for what is malformed.
    """
    if len(payload) > MAX_BATCH_BYTES:
        raise PayloadError("oversize", f"{len(payload)} bytes")
    if topic.startswith(f"{topics.root}/alerts/"):
        line, machine, leaf = topics.parse_alert(topic)
        msg: AlertEvent | Verdict
        if leaf == "event":
            msg = AlertEvent.model_validate_json(payload)
        elif leaf == "verdict":
            msg = Verdict.model_validate_json(payload)
            if msg.status != "ALERT":
                return None
        else:
            return None
        if (msg.line, msg.machine_id) != (line, machine):
            raise PayloadError("topic_mismatch", topic)
        return msg
    if topic.startswith(f"{topics.root}/commands/"):
        line, machine = topics.parse_feedback(topic)
        cmd = FeedbackCommand.model_validate_json(payload)
        if cmd.machine_id != machine:
            raise PayloadError("topic_mismatch", topic)
        return cmd
    if topic.startswith(f"{topics.root}/batch/"):
        line, _gateway = topics.parse_batch(topic)
        batch = TelemetryBatch.model_validate_json(payload)
        return [r for r in batch.readings if r.line == line]
    line, machine = topics.parse_telemetry(topic)
    reading = Telemetry.model_validate_json(payload)
    if (reading.line, reading.machine_id) != (line, machine):
        raise PayloadError("topic_mismatch", topic)
    return [reading]


class Recorder:
    """Subscribes to the alerts tree (and feedback, readings) and writes the history store."""

    def __init__(
        self,
        broker: BrokerSettings,
        store: HistoryStore,
        history: HistorySettings,
        *,
        client_id: str = "factorywatch-recorder",
    ) -> None:
        self.broker, self.store, self.history = broker, store, history
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
        ack = (msg.mid, msg.qos)
        try:
            decoded = decode(self.topics, msg.topic, bytes(msg.payload))
        except (PayloadError, ValidationError, ValueError) as exc:
            self.rejected += 1
            log.warning("history_message_rejected", topic=msg.topic, error=str(exc)[:200])
            decoded = None
        with self._lock:
            p = self._pending
            if isinstance(decoded, AlertEvent):
                p.events.append(decoded)
            elif isinstance(decoded, Verdict):
                p.verdicts.append(decoded)
            elif isinstance(decoded, FeedbackCommand):
                p.feedback.append((self.topics.parse_feedback(msg.topic)[0], decoded))
            elif isinstance(decoded, list):
                p.readings.extend(decoded)
            p.acks.append(ack)

    def flush(self) -> int:
        """Commit what is pending in one go, then acknowledge it to the broker."""
        with self._lock:
            batch, self._pending = self._pending, Pending()
        if not batch:
            return 0
        self.store.add_events(batch.events)
        self.store.add_verdicts(batch.verdicts)
        self.store.add_readings(batch.readings)
        for line in {line for line, _ in batch.feedback}:
            self.store.add_feedback(line, [c for ln, c in batch.feedback if ln == line])
        for mid, qos in batch.acks:
            if qos > 0:
                self._client.ack(mid, qos)
        stored = len(batch.events) + len(batch.verdicts) + len(batch.readings)
        stored += len(batch.feedback)
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

    def prune(self) -> int:
        """Apply the retention now."""
        gone = self.store.prune(
            time.time(),
            retention_days=self.history.retention_days,
            readings_retention_days=self.history.readings_retention_days,
        )
        log.info("history_pruned", rows=gone)
        return gone

    def run(self, stop: threading.Event) -> None:
        """Record until ``stop``; raises ``BrokerError`` if the subscription is refused."""
        fwmqtt.connect(
            self._client, self.broker, self._waiter, persistent_session_s=SESSION_EXPIRY_S
        )
        try:
            if not self._subscribed.wait(10) or self._refused:
                raise BrokerError(f"history subscription refused ({self._refused or 'no SUBACK'})")
            next_prune = time.monotonic()
            while not stop.wait(FLUSH_EVERY_S):
                self.flush()
                if time.monotonic() >= next_prune:
                    self.prune()
                    next_prune = time.monotonic() + PRUNE_EVERY_S
            self.flush()
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            log.info("history_recorder_stopped", stored=self.stored, rejected=self.rejected)
