"""The poison-message rule: one message never stops the detector or the recorder (#25)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from factorywatch.contracts import DeadLetter, Telemetry
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.detector.engine import Engine, Inbound
from factorywatch.detector.ingest import JsonIngest, Reading
from factorywatch.detector.mosquitto_shell import DetectorService
from factorywatch.detector.transport import MemoryTransport
from factorywatch.errors import PayloadError
from factorywatch.history_recorder import Recorder
from factorywatch.history_store import HistoryError, HistorySettings, HistoryStore
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics
from tests.support import reading

ROOT = "poison"
TOPICS = Topics(ROOT)
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def model(small_model_dir: Path) -> LoadedModel:
    """The small fixture model, as the detector loads it."""
    return artifact.load(small_model_dir)


class LeakyIngest:
    """The JSON ingest with a decoder bug on one machine: its readings skip validation and
    carry a seq no wire schema allows (what a decoder that forgot a bound lets through)."""

    def __init__(self, inner: JsonIngest) -> None:
        self.inner = inner

    def accepts(self, topic: str) -> bool:
        """Whatever the JSON ingest accepts."""
        return self.inner.accepts(topic)

    def decode(self, message: Received) -> list[Reading | PayloadError]:
        """The JSON ingest's readings; machine ``leaky``'s unchecked, with seq = 2**70."""
        if not message.topic.endswith("/leaky"):
            return self.inner.decode(message)
        data = json.loads(message.payload)
        data.update(seq=2**70, attributes={"product_type": data.pop("product_type", "L")})
        data.pop("schema_version", None)
        telemetry = Telemetry.model_construct(**data)
        return [Reading(telemetry, f"leaky:{2**70}", 1)]


def test_a_reading_failing_after_decoding_is_dead_lettered_and_the_batch_goes_on(
    model: LoadedModel,
) -> None:
    """A reading that breaks scoring is dead-lettered (processing_failed); the readings
    before and after it in the same batch still get their verdicts."""
    decoder = Decoder(TOPICS, channels=model.card.channels, max_clock_skew_s=7 * 86400.0)
    engine = Engine(model, TOPICS, ingest=LeakyIngest(JsonIngest(TOPICS, decoder)))

    def inbound(machine: str, seq: int) -> Inbound:
        payload = reading(machine, seq, ts=T0).encode()
        return Inbound(TOPICS.telemetry("line1", machine), payload, T0, 0.0)

    outcomes = engine.handle([inbound("m1", 1), inbound("leaky", 2), inbound("m2", 3)], T0)
    assert [len(o.verdicts) for o in outcomes] == [1, 0, 1]
    assert [e.reason for e in outcomes[1].rejected] == ["processing_failed"]
    (letter,) = [p for p in outcomes[1].publishes if "/deadletter/" in p.topic]
    assert DeadLetter.model_validate_json(letter.payload).reason == "processing_failed"
    assert engine.snapshot()["states"]  # the state is still whole and snapshots


class Shell:
    """A detector shell on a memory transport, with a state directory that outlives it."""

    def __init__(self, model_dir: Path, model: LoadedModel, state_dir: Path) -> None:
        settings = DetectorSettings(client_id="det-poison", state_dir=state_dir, metrics_port=0)
        self.transport = MemoryTransport()
        self.service = DetectorService(
            settings,
            BrokerSettings(topic_root=ROOT),
            model_dir,
            model,
            transport=self.transport,
        )
        self.service.start()

    def deliver(self, payload: bytes, machine: str = "m1") -> int:
        """Deliver one telemetry payload and run two turns (handle, then confirm and ack)."""
        token = self.transport.deliver(TOPICS.telemetry("line1", machine), payload)
        self.service.turn(timeout=0.0)
        self.service.turn(timeout=0.0)
        return token


@pytest.fixture
def shells(small_model_dir: Path, model: LoadedModel, tmp_path: Path) -> Iterator[list[Shell]]:
    """Detector shells on one state directory (each new one after the last "crashed")."""
    made: list[Shell] = []
    yield made
    for shell in made:
        shell.service.checkpoint.close()


@pytest.mark.parametrize("seq", [2**63, 2**70])
def test_a_huge_seq_is_dead_lettered_acknowledged_and_survives_a_restart(
    small_model_dir: Path, model: LoadedModel, tmp_path: Path, shells: list[Shell], seq: int
) -> None:
    """The #25 crash loop: a 2**70 seq is dead-lettered and acknowledged, the checkpoint is
    written, and a restarted detector on the same state scores the next reading."""
    import time  # noqa: PLC0415 - readings must be near the detector's clock

    now = time.time()
    shells.append(Shell(small_model_dir, model, tmp_path))
    data = json.loads(reading("m1", 1, ts=now).encode())
    token = shells[0].deliver(json.dumps({**data, "seq": seq}).encode())
    assert token in shells[0].transport.acked
    letters = [p for p in shells[0].transport.published if "/deadletter/" in p.topic]
    assert [DeadLetter.model_validate_json(p.payload).reason for p in letters] == ["schema"]
    shells[0].service.checkpoint.close()
    shells.append(Shell(small_model_dir, model, tmp_path))
    token = shells[1].deliver(reading("m1", 2, ts=now).encode())
    assert token in shells[1].transport.acked
    assert any(p.topic.endswith("/m1/verdict") for p in shells[1].transport.published)


def test_one_bad_row_does_not_cost_the_recorder_its_batch(tmp_path: Path) -> None:
    """A row the database refuses is logged and skipped; the rest of its batch is stored and
    every message acknowledged (a reading built past the decoder: seq 2**63)."""
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    recorder = Recorder(BrokerSettings(topic_root=ROOT), store, HistorySettings())
    good = [reading("m1", seq, ts=T0) for seq in (1, 2, 3)]
    bad = Telemetry.model_construct(**{**dict(good[0]), "seq": 2**63})
    recorder._pending.readings.extend([good[0], bad, good[1], good[2]])
    recorder._pending.acks.append((7, 0))
    assert recorder.flush() == 3
    assert recorder.rejected == 1
    assert [r["seq"] for r in store.readings("m1")] == [1, 2, 3]
    assert not recorder._pending


def test_a_database_that_cannot_be_written_keeps_the_readings_waiting(tmp_path: Path) -> None:
    """A read-only database is the database's fault, not the rows': flush raises HistoryError,
    acknowledges nothing and keeps every reading for the next flush, which stores them."""
    path = tmp_path / "h.db"
    writable = HistoryStore(f"sqlite:///{path}")
    read_only = HistoryStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    recorder = Recorder(BrokerSettings(topic_root=ROOT), read_only, HistorySettings())
    for seq in (1, 2):
        payload = reading("m1", seq, ts=T0).encode()
        recorder.receive(TOPICS.telemetry("line1", "m1"), payload, (seq, 0), T0)
    with pytest.raises(HistoryError, match="readonly"):
        recorder.flush()
    assert len(recorder._pending) == 2
    assert recorder.rejected == 0
    recorder.store = writable
    assert recorder.flush() == 2
    assert [r["seq"] for r in writable.readings("m1")] == [1, 2]
