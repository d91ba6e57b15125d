"""The Numenta Anomaly Benchmark's layout and its scoring (Lavin & Ahmad 2015), pure but the
loader.

Layout: a folder of ``timestamp,value`` CSVs (NAB's ``data/``, any depth) and a windows JSON
(``combined_windows.json``: ``{"<dir>/<file>.csv": [[start, end], ...]}``, timestamps as in
the CSVs). ``load_nab`` finds both under one folder and returns each file as a labelled
``Recording`` (rows inside a window are labelled 1) with its windows as row ranges.

Scoring, exactly as NAB's ``sweeper.py`` does for a detector whose anomaly score is 1 on a
detection and 0 elsewhere:

* the first ``min(floor(0.15 n), 750)`` rows are the probationary period: never scored (here
  they are also the rows a model trains on);
* a detection inside a window of width w rows, at row i with the window's last row r, is
  worth ``A_TP * S(-(r - i + 1) / w) / S(-1)`` with ``S(x) = 2 / (1 + e^{5x}) - 1`` (a scaled
  sigmoid: the earlier, the more); each window counts its best detection once, a window
  without one costs ``A_FN`` (-1);
* a detection outside every window costs ``A_FP * S(d)`` (``A_FP`` = 0.11 in the standard
  profile): ``d = |i - r_prev| / (w_prev - 1)`` past the previous window's end, 3 (a full
  -0.11) when no window came before; every such detection counts.

A file's normalised score is ``100 (S - S_null) / (S_perfect - S_null)``: S_null is the score
of a detector that never fires, S_perfect of one that fires once at each window's first row
(both through the same rules, so a window cut by the probationary period is handled alike).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from factorywatch.errors import DatasetError
from factorywatch.model.recording import Recording, load_recording

BoolArray = npt.NDArray[np.bool_]
WINDOWS_FILE: Final = "combined_windows.json"
PROBATION_SHARE: Final = 0.15
PROBATION_CAP_ROWS: Final = 5000  # NAB: the period is at most 15 % of 5,000 rows


@dataclass(frozen=True)
class Profile:
    """NAB's application profile: the weights of a true positive, false positive, miss."""

    tp: float = 1.0
    fp: float = 0.11
    fn: float = 1.0


STANDARD: Final = Profile()


@dataclass
class NabFile:
    """One NAB stream: its recording (labels = inside a window) and windows as row ranges."""

    key: str  # its name in the windows JSON (``realKnownCause/nyc_taxi.csv``)
    recording: Recording
    windows: list[tuple[int, int]]  # (first row, last row), both inclusive


def probation_rows(n: int) -> int:
    """Rows of NAB's probationary period in a file of ``n`` rows."""
    return int(min(math.floor(PROBATION_SHARE * n), PROBATION_SHARE * PROBATION_CAP_ROWS))


def scaled_sigmoid(position: float) -> float:
    """NAB's reward for a detection at a relative ``position`` (-1 = a window's first row)."""
    if position >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def raw_score(
    detected: BoolArray,
    windows: Sequence[tuple[int, int]],
    *,
    probation: int,
    profile: Profile = STANDARD,
) -> float:
    """NAB's raw score of per-row ``detected`` flags (see the module docstring)."""
    n = len(detected)
    max_tp = scaled_sigmoid(-1.0)
    window_of = np.full(n, -1, dtype=np.intp)
    for w, (first, last) in enumerate(windows):
        window_of[first : last + 1] = w
    scored = {w for w in range(len(windows)) if windows[w][1] >= probation}
    best = dict.fromkeys(scored, -profile.fn)
    false_positives = 0.0
    for i in np.flatnonzero(detected).tolist() if n else []:
        # Walk only the detections; the previous window of row i is the last ending before it.
        w = int(window_of[i])
        if w >= 0:
            first, last = windows[w]
            if i >= probation:
                width = float(last - first + 1)
                reward = scaled_sigmoid(-(last - i + 1) / width) * profile.tp / max_tp
                best[w] = max(best[w], reward)
            continue
        if i < probation:
            continue
        prev_last, prev_width = _previous_window(windows, i)
        # NAB divides by (width - 1); a one-row window would divide by zero there.
        position = 3.0 if prev_last is None else abs(prev_last - i) / max(prev_width - 1.0, 1.0)
        false_positives += scaled_sigmoid(position) * profile.fp
    return float(sum(best.values()) + false_positives)


def _previous_window(windows: Sequence[tuple[int, int]], row: int) -> tuple[int | None, float]:
    """The last row and width of the latest window that ended before ``row``."""
    ended = [(last, float(last - first + 1)) for first, last in windows if last < row]
    if not ended:
        return None, 0.0
    return max(ended)


def normalised_score(
    detected: BoolArray,
    windows: Sequence[tuple[int, int]],
    *,
    probation: int,
    profile: Profile = STANDARD,
) -> dict[str, float | None]:
    """Raw, null, perfect and normalised (null = 0, perfect = 100) scores of one file."""
    n = len(detected)
    null = raw_score(np.zeros(n, dtype=np.bool_), windows, probation=probation, profile=profile)
    ideal = np.zeros(n, dtype=np.bool_)
    for first, _ in windows:
        ideal[first] = True
    perfect = raw_score(ideal, windows, probation=probation, profile=profile)
    raw = raw_score(detected, windows, probation=probation, profile=profile)
    return {
        "raw": raw,
        "null": null,
        "perfect": perfect,
        "normalised": normalise(raw, null, perfect),
    }


def normalise(raw: float, null: float, perfect: float) -> float | None:
    """``100 (raw - null) / (perfect - null)``; None when the file has no scored window."""
    if perfect == null:
        return None
    return 100.0 * (raw - null) / (perfect - null)


def find_layout(root: Path) -> tuple[Path, Path] | None:
    """(data folder, windows JSON) of a NAB-layout folder, or None when it is not one."""
    if not root.is_dir():
        return None
    for candidate in (root / WINDOWS_FILE, root / "labels" / WINDOWS_FILE):
        if candidate.is_file():
            data = root / "data"
            return (data if data.is_dir() else root), candidate
    return None


def load_nab(root: Path) -> list[NabFile]:
    """Every file of the windows JSON under ``root`` (see ``find_layout``), sorted by name."""
    layout = find_layout(root)
    if layout is None:
        raise DatasetError(f"{root} has no {WINDOWS_FILE} (nor labels/{WINDOWS_FILE})")
    data, windows_file = layout
    try:
        table = json.loads(windows_file.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {windows_file}: {exc}") from exc
    files = []
    for key in sorted(table):
        path = data / key
        if not path.is_file():
            raise DatasetError(f"{windows_file} names {key}, which is not under {data}")
        rec = load_recording(path, time_column="timestamp", channels=["value"])
        rec.run = key.removesuffix(".csv")
        windows = [_rows(rec, start, end, key) for start, end in table[key]]
        labels = np.zeros(rec.rows, dtype=np.int_)
        for first, last in windows:
            labels[first : last + 1] = 1
        rec.labels = labels
        files.append(NabFile(key=key, recording=rec, windows=windows))
    if not files:
        raise DatasetError(f"{windows_file} lists no files")
    return files


def _rows(rec: Recording, start: str, end: str, key: str) -> tuple[int, int]:
    """A window's timestamps as (first, last) rows: the rows whose time lies inside it."""
    times = np.asarray(rec.time, dtype="datetime64[ns]")
    lo, hi = np.datetime64(start.replace(" ", "T")), np.datetime64(end.replace(" ", "T"))
    first = int(np.searchsorted(times, lo, side="left"))
    last = int(np.searchsorted(times, hi, side="right")) - 1
    if last < first:
        raise DatasetError(f"{key}: window [{start}, {end}] holds no row")
    return first, last


PUBLISHED_FILE: Final = "results/published_standard_scores.csv"


def published_means(root: Path, files: Sequence[NabFile]) -> dict[str, float]:
    """Mean per-file normalised score of each detector in NAB's published results table
    (``Detector,File,...,Score,...``) under ``root``, over ``files`` that have a window
    (null and perfect from ``normalised_score``); empty when there is no table."""
    import csv  # noqa: PLC0415 - only for the reference table

    table = root / PUBLISHED_FILE
    if not table.is_file():
        return {}
    bounds = {}
    for f in files:
        n = f.recording.rows
        s = normalised_score(np.zeros(n, dtype=np.bool_), f.windows, probation=probation_rows(n))
        null, perfect = s["null"], s["perfect"]
        if null is not None and perfect is not None and perfect != null:
            bounds[f.key] = (null, perfect)
    scores: dict[str, list[float]] = {}
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("File") in bounds and row.get("Detector") not in (None, "null"):
                null, perfect = bounds[row["File"]]
                value = normalise(float(row["Score"]), null, perfect)
                if value is not None:
                    scores.setdefault(row["Detector"], []).append(value)
    return {k: float(np.mean(v)) for k, v in sorted(scores.items()) if len(v) == len(bounds)}
