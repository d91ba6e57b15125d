"""Labelled scenario runs of a generic multichannel machine (a pump), for evaluation (pure).

Each run is what a plant recording looks like: an anomaly-free first part, then normal
operation with labelled anomaly episodes. The machine has eight channels named the way
real systems name them (``Accelerometer1RMS``, ``Volume Flow RateRMS``, ...), driven by a
shared load process (so channels are correlated), with sensor noise, a slowly warming
temperature and, optionally, operator set-point changes (normal behaviour a model must not
flag).

Anomaly kinds (``KINDS``): ``step_change`` (a sensor's level jumps), ``slow_drift`` (a
sensor ramps away), ``stuck_sensor`` (a sensor freezes at its last value), ``noise_burst``
(a sensor gets much noisier), ``oscillation`` (a periodic disturbance), and the AI4I failure
conditions on this machine: ``overstrain`` (vibration and current rise together),
``power_failure`` (electrical power leaves its window: current and voltage sag), and
``heat_dissipation`` (temperatures rise while the coolant flow drops).

Normal drifts (``DRIFTS``), runs without any anomaly whose normal behaviour moves after the
training part, as real plants do: ``warm_up`` (the machine starts cold: both temperatures
rise towards their working level with a time constant of a few hundred readings),
``load_settles`` (the load moves to a new working point after training and settles there:
every load-driven channel moves together, keeping their relationship) and
``seasonal`` (a slow cycle, longer than the run, on the temperatures: the ambient day). A
detector must stay quiet on them.

``write_csv`` writes a run as a ``;``-separated CSV with a ``datetime`` column and an
``anomaly`` label column, like public benchmark recordings.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

CHANNELS: Final = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
KINDS: Final = (
    "step_change",
    "slow_drift",
    "stuck_sensor",
    "noise_burst",
    "oscillation",
    "overstrain",
    "power_failure",
    "heat_dissipation",
)
DRIFTS: Final = ("warm_up", "load_settles", "seasonal")
# name: (mean, load gain, noise sd); the load process has unit variance.
_BASE: Final = {
    "Accelerometer1RMS": (0.21, 0.012, 0.004),
    "Accelerometer2RMS": (0.26, 0.015, 0.005),
    "Current": (1.9, 0.25, 0.08),
    "Pressure": (0.3, -0.05, 0.02),
    "Temperature": (70.0, 0.3, 0.15),
    "Thermocouple": (27.0, 0.2, 0.1),
    "Voltage": (230.0, -1.0, 0.8),
    "Volume Flow RateRMS": (32.0, 1.2, 0.4),
}
LABEL: Final = "anomaly"
TIME: Final = "datetime"
START: Final = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Episode:
    """One labelled anomaly: kind, first row, length, channel it acts on."""

    kind: str
    start: int
    length: int
    channel: str


@dataclass
class Run:
    """A generated recording: channel values per row, labels, the episodes."""

    values: dict[str, list[float]]
    labels: list[int]
    episodes: list[Episode]

    @property
    def rows(self) -> int:
        """Number of rows."""
        return len(self.labels)


def _normal(
    rows: int,
    rng: random.Random,
    setpoint_rate: float = 0.0,
    drift: str | None = None,
    train_rows: int = 400,
) -> dict[str, list[float]]:
    """Anomaly-free operation: correlated channels, slow warming, optional set-point changes
    and one of the normal ``DRIFTS``.

    ``setpoint_rate``: per-row chance that an operator moves the load set-point to a new level
    (normal, but possibly a level the training part never saw).
    """
    if drift is not None and drift not in DRIFTS:
        raise ValueError(f"unknown normal drift {drift!r}; choose from {list(DRIFTS)}")
    load, setpoint = 0.0, 0.0
    warm = rng.uniform(-0.1, 0.3)  # temperature change over the run (degrees)
    # warm-up: degrees still to gain at row 0, and its time constant (rows)
    cold, tau = rng.uniform(1.0, 1.6), rng.uniform(250.0, 400.0)
    # the load's new working point, reached over ``settle`` rows after training
    target, settle = rng.choice((-1.0, 1.0)) * rng.uniform(0.8, 1.2), rng.uniform(150, 300)
    period, phase = rng.uniform(1500.0, 2500.0), rng.uniform(0.0, 2 * math.pi)
    values: dict[str, list[float]] = {c: [] for c in CHANNELS}
    for i in range(rows):
        if setpoint_rate and rng.random() < setpoint_rate:
            setpoint = rng.uniform(-0.8, 0.8)
        shift = 0.0
        if drift == "load_settles" and i >= train_rows:
            shift = target * min(1.0, (i - train_rows) / settle)
        load = 0.95 * load + 0.05 * (setpoint + shift) + rng.gauss(0.0, 0.3)
        heat = 0.0
        if drift == "warm_up":
            heat = -cold * math.exp(-i / tau)
        elif drift == "seasonal":
            heat = 0.8 * math.sin(2 * math.pi * i / period + phase)
        for c in CHANNELS:
            mean, gain, sd = _BASE[c]
            drift_c = warm * i / rows + heat if c in ("Temperature", "Thermocouple") else 0.0
            values[c].append(mean + gain * load + drift_c + rng.gauss(0.0, sd))
    return values


def _apply(  # noqa: PLR0912 - one branch per anomaly kind
    values: dict[str, list[float]], ep: Episode, rng: random.Random
) -> None:
    """Turn rows ``ep.start .. ep.start + ep.length`` into the anomaly ``ep.kind``."""
    rows = range(ep.start, ep.start + ep.length)
    _mean, gain, sd = _BASE[ep.channel]
    spread = math.hypot(gain * 1.6, sd)  # about the channel's normal standard deviation
    col = values[ep.channel]
    sign = rng.choice((-1.0, 1.0))
    if ep.kind == "step_change":
        size = rng.uniform(2.5, 4.0) * spread * sign
        for i in rows:
            col[i] += size
    elif ep.kind == "slow_drift":
        size = rng.uniform(4.0, 6.0) * spread * sign
        for k, i in enumerate(rows):
            col[i] += size * min(1.0, (k + 1) / (0.4 * ep.length))
    elif ep.kind == "stuck_sensor":
        frozen = col[ep.start - 1]
        for i in rows:
            col[i] = frozen
    elif ep.kind == "noise_burst":
        for i in rows:
            col[i] += rng.gauss(0.0, 3.0 * spread)
    elif ep.kind == "oscillation":
        period = rng.uniform(6.0, 14.0)
        for k, i in enumerate(rows):
            col[i] += 2.0 * spread * math.sin(2 * math.pi * k / period)
    elif ep.kind == "overstrain":
        for name, factor in (
            ("Accelerometer1RMS", 4.0),
            ("Accelerometer2RMS", 3.5),
            ("Current", 3.0),
        ):
            _m, g, s = _BASE[name]
            for i in rows:
                values[name][i] += factor * math.hypot(g * 1.6, s)
    elif ep.kind == "power_failure":
        for name, factor in (("Current", -3.0), ("Voltage", -4.0)):
            _m, g, s = _BASE[name]
            for i in rows:
                values[name][i] += factor * math.hypot(g * 1.6, s)
    elif ep.kind == "heat_dissipation":
        for k, i in enumerate(rows):
            ramp = min(1.0, (k + 1) / (0.3 * ep.length))
            for name, factor in (
                ("Temperature", 5.0),
                ("Thermocouple", 4.0),
                ("Volume Flow RateRMS", -3.0),
            ):
                _m, g, s = _BASE[name]
                values[name][i] += ramp * factor * math.hypot(g * 1.6, s)
    else:
        raise ValueError(f"unknown scenario kind {ep.kind!r}; choose from {list(KINDS)}")


def generate(
    kinds: Sequence[str],
    *,
    seed: int,
    train_rows: int = 400,
    rows: int = 1200,
    episode_rows: tuple[int, int] = (60, 140),
    setpoint_rate: float = 0.0,
    drift: str | None = None,
) -> Run:
    """A run: ``train_rows`` normal rows, then normal operation with one episode per kind
    (none: a normal run), with the normal ``drift`` if given."""
    rng = random.Random(seed)
    values = _normal(rows, rng, setpoint_rate, drift, train_rows)
    labels = [0] * rows
    episodes: list[Episode] = []
    free = rows - train_rows
    slot = free // max(len(kinds), 1)
    for n, kind in enumerate(kinds):
        length = min(rng.randint(*episode_rows), slot - 20)
        start = train_rows + n * slot + rng.randint(10, max(10, slot - length - 10))
        channel = rng.choice([c for c in CHANNELS if c not in ("Voltage",)])
        ep = Episode(kind=kind, start=start, length=length, channel=channel)
        _apply(values, ep, rng)
        for i in range(start, start + length):
            labels[i] = 1
        episodes.append(ep)
    return Run(values=values, labels=labels, episodes=episodes)


def suite(seed: int = 0, runs_per_kind: int = 2, setpoint_rate: float = 0.0) -> dict[str, Run]:
    """The scenario suite: ``runs_per_kind`` runs of each kind (two episodes per run), and
    as many anomaly-free runs of each normal drift (``normal_<drift>_<n>``)."""
    out: dict[str, Run] = {}
    for k, kind in enumerate(KINDS):
        for r in range(runs_per_kind):
            out[f"{kind}_{r + 1}"] = generate(
                [kind, kind], seed=seed * 1000 + k * 10 + r, setpoint_rate=setpoint_rate
            )
    for d, drift in enumerate(DRIFTS):
        for r in range(runs_per_kind):
            out[f"normal_{drift}_{r + 1}"] = generate(
                [], seed=seed * 1000 + 700 + d * 10 + r, setpoint_rate=setpoint_rate, drift=drift
            )
    return out


def write_csv(run: Run, path: Path, *, sep: str = ";") -> None:
    """Write ``run`` as a benchmark-style CSV (datetime, channels, anomaly label)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter=sep)
        writer.writerow([TIME, *CHANNELS, LABEL])
        for i in range(run.rows):
            stamp = (START + timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S")
            writer.writerow(
                [stamp, *(f"{run.values[c][i]:.5g}" for c in CHANNELS), f"{run.labels[i]}.0"]
            )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m factorywatch.sensors.scenarios OUT_DIR``: write the suite's CSVs."""
    import argparse  # noqa: PLC0415 - only the command line needs it

    parser = argparse.ArgumentParser(description="write the scenario suite as CSV runs")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-per-kind", type=int, default=2)
    parser.add_argument(
        "--normal", type=int, default=0, help="write N anomaly-free runs instead (FAR checks)"
    )
    parser.add_argument(
        "--setpoints",
        type=float,
        default=0.0,
        help="per-row chance of an operator set-point change in normal operation (e.g. 0.004)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.normal:
        for i in range(args.normal):
            run = generate([], seed=args.seed * 1000 + 500 + i, setpoint_rate=args.setpoints)
            write_csv(run, args.out / f"normal_{i}.csv")
        print(f"wrote {args.normal} anomaly-free runs to {args.out}")
        return 0
    for name, run in suite(args.seed, args.runs_per_kind, args.setpoints).items():
        write_csv(run, args.out / f"{name}.csv")
    print(f"wrote {(len(KINDS) + len(DRIFTS)) * args.runs_per_kind} runs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
