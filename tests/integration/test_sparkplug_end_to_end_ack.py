"""End-to-end acknowledgement of our Sparkplug edge node against a real Mosquitto (logins and the
project's ACL: the edge node reads only its registered devices' answers) and a real detector
with Sparkplug: each reading is kept until its verdict is heard and sent again, as DDATA of the
next session, after a reconnect; the detector scores each reading once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from factorywatch.broker import LocalBroker
from factorywatch.contracts import Verdict
from factorywatch.credentials import init_secrets
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.sensors.sparkplug import EdgeNode, EdgeNodeClient
from factorywatch.topics import Topics
from tests.support import (
    Collector,
    Proc,
    add_account,
    login_settings,
    start_secure_detector,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GROUP, NODE, DEVICES = "plant1", "press7", ("m1", "m2")
SPARKPLUG_ENV = {
    "FACTORYWATCH_DETECTOR_SPARKPLUG": "true",
    "FACTORYWATCH_DETECTOR_SPARKPLUG_REORDER_TIMEOUT_S": "0.5",
    "FACTORYWATCH_DETECTOR_SPARKPLUG_REBIRTH_BACKOFF_S": "0",
}


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """Broker accounts for the services, the edge node (its two devices) and another one."""
    directory = tmp_path / "secrets"
    init_secrets(directory, ())
    add_account(directory, NODE, "edge-node", line=GROUP, machines=DEVICES)
    add_account(directory, "edge9", "edge-node", line=GROUP, machines=("m1",))
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
    """Start a real detector with Sparkplug (persistent session) on the secure broker."""

    def start() -> Proc:
        return start_secure_detector(
            spawn,
            secure_broker.port,
            topic_root,
            secrets_dir,
            model_dir,
            tmp_path / "detector-state",
            env=SPARKPLUG_ENV,
        )

    return start


@pytest.fixture
def verdicts(secure_broker: LocalBroker, secrets_dir: Path, topic_root: str) -> Iterator[Collector]:
    """The monitor account's view of every verdict and dead letter."""
    topics = Topics(topic_root)
    col = Collector(
        login_settings(secure_broker.port, topic_root, secrets_dir, "monitor"),
        [topics.alerts_filter, topics.deadletter_filter],
        "spb-e2e-monitor",
    )
    yield col
    col.close()


@pytest.fixture
def sims() -> dict[str, MachineSimulator]:
    """One simulated machine per device."""
    return {
        d: MachineSimulator(d, GROUP, seed=i, seq_start=100 * (i + 1))
        for i, d in enumerate(DEVICES)
    }


def _edge_node(port: int, topic_root: str, secrets_dir: Path, node: str = NODE) -> EdgeNodeClient:
    settings = login_settings(port, topic_root, secrets_dir, node)
    shell = EdgeNodeClient(settings, EdgeNode(GROUP, node, list(DEVICES), bd_seq=1))
    shell.start()
    return shell


@pytest.fixture
def edge(
    secure_broker: LocalBroker, secrets_dir: Path, topic_root: str
) -> Iterator[EdgeNodeClient]:
    """The product's edge node shell, logged in as the edge node; its run loop is the test."""
    shell = _edge_node(secure_broker.port, topic_root, secrets_dir)
    yield shell
    shell.close(timeout_s=10)


def _births(edge: EdgeNodeClient, sims: dict[str, MachineSimulator]) -> None:
    """What the run loop does when births are asked for: births, then any sends again."""
    wait_until(edge.rebirth.is_set, 30, "the edge node's (re)connection")
    edge.rebirth.clear()
    now = time.time()
    edge.births({d: sims[d].next(now) for d in DEVICES}, int(now * 1000))


def _data(edge: EdgeNodeClient, sims: dict[str, MachineSimulator], rounds: int) -> None:
    for _ in range(rounds):
        now = time.time()
        for device in DEVICES:
            edge.data(device, sims[device].next(now), int(now * 1000))


def _answered(edge: EdgeNodeClient, sims: dict[str, MachineSimulator]) -> bool:
    """Whether every reading was answered; births when asked for meanwhile (the run loop's
    part: a detector that missed a birth asks for one)."""
    if edge.rebirth.is_set():
        _births(edge, sims)
    return sum(len(p) for p in edge.pending.values()) == 0


def _made(sims: dict[str, MachineSimulator]) -> int:
    """Readings the devices made so far (each one went out: a birth or a DDATA)."""
    return sum(sim.seq - 100 * (i + 1) for i, sim in enumerate(sims.values()))


def _pending(edge: EdgeNodeClient) -> int:
    return sum(len(p) for p in edge.pending.values())


def _stopped(detector: Proc) -> dict[str, int]:
    assert detector.terminate() == 0
    lines = [json.loads(x) for x in detector.log().splitlines() if '"detector_stopped"' in x]
    return {k: v for k, v in lines[-1].items() if isinstance(v, int)}


def _deaf(edge: EdgeNodeClient) -> None:
    """Make the edge node miss its answers (as if the broker lost them on their way to it)."""
    info = edge.client.unsubscribe([d.verdict_topic for d in edge.devices.values()])
    assert info[0] == 0


def test_an_edge_node_hears_its_devices_answers_and_no_other_node_does(
    edge: EdgeNodeClient,
    start_detector: Callable[[], Proc],
    sims: dict[str, MachineSimulator],
    secure_broker: LocalBroker,
    secrets_dir: Path,
    topic_root: str,
) -> None:
    """With the generated ACL the edge node reads the verdicts of its own devices (every
    reading answered); another edge node subscribed to them gets none of them."""
    start_detector()
    theirs = [d.verdict_topic for d in edge.devices.values()]
    other = Collector(
        login_settings(secure_broker.port, topic_root, secrets_dir, "edge9"), theirs, "edge9"
    )
    try:
        _births(edge, sims)
        _data(edge, sims, 3)
        wait_until(lambda: _answered(edge, sims), 60, "every reading answered")
        assert edge.stats.answered == _made(sims) >= 8  # a birth and three data per device
        assert edge.stats.resent == 0
        assert other.messages == []  # delivered with press7's copies, had the ACL allowed it
    finally:
        other.close()


def test_readings_acknowledged_and_lost_are_sent_again_in_the_next_session(
    edge: EdgeNodeClient,
    secure_broker: LocalBroker,
    start_detector: Callable[[], Proc],
    sims: dict[str, MachineSimulator],
) -> None:
    """Births and data acknowledged while nobody could take them (gone, as after a broker
    kill -9) are sent again after the reconnect's births, and each is scored once."""
    _births(edge, sims)
    _data(edge, sims, 3)
    wait_until(lambda: edge.stats.acknowledged == edge.stats.sent, 10, "the PUBACKs")
    assert _pending(edge) == 8  # acknowledged by the broker, answered by nobody
    detector = start_detector()
    secure_broker.stop()
    secure_broker.start()
    _births(edge, sims)  # the new session's births (2 readings), then the 8 again
    wait_until(lambda: _answered(edge, sims), 60, "every reading answered")
    assert edge.stats.resent == 8
    assert edge.stats.answered == _made(sims) >= 10
    stopped = _stopped(detector)
    assert stopped["verdicts"] == _made(sims), "each reading scored once"


def test_a_reading_whose_verdict_was_lost_gets_the_same_verdict_again(
    edge: EdgeNodeClient,
    secure_broker: LocalBroker,
    start_detector: Callable[[], Proc],
    sims: dict[str, MachineSimulator],
    verdicts: Collector,
) -> None:
    """The detector scored the readings but the edge node never heard the verdicts: sent
    again in the next session (new NBIRTH, new Sparkplug seqs), they are duplicates,
    answered with the identical verdicts and not scored again."""
    detector = start_detector()
    wait_until(edge.rebirth.is_set, 30, "the edge node's connection")
    _deaf(edge)
    _births(edge, sims)
    _data(edge, sims, 3)
    verdicts.wait_for(lambda m: m.topic.endswith("/verdict"), count=8)
    assert _pending(edge) == 8
    secure_broker.stop()
    secure_broker.start()
    _births(edge, sims)
    wait_until(lambda: _answered(edge, sims), 60, "every reading answered")
    assert edge.stats.answered == _made(sims) >= 10  # the first 8 heard only now
    stopped = _stopped(detector)
    assert stopped["verdicts"] == _made(sims), "each reading is scored once"
    assert stopped["reanswered"] >= 8
    assert not verdicts.matching(lambda m: "/deadletter/" in m.topic)
    by_key: dict[tuple[str, int], set[bytes]] = {}
    for m in verdicts.matching(lambda m: m.topic.endswith("/verdict")):
        verdict = Verdict.model_validate_json(m.payload)
        by_key.setdefault((verdict.machine_id, verdict.seq), set()).add(m.payload)
    assert all(len(p) == 1 for p in by_key.values()), "a duplicate gets the verdict it got"


def test_an_overdue_reading_is_sent_again_without_a_reconnect(
    secure_broker: LocalBroker,
    secrets_dir: Path,
    topic_root: str,
    start_detector: Callable[[], Proc],
    sims: dict[str, MachineSimulator],
    verdicts: Collector,
) -> None:
    """While connected, a reading unanswered for longer than ``republish_after_s`` after a
    later reading of its device was answered is sent again (a DDATA of the same session), and
    answered with the verdict it got."""
    start_detector()
    settings = login_settings(secure_broker.port, topic_root, secrets_dir, NODE)
    edge = EdgeNodeClient(
        settings, EdgeNode(GROUP, NODE, list(DEVICES), bd_seq=1), republish_after_s=0.5
    )
    edge.start()
    try:
        wait_until(edge.rebirth.is_set, 30, "the edge node's connection")
        _deaf(edge)
        _births(edge, sims)
        _data(edge, sims, 2)
        verdicts.wait_for(lambda m: m.topic.endswith("/verdict"), count=6)
        early = {device: set(p.seqs()) for device, p in edge.pending.items()}
        assert sum(map(len, early.values())) == 6
        edge.client.subscribe([(d.verdict_topic, 0) for d in edge.devices.values()])

        def overdue_ones_answered() -> bool:
            _data(edge, sims, 1)  # later readings, answered now
            edge.resend_overdue(time.monotonic())  # as the run loop does every round
            return not any(early[d] & set(edge.pending[d].seqs()) for d in early)

        wait_until(overdue_ones_answered, 30, "the overdue readings answered", poll_s=0.3)
        assert edge.stats.resent >= 6
        assert not verdicts.matching(lambda m: "/deadletter/" in m.topic)
    finally:
        edge.close(timeout_s=10)
