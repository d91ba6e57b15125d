"""Alert lifecycle, retained state, acknowledgement, offline detection and metrics, for real."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import (
    AckCommand,
    AlertEvent,
    FeedbackCommand,
    MachineState,
    Verdict,
)
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.support import (
    Collector,
    Message,
    Proc,
    metric_value,
    reading,
    run_cli,
    scrape,
)

pytestmark = pytest.mark.integration

POLICY_ENV = {
    "FACTORYWATCH_DETECTOR_ALERT_K": "3",
    "FACTORYWATCH_DETECTOR_ALERT_N": "5",
    "FACTORYWATCH_DETECTOR_ALERT_M": "4",
    "FACTORYWATCH_DETECTOR_OFFLINE_AFTER_S": "3",
}


def _stream(
    settings: BrokerSettings, col: Collector, machine: str, plan: list[float]
) -> tuple[SensorPublisher, list[Message]]:
    """Publish one reading per rpm value in ``plan`` from ``machine``; wait for every verdict."""
    pub = SensorPublisher(settings, machine, buffer_size=1000)
    pub.start()
    for seq, rpm in enumerate(plan):
        pub.publish(reading(machine, seq, rpm))
    verdicts = col.wait_for(lambda m: m.topic.endswith(f"/{machine}/verdict"), count=len(plan))
    return pub, verdicts


def _events(col: Collector, machine: str) -> list[AlertEvent]:
    return [
        AlertEvent.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith(f"/{machine}/event"))
    ]


def test_alert_lifecycle_ack_offline_and_metrics(
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """k-of-n raise, m-normal clear, operator ack, last-will offline; metrics and health agree."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    proc = detector(env=POLICY_ENV)
    assert proc.metrics_port is not None
    pub = SensorPublisher(settings, "alarm-1", buffer_size=1000)
    pub.start()
    plan = [1500.0] * 6 + [2800.0] * 4 + [1500.0] * 6
    for seq, rpm in enumerate(plan):
        pub.publish(reading("alarm-1", seq, rpm))
    col.wait_for(lambda m: m.topic.endswith("/alarm-1/event"), count=2, timeout=30)
    kinds = [e.event for e in _events(col, "alarm-1")]
    assert kinds[:2] == ["ALERT_RAISED", "ALERT_CLEARED"]
    raised = _events(col, "alarm-1")[0]
    assert raised.explanation, "the raise names the features that drove it"
    assert raised.peak_score is not None
    assert raised.peak_score > 0.5

    for seq, rpm in enumerate([2800.0] * 3, start=100):
        pub.publish(reading("alarm-1", seq, rpm))
    col.wait_for(lambda m: m.topic.endswith("/alarm-1/event"), count=3, timeout=30)
    operator = fwmqtt.connected_client(settings, "operator-1")
    ack = AckCommand(machine_id="alarm-1", by="shift-lead", note="inspecting spindle")
    operator.publish(topics.ack("line1", "alarm-1"), ack.encode(), qos=1).wait_for_publish(5)
    operator.disconnect()
    operator.loop_stop()
    col.wait_for(lambda m: m.topic.endswith("/alarm-1/event"), count=4, timeout=30)
    assert [e.event for e in _events(col, "alarm-1")][2:4] == ["ALERT_RAISED", "ALERT_ACKNOWLEDGED"]
    states = col.wait_for(
        lambda m: (
            m.topic == topics.state("line1", "alarm-1") and b'"acknowledged":true' in m.payload
        )
    )
    last_state = MachineState.model_validate_json(states[-1].payload)
    assert last_state.state == "ALERT"
    assert last_state.acknowledged
    assert last_state.acknowledged_by == "shift-lead"

    status, body = scrape(proc.metrics_port, "/metrics")
    assert status == 200
    assert metric_value(body, "factorywatch_readings_received_total") == len(plan) + 3
    assert metric_value(body, "factorywatch_alert_verdicts_total", machine="alarm-1") >= 4
    assert metric_value(body, "factorywatch_alert_events_total", event="ALERT_RAISED") == 2
    assert metric_value(body, "factorywatch_broker_connected") == 1
    assert "factorywatch_processing_seconds_bucket" in body
    status, health = scrape(proc.metrics_port, "/healthz")
    assert status == 200
    assert json.loads(health)["ok"] is True

    pub.close()  # the sensor says offline on its status topic (as its last will would)
    col.wait_for(lambda m: m.topic.endswith("/alarm-1/event"), count=5, timeout=30)
    offline = _events(col, "alarm-1")[4]
    assert offline.event == "MACHINE_OFFLINE"


def test_silence_makes_a_machine_offline_and_a_reading_brings_it_back(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """No readings for offline_after_s -> MACHINE_OFFLINE; the next reading -> MACHINE_ONLINE."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector(env=POLICY_ENV)
    pub = SensorPublisher(settings, "quiet-1", buffer_size=100)
    pub.start()
    pub.publish(reading("quiet-1", 1, 1500.0))
    col.wait_for(lambda m: m.topic.endswith("/quiet-1/event"), count=1, timeout=20)
    pub.publish(reading("quiet-1", 2, 1500.0))
    col.wait_for(lambda m: m.topic.endswith("/quiet-1/event"), count=2, timeout=20)
    assert [e.event for e in _events(col, "quiet-1")][:2] == ["MACHINE_OFFLINE", "MACHINE_ONLINE"]
    pub.close()


def test_an_alert_clears_only_below_the_clear_score(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """With a clear score no reading reaches, NORMAL verdicts never clear the open alert."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector(env={**POLICY_ENV, "FACTORYWATCH_DETECTOR_ALERT_CLEAR_SCORE": "0.05"})
    # m=4: the normal readings would clear it three times over
    pub, verdicts = _stream(settings, col, "sticky-1", [2800.0] * 4 + [1500.0] * 12)
    statuses = [json.loads(m.payload)["status"] for m in verdicts]
    assert statuses.count("NORMAL") >= 12  # the readings were normal ...
    assert [e.event for e in _events(col, "sticky-1")] == ["ALERT_RAISED"]  # ... yet no clear
    last = col.matching(lambda m: m.topic == topics.state("line1", "sticky-1"))[-1]
    assert MachineState.model_validate_json(last.payload).state == "ALERT"
    pub.close()


def test_a_stream_far_from_training_is_reported_as_drift(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
) -> None:
    """Mostly anomalous readings: the ALERT share leaves the training one; logs and metrics say."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    proc = detector(env={**POLICY_ENV, "FACTORYWATCH_DETECTOR_DRIFT_WINDOW": "20"})
    assert proc.metrics_port is not None
    pub, _ = _stream(settings, col, "drifty-1", [1500.0] * 5 + [2800.0] * 20)
    proc.wait_log('"drift_started"', timeout=10)
    _, body = scrape(proc.metrics_port, "/metrics")
    assert metric_value(body, "factorywatch_drifting") == 1
    assert metric_value(body, "factorywatch_recent_alert_rate") >= 0.5
    assert 0 < metric_value(body, "factorywatch_training_alert_rate") < 0.1
    pub.close()


def test_false_alarm_feedback_and_the_threshold_command_change_one_machines_threshold(
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """A false-alarm label on a raised alert (as the web view sends it) raises that machine's
    threshold, shown on its retained state with who did it; `factorywatch threshold --reset`
    puts the model's back; the change is counted in the metrics (#21 item 4)."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    proc = detector(env=POLICY_ENV)
    assert proc.metrics_port is not None
    pub, verdicts = _stream(settings, col, "fb-1", [1500.0] * 3 + [2800.0] * 4)
    card_threshold = Verdict.model_validate_json(verdicts[0].payload).threshold
    col.wait_for(lambda m: m.topic.endswith("/fb-1/event"), count=1, timeout=30)
    raised = _events(col, "fb-1")[0]
    assert raised.event == "ALERT_RAISED"
    assert raised.peak_score is not None
    assert raised.alert_id is not None

    operator = fwmqtt.connected_client(settings, "operator-fb")
    label = FeedbackCommand(
        machine_id="fb-1", alert_id=raised.alert_id, label="false_alarm", by="ann", at=time.time()
    )
    operator.publish(topics.feedback("line1", "fb-1"), label.encode(), qos=1).wait_for_publish(5)
    operator.disconnect()
    operator.loop_stop()
    (raised_state,) = col.wait_for(
        lambda m: m.topic == topics.state("line1", "fb-1") and b'"threshold":' in m.payload
    )
    state = MachineState.model_validate_json(raised_state.payload)
    assert state.threshold is not None
    assert state.threshold > card_threshold
    assert state.threshold_changes is not None
    assert (state.threshold_changes[-1].by, state.threshold_changes[-1].action) == (
        "ann",
        "false_alarm",
    )

    done = run_cli("threshold", "fb-1", "--line", "line1", "--reset", "--by", "lead", *mqtt_args)
    assert done.returncode == 0, done.stderr
    reset = col.wait_for(
        lambda m: m.topic == topics.state("line1", "fb-1") and b'"action":"reset"' in m.payload
    )
    state = MachineState.model_validate_json(reset[-1].payload)
    assert state.threshold is None
    assert state.threshold_changes is not None
    assert state.threshold_changes[-1].by == "lead"
    _, body = scrape(proc.metrics_port, "/metrics")
    assert metric_value(body, "factorywatch_threshold_changes_total", action="false_alarm") == 1
    assert metric_value(body, "factorywatch_threshold_changes_total", action="reset") == 1
    pub.close()
