"""Alert history for real: detector -> broker -> recorder -> SQLite and PostgreSQL -> CLI."""

from __future__ import annotations

import csv
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AlertEvent, FeedbackCommand, Telemetry
from factorywatch.history_store import HistoryStore
from factorywatch.model import artifact
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.integration.opstack import POLICY_ENV, history_url, publish_plan
from tests.support import CLI, PROJECT_DIR, Collector, Proc, reading, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 3500 rpm lies outside the training envelope of both the AI4I data and the synthetic set
NORMAL, ANOMALOUS = 1500.0, 3500.0


def _events(col: Collector, machine: str) -> list[AlertEvent]:
    return [
        AlertEvent.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith(f"/{machine}/event"))
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_DIR
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_recorder_keeps_alerts_feedback_and_exports_training_data(
    backend: str,
    tmp_path: Path,
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """Events, ALERT verdicts, readings and a false-alarm label land in the store; the CLI
    lists them and exports the readings (with the false alarm as normal data) for `train`."""
    topics = Topics(settings.topic_root)
    with history_url(backend, tmp_path) as (url, schema):
        db = ["--db", url, *(["--db-schema", schema] if schema else [])]
        col = collector(topics.alerts_filter)
        detector(env=POLICY_ENV)
        recorder = spawn(
            "history", "record", *mqtt_args, *db, "--client-id", f"rec-{uuid.uuid4().hex[:6]}"
        )
        recorder.wait_log("history_subscribed")

        # alert 1: raise on the 3rd anomalous reading (seq 22), clear on the 4th normal (27);
        # alert 2: raised at seq 32 and left open
        plan = [NORMAL] * 20 + [ANOMALOUS] * 4 + [NORMAL] * 6 + [ANOMALOUS] * 4
        pub = publish_plan(settings, "m1", plan)
        col.wait_for(lambda m: m.topic.endswith("/m1/verdict"), count=len(plan))
        col.wait_for(lambda m: m.topic.endswith("/m1/event"), count=3)
        kinds = [e.event for e in _events(col, "m1")]
        assert kinds == ["ALERT_RAISED", "ALERT_CLEARED", "ALERT_RAISED"]
        first = _events(col, "m1")[0]
        assert first.alert_id is not None

        operator = fwmqtt.connected_client(settings, "operator-test")
        label = FeedbackCommand(
            machine_id="m1",
            alert_id=first.alert_id,
            label="false_alarm",
            by="shift-lead",
            at=time.time(),
            note="tool change",
        )
        operator.publish(topics.feedback("line1", "m1"), label.encode(), qos=1).wait_for_publish(5)
        operator.publish(topics.feedback("line1", "m1"), b"{not json", qos=1).wait_for_publish(5)
        operator.disconnect()
        operator.loop_stop()

        store = HistoryStore(url, schema=schema)
        try:
            alerts = wait_until(
                lambda: [a for a in store.alerts("m1") if a.label == "false_alarm"],
                what="the false-alarm label in the store",
            )
            assert alerts[0].alert_id == first.alert_id
            assert alerts[0].labelled_by == "shift-lead"
            assert alerts[0].raised_seq == 22
            assert alerts[0].cleared_seq == 27
            wait_until(lambda: len(store.readings("m1")) == len(plan), what="every reading")
            episodes = store.alerts("m1")
            assert [(e.raised_seq, e.open) for e in episodes] == [(32, True), (22, False)]
            assert len(store.alert_verdicts("m1")) == 8  # the 8 anomalous readings
        finally:
            store.close()
        recorder.wait_log("history_message_rejected")  # the bad feedback: logged, not stored

        shown = _cli("history", *db, "--machine", "m1", "--since", "1h")
        assert shown.returncode == 0, shown.stderr
        assert "2 alert(s) on m1" in shown.stdout
        assert "false_alarm" in shown.stdout
        assert "open" in shown.stdout

        strict_csv, relaxed_csv = tmp_path / "strict.csv", tmp_path / "relaxed.csv"
        done = _cli("history", "export", *db, "--machine", "m1", "--csv", str(strict_csv))
        assert done.returncode == 0, done.stderr
        done = _cli(
            "history",
            "export",
            *db,
            "--machine",
            "m1",
            "--false-alarms-as-normal",
            "--csv",
            str(relaxed_csv),
        )
        assert done.returncode == 0, done.stderr
        strict = list(csv.DictReader(strict_csv.read_text().splitlines()))
        relaxed = list(csv.DictReader(relaxed_csv.read_text().splitlines()))
        # strict: seq 0-19 and 28-29; relaxed adds alert 1 (seq 20-27, a false alarm)
        assert len(strict) == 22
        assert len(relaxed) == 30
        assert {r["Rotational speed [rpm]"] for r in strict} == {"1500.0"}
        assert sum(r["Rotational speed [rpm]"] == "3500.0" for r in relaxed) == 4

        if backend == "sqlite":  # the export is a dataset `factorywatch train` takes as is
            trained = _cli(
                "train",
                "--dataset",
                str(relaxed_csv),
                "--no-verify",
                "--model-dir",
                str(tmp_path / "refit"),
                "--trees",
                "20",
                "--no-promote",
            )
            assert trained.returncode == 0, trained.stderr
        pub.close()
        assert recorder.terminate() == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_retention_prunes_old_rows_and_inserts_are_idempotent(backend: str, tmp_path: Path) -> None:
    """A redelivered event is stored once; prune drops rows past each retention only."""
    with history_url(backend, tmp_path) as (url, schema):
        store = HistoryStore(url, schema=schema)
        try:
            now = time.time()
            old = AlertEvent(
                machine_id="m1", line="line1", event="ALERT_RAISED", at=now - 40 * 86400,
                alert_id="a-old", seq=1,
            )  # fmt: skip
            new = AlertEvent(
                machine_id="m1", line="line1", event="ALERT_RAISED", at=now - 60, alert_id="a-new",
                seq=9,
            )  # fmt: skip
            store.add_events([old, new, new])
            store.add_readings([reading("m1", 1, NORMAL, ts=now - 3 * 86400)])
            store.add_readings([reading("m1", 2, NORMAL, ts=now - 60)] * 2)
            assert store.counts()["events"] == 2
            assert store.counts()["readings"] == 2
            gone = store.prune(now, retention_days=30, readings_retention_days=1)
            assert gone == 2
            assert [e["alert_id"] for e in store.events("m1")] == ["a-new"]
            assert [r["seq"] for r in store.readings("m1")] == [2]
        finally:
            store.close()


def test_a_recorder_that_crashed_catches_up_on_what_happened_meanwhile(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """kill -9 of the recorder loses nothing: its persistent session queues the alert events
    and readings of the outage, and the restarted recorder (same client id) stores them."""
    topics = Topics(settings.topic_root)
    db = ["--db", f"sqlite:///{tmp_path / 'history.sqlite'}"]
    col = collector(topics.alerts_filter)
    detector(env=POLICY_ENV)
    args = ["history", "record", *mqtt_args, *db, "--client-id", "recorder-under-test"]
    first = spawn(*args)
    first.wait_log("history_subscribed")
    first.kill()

    plan = [NORMAL] * 5 + [ANOMALOUS] * 4 + [NORMAL] * 5
    pub = publish_plan(settings, "m9", plan)
    col.wait_for(lambda m: m.topic.endswith("/m9/event"), count=2)

    spawn(*args).wait_log("history_subscribed")
    store = HistoryStore(db[1])
    try:
        wait_until(lambda: len(store.readings("m9")) == len(plan), what="the outage's readings")
        wait_until(lambda: len(store.events("m9")) == 2, what="the outage's alert events")
        assert [e["event"] for e in store.events("m9")] == ["ALERT_RAISED", "ALERT_CLEARED"]
        assert len(store.alert_verdicts("m9")) == 4
    finally:
        store.close()
    pub.close()


def test_a_machine_of_any_channels_is_exported_for_train_csv_and_refits_as_its_own(
    tmp_path: Path,
) -> None:
    """A machine that is not AI4I-shaped is exported as its channels over time, its alert's
    readings left out unless marked a false alarm, and the printed refit command fits it."""
    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    now = time.time() - 3600
    rng = np.random.default_rng(7)
    store = HistoryStore(url)
    try:
        store.add_readings(
            [
                Telemetry(
                    machine_id="pump-7", line="line2", seq=seq, ts=now + seq,
                    readings={
                        "flow": 30.0 + rng.normal(), "pressure": 2.0 + 0.1 * rng.normal(),
                        **({"vibration": 0.2 + 0.01 * rng.normal()} if seq != 5 else {}),
                    },
                )
                for seq in range(300)
            ]
        )  # fmt: skip
        raised = AlertEvent(
            machine_id="pump-7", line="line2", event="ALERT_RAISED", at=now + 102,
            alert_id="a-1", seq=102,
        )  # fmt: skip
        cleared = raised.model_copy(update={"event": "ALERT_CLEARED", "at": now + 120, "seq": 120})
        store.add_events([raised, cleared])
    finally:
        store.close()
    db = ["--db", url]
    out = tmp_path / "pump-7.csv"
    done = _cli("history", "export", *db, "--machine", "pump-7", "--since", "1d", "--csv", str(out))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0]) == ["ts", "seq", "flow", "pressure", "vibration"]
    seqs = [int(r["seq"]) for r in rows]
    assert 110 not in seqs  # the alert's readings are left out
    assert {0, 299} <= set(seqs)
    assert [r["vibration"] for r in rows if r["seq"] == "5"] == [""]  # a reading without it
    refit = done.stderr.strip().splitlines()[-1]
    assert refit.startswith("refit with: factorywatch train --csv ")
    command = refit.removeprefix("refit with: factorywatch ").split()
    trained = _cli(*command, "--model-dir", str(tmp_path / "models"), "--trees", "20")
    assert trained.returncode == 0, trained.stderr
    own = tmp_path / "models" / "machines" / "pump-7"
    card = artifact.load(own).card  # the promoted one: the detector routes pump-7 to it
    assert card.channels == ["flow", "pressure", "vibration"]  # no ts, no seq
    assert card.follow() is not None
