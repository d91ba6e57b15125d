"""No message stops a consumer, for real: Mosquitto, detector and recorder processes, and
PostgreSQL restarted under the recorder (#25)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import DeadLetter, Verdict
from factorywatch.history_store import HistoryStore
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.integration.opstack import PG_BASE_URL, history_url, publish_plan
from tests.support import Collector, Proc, reading, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _publish(settings: BrokerSettings, topic: str, payload: bytes) -> None:
    client = fwmqtt.connected_client(settings, f"poisoner-{uuid.uuid4().hex[:6]}")
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def _verdict_seqs(col: Collector) -> set[int]:
    return {
        Verdict.model_validate_json(m.payload).seq
        for m in col.matching(lambda m: m.topic.endswith("/m1/verdict"))
    }


def test_a_huge_seq_neither_crash_loops_the_detector_nor_the_recorder(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """A reading with seq 2**70 is dead-lettered by the detector and refused by the recorder;
    both go on, and after a kill -9 and restart of both the next reading is scored and stored."""
    topics = Topics(settings.topic_root)
    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    col = collector(topics.alerts_filter, topics.deadletter_filter)

    def start_recorder() -> Proc:
        proc = spawn("history", "record", *mqtt_args, "--db", url, "--client-id", "rec-poison")
        proc.wait_log("history_subscribed")
        return proc

    procs = [detector(), start_recorder()]
    poison = json.loads(reading("m1", 1).encode()) | {"seq": 2**70}
    _publish(settings, topics.telemetry("line1", "m1"), json.dumps(poison).encode())
    _publish(settings, topics.telemetry("line1", "m1"), reading("m1", 2).encode())
    letters = col.wait_for(lambda m: "/deadletter/" in m.topic)
    assert [DeadLetter.model_validate_json(m.payload).reason for m in letters] == ["schema"]
    wait_until(lambda: 2 in _verdict_seqs(col), what="the verdict of seq 2")
    store = HistoryStore(url)
    try:
        wait_until(lambda: [r["seq"] for r in store.readings("m1")] == [2], what="seq 2 stored")
        for proc in procs:
            proc.kill()  # crash both; the broker keeps what they had not acknowledged
        procs = [detector(), start_recorder()]
        _publish(settings, topics.telemetry("line1", "m1"), reading("m1", 3).encode())
        wait_until(lambda: 3 in _verdict_seqs(col), what="the verdict of seq 3 after restart")
        wait_until(lambda: [r["seq"] for r in store.readings("m1")] == [2, 3], what="seq 3 stored")
    finally:
        store.close()
    assert all(proc.running() for proc in procs)
    assert not any("Traceback" in proc.log() for proc in procs)


def test_the_recorder_loses_nothing_when_postgresql_drops_its_connections(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    settings: BrokerSettings,
    mqtt_args: list[str],
) -> None:
    """While its PostgreSQL connections are terminated again and again (pg_terminate_backend,
    as a server restart does), the recorder stores every reading and does not exit."""
    app = f"fwrec_{uuid.uuid4().hex[:10]}"
    with history_url("postgresql", tmp_path) as (base, schema):
        assert schema is not None
        url = f"{base}?application_name={app}"
        recorder = spawn(
            "history", "record", *mqtt_args, "--db", url, "--db-schema", schema,
            "--client-id", f"rec-{app}",
        )  # fmt: skip
        recorder.wait_log("history_subscribed")
        admin = sa.create_engine(PG_BASE_URL)
        killed: list[int] = []
        stop = threading.Event()

        def terminate_recorder_backends() -> None:
            query = sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :app"
            )
            while not stop.wait(0.05):
                with admin.begin() as conn:
                    killed.append(int(conn.execute(query, {"app": app}).scalar_one()))

        store = HistoryStore(base, schema=schema)
        try:
            publisher = publish_plan(settings, "m1", [1500.0] * 20)
            wait_until(lambda: len(store.readings("m1")) == 20, what="the first 20 readings")
            killer = threading.Thread(target=terminate_recorder_backends, daemon=True)
            killer.start()
            sent = 20

            def publish_one_more() -> bool:
                # keep the recorder writing until three of its connections were terminated:
                # an idle recorder holds at most one connection to terminate
                nonlocal sent
                publisher.publish(reading("m1", sent))
                sent += 1
                return sent >= 220 and sum(killed) >= 3

            wait_until(
                publish_one_more, timeout=60, poll_s=0.01,
                what="three terminated recorder connections while readings arrive",
            )  # fmt: skip
            stop.set()
            killer.join(10)
            wait_until(
                lambda: len(store.readings("m1")) == sent, timeout=90, what=f"all {sent} readings"
            )
            assert [r["seq"] for r in store.readings("m1")] == list(range(sent))
            publisher.close()
        finally:
            stop.set()
            store.close()
            admin.dispose()
        assert recorder.running()
        assert "Traceback" not in recorder.log()
        print(
            f"recorder connections terminated: {sum(killed)}, write retries: "
            f"{recorder.log().count('history_write_failed')}, readings lost: 0 of {sent}"
        )
