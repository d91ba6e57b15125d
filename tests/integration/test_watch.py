"""``factorywatch watch`` on a real Mosquitto: retained states and live messages reach the table."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from rich.console import Console

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import free_port
from factorywatch.contracts import (
    AlertEvent,
    Contribution,
    MachineCondition,
    MachineState,
    Verdict,
)
from factorywatch.dashboard import DashboardModel, run_watch
from factorywatch.errors import BrokerError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


@pytest.fixture
def publisher(settings: BrokerSettings) -> Iterator[mqtt.Client]:
    """A connected paho client on this test's broker."""
    client = fwmqtt.new_client(settings, f"test-pub-{uuid.uuid4().hex[:8]}")
    waiter = fwmqtt.ConnectWaiter()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        waiter.record(rc)

    client.on_connect = on_connect
    fwmqtt.connect(client, settings, waiter)
    yield client
    client.disconnect()
    client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish at QoS 1 and wait for the broker's PUBACK."""
    info = client.publish(topic, payload, qos=fwmqtt.QOS, retain=retain)
    info.wait_for_publish(timeout=5)
    assert info.is_published()


def verdict(machine: str, seq: int, score: float) -> Verdict:
    """A verdict on line1; above 0.6 it is anomalous and explained by torque."""
    alert = score > 0.6
    return Verdict(
        machine_id=machine,
        line="line1",
        seq=seq,
        reading_ts=T0 + seq,
        status="ALERT" if alert else "NORMAL",
        score=score,
        threshold=0.6,
        model_version="v1",
        latency_ms=1.0,
        explanation=[Contribution(feature="torque_nm", value=80.0, z=5.5)] if alert else None,
    )


class WatchThread(threading.Thread):
    """``run_watch`` in a thread; keeps its result or its exception for the test."""

    def __init__(self, settings: BrokerSettings, console: Console, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args = (settings, threading.Event(), console)
        self.kwargs = kwargs
        self.ready = threading.Event()
        self.model: DashboardModel | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """Run the dashboard until its duration is over."""
        try:
            self.model = run_watch(*self.args, ready=self.ready, **self.kwargs)
        except BaseException as exc:  # handed to the test thread, which asserts on it
            self.error = exc


def row(text: str, machine: str) -> str:
    """The one rendered line that shows ``machine``."""
    [found] = [ln for ln in text.splitlines() if f"line1/{machine} " in ln]
    return found


def test_watch_shows_retained_and_live_machine_states(
    settings: BrokerSettings, topic_root: str, publisher: mqtt.Client
) -> None:
    """A retained OFFLINE state and live verdicts and events all end up in the rendered table."""
    topics = Topics(topic_root)
    offline = MachineState(
        machine_id="lathe-2",
        line="line1",
        state="OFFLINE",
        since=T0,
        last_score=0.512,
        window_size=5,
        alerts_raised=2,
    )
    publish(publisher, topics.state("line1", "lathe-2"), offline.encode(), retain=True)

    console = Console(record=True, width=160, file=io.StringIO())
    watch = WatchThread(settings, console, duration=2.0, refresh_per_second=10)
    watch.start()
    assert watch.ready.wait(15), f"dashboard did not subscribe: {watch.error!r}"

    for seq, score in enumerate([0.30, 0.35, 0.91, 0.93, 0.95]):
        publish(
            publisher, topics.verdict("line1", "press-1"), verdict("press-1", seq, score).encode()
        )
    raised = AlertEvent(
        machine_id="press-1",
        line="line1",
        event="ALERT_RAISED",
        at=T0,
        seq=4,
        alert_id="press-1-4",
        peak_score=0.95,
        explanation=[Contribution(feature="torque_nm", value=80.0, z=5.5)],
    )
    publish(publisher, topics.event("line1", "press-1"), raised.encode())
    for seq in range(3):
        publish(publisher, topics.verdict("line1", "mill-3"), verdict("mill-3", seq, 0.4).encode())
    cleared = AlertEvent(machine_id="mill-3", line="line1", event="ALERT_CLEARED", at=T0)
    publish(publisher, topics.event("line1", "mill-3"), cleared.encode())
    publish(publisher, f"{topic_root}/alerts/line1/mill-3/verdict", b"not json")

    watch.join(15)
    assert not watch.is_alive(), "run_watch did not stop after its duration"
    assert watch.error is None, repr(watch.error)
    text = console.export_text()

    assert "3 machines, 1 in alert, 1 offline" in text
    press = row(text, "press-1")
    assert "ALERT" in press
    assert "0.950" in press
    assert "torque_nm z=+5.5" in press
    assert "█" in press
    assert "NORMAL" in row(text, "mill-3")
    lathe = row(text, "lathe-2")
    assert "OFFLINE" in lathe
    assert "0.512" in lathe
    assert watch.model is not None
    assert watch.model.ignored == 1


def test_watch_once_prints_the_retained_states(
    settings: BrokerSettings, topic_root: str, publisher: mqtt.Client
) -> None:
    """``once`` collects the retained states and prints the table a single time."""
    topics = Topics(topic_root)
    conditions: list[tuple[str, MachineCondition]] = [("press-1", "ALERT"), ("mill-3", "NORMAL")]
    for machine, condition in conditions:
        state = MachineState(
            machine_id=machine,
            line="line1",
            state=condition,
            since=T0,
            window_size=5,
            alert_id="press-1-9" if condition == "ALERT" else None,
        )
        publish(publisher, topics.state("line1", machine), state.encode(), retain=True)

    console = Console(record=True, width=160, file=io.StringIO())
    model = run_watch(settings, threading.Event(), console, once=True, duration=0.5)
    text = console.export_text()

    assert text.count("factorywatch:") == 1
    assert "ALERT" in row(text, "press-1")
    assert "NORMAL" in row(text, "mill-3")
    assert sorted(model.rows) == [("line1", "mill-3"), ("line1", "press-1")]


def test_watch_without_a_broker_fails_with_a_clear_error() -> None:
    """An unreachable broker ends in BrokerError (exit 2 from the CLI), not a hang."""
    settings = BrokerSettings().with_overrides(port=free_port(), connect_retries=0)
    with pytest.raises(BrokerError, match="unreachable"):
        run_watch(settings, threading.Event(), Console(file=io.StringIO()), duration=1.0)
