"""The web view in a real headless Chromium, on a secured broker with a real detector,
sensors and recorder: login and roles, live tiles pushed without polling, acknowledge and
false-alarm from the browser, the machine page with its charts and history. Screenshots go
to the test's tmp dir (the committed reports/web-*.png are not rewritten by tests)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from factorywatch.broker import LocalBroker, free_port
from factorywatch.contracts import AlertEvent, FeedbackCommand, ThresholdCommand
from factorywatch.credentials import init_secrets, read_password
from factorywatch.history_store import HistoryStore
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.integration.opstack import POLICY_ENV
from tests.support import Collector, Proc, login_settings, reading, secure_args, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MACHINES = ("press-1", "lathe-2", "mill-3")
NORMAL, ANOMALOUS = 1500.0, 3500.0  # 3500 rpm: outside every training envelope


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Broker users for every role and the three machines."""
    directory = tmp_path_factory.mktemp("websecrets")
    init_secrets(directory, MACHINES)
    return directory


def _login(page: Page, base: str, user: str, password: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#signin")


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def test_web_view_in_chromium(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    model_dir: Path,
    secure_broker: LocalBroker,
    secrets_dir: Path,
    topic_root: str,
    browser: Browser,
) -> None:
    """Viewers see live tiles (pushed, no polling) but cannot act; an operator acknowledges
    and marks a false alarm from the browser, which reach the broker and the history; the
    machine page draws score, threshold and channel charts and lists the alert history."""
    topics = Topics(topic_root)
    base_mqtt = secure_args(secure_broker.port, topic_root, secrets_dir)

    def as_user(user: str) -> BrokerSettings:
        return login_settings(secure_broker.port, topic_root, secrets_dir, user)

    db = f"sqlite:///{tmp_path / 'history.sqlite'}"
    spawn(
        "detect",
        *base_mqtt,
        "--model-dir",
        str(model_dir),
        "--client-id",
        "web-test-detector",
        "--state-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        "0",
        env=POLICY_ENV,
    ).wait_log("telemetry_subscribed")
    spawn("history", "record", *base_mqtt, "--db", db).wait_log("history_subscribed")
    http_port = free_port()
    web = spawn("web", *base_mqtt, "--db", db, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: _get(f"{base}/healthz") == 200, what="the web view's /healthz")
    monitor = Collector(as_user("monitor"), [f"{topic_root}/#"], "web-test-monitor")

    # press-1: a minute of history with one alert that cleared and one still open
    press = SensorPublisher(as_user("press-1"), "press-1", buffer_size=1000)
    press.start()
    plan = [NORMAL] * 30 + [ANOMALOUS] * 4 + [NORMAL] * 6 + [NORMAL] * 20 + [ANOMALOUS] * 4
    start = time.time() - len(plan) * 0.8
    for seq, rpm in enumerate(plan):
        press.publish(reading("press-1", seq, rpm, ts=start + seq * 0.8))
    monitor.wait_for(lambda m: m.topic.endswith("/press-1/event"), count=3)
    sensors = spawn(
        "sensor", *base_mqtt, "--machine-id", "lathe-2,mill-3", "--rate", "4",
        "--anomaly-rate", "0", "--seed", "3",
    )  # fmt: skip
    monitor.wait_for(lambda m: m.topic.endswith("/mill-3/verdict"), count=5)

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.goto(base)
    assert page.url.endswith("/login"), "the view needs a login"
    _login(page, base, "viewer", "wrong password")
    page.wait_for_selector("#error:not([hidden])")

    # -- a viewer: live tiles, pushed; no actions ----------------------------------------------
    _login(page, base, "viewer", read_password(secrets_dir, "viewer") or "")
    for machine in MACHINES:
        page.wait_for_selector(f"#tile-{machine}")
    # started without --alertmanager-url: the view says alerts reach no one else
    page.wait_for_selector("#notify-banner:not([hidden])")
    assert "No notification receiver configured" in page.inner_text("#notify-banner")
    page.wait_for_selector("#tile-press-1 .badge.ALERT")
    assert page.inner_text("#who") == "viewer · viewer"
    assert page.locator("button.ack").count() == 0
    assert page.locator("button.false-alarm").count() == 0
    refused = page.evaluate(
        """async () => (await fetch('/api/ack', {method: 'POST', headers:
        {'Content-Type': 'application/json', 'X-Requested-With': 'factorywatch'},
        body: JSON.stringify({line: 'line1', machine: 'press-1'})})).status"""
    )
    assert refused == 403
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    before = page.inner_text("#tile-lathe-2 .score")
    page.wait_for_function(
        "before => document.querySelector('#tile-lathe-2 .score').textContent !== before",
        arg=before,
        timeout=15_000,
    )
    page.wait_for_function(
        "before => document.querySelector('#tile-mill-3 .score').textContent !== before",
        arg=page.inner_text("#tile-mill-3 .score"),
        timeout=15_000,
    )
    assert requests == [], f"the tiles changed by push alone, yet the page fetched {requests}"
    page.goto(f"{base}/logout")

    # -- an operator: acknowledge and false alarm from the browser -----------------------------
    _login(page, base, "operator", read_password(secrets_dir, "operator") or "")
    row = page.locator('#alerts tr[data-machine="press-1"]')
    row.locator("button.ack").wait_for()
    page.wait_for_timeout(600)  # let a tick of sparkline points arrive before the picture
    page.screenshot(path=str(tmp_path / "web-overview.png"), full_page=True)
    row.locator("button.ack").click()
    acked = monitor.wait_for(
        lambda m: m.topic == topics.event("line1", "press-1") and b"ACKNOWLEDGED" in m.payload
    )
    assert acked, "no ALERT_ACKNOWLEDGED from the detector after the click"
    assert AlertEvent.model_validate_json(acked[0].payload).acknowledged_by == "operator"
    page.wait_for_function(
        "() => document.querySelector('#alerts tr[data-machine=\"press-1\"]')"
        ".textContent.includes('✓ operator')"
    )
    open_alert = AlertEvent.model_validate_json(acked[0].payload).alert_id
    row.locator("button.false-alarm").click()
    labels = monitor.wait_for(lambda m: m.topic == topics.feedback("line1", "press-1"))
    assert labels, "no feedback command on the broker after the click"
    label = FeedbackCommand.model_validate_json(labels[0].payload)
    assert (label.label, label.by, label.alert_id) == ("false_alarm", "operator", open_alert)
    store = HistoryStore(db)
    try:
        stored = wait_until(
            lambda: [a for a in store.alerts("press-1") if a.label == "false_alarm"],
            what="the false alarm in the history store",
        )
        assert stored[0].alert_id == open_alert
    finally:
        store.close()
    # ... and the overview shows it: on the open alert's row and on the machine's tile
    page.wait_for_selector('#alerts tr[data-machine="press-1"] .badge.false_alarm')
    page.wait_for_selector("#tile-press-1 .badge.false_alarm")
    # the detector raised press-1's own threshold above that alert (#21): its tile says so
    page.wait_for_selector("#tile-press-1 .own-threshold")

    # -- what the overview says agrees with itself and with the CLI -----------------------------
    seen = page.inner_text("#tile-lathe-2 .seen")
    assert re.fullmatch(r"seen \d+ s ago", seen), f"{seen!r}: lathe-2 reports 4 times a second"
    assert int(seen.split()[1]) <= 10, seen
    contradictions = page.evaluate(
        """() => [...document.querySelectorAll('.tile')].filter((t) =>
            t.querySelector('.badge').textContent === 'NORMAL'
            && (t.textContent.includes('last reading anomalous')
                || t.querySelector('.score.above'))).map((t) => t.id)"""
    )
    assert contradictions == [], "a NORMAL badge beside an anomalous last reading"
    assert page.evaluate("FW.badge({state: 'NORMAL', last_status: 'ALERT'}).text") == (
        "ANOMALOUS READING"
    )
    assert page.evaluate("FW.when(1800000000)") == "2027-01-15 08:00:00", "UTC, as the CLI"
    assert page.evaluate("FW.time(1800000000.4)") == "08:00:00"

    # -- the machine page ----------------------------------------------------------------------
    page.click("#tile-press-1")
    page.wait_for_url(f"{base}/machine/line1/press-1")
    page.wait_for_selector("#score-chart svg polyline")
    page.wait_for_function("() => document.querySelectorAll('#channels svg polyline').length == 5")
    page.wait_for_function("() => document.querySelectorAll('#history tbody tr').length == 2")
    assert page.locator("#history .badge.false_alarm").count() == 1
    assert "threshold" in page.inner_text("#score-chart")
    overlaps = page.evaluate(
        """() => [...document.querySelectorAll('#score-chart svg, #channels svg')].map((svg) => {
            const boxes = [...svg.querySelectorAll('text.axis.x')].map((t) => t.getBBox());
            return boxes.slice(1).filter((b, i) => b.x < boxes[i].x + boxes[i].width).length;
        })"""
    )
    assert overlaps, "no chart drawn"
    assert not any(overlaps), f"time labels overlap: {overlaps}"
    labels_text = page.locator("#channels svg text.axis.x").all_text_contents()
    assert labels_text
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in labels_text), labels_text
    history: dict[str, Any] = page.evaluate(
        "async () => (await fetch('/api/history?machine=press-1&since=1h')).json()"
    )
    assert [a["open"] for a in history["alerts"]] == [True, False]

    # -- alert notes and the time range of the history -----------------------------------------
    with page.expect_request(lambda r: "/api/history" in r.url and "since=1h" in r.url):
        page.select_option("#range", "1h")
    page.wait_for_function("() => document.querySelectorAll('#history tbody tr').length == 2")
    closed = page.locator("#history tbody tr").nth(1)
    closed.locator("input.note").fill("bearing replaced, real fault")
    closed.locator("button.confirm").click()
    noted = monitor.wait_for(
        lambda m: m.topic == topics.feedback("line1", "press-1") and b"bearing" in m.payload
    )
    assert noted, "no feedback command with the note on the broker"
    assert FeedbackCommand.model_validate_json(noted[0].payload).label == "confirmed"
    page.wait_for_selector("#history .note-text:has-text('bearing replaced, real fault')")

    # -- the machine's own threshold: who changed it, and a reset from the page ----------------
    page.wait_for_selector("#tuning li:has-text('false alarm')")
    assert "operator" in page.inner_text("#tuning li")
    page.click("#tuning button.threshold-action[data-action='reset']")
    reset = monitor.wait_for(lambda m: m.topic == topics.threshold("line1", "press-1"))
    command = ThresholdCommand.model_validate_json(reset[0].payload)
    assert (command.action, command.by) == ("reset", "operator")
    page.wait_for_selector("#tuning li:has-text('reset')")
    assert page.locator("#tuning button.threshold-action[data-action='reset']").count() == 0
    page.wait_for_timeout(600)  # one more tick so the charts hold the latest points
    page.screenshot(path=str(tmp_path / "web-machine.png"), full_page=True)
    assert not [e for e in console_errors if "Content Security Policy" in e], console_errors

    status = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=5).read())  # noqa: S310
    assert status["machines"] == 3
    page.close()
    monitor.close()
    press.close()
    sensors.terminate()
    assert web.terminate() == 0, web.log()[-2000:]
