"""The detector shell in-process on the memory transport: engine, acks, checkpoint, restart."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from factorywatch.contracts import AckCommand, AlertEvent, MachineState, Telemetry, Verdict
from factorywatch.detector.mosquitto_shell import DetectorService
from factorywatch.detector.transport import MemoryTransport
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics
from tests.support import TYPICAL, reading

ROOT = "unit"
TOPICS = Topics(ROOT)
NORMAL = TYPICAL
# Far outside the training envelope: an ALERT whatever the forest says.
ANOMALOUS = {**NORMAL, "torque_nm": 400.0}


@pytest.fixture(scope="module")
def model(small_model_dir: Path) -> LoadedModel:
    """The small fixture model, as the detector loads it."""
    return artifact.load(small_model_dir)


class Harness:
    """A detector shell on a memory transport, with a state directory that outlives it."""

    def __init__(self, model_dir: Path, model: LoadedModel, state_dir: Path) -> None:
        self.settings = DetectorSettings(
            client_id="det-unit",
            state_dir=state_dir,
            metrics_port=0,
            alert_k=2,
            alert_n=3,
            alert_m=3,
            alert_clear_score=0.99,
        )
        self.transport = MemoryTransport()
        self.service = DetectorService(
            self.settings,
            BrokerSettings(topic_root=ROOT),
            model_dir,
            model,
            transport=self.transport,
        )
        self.service.start()
        self.clock = 1_700_000_000.0

    def send(self, machine: str, seq: int, readings: dict[str, float], ts: float) -> int:
        """Deliver one reading and run one turn of the loop."""
        payload = Telemetry(
            machine_id=machine,
            line="line1",
            seq=seq,
            ts=ts,
            attributes={"product_type": "M"},
            readings=readings,
        ).encode()
        token = self.transport.deliver(TOPICS.telemetry("line1", machine), payload)
        self.service.turn(timeout=0.0)
        return token

    def settle(self) -> None:
        """One more turn: confirmations arrive, acks go out, the checkpoint is flushed."""
        self.service.turn(timeout=0.0)

    def events(self) -> list[AlertEvent]:
        """Every alert event published so far."""
        return [
            AlertEvent.model_validate_json(s.payload)
            for s in self.transport.published
            if s.topic.endswith("/event")
        ]

    def verdicts(self) -> list[Verdict]:
        """Every verdict published so far."""
        return [
            Verdict.model_validate_json(s.payload)
            for s in self.transport.published
            if s.topic.endswith("/verdict")
        ]

    def crash(self) -> None:
        """Die like ``kill -9``: what was flushed stays on disk, nothing else happens."""
        self.service.checkpoint.close()

    def state(self, machine: str) -> MachineState:
        """The last retained state published for ``machine``."""
        last = [s for s in self.transport.published if s.topic == TOPICS.state("line1", machine)]
        return MachineState.model_validate_json(last[-1].payload)


def test_every_reading_gets_a_verdict_and_is_acked_after_it(make: Make, now: float) -> None:
    """A message is acknowledged only at the turn after its verdict was confirmed."""
    h = make()
    token = h.send("m1", 1, NORMAL, now)
    assert [v.seq for v in h.verdicts()] == [1]
    assert token not in h.transport.acked  # the verdict is not confirmed yet
    h.settle()
    assert token in h.transport.acked


def test_redelivery_gets_its_first_verdict_again_and_a_reused_id_is_dead_lettered(
    make: Make, now: float
) -> None:
    """Same id and content: not scored again, answered with the very verdict it got (its
    sensor may never have heard it); same id, new content: duplicate_id."""
    h = make()
    h.send("m1", 5, NORMAL, now)
    h.settle()
    again = h.send("m1", 5, NORMAL, now)
    reused = h.send("m1", 5, NORMAL, now + 1.0)
    h.settle()
    verdicts = [s.payload for s in h.transport.published if s.topic.endswith("/verdict")]
    assert len(verdicts) == 2
    assert verdicts[0] == verdicts[1]
    assert len(h.service.engine.record("m1").window) == 1  # counted once
    assert h.service.counters.reanswered == 1
    letters = [json.loads(s.payload) for s in h.transport.published if "/deadletter/" in s.topic]
    assert [d["reason"] for d in letters] == ["duplicate_id"]
    assert again in h.transport.acked
    assert reused in h.transport.acked


def test_a_refused_verdict_leaves_its_reading_unacknowledged(make: Make, now: float) -> None:
    """When the transport refuses the verdict, the reading is not acked, and its redelivery
    is scored again (not dropped as a duplicate: its verdict was never delivered) without
    counting twice in the machine's alert window."""
    h = make()
    h.transport.refuse_prefixes = (f"{ROOT}/alerts/",)
    token = h.send("m1", 1, NORMAL, now)
    h.settle()
    assert token not in h.transport.acked
    assert h.service.counters.publish_failures >= 1
    h.transport.refuse_prefixes = ()
    again = h.send("m1", 1, NORMAL, now)  # the broker redelivers the unacknowledged reading
    h.settle()
    assert again in h.transport.acked
    assert [v.seq for v in h.verdicts()] == [1, 1]  # refused once, then delivered
    assert len(h.service.engine.record("m1").window) == 1


def test_an_alert_open_before_a_crash_clears_after_the_restart(make: Make, now: float) -> None:
    """kill -9 in-process: a new shell on the same state clears the alert and keeps the ack."""
    first = make()
    first.send("m1", 1, ANOMALOUS, now)
    first.send("m1", 2, ANOMALOUS, now)
    raised = [e for e in first.events() if e.event == "ALERT_RAISED"]
    assert len(raised) == 1
    ack = AckCommand(machine_id="m1", by="ana", alert_id=raised[0].alert_id)
    first.transport.deliver(TOPICS.ack("line1", "m1"), ack.encode())
    first.settle()
    first.settle()
    assert [e.event for e in first.events()] == ["ALERT_RAISED", "ALERT_ACKNOWLEDGED"]
    # The process dies here: no shutdown, no final snapshot.
    second = make()
    assert second.service.engine.record("m1").alert_id == raised[0].alert_id
    for seq in range(3, 6):
        second.send("m1", seq, NORMAL, now + seq)
    second.settle()
    cleared = [e for e in second.events() if e.event == "ALERT_CLEARED"]
    assert len(cleared) == 1
    assert cleared[0].alert_id == raised[0].alert_id
    assert second.state("m1").state == "NORMAL"
    assert second.state("m1").alerts_raised == 1


def test_an_acknowledgement_survives_a_restart(make: Make, now: float) -> None:
    """The restored state of an open, acknowledged alert still says who acknowledged it."""
    first = make()
    first.send("m1", 1, ANOMALOUS, now)
    first.send("m1", 2, ANOMALOUS, now)
    first.transport.deliver(
        TOPICS.ack("line1", "m1"), AckCommand(machine_id="m1", by="ana").encode()
    )
    first.settle()
    second = make()
    second.send("m1", 3, ANOMALOUS, now + 3)
    state = second.state("m1")
    assert state.state == "ALERT"
    assert state.acknowledged_by == "ana"


def test_an_event_unconfirmed_at_the_crash_is_republished(make: Make, now: float) -> None:
    """The outbox: ALERT_RAISED whose publish was never confirmed comes again after restart."""
    first = make()
    first.send("m1", 1, ANOMALOUS, now)
    first.send("m1", 2, ANOMALOUS, now)  # raises; the crash comes before its confirmation
    raised = [e for e in first.events() if e.event == "ALERT_RAISED"]
    second = make()
    again = [e for e in second.events() if e.event == "ALERT_RAISED"]
    assert [e.alert_id for e in again] == [raised[0].alert_id]
    second.settle()
    third = make()
    assert [e for e in third.events() if e.event == "ALERT_RAISED"] == []


def test_a_redelivered_reading_after_restart_gets_no_second_verdict(make: Make, now: float) -> None:
    """Readings answered before the crash are recognised by their id after the restart (the
    verdicts themselves are not kept across it: such a duplicate is not answered again)."""
    first = make()
    for seq in range(1, 4):
        first.send("m1", seq, NORMAL, now + seq)
    first.settle()
    second = make()
    for seq in range(1, 4):
        second.send("m1", seq, NORMAL, now + seq)
    second.settle()
    assert second.verdicts() == []
    assert second.service.counters.duplicates == 3


def test_a_clean_stop_snapshots_everything(make: Make, now: float, tmp_path: Path) -> None:
    """After a clean shutdown the snapshot alone restores every machine, the drift window too."""
    first = make()
    for i, machine in enumerate(["a", "b", "c"]):
        first.send(machine, 1, NORMAL, now + i)
    first.service.shutdown()
    journals = list(tmp_path.glob("det-unit.journal.*"))
    assert [p.stat().st_size for p in journals] == [0]
    second = make()
    assert sorted(
        r.machine_id for r in second.service.engine.records(second.service.engine.machines())
    ) == ["a", "b", "c"]
    assert second.service.engine.drift.figures().readings == 3


Make = Callable[[], Harness]


@pytest.fixture
def make(small_model_dir: Path, model: LoadedModel, tmp_path: Path) -> Iterator[Make]:
    """Shells on one state directory; each one not stopped is "killed" at teardown."""
    made: list[Harness] = []

    def build() -> Harness:
        for previous in made:
            previous.crash()
        made.append(Harness(small_model_dir, model, tmp_path))
        return made[-1]

    yield build
    made[-1].crash()


@pytest.fixture
def now() -> float:
    """A fixed wall-clock time near the detector's (readings are checked against its clock)."""
    import time  # noqa: PLC0415 - only the fixture reads the clock

    return time.time()


@pytest.mark.parametrize("linger_ms", [100.0, 0.0])
def test_a_busy_stream_lingers_once_for_more_readings_to_score_together(
    make: Make, now: float, linger_ms: float
) -> None:
    """While readings come back to back, a turn that received some waits ``batch_linger_ms``
    once and scores what arrived meanwhile in the same batch; with 0 it never waits."""
    h = make()
    h.service.settings = h.settings.model_copy(update={"batch_linger_ms": linger_ms})
    reads: list[float] = []
    receive = h.transport.receive
    late = reading("m3", 1, ts=now, product_type="M").encode()

    def reading_arrives_while_lingering(timeout: float) -> list[Any]:
        reads.append(timeout)
        if len(reads) == 3:  # the second turn's second read: m3 came in meanwhile
            h.transport.deliver(TOPICS.telemetry("line1", "m3"), late)
        return receive(timeout)

    h.transport.receive = reading_arrives_while_lingering  # type: ignore[method-assign]
    h.send("m1", 1, NORMAL, now)  # the first arrival: nothing to go by, no wait
    h.send("m2", 1, NORMAL, now)  # right after it: a busy stream
    scored = {v.machine_id for v in h.verdicts()}
    if linger_ms:
        assert scored == {"m1", "m2", "m3"}  # m3 joined m2's batch
        assert len(reads) == 3
    else:
        assert scored == {"m1", "m2"}
        assert len(reads) == 2
