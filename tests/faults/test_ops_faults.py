"""Fault injection under the operator services: Alertmanager down while alerts fire and clear
(the notifier), PostgreSQL restarted under the recorder. Each row reports what the detector
said (alert events) against what reached the far end, and asserts loss = 0."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from factorywatch.contracts import AlertEvent
from factorywatch.history_store import HistoryStore
from factorywatch.notify import ANOMALY
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.faults.conftest import FaultReport, Figures
from tests.faults.postgres import PrivatePostgres
from tests.integration.opstack import POLICY_ENV, Alertmanager, WebhookReceiver, publish_plan
from tests.support import Collector, Proc, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timing]

NORMAL, ANOMALOUS = 1500.0, 3500.0  # 3500 rpm: outside every training envelope
#: raised on the 3rd anomalous reading, cleared on the 4th normal one (POLICY_ENV)
RAISE_AND_CLEAR = [NORMAL] * 3 + [ANOMALOUS] * 4 + [NORMAL] * 6
RAISE_ONLY = [NORMAL] * 3 + [ANOMALOUS] * 4


def _events(col: Collector) -> list[AlertEvent]:
    return [
        AlertEvent.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith("/event"))
    ]


def _anomaly_events(col: Collector) -> list[AlertEvent]:
    """Raises and clears (a machine silent for long also goes OFFLINE: not this row's)."""
    return [e for e in _events(col) if e.event in ("ALERT_RAISED", "ALERT_CLEARED")]


def _of(alert: dict[str, object], machine: str) -> bool:
    labels = alert["labels"]
    return isinstance(labels, dict) and labels.get("machine") == machine


def _crashes(*procs: Proc) -> int:
    return sum(p.log().count("Traceback") for p in procs)


# -- Alertmanager down while alerts fire and clear -----------------------------------------------
AM_DOWN_S = 60.0  # the outage of the goal
AM_CLEARED = ("am1", "am2", "am3", "am4")  # raise and clear while Alertmanager is down
AM_OPEN = ("am5", "am6")  # raise while it is down, still open when it returns


def test_alertmanager_down_60s_while_alerts_fire_and_clear_loses_no_notification(
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    alertmanager: Alertmanager,
    webhook: WebhookReceiver,
    fault_report: FaultReport,
) -> None:
    """Six alerts raised (four of them also cleared) during a 60 s Alertmanager outage all
    reach its receivers once it is back: firing for each, resolved for each cleared one."""
    started = time.monotonic()
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    det = detector(env=POLICY_ENV)
    # --resend 2: the notifier's retry back-off (1 s doubling) stops at 2 s instead of 60 s,
    # so the figure below is the outage's cost, not the back-off's (docs: notifications)
    notifier = spawn("notify", *mqtt_args, "--alertmanager-url", alertmanager.url, "--resend", "2")
    notifier.wait_log("notify_subscribed")
    alertmanager.stop()
    down_at = time.monotonic()
    pubs = [publish_plan(settings, m, RAISE_AND_CLEAR) for m in AM_CLEARED[:2]]
    col.wait_for(lambda m: b"ALERT_CLEARED" in m.payload, count=2)
    notifier.wait_log("alertmanager_post_failed")
    time.sleep(AM_DOWN_S / 2)  # the fault itself: Alertmanager stays down while alerts come
    pubs += [publish_plan(settings, m, RAISE_AND_CLEAR) for m in AM_CLEARED[2:]]
    pubs += [publish_plan(settings, m, RAISE_ONLY) for m in AM_OPEN]
    expected_events = 2 * len(AM_CLEARED) + len(AM_OPEN)
    wait_until(
        lambda: len(_anomaly_events(col)) >= expected_events, timeout=60, what="the alert events"
    )
    time.sleep(max(0.0, AM_DOWN_S - (time.monotonic() - down_at)))  # the rest of the outage
    down_s = round(time.monotonic() - down_at, 1)
    delivered_during_outage = len(webhook.alerts(lambda a: True))  # of any alert name
    alertmanager.start()
    back = time.monotonic()
    expected = {(m, "firing") for m in (*AM_CLEARED, *AM_OPEN)} | {
        (m, "resolved") for m in AM_CLEARED
    }

    def delivered() -> set[tuple[str, str]]:
        """The anomaly notifications the receiver got (offline ones are not counted)."""
        return {
            (a["labels"].get("machine"), a["status"])
            for a in webhook.alerts(lambda a: a["labels"].get("alertname") == ANOMALY)
        }

    wait_until(lambda: expected <= delivered(), timeout=120, what="every notification")
    all_delivered_s = round(time.monotonic() - back, 1)
    events = _anomaly_events(col)
    for pub in pubs:
        pub.close()
    crashes = _crashes(det, notifier) + (notifier.terminate() != 0)
    fig = fault_report.add(
        Figures(
            scenario="Alertmanager down 60 s, alerts fire and clear",
            sent=len(expected),
            acked=len(expected),
            unique_verdicts=len(expected & delivered()),
            duplicates=0,
            lost=len(expected - delivered()),
            dead_lettered=0,
            crashes=crashes,
            broker_dropped=0,
            wall_s=round(time.monotonic() - started, 1),
            details={
                "alert_events": len(events),
                "notifications_expected": len(expected),
                "alertmanager_down_s": down_s,
                "delivered_during_outage": delivered_during_outage,
                "all_delivered_after_return_s": all_delivered_s,
                "failed_posts": notifier.log().count("alertmanager_post_failed"),
                "unexpected": sorted(map(list, delivered() - expected)),
            },
        )
    )
    assert len(events) == expected_events
    assert delivered_during_outage == 0
    assert fig.lost == 0, fig
    assert fig.crashes == 0, fig
    assert delivered() == expected, "a notification nobody raised"
    # resolved only after firing, for each cleared alert (Alertmanager tells no one otherwise)
    for machine in AM_CLEARED:
        statuses = [
            a["status"]
            for a in webhook.alerts(lambda a: a["labels"].get("alertname") == ANOMALY)
            if _of(a, machine)
        ]
        assert statuses[0] == "firing", (machine, statuses)


# -- PostgreSQL restarted under the recorder -----------------------------------------------------
PG_BEFORE = ("pg1", "pg2")  # alerts raised and cleared before the restart
PG_DURING = ("pg3", "pg4", "pg5", "pg6")  # ... while PostgreSQL is down
PG_DOWN_S = 15.0


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server of this test (never the machine's shared one)."""
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


def _stored(store: HistoryStore) -> set[tuple[str, str, str | None]]:
    """The raises and clears stored (as ``_anomaly_events`` counts them)."""
    return {
        (e["machine_id"], e["event"], e["alert_id"])
        for e in store.events()
        if e["event"] in ("ALERT_RAISED", "ALERT_CLEARED")
    }


def test_postgresql_restarted_under_the_recorder_loses_no_event(
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    postgres: PrivatePostgres,
    fault_report: FaultReport,
) -> None:
    """Alert events (and readings) that come while the recorder's PostgreSQL is down are
    stored once it is back: the recorder keeps them unacknowledged and retries."""
    started = time.monotonic()
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    det = detector(env=POLICY_ENV)
    recorder = spawn(
        "history", "record", *mqtt_args, "--db", postgres.url,
        "--client-id", f"rec-{uuid.uuid4().hex[:6]}", name="recorder",
    )  # fmt: skip
    recorder.wait_log("history_subscribed")
    store = HistoryStore(postgres.url)
    pubs = [publish_plan(settings, m, RAISE_AND_CLEAR) for m in PG_BEFORE]
    wait_until(lambda: len(_stored(store)) == 2 * len(PG_BEFORE), what="the first events stored")
    store.close()

    postgres.stop("fast")
    down_at = time.monotonic()
    pubs += [publish_plan(settings, m, RAISE_AND_CLEAR) for m in PG_DURING]
    expected_events = 2 * (len(PG_BEFORE) + len(PG_DURING))
    wait_until(
        lambda: len(_anomaly_events(col)) >= expected_events, timeout=60, what="the alert events"
    )
    recorder.wait_log("history_write_failed")
    time.sleep(max(0.0, PG_DOWN_S - (time.monotonic() - down_at)))  # the fault: still down
    postgres.start()
    back = time.monotonic()
    down_s = round(back - down_at, 1)

    said = {(e.machine_id, e.event, e.alert_id) for e in _anomaly_events(col)}
    store = HistoryStore(postgres.url)
    machines = (*PG_BEFORE, *PG_DURING)
    try:
        wait_until(lambda: said <= _stored(store), timeout=90, what="every event stored")
        caught_up_s = round(time.monotonic() - back, 1)
        wait_until(
            lambda: all(len(store.readings(m)) == len(RAISE_AND_CLEAR) for m in machines),
            timeout=60,
            what="every reading stored",
        )
        stored, readings = _stored(store), sum(len(store.readings(m)) for m in machines)
    finally:
        store.close()
    for pub in pubs:
        pub.close()
    crashes = _crashes(det, recorder) + (recorder.terminate() != 0)
    fig = fault_report.add(
        Figures(
            scenario="PostgreSQL restarted under the recorder",
            sent=len(said),
            acked=len(said),
            unique_verdicts=len(said & stored),
            duplicates=0,
            lost=len(said - stored),
            dead_lettered=0,
            crashes=crashes,
            broker_dropped=0,
            wall_s=round(time.monotonic() - started, 1),
            details={
                "events_stored": len(stored),
                "readings_expected": len(machines) * len(RAISE_AND_CLEAR),
                "readings_stored": readings,
                "postgres_down_s": down_s,
                "write_failures_logged": recorder.log().count("history_write_failed"),
                "caught_up_after_restart_s": caught_up_s,
            },
        )
    )
    assert len(said) == expected_events
    assert fig.lost == 0, fig
    assert fig.crashes == 0, fig
    assert stored == said, "an event stored that the detector never said"
    assert readings == len(machines) * len(RAISE_AND_CLEAR)
