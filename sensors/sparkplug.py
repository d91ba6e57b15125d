"""A simulated Sparkplug B edge node (``factorywatch sensor --sparkplug``) for the demo.

One edge node (``spBv1.0/<group>/.../<edge node>``) whose devices are simulated machines.
It publishes what a real one does: ``NBIRTH`` (``bdSeq``, ``Node Control/Rebirth``), one
``DBIRTH`` per device declaring every metric with its name, type and alias, then ``DDATA``
by alias carrying only the metrics that changed (report by exception), a sequence number
that wraps at 255, ``NDEATH`` as its last will (and before a clean disconnect), and a new
set of births when a host application asks with ``NCMD`` ``Node Control/Rebirth``.

The metrics are named as the AI4I dataset's columns (``Air temperature [K]``, ...,
``Product Type``), so the detector maps them to the default model's channels. Data goes out
at QoS 1 (the specification allows 0): with the detector's persistent session nothing is
lost across a detector restart. The pure part (``EdgeNode``, on
``factorywatch.sparkplug_codec``'s payloads) builds the messages; ``run`` is the MQTT shell.

End-to-end acknowledgement, as the JSON sensor's (``sensors/publisher.py``): a broker's PUBACK
is not the end of a reading's way (a broker killed before its next save loses what it
acknowledged since). Every ``DBIRTH`` and ``DDATA`` is one reading of its device and carries
the reading's own sequence number (``factorywatch/Reading Seq``); the edge node keeps each
reading (:mod:`factorywatch.sensors.pending`, one set per device) until the detector's
answer about it — its verdict or its dead letter, read on the device's own topics — is
heard. After a reconnect it sends its births (fresh readings), then every acknowledged,
unanswered reading again (and, once, those answered in the last ``resend_answered_s`` before
the connection was lost) as a ``DDATA`` of the new session: the same metrics with the next
Sparkplug ``seq``. While connected, one acknowledged more than ``republish_after_s`` ago and
unanswered while a later one was answered goes again. The detector knows a reading by its own
sequence number, not the session's: it answers a repeated one with the verdict it gave.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog
from esio_spb_builder.core import sparkplug_b_pb2  # Eclipse Tahu's schema, generated
from pydantic import ValidationError

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AI4I_CHANNELS, DeadLetter, Telemetry
from factorywatch.sensors.pending import DEFAULT_CAPACITY, PendingReadings, Released, Unanswered
from factorywatch.sensors.publisher import (
    DEFAULT_REPUBLISH_AFTER_S,
    DEFAULT_RESEND_ANSWERED_S,
    Pacer,
    PublishStats,
    wait_for_pubacks,
)
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.sparkplug_codec import (
    INT64,
    READING_SEQ_METRIC,
    Message,
    SparkplugNode,
    add_metric,
    datatype_of,
    is_rebirth_request,
)
from factorywatch.topics import (
    Topics,
    parse_sparkplug,
    sparkplug_line,
    sparkplug_machine_id,
    sparkplug_topic,
)

log = structlog.get_logger("sensors")

#: Metric names of the AI4I channels: the dataset's own column names.
METRIC_NAMES: Final = {
    "air_temperature_k": "Air temperature [K]",
    "process_temperature_k": "Process temperature [K]",
    "rotational_speed_rpm": "Rotational speed [rpm]",
    "torque_nm": "Torque [Nm]",
    "tool_wear_min": "Tool wear [min]",
}
PRODUCT_TYPE_METRIC: Final = "Product Type"
_PRODUCT_ALIAS: Final = len(AI4I_CHANNELS) + 1
_READING_SEQ_ALIAS: Final = _PRODUCT_ALIAS + 1
#: seconds between two looks for overdue readings
_OVERDUE_EVERY_S: Final = 1.0


class EdgeNode(SparkplugNode):
    """The messages of one edge node (pure: no I/O; times are given)."""

    def __init__(self, group: str, node: str, devices: Sequence[str], bd_seq: int) -> None:
        super().__init__(group, node, bd_seq)
        self.devices = list(devices)
        self._last: dict[str, dict[str, float | str]] = {}

    @staticmethod
    def _add(payload: Any, name: str | None, alias: int, value: float | str, ts_ms: int) -> None:
        # births name each metric with its data type; data (by alias) leaves the type out
        add_metric(
            payload,
            value,
            ts_ms,
            datatype=datatype_of(value),
            name=name,
            alias=alias,
            typed=name is not None,
        )

    def births(self, readings: dict[str, Telemetry], ts_ms: int) -> list[Message]:
        """``NBIRTH`` then one ``DBIRTH`` per device with all its metrics (seq from 0)."""
        out = [self.nbirth(ts_ms)]
        for device in self.devices:
            reading = readings[device]
            payload = self.payload(ts_ms)
            for alias, channel in enumerate(AI4I_CHANNELS, start=1):
                self._add(payload, METRIC_NAMES[channel], alias, reading.readings[channel], ts_ms)
            product = reading.attributes["product_type"]
            self._add(payload, PRODUCT_TYPE_METRIC, _PRODUCT_ALIAS, product, ts_ms)
            _add_reading_seq(payload, reading.seq, ts_ms, birth=True)
            self._last[device] = {**reading.readings, PRODUCT_TYPE_METRIC: product}
            out.append(self.device_message("DBIRTH", device, payload))
        return out

    def data(self, device: str, reading: Telemetry, ts_ms: int) -> Message | None:
        """``DDATA`` by alias with the metrics that changed since the last; None if none did."""
        last = self._last.setdefault(device, {})
        changed: list[tuple[int, float | str]] = [
            (alias, reading.readings[channel])
            for alias, channel in enumerate(AI4I_CHANNELS, start=1)
            if last.get(channel) != reading.readings[channel]
        ]
        product = reading.attributes["product_type"]
        if last.get(PRODUCT_TYPE_METRIC) != product:
            changed.append((_PRODUCT_ALIAS, product))
        if not changed:
            return None
        payload = self.payload(ts_ms)
        for alias, value in changed:
            self._add(payload, None, alias, value, ts_ms)
        _add_reading_seq(payload, reading.seq, ts_ms, birth=False)
        last.update(reading.readings)
        last[PRODUCT_TYPE_METRIC] = product
        return self.device_message("DDATA", device, payload)

    def again(self, message: Message) -> Message:
        """A reading's ``DBIRTH`` or ``DDATA`` (of any session) as a ``DDATA`` of this one: the
        same metrics by alias (their values and timestamps), the next ``seq``. The detector
        knows it by its reading seq and what its metrics say: the same reading."""
        topic = parse_sparkplug(message[0])
        if topic.device is None or topic.kind not in ("DBIRTH", "DDATA"):
            raise ValueError(f"not a device's reading: {message[0]!r}")
        payload = sparkplug_b_pb2.Payload.FromString(message[1])
        for metric in payload.metrics:  # a birth names and types them; data goes by alias
            metric.ClearField("name")
            metric.ClearField("datatype")
        payload.seq = self.seq
        self.seq = (self.seq + 1) % 256
        return self.device_message("DDATA", topic.device, payload)


def _add_reading_seq(payload: Any, seq: int, ts_ms: int, *, birth: bool) -> None:
    """The reading's own sequence number (declared Int64 in the birth, by alias in data)."""
    add_metric(
        payload,
        seq,
        ts_ms,
        datatype=INT64,
        name=READING_SEQ_METRIC if birth else None,
        alias=_READING_SEQ_ALIAS,
        typed=birth,
    )


def answers_letter(sent: bytes, letter: DeadLetter) -> bool:
    """Whether a dead letter is the detector's answer to a message sent as ``sent`` (its size
    and excerpt: a protobuf names its reading nowhere else)."""
    return letter.payload_bytes == len(sent) and letter.payload_excerpt == sent[:200].decode(
        "utf-8", errors="replace"
    )


@dataclass(frozen=True, slots=True)
class _Device:
    """One device as the shell sees it: its Sparkplug id, machine id and answer topics."""

    device: str
    machine: str
    verdict_topic: str
    deadletter_topic: str


class EdgeNodeClient:
    """The MQTT shell of one edge node: its will, births on (re)connect and on request, and
    its readings kept until the detector answers them (see the module docstring).

    ``pending_size`` bounds the readings kept per device; ``republish_after_s`` and
    ``resend_answered_s`` are the JSON sensor's (``SensorPublisher``).
    """

    def __init__(
        self,
        broker: BrokerSettings,
        edge: EdgeNode,
        *,
        pending_size: int = DEFAULT_CAPACITY,
        republish_after_s: float = DEFAULT_REPUBLISH_AFTER_S,
        resend_answered_s: float = DEFAULT_RESEND_ANSWERED_S,
    ) -> None:
        if broker.authenticates:  # an edge node logs in as itself: the ACL scopes it
            broker = broker.with_overrides(username=edge.node)
        self.broker = broker
        self.edge = edge
        self.stats = PublishStats()
        self.rebirth = threading.Event()
        self._lock = threading.Lock()
        self._waiter = fwmqtt.ConnectWaiter()
        self._ncmd = sparkplug_topic(edge.group, "NCMD", edge.node)
        topics, line = Topics(broker.topic_root), sparkplug_line(edge.group)
        self.devices: dict[str, _Device] = {}
        for device in edge.devices:
            machine = sparkplug_machine_id(edge.node, device)
            self.devices[device] = _Device(
                device, machine, topics.verdict(line, machine), topics.deadletter(line, machine)
            )
        self._by_topic = {
            t: d for d in self.devices.values() for t in (d.verdict_topic, d.deadletter_topic)
        }
        #: per device: its readings sent and not answered yet
        self.pending = {d: PendingReadings(pending_size) for d in self.devices}
        self.republish_after_s = republish_after_s
        self.resend_answered_s = resend_answered_s
        self._reading_of_mid: dict[int, tuple[str, int] | None] = {}  # None: not a reading
        self._resend_mids: set[int] = set()  # ... of which sends again (not in ``stats.sent``)
        self._early: dict[int, bool] = {}  # PUBACKs that beat their packet id's registration
        self._connects = 0
        #: per device, what a reconnect owes to send again after the births
        self._owed: list[tuple[str, list[Unanswered], Released]] = []
        self._lost_at: float | None = None  # monotonic time the connection was last lost
        self._next_overdue_check = 0.0
        self.rejections: dict[str, int] = {}  # dead-letter reason -> count
        self.client = fwmqtt.new_client(broker, f"spb-{edge.group}-{edge.node}")
        self.client.will_set(*edge.ndeath(), qos=1, retain=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            # QoS 0 for the answers: a missed one costs one more send of its reading
            answers = [(t, 0) for t in self._by_topic]
            client.subscribe([(self._ncmd, 1), *answers])
            with self._lock:
                self._connects += 1
                if self._connects > 1:
                    self._owe_again()
            self.rebirth.set()  # every (re)connection starts with births (before any data)
        self._waiter.record(reason)

    def _owe_again(self) -> None:
        """Under the lock, at a reconnect: what to send again once the births are out (the
        broker may be a new one that lost what the old one acknowledged): every acknowledged,
        unanswered reading, and those answered just before the connection was lost (their
        verdicts may not have reached other consumers). Readings without a PUBACK are paho's."""
        lost_at = self._lost_at if self._lost_at is not None else time.monotonic()
        since = lost_at - self.resend_answered_s if self.resend_answered_s > 0 else None
        for device, pending in self.pending.items():
            again, released = pending.after_reconnect(time.monotonic(), answered_since=since)
            self._owed.append((device, again, released))

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        with self._lock:
            self._lost_at = time.monotonic()
        # Each connection is a new session with the next bdSeq (its will, then its NBIRTH
        # carry it): the old session's will, delivered late, cannot end the new one.
        self.edge.bd_seq = (self.edge.bd_seq + 1) % 256
        client.will_set(*self.edge.ndeath(), qos=1, retain=False)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._ncmd:
            if is_rebirth_request(bytes(msg.payload)):
                log.info("rebirth_requested", group=self.edge.group, edge_node=self.edge.node)
                self.rebirth.set()
            return
        device = self._by_topic.get(msg.topic)
        if device is None:
            return
        if msg.topic == device.verdict_topic:
            try:
                seq = int(json.loads(msg.payload)["seq"])
            except (ValueError, KeyError, TypeError):
                return
            with self._lock:
                if self.pending[device.device].answered(seq, time.monotonic()):
                    self.stats.answered += 1
            return
        self._on_deadletter(device, bytes(msg.payload))

    def _on_deadletter(self, device: _Device, raw: bytes) -> None:
        try:
            letter = DeadLetter.model_validate_json(raw)
        except ValidationError:
            return
        with self._lock:
            self.stats.rejected += 1
            self.rejections[letter.reason] = self.rejections.get(letter.reason, 0) + 1
            pending = self.pending[device.device]
            for seq in pending.seqs():
                entry = pending.get(seq)
                if entry is not None and answers_letter(entry.payload, letter):
                    self.stats.answered += pending.answered(seq, time.monotonic())
                    break
        log.warning(
            "reading_rejected",
            machine_id=device.machine,
            reason=letter.reason,
            detail=letter.detail[:200],
        )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        ok = not fwmqtt.reason_failed(reason)
        with self._lock:
            if mid not in self._reading_of_mid:
                self._early[mid] = ok  # its publish() has not registered the packet id yet
                return
            self._puback(mid, self._reading_of_mid.pop(mid), ok=ok)

    def _register(self, mid: int, reading: tuple[str, int] | None) -> None:
        """Under the lock: tie a packet id to its reading (None: not a reading); apply a
        PUBACK that came first. Only the run loop publishes, one message at a time."""
        early = self._early.pop(mid, None)
        if early is None:
            self._reading_of_mid[mid] = reading
        else:
            self._puback(mid, reading, ok=early)

    def _puback(self, mid: int, reading: tuple[str, int] | None, *, ok: bool) -> None:
        """Under the lock: count a PUBACK and move its reading on in the pending set."""
        if mid in self._resend_mids:  # not in ``sent``: its refusal is an unanswered reading let go
            self._resend_mids.discard(mid)
            self.stats.unanswered_dropped += not ok
        elif ok:
            self.stats.acknowledged += 1
        else:
            self.stats.refused += 1
        if reading is not None:
            device, seq = reading
            if ok:
                self.pending[device].acknowledged(seq)
            else:
                self.pending[device].discard(seq)  # refused (e.g. denied): no answer comes

    def start(self) -> None:
        """Connect (bounded retries); paho reconnects by itself afterwards."""
        fwmqtt.connect(self.client, self.broker, self._waiter)

    def send(self, message: Message | None, reading: tuple[str, int] | None = None) -> None:
        """Publish at QoS 1 (nothing for None: no metric changed); ``reading`` (device, its
        reading seq) is kept until the detector answers it."""
        if message is None:
            return
        with self._lock:  # pending before the publish: its answer may come at once
            self.stats.sent += 1
            dropped = [] if reading is None else self._keep(reading, message)
        if dropped:
            log.warning("pending_full", edge_node=self.edge.node, dropped_seq=dropped[0])
        info = self.client.publish(message[0], message[1], qos=1)
        with self._lock:
            self._register(info.mid, reading)

    def _keep(self, reading: tuple[str, int], message: Message) -> list[int]:
        device, seq = reading
        dropped = self.pending[device].sent(seq, message[0], message[1], time.monotonic())
        self.stats.unanswered_dropped += len(dropped)
        return dropped

    def births(self, readings: dict[str, Telemetry], ts_ms: int) -> None:
        """Send the births (each ``DBIRTH`` one reading), then, after a reconnect, every
        acknowledged reading still unanswered (and those answered just before the loss)."""
        for message in self.edge.births(readings, ts_ms):
            device = parse_sparkplug(message[0]).device
            self.send(message, None if device is None else (device, readings[device].seq))
        with self._lock:
            owed, self._owed = self._owed, []
        for device, again, released in owed:
            self._send_again(device, again, released, "reconnect")

    def data(self, device: str, reading: Telemetry, ts_ms: int) -> None:
        """One reading of ``device`` (by exception: nothing when no metric changed)."""
        self.send(self.edge.data(device, reading, ts_ms), (device, reading.seq))

    def resend_overdue(self, now: float) -> None:
        """Send again readings unanswered for ``republish_after_s`` while a later one of their
        device was answered (looked at once a second)."""
        if self.republish_after_s <= 0 or now < self._next_overdue_check:
            return
        self._next_overdue_check = now + _OVERDUE_EVERY_S
        for device, pending in self.pending.items():
            with self._lock:
                again, released = pending.overdue(now, self.republish_after_s)
            if again or released.given_up:
                self._send_again(device, again, released, "overdue")

    def _send_again(
        self, device: str, again: list[Unanswered], released: Released, why: str
    ) -> None:
        """Publish ``again`` as ``DDATA`` of this session (not under our lock: paho calls
        ``on_publish`` under its own, which then takes ours)."""
        for entry in again:
            message = self.edge.again((entry.topic, entry.payload))
            with self._lock:
                entry.topic, entry.payload = message  # a dead letter names this send's bytes
            info = self.client.publish(message[0], message[1], qos=1)
            with self._lock:
                self._resend_mids.add(info.mid)
                self._register(info.mid, (device, entry.seq))
        with self._lock:
            self.stats.resent += len(again)
            self.stats.unanswered_dropped += len(released.given_up)
        if again:
            log.info("readings_sent_again", device=device, count=len(again), why=why)
        if released.given_up:
            log.warning(
                "readings_unanswered",
                device=device,
                count=len(released.given_up),
                first_seq=released.given_up[0],
            )

    def close(self, timeout_s: float = 30.0) -> PublishStats:
        """Say NDEATH (a clean disconnect sends no will), await the PUBACKs, disconnect."""
        self.send(self.edge.ndeath())
        wait_for_pubacks(self.stats, self._lock, timeout_s, lambda: not self._resend_mids)
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            self.stats.unanswered_at_close = sum(len(p) for p in self.pending.values())
            return PublishStats(**vars(self.stats))


def run(
    broker: BrokerSettings,
    group: str,
    node: str,
    sims: Sequence[MachineSimulator],
    *,
    rate_hz: float,
    count: int | None,
    stop: threading.Event,
    pending_size: int = DEFAULT_CAPACITY,
    republish_after_s: float = DEFAULT_REPUBLISH_AFTER_S,
    resend_answered_s: float = DEFAULT_RESEND_ANSWERED_S,
) -> PublishStats:
    """Publish births, then ``count`` data messages per device (forever when None).

    Births come first and whenever a (re)connection or an ``NCMD`` asks for them; each
    ``DBIRTH`` is a reading of its own (a fresh one from the simulator), not counted.
    """
    shell = EdgeNodeClient(
        broker,
        EdgeNode(group, node, [sim.machine_id for sim in sims], bd_seq=int(time.time())),
        pending_size=pending_size,
        republish_after_s=republish_after_s,
        resend_answered_s=resend_answered_s,
    )
    return publish(shell, sims, rate_hz=rate_hz, count=count, stop=stop)


def publish(
    shell: EdgeNodeClient,
    sims: Sequence[MachineSimulator],
    *,
    rate_hz: float,
    count: int | None,
    stop: threading.Event,
) -> PublishStats:
    """``run``'s loop on a given (not yet started) shell; closes it at the end."""
    shell.start()
    edge = shell.edge
    log.info("edge_node_started", group=edge.group, edge_node=edge.node, devices=edge.devices)
    produced, pacer = 0, Pacer(rate_hz)
    stats = PublishStats()
    try:
        while not stop.is_set() and (count is None or produced < count):
            now = time.time()
            if shell.rebirth.is_set():
                shell.rebirth.clear()
                shell.births({sim.machine_id: sim.next(now) for sim in sims}, int(now * 1000))
            for sim in sims:
                shell.data(sim.machine_id, sim.next(now), int(now * 1000))
            shell.resend_overdue(time.monotonic())
            produced += 1
            pacer.wait(stop)
    finally:
        stats = shell.close()
        log.info("edge_node_stopped", **vars(stats))
    return stats
