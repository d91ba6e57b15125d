"""NAB's layout and standard-profile scoring (model.nab) and the alert-level figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from factorywatch.errors import DatasetError
from factorywatch.model import nab
from factorywatch.model.streams import alarms, alert_figures


def _flags(n: int, rows: list[int]) -> np.ndarray:
    out = np.zeros(n, dtype=np.bool_)
    out[rows] = True
    return out


def test_probationary_period_is_fifteen_percent_capped_at_750_rows() -> None:
    """The probationary period is floor(15 % of the rows), at most 750 rows."""
    assert nab.probation_rows(100) == 15
    assert nab.probation_rows(4032) == 604
    assert nab.probation_rows(18050) == 750


def test_scaled_sigmoid_matches_nab_reference_points() -> None:
    """The scaled sigmoid gives NAB's documented values at -1, -0.5, 0 and beyond 3."""
    assert nab.scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab.scaled_sigmoid(0.0) == pytest.approx(0.0)
    assert nab.scaled_sigmoid(3.0) == -1.0


def test_hand_computed_file_score() -> None:
    """A hand-worked file: one window found twice, two false positives, one probationary
    detection, scored and normalised as NAB's sweeper does."""
    # 100 rows: probation = 15 rows; one window, rows 40..49 (width 10).
    windows = [(40, 49)]
    detected = _flags(100, [10, 20, 45, 49, 59])
    max_tp = 2 / (1 + math.exp(-5)) - 1  # S(-1) = 0.98661
    # row 45: position -(49 - 45 + 1) / 10 = -0.5 -> S = 0.84828; the better of 45 and 49.
    found = (2 / (1 + math.exp(-2.5)) - 1) / max_tp
    # row 20: no window before it -> a full false positive, -0.11.
    early = -0.11
    # row 59: |49 - 59| / (10 - 1) past the window -> S(1.111) * 0.11.
    late = (2 / (1 + math.exp(5 * 10 / 9)) - 1) * 0.11
    expected = found + early + late  # row 10 is probationary: not scored
    assert expected == pytest.approx(0.64064, abs=1e-4)
    raw = nab.raw_score(detected, windows, probation=15)
    assert raw == pytest.approx(expected, abs=1e-12)
    scores = nab.normalised_score(detected, windows, probation=15)
    assert scores["null"] == -1.0
    # the perfect detector fires at row 40: position -(49 - 40 + 1) / 10 = -1 -> exactly 1.
    assert scores["perfect"] == pytest.approx(1.0)
    assert scores["normalised"] == pytest.approx(100 * (expected + 1) / 2)


def test_missed_window_costs_one_and_probationary_windows_do_not_count() -> None:
    """A missed window costs A_FN = 1; a window inside the probationary period is not scored."""
    windows = [(2, 8), (50, 59)]
    assert nab.raw_score(_flags(100, [5]), windows, probation=15) == -1.0
    scores = nab.normalised_score(_flags(100, []), [], probation=15)
    assert scores["normalised"] is None


def test_load_nab_reads_the_layout(tmp_path: Path) -> None:
    """A data folder of timestamp,value CSVs plus combined_windows.json becomes labelled
    recordings whose windows are row ranges."""
    (tmp_path / "data" / "kind").mkdir(parents=True)
    times = [f"2020-01-01 00:{m:02d}:00" for m in range(30)]
    lines = ["timestamp,value", *(f"{t},{i % 7}" for i, t in enumerate(times))]
    (tmp_path / "data" / "kind" / "a.csv").write_text("\n".join(lines) + "\n")
    table = {"kind/a.csv": [["2020-01-01 00:10:00.000000", "2020-01-01 00:14:00.000000"]]}
    (tmp_path / nab.WINDOWS_FILE).write_text(json.dumps(table))
    [file] = nab.load_nab(tmp_path)
    assert file.windows == [(10, 14)]
    assert file.recording.name == "kind/a"
    assert file.recording.labels is not None
    assert file.recording.labels.tolist() == [0] * 10 + [1] * 5 + [0] * 15
    with pytest.raises(DatasetError, match="combined_windows"):
        nab.load_nab(tmp_path / "data")


def test_alarm_needs_k_of_n_and_clears_after_m_normal_rows() -> None:
    """An alarm is raised at the third ALERT among five rows and only again after ten calm
    rows."""
    flagged = _flags(60, [0, 2, 4, 5, 6, 15, 17, 19, 40, 41, 42])
    # raised at 4 (0, 2, 4); 15-19 fall inside the open alarm (calm never reaches 10 before
    # 15); it clears at 29; 40-42 raise a second one at 42.
    assert alarms(flagged, k=3, n=5, m=10) == [4, 42]


def test_alert_figures_count_found_events_and_false_alarms() -> None:
    """Events found by a raised alarm, their time to detect, false alarms and the daily rate
    follow from the raise rows."""
    labels = np.zeros(100, dtype=np.int_)
    labels[50:60] = 1
    figures = alert_figures(labels, [5, 30, 53, 80], start=20, seconds_per_row=864.0)
    assert figures["alarms"] == 3  # row 5 is in the training part
    assert figures["false_alarms"] == 2
    assert figures["alarm_events_found"] == 1
    assert figures["ttd_rows"] == [3]
    assert figures["alarms_per_day"] == pytest.approx(3 / (80 * 864 / 86_400))
