"""A clumsy operator loses no data: export, --since, a read-only database, labels (#25)."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorywatch.cli import main
from factorywatch.history_episodes import episodes, parse_since
from factorywatch.history_store import HistoryStore
from tests.support import reading

NOW = 1.8e9


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A history database holding three readings of m1 (stamped now)."""
    import time  # noqa: PLC0415 - export looks back from the wall clock

    path = tmp_path / "history.sqlite"
    store = HistoryStore(f"sqlite:///{path}")
    store.add_readings([reading("m1", seq, ts=time.time()) for seq in (1, 2, 3)])
    store.close()
    return path


def export(db: Path, csv: Path, *extra: str, machine: str = "m1") -> int:
    """Run ``factorywatch history export`` in-process; its exit code."""
    return main(["history", "export", "--db", f"sqlite:///{db}", "--machine", machine,
                 "--csv", str(csv), *extra])  # fmt: skip


def test_export_never_writes_over_the_history_database(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pointing --csv at the database (even with --force) is an error; the database is intact."""
    before = db.read_bytes()
    assert export(db, db, "--force") == 2
    assert "history database" in capsys.readouterr().err
    assert db.read_bytes() == before


def test_export_never_writes_over_another_sqlite_file(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any file starting with the SQLite magic is refused, --force or not."""
    other = tmp_path / "other.db"
    HistoryStore(f"sqlite:///{other}").close()
    before = other.read_bytes()
    assert export(db, other, "--force") == 2
    assert "SQLite database" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_export_overwrites_an_existing_csv_only_with_force(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing CSV is left alone without --force and replaced with it."""
    out = tmp_path / "train.csv"
    out.write_text("precious\n")
    assert export(db, out) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    assert export(db, out, "--force") == 0
    assert len(out.read_text().splitlines()) == 4  # header and three readings


def test_a_misspelt_machine_is_an_error_and_overwrites_nothing(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No readings for --machine: exit 2 naming the machines that have some; the CSV given
    (even with --force) keeps its content and no partial file is left."""
    out = tmp_path / "train.csv"
    out.write_text("precious\n")
    assert export(db, out, "--force", machine="m11") == 2
    err = capsys.readouterr().err
    assert "'m11'" in err
    assert "m1" in err
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.sqlite", "train.csv"]


@pytest.mark.parametrize("since", ["99999999999999d", "-5d", "1e9w", "yesterday"])
def test_bad_since_values_give_one_clear_error(
    db: Path, since: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`history --since` with an absurd or malformed duration: exit 2, one line, no traceback."""
    assert main(["history", "--db", f"sqlite:///{db}", f"--since={since}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_since_is_never_before_the_epoch() -> None:
    """A long but accepted duration looks back to 1970 at the furthest."""
    assert parse_since("99w", NOW) == NOW - 99 * 7 * 86400
    assert parse_since("36500d", 1000.0) == 0.0


def test_the_recorder_refuses_a_read_only_database_at_start(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`history record` on a read-only database: exit 2 with a clear error before it connects
    to any broker (port 1 has none), not a traceback at its first flush."""
    url = f"sqlite:///file:{db}?mode=ro&uri=true"
    assert main(["history", "record", "--db", url, "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err
    assert "readonly" in err


def test_a_label_for_an_unknown_alert_is_not_an_open_alert() -> None:
    """Feedback for an alert id with no recorded raise creates no open alert."""
    feedback = [{"machine_id": "m1", "line": "line1", "alert_id": "nope", "label": "confirmed",
                 "by": "ana"}]  # fmt: skip
    (episode,) = episodes([], feedback)
    assert episode.label == "confirmed"
    assert not episode.open


def test_export_leaves_out_readings_that_are_no_ai4i_rows(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored reading lacking an AI4I channel (the detector refused it) is left out of the
    export instead of stopping it with a traceback."""
    import time  # noqa: PLC0415 - export looks back from the wall clock

    store = HistoryStore(f"sqlite:///{db}")
    odd = reading("m1", 4, ts=time.time())
    store.add_readings([odd.model_copy(update={"readings": {"flow_rate": 1.0}})])
    store.close()
    out = tmp_path / "train.csv"
    assert export(db, out) == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 4  # header and the three AI4I readings
