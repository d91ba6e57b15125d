"""Verdicts out as Sparkplug B: the detector is also an edge node whose devices are machines.

Optional (``FACTORYWATCH_DETECTOR_SPARKPLUG_OUT``); the JSON alerts tree stays as it is. The
detector's edge node ``spBv1.0/<group>/.../<node>`` (group ``factorywatch``, node the
detector's client id by default) has one device per machine (its machine id) with these
metrics, so a SCADA host picks them up as tags without configuration:

==================  ========  ==========================================================
metric              type      value
==================  ========  ==========================================================
``Line``            String    the machine's production line
``Status``          String    the last verdict: ``NORMAL`` / ``ALERT``
``Score``           Double    the last anomaly score (higher = more anomalous)
``Threshold``       Double    the alarm threshold of the model that scored it
``Alert State``     String    ``NORMAL`` / ``ALERT`` / ``OFFLINE`` (the retained state)
``Alert Active``    Boolean   an alert is open
``Acknowledged``    Boolean   the open alert was acknowledged by an operator
``Alerts Raised``   Int64     alerts raised since the detector started
``Model Version``   String    the model that scored the last reading
==================  ========  ==========================================================

``NBIRTH`` (with ``bdSeq`` and ``Node Control/Rebirth``) and a ``DBIRTH`` per machine come
first, ``DDATA`` by alias carries what changed, at most once per machine per loop turn (the
newest values). ``NDEATH`` is the will of its own MQTT connection (a second one: a connection
has one will, and the detector's is its status), and an ``NCMD`` rebirth request is answered
with new births. Births and data go out at QoS 0 as the specification says; they are
derived from verdicts already published at QoS 1, so they do not hold acknowledgements back.

``VerdictNode`` is pure (messages in, bytes out; the payloads every edge node shares are
``factorywatch.sparkplug_codec``'s); ``SparkplugOut`` is its MQTT shell.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import MachineState, Verdict
from factorywatch.errors import FactorywatchError
from factorywatch.settings import BrokerSettings
from factorywatch.sparkplug_codec import (
    BOOLEAN,
    DOUBLE,
    INT64,
    STRING,
    Message,
    SparkplugNode,
    Value,
    add_metric,
    is_rebirth_request,
)
from factorywatch.topics import sparkplug_topic

log = structlog.get_logger("detector")

#: The metrics of every machine device: name -> (alias, data type).
METRICS: Final = {
    "Line": (1, STRING),
    "Status": (2, STRING),
    "Score": (3, DOUBLE),
    "Threshold": (4, DOUBLE),
    "Alert State": (5, STRING),
    "Alert Active": (6, BOOLEAN),
    "Acknowledged": (7, BOOLEAN),
    "Alerts Raised": (8, INT64),
    "Model Version": (9, STRING),
}


def tags(state: MachineState, verdict: Verdict | None, last: dict[str, Value]) -> dict[str, Value]:
    """A machine's metric values from its state and (if any) its newest verdict."""
    values: dict[str, Value] = dict(last)
    values.update(
        {
            "Line": state.line,
            "Alert State": state.state,
            "Alert Active": state.alert_id is not None,
            "Acknowledged": state.acknowledged,
            "Alerts Raised": state.alerts_raised,
        }
    )
    if verdict is not None:
        values.update(
            {
                "Status": verdict.status,
                "Score": verdict.score,
                "Threshold": verdict.threshold,
                "Model Version": verdict.model_version,
            }
        )
    return values


class VerdictNode(SparkplugNode):
    """The detector's edge node: births, data and death as bytes (pure)."""

    def __init__(self, group: str, node: str, bd_seq: int) -> None:
        super().__init__(group, node, bd_seq)
        self.born = False
        #: machine -> the values last published (what a birth republishes)
        self.published: dict[str, dict[str, Value]] = {}

    def _add(self, payload: Any, name: str, value: Value, now_ms: int, *, birth: bool) -> None:
        alias, datatype = METRICS[name]
        add_metric(
            payload,
            value,
            now_ms,
            datatype=datatype,
            name=name if birth else None,
            alias=alias,
            typed=birth,  # DDATA leaves data types out, as the specification says
        )

    def births(self, now_ms: int) -> list[Message]:
        """``NBIRTH`` and a ``DBIRTH`` for every machine published so far (``seq`` from 0)."""
        out = [self.nbirth(now_ms)]
        self.born = True
        for machine in sorted(self.published):
            out.append(self._dbirth(machine, self.published[machine], now_ms))
        return out

    def _dbirth(self, machine: str, values: dict[str, Value], now_ms: int) -> Message:
        payload = self.payload(now_ms)
        for name in METRICS:
            if name in values:
                self._add(payload, name, values[name], now_ms, birth=True)
        return self.device_message("DBIRTH", machine, payload)

    def update(self, machine: str, values: dict[str, Value], now_ms: int) -> list[Message]:
        """A new machine's ``DBIRTH`` (all its metrics), else ``DDATA`` with what changed."""
        last = self.published.get(machine)
        self.published[machine] = dict(values)
        if last is None or set(values) - set(last):
            return [self._dbirth(machine, values, now_ms)]
        changed = [name for name in METRICS if name in values and values[name] != last.get(name)]
        if not changed:
            return []
        payload = self.payload(now_ms)
        for name in changed:
            self._add(payload, name, values[name], now_ms, birth=False)
        return [self.device_message("DDATA", machine, payload)]


def out_broker(
    broker: BrokerSettings, username: str | None, password_file: Path | None
) -> BrokerSettings:
    """The broker settings of Sparkplug out's own account on an authenticating broker.

    Its own account (``broker add-user NAME --role edge-node --line factorywatch``): client
    ids are bound to logins, so it cannot share the detector's, and the ACL lets an edge node
    write only its own node's topics, so the node id is the account.
    """
    if not username:
        raise FactorywatchError(
            "Sparkplug out on an authenticating broker needs an account of its own: run "
            "`factorywatch broker add-user detector-spb --role edge-node --line factorywatch`, "
            "reload the broker, and set FACTORYWATCH_DETECTOR_SPARKPLUG_OUT_USERNAME=detector-spb"
        )
    out = broker.model_copy(
        update={"username": username, "password": None, "password_file": password_file}
    )
    if out.resolved_password() is None:
        where = password_file or (broker.secrets_dir or Path("<secrets dir>")) / username
        raise FactorywatchError(
            f"no password for Sparkplug out's account {username!r}: expected it in {where}"
            + ("" if password_file else ".password")
        )
    return out


class SparkplugOut:
    """The MQTT shell: its own connection (will = ``NDEATH``), births, data, rebirths."""

    def __init__(self, broker: BrokerSettings, client_id: str, group: str, node: str) -> None:
        self.node = VerdictNode(group, node, bd_seq=int(time.time()))
        self.broker = broker
        self._ncmd = sparkplug_topic(group, "NCMD", node)
        self._rebirth = threading.Event()
        self._pending: dict[str, tuple[MachineState, Verdict | None]] = {}
        self._waiter = fwmqtt.ConnectWaiter()
        self.client = fwmqtt.new_client(broker, client_id)
        self.client.will_set(*self.node.ndeath(), qos=1, retain=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self._ncmd, qos=1)
            self._rebirth.set()  # a new session starts with births
        self._waiter.record(reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._ncmd and is_rebirth_request(bytes(msg.payload)):
            log.info("sparkplug_rebirth_requested", node=self.node.node)
            self._rebirth.set()

    def start(self) -> None:
        """Connect (bounded retries); paho reconnects by itself afterwards."""
        fwmqtt.connect(self.client, self.broker, self._waiter)

    def observe(self, state: MachineState, verdict: Verdict | None) -> None:
        """Remember a machine's newest state (and verdict) for the next ``flush``."""
        previous = self._pending.get(state.machine_id)
        if verdict is None and previous is not None:
            verdict = previous[1]
        self._pending[state.machine_id] = (state, verdict)

    def flush(self, now: float) -> None:
        """Publish births if due, then one ``DDATA`` per machine that changed since the last."""
        now_ms = int(now * 1000)
        messages: list[Message] = []
        if self._rebirth.is_set():
            self._rebirth.clear()
            messages += self.node.births(now_ms)
        if self.node.born:
            pending, self._pending = self._pending, {}
            for machine, (state, verdict) in pending.items():
                values = tags(state, verdict, self.node.published.get(machine, {}))
                messages += self.node.update(machine, values, now_ms)
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=0)

    def close(self) -> None:
        """Say ``NDEATH`` (a clean disconnect sends no will) and disconnect."""
        topic, payload = self.node.ndeath()
        info = self.client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):
            log.warning("sparkplug_death_not_sent", node=self.node.node)
        self.client.disconnect()
        self.client.loop_stop()
