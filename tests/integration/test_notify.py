"""Notifications for real: detector -> broker -> notifier -> Alertmanager -> webhook receiver."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from factorywatch.contracts import AlertEvent
from factorywatch.mqtt import connected_client
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.integration.opstack import (
    POLICY_ENV,
    Alertmanager,
    WebhookReceiver,
    publish_plan,
)
from tests.support import Collector, Proc, reading, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NORMAL, ANOMALOUS = 1500.0, 3500.0  # 3500 rpm: outside every training envelope


def _on(machine: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda a: a["labels"].get("machine") == machine and a["status"] == status


def test_raised_and_cleared_alerts_reach_alertmanager_and_a_silence_suppresses_one(
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    alertmanager: Alertmanager,
    webhook: WebhookReceiver,
) -> None:
    """A raise is notified firing and its clear resolved, with labels and annotations; an
    alert of a machine under a silence (maintenance) reaches Alertmanager but notifies no one
    until the silence is expired."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector(env=POLICY_ENV)
    now = datetime.now(UTC)
    silence = alertmanager.api(
        "silences",
        {
            "matchers": [{"name": "machine", "value": "m2", "isRegex": False, "isEqual": True}],
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(hours=1)).isoformat(),
            "createdBy": "factorywatch-test",
            "comment": "m2 in maintenance until noon",
        },
    )
    notifier = spawn(
        "notify",
        *mqtt_args,
        "--alertmanager-url",
        alertmanager.url,
        "--resend",
        "2",
        "--label",
        "site=test-plant",
        "--web-url",
        "http://127.0.0.1:8080",
    )
    notifier.wait_log("notify_subscribed")

    m2 = publish_plan(settings, "m2", [NORMAL] * 3 + [ANOMALOUS] * 4)
    col.wait_for(lambda m: m.topic.endswith("/m2/event"), count=1)
    m1 = publish_plan(settings, "m1", [NORMAL] * 3 + [ANOMALOUS] * 4)
    firing = webhook.wait_for(_on("m1", "firing"))
    assert firing, f"no firing notification for m1; notifier log:\n{notifier.log()[-2000:]}"
    alert = firing[0]
    assert alert["labels"]["alertname"] == "FactorywatchAnomaly"
    assert alert["labels"]["line"] == "line1"
    assert alert["labels"]["site"] == "test-plant"
    assert float(alert["annotations"]["peak_score"]) > 0
    assert alert["generatorURL"] == "http://127.0.0.1:8080/machine/line1/m1"
    for seq in range(10, 15):  # then m1 clears (after its firing was notified: no flap)
        m1.publish(reading("m1", seq, NORMAL))
    col.wait_for(lambda m: m.topic.endswith("/m1/event"), count=2)
    assert webhook.wait_for(_on("m1", "resolved")), "the clear was not notified as resolved"

    # m2's alert is in Alertmanager, suppressed by the silence, and notified no one
    suppressed = wait_until(
        lambda: [
            a
            for a in alertmanager.api("alerts?filter=machine%3D%22m2%22")
            if a["status"]["state"] == "suppressed"
        ],
        what="m2's alert suppressed in Alertmanager",
    )
    assert suppressed[0]["status"]["silencedBy"] == [silence["silenceID"]]
    assert webhook.alerts(lambda a: a["labels"].get("machine") == "m2") == []

    # expiring the silence releases the notification: the silence was what held it back
    request = urllib.request.Request(  # noqa: S310 - loopback Alertmanager of this test
        f"{alertmanager.url}/api/v2/silence/{silence['silenceID']}", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        assert resp.status == 200
    assert webhook.wait_for(_on("m2", "firing")), "m2 not notified after the silence expired"
    m1.close()
    m2.close()
    assert notifier.terminate() == 0
    assert "alertmanager_post_failed" not in notifier.log()


def test_a_restarted_notifier_resolves_an_alert_that_cleared_while_it_was_down(
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    alertmanager: Alertmanager,
    webhook: WebhookReceiver,
) -> None:
    """The retained state topics tell a new notifier what is open: a clear it missed is
    still sent to Alertmanager as resolved, and the open alert stays firing."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector(env=POLICY_ENV)
    args = [*mqtt_args, "--alertmanager-url", alertmanager.url, "--resend", "2"]
    first = spawn("notify", *args)
    first.wait_log("notify_subscribed")
    m3 = publish_plan(settings, "m3", [NORMAL] * 3 + [ANOMALOUS] * 4)
    assert webhook.wait_for(_on("m3", "firing"))
    assert first.terminate() == 0

    for seq, rpm in enumerate([NORMAL] * 5, start=100):  # clears while no notifier runs
        m3.publish(reading("m3", seq, rpm))
    col.wait_for(lambda m: m.topic.endswith("/m3/event"), count=2)
    assert webhook.alerts(_on("m3", "resolved")) == []

    second = spawn("notify", *args)
    second.wait_log("notify_subscribed")
    # the retained NORMAL state is reconciled against Alertmanager's view on start
    assert webhook.wait_for(_on("m3", "resolved"), timeout=30), second.log()[-2000:]
    assert webhook.alerts(_on("m3", "firing")), "fired before the restart"
    m3.close()
    assert second.terminate() == 0


def test_alerts_raised_and_cleared_while_alertmanager_is_down_arrive_when_it_returns(
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    alertmanager: Alertmanager,
    webhook: WebhookReceiver,
) -> None:
    """With Alertmanager stopped, one alert is raised and cleared and another raised; once
    it is started again the notifier's retries deliver both: the first notified firing and
    then resolved, the second firing (nothing is lost, nothing is only re-sent at shutdown)."""
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    detector(env=POLICY_ENV)
    notifier = spawn("notify", *mqtt_args, "--alertmanager-url", alertmanager.url, "--resend", "2")
    notifier.wait_log("notify_subscribed")
    alertmanager.stop()

    m4 = publish_plan(settings, "m4", [NORMAL] * 3 + [ANOMALOUS] * 4 + [NORMAL] * 6)
    m5 = publish_plan(settings, "m5", [NORMAL] * 3 + [ANOMALOUS] * 4)
    col.wait_for(lambda m: m.topic.endswith("/m4/event"), count=2)  # raised, cleared
    col.wait_for(lambda m: m.topic.endswith("/m5/event"), count=1)
    notifier.wait_log("alertmanager_post_failed")
    assert webhook.alerts(lambda a: a["labels"].get("machine") in ("m4", "m5")) == []

    alertmanager.start()
    assert webhook.wait_for(_on("m4", "firing")), notifier.log()[-2000:]
    assert webhook.wait_for(_on("m4", "resolved")), notifier.log()[-2000:]
    assert webhook.wait_for(_on("m5", "firing")), notifier.log()[-2000:]
    assert webhook.alerts(_on("m5", "resolved")) == [], "m5 is still open"
    m4.close()
    m5.close()
    assert notifier.terminate() == 0
    assert "alertmanager_receiver_missing" not in notifier.log(), "the test's has a webhook"


class _HungServer:
    """A TCP listener that reads requests and never answers (a hung Alertmanager)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.requests: list[bytes] = []  # each request's first bytes (list.append is atomic)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.requests.append(conn.recv(5))

    @property
    def posts(self) -> int:
        """POST requests received (the notifier's status query is a GET)."""
        return sum(r.startswith(b"POST") for r in self.requests)

    def close(self) -> None:
        """Stop listening and drop every held connection."""
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_hung_alertmanager_costs_one_timeout_per_burst_not_one_per_alert(
    spawn: Callable[..., Proc], settings: BrokerSettings, mqtt_args: list[str]
) -> None:
    """Sixty alerts raised at once against an Alertmanager that never answers are posted
    together: all sixty are in one timed-out post after at most three posts, where posting
    them one by one in series would take sixty 5 s timeouts."""
    topics = Topics(settings.topic_root)
    hung = _HungServer()
    try:
        notifier = spawn(
            "notify", *mqtt_args, "--alertmanager-url", f"http://127.0.0.1:{hung.port}"
        )
        notifier.wait_log("notify_subscribed", timeout=60)
        publisher = connected_client(settings, "test-hung-events")
        now = time.time()
        sent = []
        for i in range(60):
            event = AlertEvent(
                machine_id=f"h{i}", line="line1", event="ALERT_RAISED", at=now, alert_id=f"a{i}"
            )
            sent.append(publisher.publish(topics.event("line1", f"h{i}"), event.encode(), qos=1))
        for info in sent:
            info.wait_for_publish(10)
        publisher.disconnect()
        publisher.loop_stop()

        def all_sixty_posted() -> bool:
            return any(
                line.get("event") == "alertmanager_post_failed" and line.get("alerts") == 60
                for line in _json_lines(notifier.log())
            )

        wait_until(all_sixty_posted, timeout=90, what="one post carrying all 60 alerts")
        assert hung.posts <= 3, f"{hung.posts} posts for one burst"
        assert notifier.terminate() == 0
    finally:
        hung.close()


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            decoded = json.loads(line)
            if isinstance(decoded, dict):
                out.append(decoded)
    return out
