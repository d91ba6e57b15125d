"""Point-wise evaluation figures (model.streams) and the evaluate --csv command's errors (the
command run in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factorywatch.errors import DatasetError
from factorywatch.model.streams import (
    confusion,
    event_delays,
    events,
    load_labelled_runs,
    rates,
)
from tests.support import cli_in_process


def test_events_are_maximal_runs_of_ones() -> None:
    """Events are the label's runs of ones, at the edges too."""
    assert events(np.array([1, 1, 0, 0, 1, 0, 1])) == [(0, 2), (4, 5), (6, 7)]
    assert events(np.array([0, 0])) == []


def test_rates_from_counts() -> None:
    """Precision, recall, F1, FAR and MAR follow their definitions."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    flagged = np.array([1, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    counts = confusion(labels, flagged)
    assert counts == {"tp": 3, "fp": 1, "fn": 1, "tn": 5}
    r = rates(counts)
    assert r["precision"] == pytest.approx(0.75)
    assert r["recall"] == pytest.approx(0.75)
    assert r["f1"] == pytest.approx(0.75)
    assert r["far"] == pytest.approx(1 / 6)
    assert r["mar"] == pytest.approx(0.25)


def test_no_positives_give_zero_not_an_error() -> None:
    """Undefined ratios (no alarms, no anomalies) are reported as 0."""
    r = rates({"tp": 0, "fp": 0, "fn": 0, "tn": 10})
    assert r == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "far": 0.0, "mar": 0.0}


def test_delay_is_rows_to_the_first_alert_or_missed() -> None:
    """Each event's delay counts rows from its start to its first ALERT; None if never."""
    labels = np.array([0, 1, 1, 1, 0, 1, 1, 0])
    flagged = np.array([1, 0, 0, 1, 0, 0, 0, 1], dtype=bool)
    assert event_delays(labels, flagged) == [2, None]


def test_evaluate_csv_needs_labels_and_a_training_part(tmp_path: Path) -> None:
    """Without --label-column or a training part, evaluate --csv says what is missing."""
    csv = tmp_path / "run.csv"
    csv.write_text("a,b,anomaly\n1,2,0\n")
    done = cli_in_process("evaluate", "--csv", str(csv), "--train-rows", "5")
    assert done.returncode == 2
    assert "--label-column" in done.stderr
    done = cli_in_process("evaluate", "--csv", str(csv), "--label-column", "anomaly")
    assert done.returncode == 2
    assert "--train-rows" in done.stderr


def test_train_csv_errors_are_clear(tmp_path: Path) -> None:
    """A missing file or too few training rows end with a message and exit code 2."""
    done = cli_in_process("train", "--csv", str(tmp_path / "nope.csv"))
    assert done.returncode == 2
    assert "nope.csv is not a file" in done.stderr
    csv = tmp_path / "short.csv"
    csv.write_text("a;b\n" + "".join(f"{i};{i * 2 % 7}\n" for i in range(20)))
    done = cli_in_process("train", "--csv", str(csv), "--model-dir", str(tmp_path / "m"))
    assert done.returncode == 2
    assert "too few" in done.stderr


def _run_csv(path: Path, rows: int, *, labelled: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "datetime;Flow Rate;Pressure" + (";anomaly" if labelled else "")
    lines = [header]
    for i in range(rows):
        row = f"2026-03-01 08:{i // 60:02d}:{i % 60:02d};{rng.normal():.5f};{rng.normal():.5f}"
        lines.append(row + (f";{int(i >= rows - 10)}" if labelled else ""))
    path.write_text("\n".join(lines) + "\n")


def test_a_folder_of_runs_is_read_with_its_subfolders_and_names_runs_by_path(
    tmp_path: Path,
) -> None:
    """SKAB's layout: runs in subfolders with the same file names stay distinct runs (named
    by their path in the folder); a recording without the label column (normal operation
    only) is left out of an evaluation with a note, and a lone such file is an error."""
    root = tmp_path / "data"
    _run_csv(root / "valve1" / "1.csv", 120, seed=1)
    _run_csv(root / "valve2" / "1.csv", 120, seed=2)
    _run_csv(root / "anomaly-free" / "anomaly-free.csv", 120, labelled=False)
    notes: list[str] = []
    recs = load_labelled_runs(
        root, label_column="anomaly", time_column="datetime", progress=notes.append
    )
    assert [r.name for r in recs] == ["valve1/1", "valve2/1"]
    assert notes == ["left out anomaly-free/anomaly-free: no label column 'anomaly'"]
    assert [r.channels for r in recs] == [["flow_rate", "pressure"]] * 2
    with pytest.raises(DatasetError, match="label column"):
        load_labelled_runs(root / "anomaly-free" / "anomaly-free.csv", label_column="anomaly")
    with pytest.raises(DatasetError, match="has the label column"):
        load_labelled_runs(root / "anomaly-free", label_column="anomaly")
    done = cli_in_process(
        "evaluate", "--csv", str(root), "--label-column", "anomaly",
        "--time-column", "datetime", "--train-rows", "60", "--trees", "20",
        "--out", str(tmp_path / "reports"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "reports" / "streams.md").read_text()
    assert "valve1/1" in report
    assert "valve2/1" in report
