"""Two processes opening one new history database at once (compose's recorder and web view)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from factorywatch.contracts import AlertEvent
from factorywatch.history_store import HistoryStore


def test_a_store_opens_when_another_creates_the_tables_between_its_check_and_create(
    tmp_path: Path,
) -> None:
    """The loser of the race to create the tables of a new SQLite file still opens and works."""
    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    other: list[HistoryStore] = []
    raced: list[bool] = []

    def other_process_first(_table: Any, _conn: Any, **_kw: Any) -> None:
        # Runs after this store checked that the first table is missing and before it
        # creates it: the other store (its own engine and connection) creates them all now.
        if not raced:
            raced.append(True)
            other.append(HistoryStore(url))

    sa.event.listen(sa.Table, "before_create", other_process_first)
    try:
        store = HistoryStore(url)
    finally:
        sa.event.remove(sa.Table, "before_create", other_process_first)
    try:
        assert raced, "the other store created the tables in the middle"
        event = AlertEvent(
            machine_id="press-1",
            line="line1",
            event="ALERT_RAISED",
            at=time.time(),
            alert_id="a-1",
            seq=1,
        )
        store.add_events([event])
        assert [e["alert_id"] for e in other[0].events("press-1", since=0.0)] == ["a-1"]
    finally:
        store.close()
        for s in other:
            s.close()
