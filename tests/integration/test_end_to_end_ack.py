"""End-to-end acknowledgement against a real Mosquitto (logins and the project's ACL) and a real
detector: a sensor keeps each reading until it hears the detector's verdict, sends the
unanswered ones again after a reconnect (or when overdue), and the detector answers a reading
it already scored with the very verdict it gave."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from factorywatch.broker import LocalBroker
from factorywatch.contracts import Verdict
from factorywatch.credentials import init_secrets
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.topics import Topics
from tests.support import (
    Collector,
    Proc,
    login_settings,
    reading,
    start_secure_detector,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MACHINE = "press-1"


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """Broker accounts for one machine and the services."""
    directory = tmp_path / "secrets"
    init_secrets(directory, (MACHINE,))
    return directory


@pytest.fixture
def start_detector(
    spawn: Callable[..., Proc],
    secure_broker: LocalBroker,
    secrets_dir: Path,
    topic_root: str,
    model_dir: Path,
    tmp_path: Path,
) -> Callable[[], Proc]:
    """Start a real detector (persistent session) on the secure broker, wait until subscribed."""

    def start() -> Proc:
        return start_secure_detector(
            spawn,
            secure_broker.port,
            topic_root,
            secrets_dir,
            model_dir,
            tmp_path / "detector-state",
        )

    return start


@pytest.fixture
def verdicts(secure_broker: LocalBroker, secrets_dir: Path, topic_root: str) -> Iterator[Collector]:
    """The monitor account's view of every verdict."""
    col = Collector(
        login_settings(secure_broker.port, topic_root, secrets_dir, "monitor"),
        [Topics(topic_root).alerts_filter],
        "e2e-monitor",
    )
    yield col
    col.close()


@pytest.fixture
def sensor(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> Iterator[SensorPublisher]:
    """The product's publisher for the machine, logged in as the machine."""
    settings = login_settings(secure_broker.port, topic_root, secrets_dir, MACHINE)
    pub = SensorPublisher(settings, MACHINE, buffer_size=1000, republish_after_s=0.5)
    pub.start()
    yield pub
    pub.close(timeout_s=10)


def _verdict_payloads(col: Collector, seq: int) -> list[bytes]:
    return [
        m.payload
        for m in col.messages
        if m.topic.endswith(f"/{MACHINE}/verdict")
        and Verdict.model_validate_json(m.payload).seq == seq
    ]


def _deaf(pub: SensorPublisher) -> None:
    """Make the sensor miss its answers (as if the broker lost them on their way to it)."""
    info = pub.client.unsubscribe(list(pub.answer_filters))
    assert info[0] == 0


def test_readings_the_broker_acknowledged_and_lost_are_sent_again_after_a_reconnect(
    sensor: SensorPublisher,
    secure_broker: LocalBroker,
    start_detector: Callable[[], Proc],
) -> None:
    """Readings acknowledged while nobody could take them (gone, as after a broker kill -9)
    are sent again once the sensor reconnects, and each then gets its verdict."""
    for seq in range(5):
        assert sensor.publish(reading(MACHINE, seq))
    wait_until(lambda: sensor.stats.acknowledged == 5, 10, "the PUBACKs")
    assert len(sensor.pending) == 5  # acknowledged by the broker, answered by nobody
    detector = start_detector()
    secure_broker.stop()
    secure_broker.start()
    wait_until(lambda: len(sensor.pending) == 0, 60, "every reading answered")
    assert sensor.stats.resent == 5
    assert sensor.stats.answered == 5
    assert sensor.stats.sent == sensor.stats.acknowledged == 5  # sends again are not readings
    assert detector.terminate() == 0
    stopped = [json.loads(x) for x in detector.log().splitlines() if '"detector_stopped"' in x]
    assert stopped[-1]["verdicts"] == 5, "each reading scored once, after it was sent again"


def test_a_reading_whose_verdict_was_lost_gets_the_same_verdict_again(
    sensor: SensorPublisher,
    secure_broker: LocalBroker,
    start_detector: Callable[[], Proc],
    verdicts: Collector,
) -> None:
    """The detector scored the readings, but their verdicts never reached the sensor: sent
    again after a reconnect, they are duplicates, answered with the identical verdicts."""
    detector = start_detector()
    _deaf(sensor)
    for seq in range(3):
        assert sensor.publish(reading(MACHINE, seq))
    verdicts.wait_for(lambda m: m.topic.endswith("/verdict"), count=3)
    assert len(sensor.pending) == 3
    secure_broker.stop()
    secure_broker.start()
    wait_until(lambda: len(sensor.pending) == 0, 60, "every reading answered")
    assert sensor.stats.answered == 3  # heard only now: the first verdicts went unheard
    assert detector.terminate() == 0
    stopped = [json.loads(x) for x in detector.log().splitlines() if '"detector_stopped"' in x]
    assert stopped[-1]["verdicts"] == 3, "each reading is scored once"
    # the broker may also redeliver a reading whose ack the restart cut off: answered again too
    assert stopped[-1]["reanswered"] >= 3
    # The monitor (a clean session, away while the broker restarts) may miss a copy, but every
    # copy it got of a reading's verdict is the same bytes.
    for seq in range(3):
        payloads = _verdict_payloads(verdicts, seq)
        assert payloads, f"no verdict for {seq}"
        assert len(set(payloads)) == 1, "a duplicate must get the verdict it already got"


def test_an_overdue_reading_is_sent_again_without_a_reconnect(
    sensor: SensorPublisher, start_detector: Callable[[], Proc], verdicts: Collector
) -> None:
    """While connected, a reading unanswered for longer than ``republish_after_s`` after a
    later reading was answered is sent again, and answered."""
    start_detector()
    _deaf(sensor)
    for seq in range(3):
        assert sensor.publish(reading(MACHINE, seq))
    verdicts.wait_for(lambda m: m.topic.endswith("/verdict"), count=3)
    sensor.client.subscribe([(f, 0) for f in sensor.answer_filters])
    seq = 3

    def overdue_ones_answered() -> bool:
        nonlocal seq
        sensor.publish(reading(MACHINE, seq))  # each publish may look for overdue readings
        seq += 1
        return not {0, 1, 2} & set(sensor.pending.seqs())

    wait_until(overdue_ones_answered, 30, "the overdue readings answered", poll_s=0.3)
    assert sensor.stats.resent >= 3
    for old in range(3):
        assert len(_verdict_payloads(verdicts, old)) >= 2
