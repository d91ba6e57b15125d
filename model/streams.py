"""Evaluation on labelled recordings: point-wise precision/recall/F1, FAR, MAR, delays.

Protocol (``factorywatch evaluate --csv FILE_OR_FOLDER --label-column COL --train-rows N``):
each CSV is one run; the model is trained on the run's first part (labels unused), every
row is scored as the detector streams it (windows from the run's first row), and only the
rows AFTER the training part are counted. Counts are summed over runs (micro average).

* precision, recall, F1 over rows; FAR = FP / (FP + TN) (false alarms among normal rows),
  MAR = FN / (FN + TP) (missed anomalous rows);
* an event is a maximal run of anomalous rows; its delay is the number of rows (and seconds,
  with a time column) from its first row to its first ALERT, and an event with no ALERT in
  it is missed.

Alert level (what an operator sees): the ALERT rows go through the detector's alert rule
(``alarms``: raised when ``ALARM_K`` of the last ``ALARM_N`` readings are ALERT, cleared
after ``ALARM_M`` readings in a row that are NORMAL and score at or below the model's clear
threshold, as ``detector/alerting.py`` does with its defaults). An
event is found when an alarm is raised inside it; the time to detect is from the event's
first row to that raise; a false alarm is one raised outside every event; alarms per day
count raised alarms over the scored span (per 1,000 rows without a time column).

A run in NAB's layout (``model.nab``) carries its windows: its labelled events are the
windows, its training part is NAB's probationary period, and the alarms raised are its
detections for NAB's standard-profile score (``model.nab``), normalised per file.

``mode="per-run"`` trains a model per run (a model per machine); ``mode="global"`` trains
one model on every run's training part (one model for all machines).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from factorywatch.errors import DatasetError
from factorywatch.model import nab
from factorywatch.model.alert_rule import ALARM_K, ALARM_M, ALARM_N, AlertRule
from factorywatch.model.fitspec import DEFAULT_SPEC, FitSpec
from factorywatch.model.generic import Scores, Trained, fit_recording
from factorywatch.model.rebaseline import replay
from factorywatch.model.recording import (
    Missing,
    Recording,
    has_column,
    load_recording,
    train_mask,
)

BoolArray = npt.NDArray[np.bool_]
JSON_FILE: Final = "streams.json"
REPORT_FILE: Final = "streams.md"
PLOT_FILE: Final = "streams.png"
MAX_PLOTS: Final = 16
SECONDS_PER_DAY: Final = 86_400.0


@dataclass(frozen=True)
class Config:
    """One model configuration to evaluate: a name, how it is fitted, per run or global."""

    name: str
    spec: FitSpec = DEFAULT_SPEC
    mode: str = "per-run"  # or "global"

    def as_dict(self) -> dict[str, Any]:
        """Name, mode and the fit parameters, flat (the report's ``config``)."""
        return {"name": self.name, "mode": self.mode, **self.spec.as_dict()}


@dataclass
class RunResult:
    """One run's scored test rows."""

    name: str
    train_rows: int
    labels: npt.NDArray[np.int_]
    scores: Scores
    threshold: float
    seconds_per_row: float | None
    counts: dict[str, int] = field(default_factory=dict)
    delays: list[int | None] = field(default_factory=list)
    alert_level: dict[str, Any] = field(default_factory=dict)
    forward_far: float | None = None  # the training's forward-in-time estimate
    nab: dict[str, float | None] | None = None  # NAB scores when the run has windows


def csv_files(path: Path) -> list[Path]:
    """The CSV itself, or every ``*.csv`` under a folder, its subfolders included (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".csv" and p.is_file())
        if not files:
            raise DatasetError(f"no .csv files in {path} or its subfolders")
        return files
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    return [path]


def run_name(file: Path, root: Path) -> str:
    """A run's name: its path under ``root`` without the suffix (``valve1/1``), or the file's
    stem for a single file."""
    if root.is_dir():
        return file.relative_to(root).with_suffix("").as_posix()
    return file.stem


def load_labelled_runs(
    path: Path,
    *,
    label_column: str,
    time_column: str | None = None,
    channels: Sequence[str] | None = None,
    machine_column: str | None = None,
    missing: Missing = "error",
    progress: Callable[[str], None] = lambda _: None,
) -> list[Recording]:
    """The labelled runs of a CSV or of every CSV under a folder (``csv_files``), each named
    by ``run_name``. In a folder, a CSV without the label column (a recording of normal
    operation only, like SKAB's ``anomaly-free.csv``) is left out with a note through
    ``progress``; a single file without it is an error."""
    files = csv_files(path)
    if path.is_dir():
        unlabelled = [f for f in files if not has_column(f, label_column)]
        for file in unlabelled:
            progress(f"left out {run_name(file, path)}: no label column {label_column!r}")
        files = [f for f in files if f not in unlabelled]
        if not files:
            raise DatasetError(f"no .csv file under {path} has the label column {label_column!r}")
    recs = load_runs(
        files,
        label_column=label_column,
        time_column=time_column,
        channels=channels,
        machine_column=machine_column,
        missing=missing,
    )
    for rec in recs:
        rec.run = run_name(rec.path, path)
    return recs


def events(labels: npt.NDArray[np.int_]) -> list[tuple[int, int]]:
    """``(start, end)`` (end exclusive) of every maximal run of ones."""
    padded = np.concatenate([[0], labels.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def confusion(labels: npt.NDArray[np.int_], flagged: BoolArray) -> dict[str, int]:
    """TP, FP, FN, TN of flagged rows against labels."""
    y = labels.astype(bool)
    return {
        "tp": int(np.sum(y & flagged)),
        "fp": int(np.sum(~y & flagged)),
        "fn": int(np.sum(y & ~flagged)),
        "tn": int(np.sum(~y & ~flagged)),
    }


def rates(counts: dict[str, int]) -> dict[str, float]:
    """Precision, recall, F1, FAR, MAR from summed counts (0 where undefined)."""
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "far": fp / (fp + tn) if fp + tn else 0.0,
        "mar": fn / (fn + tp) if fn + tp else 0.0,
    }


def event_delays(labels: npt.NDArray[np.int_], flagged: BoolArray) -> list[int | None]:
    """Per event: rows from its start to its first ALERT (None when never flagged)."""
    out: list[int | None] = []
    for start, end in events(labels):
        hits = np.flatnonzero(flagged[start:end])
        out.append(int(hits[0]) if len(hits) else None)
    return out


def _seconds_per_row(rec: Recording) -> float | None:
    if rec.time is None or rec.rows < 2:
        return None
    times = np.asarray(rec.time)
    if np.issubdtype(times.dtype, np.datetime64):
        span = (times[-1] - times[0]) / np.timedelta64(1, "s")
    else:
        span = float(times[-1] - times[0])
    return float(span) / (rec.rows - 1)


def load_runs(
    files: Sequence[Path],
    *,
    label_column: str,
    time_column: str | None = None,
    channels: Sequence[str] | None = None,
    machine_column: str | None = None,
    missing: Missing = "error",
) -> list[Recording]:
    """Load every run; all runs must have the same channels."""
    recs: list[Recording] = []
    for path in files:
        rec = load_recording(
            path,
            label_column=label_column,
            time_column=time_column,
            channels=channels,
            machine_column=machine_column,
            missing=missing,
        )
        if recs and rec.channels != recs[0].channels:
            raise DatasetError(
                f"{path} has channels {rec.channels}, {files[0]} has {recs[0].channels}"
            )
        recs.append(rec)
    return recs


def evaluate(
    recs: Sequence[Recording],
    config: Config,
    *,
    train_rows: int | None,
    train_until: str | None,
    seed: int = 0,
    windows: Sequence[Sequence[tuple[int, int]]] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[RunResult]:
    """Train per run (or once, globally), score every run, count its test rows.

    ``windows`` (NAB's layout, one list per run): each run trains on NAB's probationary
    period instead of ``train_rows``/``train_until`` and is scored with NAB's profile too.
    """
    if windows is None:
        masks = train_masks(recs, train_rows=train_rows, train_until=train_until)
    else:
        masks = [nab_mask(rec.rows) for rec in recs]
    models = fit_models(recs, masks, config, seed)
    results = []
    for i, (rec, mask, model) in enumerate(zip(recs, masks, models, strict=True)):
        run_windows = None if windows is None else windows[i]
        scores = replay(model, rec.columns).scores
        results.append(run_result(rec, mask, scores, model, windows=run_windows))
        progress(f"{config.name}: {rec.name} scored")
    return results


def nab_mask(rows: int) -> BoolArray:
    """NAB's probationary period of a run as its training rows."""
    mask = np.zeros(rows, dtype=np.bool_)
    mask[: nab.probation_rows(rows)] = True
    return mask


def alarms(
    flagged: BoolArray,
    *,
    clear: BoolArray | None = None,
    calibrating: BoolArray | None = None,
    k: int = ALARM_K,
    n: int = ALARM_N,
    m: int = ALARM_M,
) -> list[int]:
    """Rows where an alarm is raised under the detector's alert rule (``AlertRule``): ``k``
    of the last ``n`` rows ALERT while none is open; it stays open until ``m`` clear rows in
    a row clear it. A row is clear when it is not ALERT and, given ``clear``, marked there
    (the detector's rule: the score at or below the model's lower clear threshold). A row
    marked in ``calibrating`` counts for nothing and starts the rule over (a re-baseline
    clears the open alert; ``model.rebaseline``)."""
    calm_rows = (np.ones_like(flagged) if clear is None else clear).tolist()
    skipped = (np.zeros_like(flagged) if calibrating is None else calibrating).tolist()
    rule = AlertRule(k=k, n=n, m=m)
    raised = []
    for i, (hit, calm, skip) in enumerate(zip(flagged.tolist(), calm_rows, skipped, strict=True)):
        if skip:
            rule = AlertRule(k=k, n=n, m=m)
        elif rule.step(hit, calm):
            raised.append(i)
    return raised


def alert_figures(
    labels: npt.NDArray[np.int_], raised: Sequence[int], start: int, seconds_per_row: float | None
) -> dict[str, Any]:
    """Alert-level figures over rows ``start ..`` (the scored part): events found by a raised
    alarm, time to detect, false alarms, alarms per day (per 1,000 rows without times)."""
    scored = [r for r in raised if r >= start]
    spans = [(a + start, b + start) for a, b in events(labels[start:])]
    inside = np.zeros(len(labels), dtype=np.bool_)
    for a, b in spans:
        inside[a:b] = True
    ttd: list[int | None] = []
    for a, b in spans:
        hits = [r for r in scored if a <= r < b]
        ttd.append(hits[0] - a if hits else None)
    rows = len(labels) - start
    days = rows * seconds_per_row / SECONDS_PER_DAY if seconds_per_row else None
    return {
        "alarms": len(scored),
        "false_alarms": sum(1 for r in scored if not inside[r]),
        "alarm_events": len(spans),
        "alarm_events_found": sum(1 for t in ttd if t is not None),
        "ttd_rows": ttd,
        "scored_days": days,
        "alarms_per_day": len(scored) / days if days else None,
        "alarms_per_1000_rows": 1000.0 * len(scored) / rows if rows else 0.0,
    }


def train_masks(
    recs: Sequence[Recording], *, train_rows: int | None, train_until: str | None
) -> list[BoolArray]:
    """Each run's training rows; a run with nothing left to score is an error."""
    masks = [train_mask(r, train_rows=train_rows, train_until=train_until) for r in recs]
    for rec, mask in zip(recs, masks, strict=True):
        if mask.all():
            raise DatasetError(f"{rec.name}: every row is a training row; nothing to score")
    return masks


def fit_models(
    recs: Sequence[Recording], masks: Sequence[BoolArray], config: Config, seed: int = 0
) -> list[Trained]:
    """The model serving each run: its own (``per-run``) or one shared by all (``global``)."""
    spec = config.spec.replace(seed=seed)
    if config.mode == "global":
        joined = _concat(recs, masks)
        shared = fit_recording(joined, np.ones(joined.rows, dtype=np.bool_), spec)
        return [shared] * len(recs)
    return [fit_recording(rec, mask, spec) for rec, mask in zip(recs, masks, strict=True)]


def run_result(
    rec: Recording,
    mask: BoolArray,
    scores: Scores,
    model: Trained,
    *,
    windows: Sequence[tuple[int, int]] | None = None,
) -> RunResult:
    """One run's figures from its per-row scores and ALERT flags (offline or from verdicts).

    The training rows are the run's first rows (``alert_figures`` counts from the first
    row after them)."""
    test = ~mask
    assert rec.labels is not None
    labels = rec.labels[test]
    flagged = scores.flagged[test]
    clear_threshold = model.card.clear_threshold
    calm: BoolArray | None
    if scores.calm is not None:
        calm = scores.calm
    else:
        calm = None if clear_threshold is None else scores.score <= clear_threshold
    raised = alarms(scores.flagged, clear=calm, calibrating=scores.calibrating)
    start = int(np.argmin(mask)) if test.any() else rec.rows
    nab_scores = None
    if windows is not None:
        detected = np.zeros(rec.rows, dtype=np.bool_)
        detected[raised] = True
        nab_scores = nab.normalised_score(detected, windows, probation=nab.probation_rows(rec.rows))
    seconds_per_row = _seconds_per_row(rec)
    return RunResult(
        name=rec.name,
        train_rows=int(mask.sum()),
        labels=rec.labels,
        scores=scores,
        threshold=model.card.threshold,
        seconds_per_row=seconds_per_row,
        counts=confusion(labels, flagged),
        delays=event_delays(labels, flagged),
        alert_level=alert_figures(rec.labels, raised, start, seconds_per_row),
        nab=nab_scores,
        forward_far=model.card.metrics.get("forward_far"),
    )


def _concat(recs: Sequence[Recording], masks: Sequence[BoolArray]) -> Recording:
    """The training parts of every run as one recording, one machine per run."""
    columns = {
        c: np.concatenate([r.columns[c][m] for r, m in zip(recs, masks, strict=True)])
        for c in recs[0].channels
    }
    machines = [r.name for r, m in zip(recs, masks, strict=True) for _ in range(int(m.sum()))]
    return Recording(
        path=recs[0].path.parent / "all-runs",
        sha256="-",
        channels=list(recs[0].channels),
        columns=columns,
        machines=machines,
    )


def summary(results: Sequence[RunResult]) -> dict[str, Any]:
    """Summed counts, rates and event figures over runs."""
    counts = {k: sum(r.counts[k] for r in results) for k in ("tp", "fp", "fn", "tn")}
    delays = [d for r in results for d in r.delays]
    found = [d for d in delays if d is not None]
    seconds = [
        d * r.seconds_per_row
        for r in results
        for d in r.delays
        if d is not None and r.seconds_per_row is not None
    ]
    ttd = [t for r in results for t in r.alert_level["ttd_rows"] if t is not None]
    ttd_seconds = [
        t * r.seconds_per_row
        for r in results
        for t in r.alert_level["ttd_rows"]
        if t is not None and r.seconds_per_row is not None
    ]
    timed = [r.alert_level for r in results if r.alert_level.get("scored_days")]
    alarms_total = sum(r.alert_level["alarms"] for r in results)
    forward = [
        r.forward_far for r in results if r.forward_far is not None and np.isfinite(r.forward_far)
    ]
    normalised = [r.nab["normalised"] for r in results if r.nab and r.nab["normalised"] is not None]
    return {
        **counts,
        **rates(counts),
        "runs": len(results),
        "events": len(delays),
        "events_detected": len(found),
        "delay_rows_median": float(np.median(found)) if found else None,
        "delay_rows_mean": float(np.mean(found)) if found else None,
        "delay_seconds_median": float(np.median(seconds)) if seconds else None,
        "alarms": alarms_total,
        "false_alarms": sum(r.alert_level["false_alarms"] for r in results),
        "alarm_events": sum(r.alert_level["alarm_events"] for r in results),
        "alarm_events_found": sum(r.alert_level["alarm_events_found"] for r in results),
        "ttd_rows_median": float(np.median(ttd)) if ttd else None,
        "ttd_seconds_median": float(np.median(ttd_seconds)) if ttd_seconds else None,
        # over the runs with times only: alarms of those runs / their scored days
        "alarms_per_day": (
            sum(a["alarms"] for a in timed) / sum(a["scored_days"] for a in timed)
            if timed
            else None
        ),
        "forward_far_mean": float(np.mean(forward)) if forward else None,
        "nab_files": len(normalised),
        "nab_normalised_mean": float(np.mean(normalised)) if normalised else None,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(
    out: Path,
    results: dict[str, list[RunResult]],
    configs: Sequence[Config],
    *,
    command: str,
    source: str,
    stem: str = "streams",
    references: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out``; return the JSON.

    ``references``: published mean normalised NAB scores of other detectors, shown beside."""
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"command": command, "source": source, "configs": []}
    if references:
        document["nab_published_normalised_mean"] = references
    for config in configs:
        runs = results[config.name]
        document["configs"].append(
            {
                "name": config.name,
                "config": config.as_dict(),
                "summary": summary(runs),
                "runs": [
                    {
                        "name": r.name,
                        "train_rows": r.train_rows,
                        "threshold": r.threshold,
                        **r.counts,
                        **rates(r.counts),
                        "event_delays_rows": r.delays,
                        **r.alert_level,
                        "nab": r.nab,
                        "forward_far": r.forward_far,
                    }
                    for r in runs
                ],
            }
        )
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot_file = f"{stem}.png"
    lines = [
        "# Streams evaluation",
        "",
        f"Command: `{command}`  ",
        f"Data: {source}. Point-wise counts over the rows after each run's training part, "
        "summed over runs. FAR = false alarms among normal rows, MAR = missed anomalous rows; "
        "delay = rows from an event's first row to its first ALERT.",
        "",
        "FAR (target) is the realized rate beside the target; forward FAR is what training "
        "predicted forward in time (threshold set on the earlier training blocks, measured on "
        "the last one; mean over runs).",
        "",
        "| configuration | precision | recall | F1 | FAR (target) | forward FAR | MAR | "
        "events found | median delay (rows) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in document["configs"]:
        s = entry["summary"]
        lines.append(
            f"| {entry['name']} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | "
            f"{_fmt(s['f1'])} | {_fmt(s['far'], 4)} ({_fmt(entry['config']['far'], 4)}) | "
            f"{_fmt(s['forward_far_mean'], 4)} | {_fmt(s['mar'])} | "
            f"{s['events_detected']}/{s['events']} | {_fmt(s['delay_rows_median'], 1)} |"
        )
    lines += [
        "",
        "Alert level: an alarm is raised when "
        f"{ALARM_K} of the last {ALARM_N} readings are ALERT and clears after {ALARM_M} "
        "in a row that are NORMAL with a score at or below the model's clear threshold (the "
        "detector's alert rule); an event is found when an alarm is raised "
        "inside it, time to detect (TTD) is from its first row to that raise; a false alarm is "
        "raised outside every event. NAB = mean per-file normalised NAB standard-profile score "
        "(null = 0, perfect = 100) of the raised alarms, over files with a window.",
        "",
        "| configuration | alarms | false alarms | alarms per day | events found by an alarm | "
        "median TTD (rows) | NAB |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in document["configs"]:
        s = entry["summary"]
        lines.append(
            f"| {entry['name']} | {s['alarms']} | {s['false_alarms']} | "
            f"{_fmt(s['alarms_per_day'], 2)} | {s['alarm_events_found']}/{s['alarm_events']} | "
            f"{_fmt(s['ttd_rows_median'], 1)} | {_fmt(s['nab_normalised_mean'], 1)} |"
        )
    for name, value in (references or {}).items():
        lines.append(f"| {name} (published) | | | | | | {value:.1f} |")
    first = document["configs"][0]
    lines += [
        "",
        f"## Per run ({first['name']})",
        "",
        "| run | F1 | FAR | MAR | event delays (rows) | alarms (false) | NAB |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in first["runs"]:
        delays = ", ".join("missed" if d is None else str(d) for d in run["event_delays_rows"])
        nab_score = run["nab"]["normalised"] if run["nab"] else None
        lines.append(
            f"| {run['name']} | {_fmt(run['f1'])} | {_fmt(run['far'], 4)} | "
            f"{_fmt(run['mar'])} | {delays or '-'} | {run['alarms']} ({run['false_alarms']}) | "
            f"{_fmt(nab_score, 1)} |"
        )
    lines += ["", f"![score, threshold and labels over time]({plot_file})", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    _plot(out / plot_file, results[configs[0].name])
    return document


def _plot(path: Path, runs: Sequence[RunResult]) -> None:
    """Score (log scale), threshold and labelled rows over time, one panel per run."""
    import matplotlib  # noqa: PLC0415 - plotting is for reports only

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415

    shown = list(runs)[:MAX_PLOTS]
    fig = Figure(figsize=(12, 1.8 * len(shown) + 0.5))
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, shown, strict=True):
        x = np.arange(len(run.labels))
        ax.plot(x, run.scores.score, lw=0.7, color="tab:blue", label="score")
        ax.axhline(run.threshold, color="tab:red", lw=0.8, label="threshold")
        ax.axvline(run.train_rows, color="grey", ls="--", lw=0.8, label="end of training")
        ax.fill_between(
            x,
            0,
            1,
            where=run.labels.astype(bool),
            color="tab:orange",
            alpha=0.25,
            transform=ax.get_xaxis_transform(),
            label="labelled anomaly",
        )
        ax.set_ylabel(run.name, fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=6, loc="upper left", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
