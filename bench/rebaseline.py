"""``python -m bench.rebaseline``: what re-baselining after a sustained alarm would change.

A candidate policy, measured offline before it is built into the detector: when a machine's
alarm has stayed open for ``R`` readings, its operation is taken to have moved to a new
level; it recalibrates on its next ``W`` readings (CALIBRATING, not ALERT; ``W`` = the rows
its model was trained on) and is scored on with the model fitted on them (fresh windows and
likelihood state, as a newly calibrated machine). Everything else is ``evaluate``'s default
(``model.streams``): the same fit, the same scoring, the same alert rule and NAB scoring.

Each NAB file is one machine trained on its probationary period. The report gives, per
``R``, the pooled point-wise false-alarm rate beside the 2 % target, the mean normalised
NAB standard-profile score, events found by an alarm and how many re-baselines fired, and
per file where the policy changed anything. Writes ``<out>/rebaseline.{json,md}``; nothing
is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.harness import progress
from bench.report import fmt, write_files
from factorywatch.model import nab, streams
from factorywatch.model.alert_rule import AlertRule
from factorywatch.model.fitspec import DEFAULT_SPEC
from factorywatch.model.generic import fit_recording, score_recording
from factorywatch.model.recording import Recording

#: candidate ``R`` values; 0 = no re-baseline (today's default), -1 = ``W`` (as long as the
#: machine was trained)
CANDIDATES = (0, -1, 300)


def _tail(rec: Recording, start: int) -> Recording:
    """Rows ``start ..`` of ``rec``."""
    return dataclasses.replace(
        rec,
        columns={c: v[start:] for c, v in rec.columns.items()},
        time=None if rec.time is None else rec.time[start:],
        labels=None if rec.labels is None else rec.labels[start:],
    )


def replay(
    rec: Recording, train_rows: int, after: int
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], list[int]]:
    """ALERT flags and clear marks of ``rec`` row by row under the policy (``after`` = R,
    0 for none), and the rows where a re-baseline started."""
    n = rec.rows
    flagged = np.zeros(n, dtype=np.bool_)
    calm = np.ones(n, dtype=np.bool_)
    mask = np.zeros(n, dtype=np.bool_)
    mask[:train_rows] = True
    model = fit_recording(rec, mask, DEFAULT_SPEC)
    scores, start = score_recording(model, rec.columns), 0
    starts: list[int] = []
    while True:
        rule, open_for, cut = AlertRule(), 0, None
        clear = model.card.clear_threshold
        for i in range(start, n):
            hit, value = bool(scores.flagged[i - start]), float(scores.score[i - start])
            calm[i] = clear is None or value <= clear
            flagged[i] = hit
            rule.step(hit, bool(calm[i]))
            open_for = open_for + 1 if rule.open else 0
            if after and i >= train_rows and open_for >= after:
                cut = i + 1
                break
        if cut is None or cut + train_rows >= n:
            return flagged, calm, starts
        starts.append(cut)
        piece = _tail(rec, cut)
        window = np.zeros(piece.rows, dtype=np.bool_)
        window[:train_rows] = True
        model = fit_recording(piece, window, DEFAULT_SPEC)
        start = cut + train_rows
        scores = score_recording(model, _tail(rec, start).columns)


def measure(files: Sequence[nab.NabFile], after: int) -> dict[str, Any]:
    """The figures of one candidate over every file."""
    false_rows = normal_rows = found = events = 0
    runs = []
    for f in files:
        rec = f.recording
        train_rows = nab.probation_rows(rec.rows)
        flagged, calm, starts = replay(rec, train_rows, train_rows if after < 0 else after)
        assert rec.labels is not None
        normal = rec.labels[train_rows:] == 0
        false = int((flagged[train_rows:] & normal).sum())
        raised = streams.alarms(flagged, clear=calm)
        detected = np.zeros(rec.rows, dtype=np.bool_)
        detected[raised] = True
        score = nab.normalised_score(detected, f.windows, probation=train_rows)["normalised"]
        alert = streams.alert_figures(rec.labels, raised, train_rows, None)
        false_rows, normal_rows = false_rows + false, normal_rows + int(normal.sum())
        found, events = found + alert["alarm_events_found"], events + alert["alarm_events"]
        runs.append(
            {
                "run": rec.name,
                "far": false / max(1, int(normal.sum())),
                "nab": score,
                "alarms": alert["alarms"],
                "false_alarms": alert["false_alarms"],
                "rebaselines": len(starts),
            }
        )
        progress(f"R={after}: {rec.name} scored")
    scored = [r["nab"] for r in runs if r["nab"] is not None]
    return {
        "after": after,
        "far": false_rows / max(1, normal_rows),
        "nab": float(np.mean(scored)) if scored else None,
        "events_found": found,
        "events": events,
        "rebaselines": sum(r["rebaselines"] for r in runs),
        "runs": runs,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report's page."""
    name = {0: "none (today's default)", -1: "R = W (as long as the model was trained)"}
    lines = [
        "# Re-baselining after a sustained alarm (candidate policy, offline)",
        "",
        f"Command: `{report['command']}`  ",
        f"Data: {report['source']}. Target false-alarm rate 2 %.",
        "",
        "| re-baseline after R readings in alarm | pooled FAR | NAB | events found | "
        "re-baselines |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in report["candidates"]:
        label = name.get(c["after"], f"R = {c['after']}")
        lines.append(
            f"| {label} | {fmt(c['far'], 4)} | "
            f"{fmt(c['nab'], 1)} | {c['events_found']}/{c['events']} | {c['rebaselines']} |"
        )
    base = {r["run"]: r for r in report["candidates"][0]["runs"]}
    lines += ["", "Files where a candidate changed anything (FAR, NAB, alarms (false)):", ""]
    lines += ["| file | R | FAR | NAB | alarms | without: FAR | NAB | alarms |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["candidates"][1:]:
        for r in c["runs"]:
            if not r["rebaselines"]:
                continue
            b = base[r["run"]]
            lines.append(
                f"| {r['run']} | {c['after']} | {fmt(r['far'], 3)} | {fmt(r['nab'], 1)} | "
                f"{r['alarms']} ({r['false_alarms']}) | {fmt(b['far'], 3)} | "
                f"{fmt(b['nab'], 1)} | {b['alarms']} ({b['false_alarms']}) |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.rebaseline``."""
    parser = argparse.ArgumentParser(prog="python -m bench.rebaseline", description=__doc__)
    parser.add_argument("--nab", type=Path, default=Path("../shared/data/nab-dev"))
    parser.add_argument("--after", type=int, nargs="*", default=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    files = nab.load_nab(args.nab)
    after = [0, *[a for a in args.after if a != 0]]  # the default first: the baseline
    report = {
        "command": shlex.join(["python", "-m", "bench.rebaseline", *(argv or sys.argv[1:])]),
        "source": f"{args.nab} ({len(files)} files, NAB layout)",
        "candidates": [measure(files, a) for a in after],
    }
    text = markdown(report)
    print(text)
    write_files(args.out, "rebaseline", report, text, progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
