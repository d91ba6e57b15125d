"""Point-wise evaluation figures (model.streams) and the evaluate --csv command's errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from factorywatch.model.streams import confusion, event_delays, events, rates
from tests.support import CLI, PROJECT_DIR


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


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real factorywatch command (a subprocess: its logging is its own)."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=PROJECT_DIR, check=False, timeout=120
    )


def test_evaluate_csv_needs_labels_and_a_training_part(tmp_path: Path) -> None:
    """Without --label-column or a training part, evaluate --csv says what is missing."""
    csv = tmp_path / "run.csv"
    csv.write_text("a,b,anomaly\n1,2,0\n")
    done = run_cli("evaluate", "--csv", str(csv), "--train-rows", "5")
    assert done.returncode == 2
    assert "--label-column" in done.stderr
    done = run_cli("evaluate", "--csv", str(csv), "--label-column", "anomaly")
    assert done.returncode == 2
    assert "--train-rows" in done.stderr


def test_train_csv_errors_are_clear(tmp_path: Path) -> None:
    """A missing file or too few training rows end with a message and exit code 2."""
    done = run_cli("train", "--csv", str(tmp_path / "nope.csv"))
    assert done.returncode == 2
    assert "nope.csv is not a file" in done.stderr
    csv = tmp_path / "short.csv"
    csv.write_text("a;b\n" + "".join(f"{i};{i * 2 % 7}\n" for i in range(20)))
    done = run_cli("train", "--csv", str(csv), "--model-dir", str(tmp_path / "m"))
    assert done.returncode == 2
    assert "too few" in done.stderr
