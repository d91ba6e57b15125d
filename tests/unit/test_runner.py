"""The runner's policy, the same tests over the sync and the async in-memory drivers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import pytest

from factorywatch.contracts import ClientStatus, Verdict
from factorywatch.detector.alerting import AlertPolicy
from factorywatch.detector.engine import Engine, EngineSettings
from factorywatch.detector.runner import Runner, RunnerSettings
from factorywatch.detector.store import Changes, Restored
from factorywatch.detector.transport import (
    AsyncMemoryTransport,
    MemoryTransport,
    Sent,
    acommit,
    asend,
    commit,
    send,
)
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.topics import Topics
from tests.support import TYPICAL, reading

TOPICS = Topics("unit-runner")
TS = 1_700_000_000.0
NORMAL_TORQUE = TYPICAL["torque_nm"]


@pytest.fixture(scope="module")
def model(small_model_dir: Path) -> LoadedModel:
    """The small fixture model."""
    return artifact.load(small_model_dir)


class MemoryStore:
    """A store in memory: what was written becomes durable at ``flush`` (which may fail)."""

    def __init__(self) -> None:
        self.written: list[tuple[str, int]] = []
        self.durable: set[str] = set()
        self.fail_next_flush = False

    def load(self) -> Restored:
        """Nothing stored before."""
        return Restored()

    def write(self, changes: Changes) -> None:
        """Hold the answered ids until the flush."""
        self.written += changes.answered

    def _flush(self) -> bool:
        written, self.written = self.written, []
        if self.fail_next_flush:
            self.fail_next_flush = False
            return False
        self.durable.update(identity for identity, _ in written)
        return True

    def flush(self) -> None:
        """Make the written ids durable."""
        self._flush()


class AsyncMemoryStore(MemoryStore):
    """``MemoryStore``'s asyncio twin."""

    async def load(self, prefix: str) -> Restored:  # type: ignore[override]
        """Nothing stored before."""
        del prefix
        return Restored()

    async def flush(self) -> bool:  # type: ignore[override]
        """Make the written ids durable; False once after ``fail_next_flush``."""
        return self._flush()


class Rig(Protocol):
    """A runner on one in-memory driver and store."""

    runner: Runner
    #: (token, the ids durable when it was acked)
    acks: list[tuple[Any, frozenset[str]]]

    @property
    def store(self) -> MemoryStore: ...
    def deliver(self, machine: str, seq: int, torque_nm: float = NORMAL_TORQUE) -> int: ...
    def refuse(self, prefix: str) -> None: ...
    def run(self) -> None: ...
    def published(self) -> list[Sent]: ...


def _runner(model: LoadedModel) -> Runner:
    engine = Engine(
        model,
        TOPICS,
        EngineSettings(policy=AlertPolicy(k=1, n=1, m=1), max_clock_skew_s=10 * 365 * 86400.0),
    )
    return Runner(engine, RunnerSettings(client_id="det-runner", heartbeat_s=7.0))


class SyncRig:
    """The runner over ``MemoryTransport`` (confirmations arrive at the next receive)."""

    def __init__(self, model: LoadedModel) -> None:
        self.runner = _runner(model)
        self._store = MemoryStore()
        self.acks: list[tuple[Any, frozenset[str]]] = []
        rig = self

        class Transport(MemoryTransport):
            def ack(self, token: Any) -> None:
                rig.acks.append((token, frozenset(rig.store.durable)))

        self.transport = Transport()

    def deliver(self, machine: str, seq: int, torque_nm: float = NORMAL_TORQUE) -> int:
        """A reading arrives."""
        payload = reading(machine, seq, ts=TS, torque_nm=torque_nm).encode()
        return self.transport.deliver(TOPICS.telemetry("line1", machine), payload)

    @property
    def store(self) -> MemoryStore:
        """The store the runner writes."""
        return self._store

    def refuse(self, prefix: str) -> None:
        """Refuse publishes whose topic starts with ``prefix`` ('' for none)."""
        self.transport.refuse_prefixes = (prefix,) if prefix else ()

    def run(self) -> None:
        """Two turns: handle what arrived, then its confirmations, store flush and acks."""
        for _ in range(2):
            inbox = self.transport.receive(0.0)
            send(self.runner, self.transport, self.runner.handle(inbox, TS).sends)
            commit(self.runner, self.transport, self.store, records=False, snapshot=False)

    def published(self) -> list[Sent]:
        """Everything published so far."""
        return self.transport.published


class AsyncRig:
    """The runner over ``AsyncMemoryTransport`` (a publish is confirmed when awaited)."""

    def __init__(self, model: LoadedModel) -> None:
        self.runner = _runner(model)
        self._store = AsyncMemoryStore()
        self.acks: list[tuple[Any, frozenset[str]]] = []
        rig = self

        class Transport(AsyncMemoryTransport):
            async def ack(self, token: Any) -> None:
                rig.acks.append((token, frozenset(rig.store.durable)))

        self.transport = Transport()

    def deliver(self, machine: str, seq: int, torque_nm: float = NORMAL_TORQUE) -> int:
        """A reading arrives."""
        payload = reading(machine, seq, ts=TS, torque_nm=torque_nm).encode()
        return self.transport.deliver(TOPICS.telemetry("line1", machine), payload)

    @property
    def store(self) -> AsyncMemoryStore:
        """The store the runner writes."""
        return self._store

    def refuse(self, prefix: str) -> None:
        """Refuse publishes whose topic starts with ``prefix`` ('' for none)."""
        self.transport.refuse_prefixes = (prefix,) if prefix else ()

    def run(self) -> None:
        """One turn: handle, publish and settle, store flush, acks."""

        async def turn() -> None:
            inbox = await self.transport.receive(0.0)
            await asend(self.runner, self.transport, self.runner.handle(inbox, TS).sends)
            await acommit(self.runner, self.transport, self.store)

        asyncio.run(turn())

    def published(self) -> list[Sent]:
        """Everything published so far."""
        return self.transport.published


@pytest.fixture(params=["sync", "async"])
def rig(request: pytest.FixtureRequest, model: LoadedModel) -> Rig:
    """The runner on the sync or the async in-memory driver."""
    return SyncRig(model) if request.param == "sync" else AsyncRig(model)


def _verdicts(rig: Rig) -> list[Verdict]:
    return [
        Verdict.model_validate_json(s.payload) for s in rig.published() if "/verdict" in s.topic
    ]


def test_a_message_is_acked_only_after_its_verdict_confirmed_and_the_store_flushed(
    rig: Rig,
) -> None:
    """Each reading gets one verdict and its ack comes after its id was made durable."""
    tokens = [rig.deliver("m1", seq) for seq in range(3)]
    rig.run()
    assert [(v.machine_id, v.seq) for v in _verdicts(rig)] == [("m1", 0), ("m1", 1), ("m1", 2)]
    assert [token for token, _ in rig.acks] == tokens
    for seq, (_, durable) in enumerate(rig.acks):
        assert f"m1:{seq}" in durable


def test_a_refused_verdict_leaves_its_message_unacked_and_the_redelivery_is_scored(
    rig: Rig,
) -> None:
    """A refused publish: no ack, only that reading's id forgotten, its redelivery scored."""
    rig.deliver("m1", 0)
    rig.run()
    rig.refuse(TOPICS.root)
    refused = rig.deliver("m1", 1)
    rig.run()
    assert refused not in [token for token, _ in rig.acks]
    assert rig.runner.counters.publish_failures >= 1
    rig.refuse("")
    again = rig.deliver("m1", 1)  # the transport's redelivery
    duplicate = rig.deliver("m1", 0)  # an answered reading redelivered: not scored again
    rig.run()
    # m1:1 refused, then its redelivery scored; m1:0's duplicate gets its first verdict again
    assert [(v.machine_id, v.seq) for v in _verdicts(rig)] == [
        ("m1", 0),
        ("m1", 1),
        ("m1", 1),
        ("m1", 0),
    ]
    assert {again, duplicate} <= {token for token, _ in rig.acks}


def test_a_duplicate_is_answered_with_its_verdict_and_acked_only_once_that_confirmed(
    rig: Rig,
) -> None:
    """A reading sent again (same id, same content) is not scored twice: the same verdict
    bytes go out again, and the message is acked only after that publish is confirmed; a
    refused answer leaves it unacknowledged, and its next arrival is answered again."""
    rig.deliver("m1", 0)
    rig.run()
    first = [s.payload for s in rig.published() if "/verdict" in s.topic]
    rig.refuse(TOPICS.root)
    refused = rig.deliver("m1", 0)
    rig.run()
    assert refused not in [token for token, _ in rig.acks]
    rig.refuse("")
    again = rig.deliver("m1", 0)
    rig.run()
    answers = [s.payload for s in rig.published() if "/verdict" in s.topic]
    assert answers == first * 3  # the first, the refused answer, the confirmed answer
    assert again in [token for token, _ in rig.acks]
    assert rig.runner.counters.verdicts == 1  # scored once
    assert rig.runner.counters.reanswered == 2  # answered twice from the cache (once refused)
    assert len(rig.runner.engine.record("m1").window) == 1


def test_a_duplicate_with_other_content_is_still_a_dead_letter(rig: Rig) -> None:
    """A reused id with new content is refused (duplicate_id), never answered from the cache."""
    rig.deliver("m1", 0)
    rig.run()
    rig.deliver("m1", 0, torque_nm=NORMAL_TORQUE + 1.0)
    rig.run()
    assert len(_verdicts(rig)) == 1
    letters = [s for s in rig.published() if "/deadletter/" in s.topic]
    assert len(letters) == 1
    assert b"duplicate_id" in letters[0].payload


def test_an_anomaly_raises_an_alert_on_either_driver(rig: Rig) -> None:
    """The same readings give the same statuses and scores on both drivers."""
    rig.deliver("m1", 0)
    rig.deliver("m1", 1, torque_nm=400.0)
    rig.run()
    statuses = [v.status for v in _verdicts(rig)]
    assert statuses == ["NORMAL", "ALERT"]
    assert any("/event" in s.topic for s in rig.published())


def test_an_async_store_that_cannot_flush_gives_the_messages_back(model: LoadedModel) -> None:
    """A failed flush: no ack, the message given back, and its redelivery scored again."""
    rig = AsyncRig(model)
    rig.store.fail_next_flush = True
    token = rig.deliver("m1", 0)
    rig.run()
    assert rig.acks == []
    assert rig.transport.given_back == [token]
    again = rig.deliver("m1", 0)
    rig.run()
    assert [(v.machine_id, v.seq) for v in _verdicts(rig)] == [("m1", 0), ("m1", 0)]
    assert [t for t, _ in rig.acks] == [again]


def test_the_heartbeat_period_comes_from_the_settings(model: LoadedModel) -> None:
    """``due`` says heartbeat at the first call and then every ``heartbeat_s``, not 15 s."""
    runner = _runner(model)
    assert runner.due(100.0).heartbeat
    assert not runner.due(106.9).heartbeat
    assert runner.due(107.0).heartbeat


def test_status_and_health_are_the_runners(model: LoadedModel) -> None:
    """The retained status names the client and model; health ages with the last turn."""
    runner = _runner(model)
    status = runner.status("online", TS)
    assert status.retain
    assert status.topic == TOPICS.status("detector", "det-runner")
    decoded = ClientStatus.model_validate_json(status.payload)
    assert (decoded.state, decoded.model_version) == ("online", model.version)
    runner.turned(50.0)
    assert runner.health(connected=True, now=55.0)[0]
    assert not runner.health(connected=True, now=61.0)[0]
    assert not runner.health(connected=False, now=50.0)[0]


def test_each_verdict_of_a_batch_carries_its_own_readings_id(model: LoadedModel) -> None:
    """A gateway batch holding a reading sent again (answered from the cache) before a new
    one: each verdict's message id is its own reading's (a transport that de-duplicates by
    message id, as JetStream does, then drops only a true second verdict)."""
    from factorywatch.contracts import TelemetryBatch  # noqa: PLC0415
    from factorywatch.detector.engine import Inbound  # noqa: PLC0415

    runner = _runner(model)
    first = reading("m1", 0, ts=TS)
    topic = TOPICS.batch("line1", "gw1")
    runner.handle([Inbound(topic, TelemetryBatch(readings=[first]).encode(), TS, 0.0)], TS)
    batch = TelemetryBatch(readings=[first, reading("m1", 1, ts=TS + 1)])
    handled = runner.handle([Inbound(topic, batch.encode(), TS + 1, 0.0)], TS + 1)
    verdicts = [s for s in handled.sends if s.publish.topic.endswith("/verdict")]
    ids = [s.msg_id for s in verdicts]
    seqs = [Verdict.model_validate_json(s.publish.payload).seq for s in verdicts]
    assert list(zip(seqs, ids, strict=True)) == [(0, "m1:0"), (1, "m1:1")]


def test_changed_records_are_journaled_a_slice_per_turn_once_their_cadence_came(
    model: LoadedModel,
) -> None:
    """``records``: every record changed until then, RECORDS_PER_TURN per call, until all
    are written (``journaling`` meanwhile); a record changed again after its slice waits for
    the next cadence; with a snapshot too, all at once."""
    from factorywatch.detector.engine import Inbound  # noqa: PLC0415
    from factorywatch.detector.runner import RECORDS_PER_TURN, Settled  # noqa: PLC0415

    runner = _runner(model)
    machines = [f"m{i:03d}" for i in range(2 * RECORDS_PER_TURN + 10)]

    def readings(seq: int, of: list[str]) -> None:
        batch = [
            Inbound(TOPICS.telemetry("line1", m), reading(m, seq, ts=TS).encode(), TS, 0.0)
            for m in of
        ]
        runner.handle(batch, TS)

    readings(0, machines)
    runner.engine.take_urgent()  # the first verdicts' own turn (alerts would be urgent)
    written: list[str] = []
    first = runner.changes(Settled(), records=True)
    written += [r.machine_id for r in first.records]
    assert len(first.records) == RECORDS_PER_TURN
    assert runner.journaling
    readings(1, [machines[0]])  # written in the first slice, changed again
    while runner.journaling:
        written += [r.machine_id for r in runner.changes(Settled()).records]
    assert written == machines  # each once, in order
    assert runner.changes(Settled()).records == []
    assert [r.machine_id for r in runner.changes(Settled(), records=True).records] == [machines[0]]
    readings(2, machines)
    everything = runner.changes(Settled(), records=True, snapshot=True)
    assert [r.machine_id for r in everything.records] == machines
    assert not runner.journaling
