"""The recorder stores what the detector would accept, and prune cannot be defeated (#25)."""

from __future__ import annotations

from pathlib import Path

from factorywatch.accounts import AccountRegistry
from factorywatch.contracts import Telemetry, TelemetryBatch
from factorywatch.detector.registry import Registry
from factorywatch.errors import PayloadError
from factorywatch.history_recorder import decode
from factorywatch.history_store import HistoryStore
from factorywatch.topics import Topics
from tests.support import reading

NOW = 1.8e9
TOPICS = Topics("door")
REGISTRY = Registry.from_accounts(
    AccountRegistry().with_machine("m1", "line1").with_gateway("gw1", ["m2"], "line1")
)


def kept(result: object) -> list[Telemetry]:
    """The readings a decoded message leaves to store."""
    assert isinstance(result, list)
    return [r for r in result if isinstance(r, Telemetry)]


def test_a_gateways_forged_reading_for_another_machine_is_not_stored() -> None:
    """gw1 may carry m2 only: its reading for m1 is refused (unauthorized_machine), m2's kept."""
    batch = TelemetryBatch(readings=[reading("m1", 5, ts=NOW), reading("m2", 5, ts=NOW)])
    result = decode(TOPICS, TOPICS.batch("line1", "gw1"), batch.encode(), NOW, REGISTRY)
    assert [r.machine_id for r in kept(result)] == ["m2"]
    assert isinstance(result, list)
    assert [e.reason for e in result if isinstance(e, PayloadError)] == ["unauthorized_machine"]


def test_the_real_reading_is_stored_after_a_forgery_for_its_seq(tmp_path: Path) -> None:
    """After gw1's forged m1 seq 5, m1's own seq 5 is the row stored (not displaced)."""
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    forged = reading("m1", 5, ts=NOW, torque_nm=99.0)
    real = reading("m1", 5, ts=NOW)
    for topic, payload in (
        (TOPICS.batch("line1", "gw1"), TelemetryBatch(readings=[forged]).encode()),
        (TOPICS.telemetry("line1", "m1"), real.encode()),
    ):
        store.add_readings(kept(decode(TOPICS, topic, payload, NOW, REGISTRY)))
    (row,) = store.readings("m1")
    assert row["readings"]["torque_nm"] == real.readings["torque_nm"]


def test_an_unregistered_account_publishing_on_its_own_name_is_not_stored() -> None:
    """A viewer account's telemetry on its own name is refused (unknown_machine)."""
    payload = reading("viewer", 1, ts=NOW).encode()
    result = decode(TOPICS, TOPICS.telemetry("line1", "viewer"), payload, NOW, REGISTRY)
    assert isinstance(result, list)
    assert [e.reason for e in result if isinstance(e, PayloadError)] == ["unknown_machine"]


def test_prune_deletes_rows_stamped_in_the_future(tmp_path: Path) -> None:
    """Rows stamped in 2099 (written before the door refused them) go at the next prune;
    today's rows stay."""
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    store.add_readings([reading("m1", 1, ts=NOW), reading("m1", 2, ts=4_070_908_800.0)])
    assert store.prune(NOW, retention_days=90, readings_retention_days=7) == 1
    assert [r["seq"] for r in store.readings("m1")] == [1]
