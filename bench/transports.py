"""``python -m bench.transports``: the detector on each MQTT transport, in one run.

The part of ``make bench`` that compares the detector's transports (``mqtt5``, the compiled
codec and the default, and ``paho5``, paho-mqtt), alone and quicker: its own Mosquitto and a
model trained on the dataset, then per round a relay and a detector on each transport at
saturation (msg/s, CPU µs per message of the process under test), then the detector on each
transport at the fixed rates (100 and 1,000 msg/s, 100 machines: CPU µs per message, p50/p99
publish -> verdict); then the default transport's fixed-rate grid (100 msg/s, 1,000 msg/s and
80 % of its saturation rate in this run, each with 10, 100 and 1,000 machines: CPU % of a core
and per message, p50/p99/p99.9), a CPU split of the detector (transport, decode, engine,
scoring, publish) from py-spy attached to one more run at 1,000 msg/s with 1,000 machines,
and the issue's goals checked against the run's own figures. Writes
``<out>/transports.json`` and ``<out>/transports.md``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from bench.harness import FULL, Bench, Plan, find_dataset, progress, train
from bench.profile import SAMPLE_RATE_HZ, SPLIT_PARTS, Profile, spied
from bench.report import fmt, write_files
from bench.scenarios import GOAL_P99_MS, TRANSPORT_CLIENTS, TRANSPORT_MACHINES
from bench.system import environment

#: the default transport's fixed-rate grid: rates (msg/s; 80 % of its saturation rate is
#: added) by machine counts
GRID_RATES: Final = (100.0, 1000.0)
GRID_MACHINES: Final = (10, 100, 1000)
#: the run py-spy is attached to for the CPU split (rate, machines): the latency goal's
PROFILED: Final = (1000.0, 1000)
#: that run lasts this many times as long as a fixed-rate run
PROFILED_LONGER: Final = 3
#: the issue's goals for the default transport
GOAL_SATURATION_US: Final = 80.0
GOAL_CPU_PCT: Final = {100.0: 3.0, 1000.0: 15.0}
DEFAULT_CLIENT: Final = "mqtt5"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def saturation(bench: Bench, count: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Relay and detector per transport, ``rounds`` alternating rounds; medians."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(1, rounds + 1):
        for kind in ("relay", "detector"):
            for client in TRANSPORT_CLIENTS:
                progress(f"round {round_no}/{rounds}: {kind} on {client}, {count:,} readings")
                row = bench.throughput(kind, 10, count, client=client)
                runs.setdefault(f"{kind} {client}", []).append(row)
                progress(
                    f"  {fmt(row['msgs_per_s'])} msg/s, "
                    f"{fmt(row.get('server_cpu_us_per_msg'))} CPU µs/msg, lost {row['lost']}, "
                    f"duplicates {row['duplicates']}"
                )
    return {
        name: {
            "msgs_per_s": _median([r["msgs_per_s"] for r in rows]),
            "cpu_us_per_msg": _median([r.get("server_cpu_us_per_msg") for r in rows]),
            "lost": sum(r["lost"] for r in rows),
            "duplicates": sum(r["duplicates"] for r in rows),
        }
        for name, rows in runs.items()
    }


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a latency run."""
    keep = (
        *("client", "rate", "target_msgs_per_s", "achieved_msgs_per_s", "machines", "sent"),
        *("lost", "duplicates", "server_cpu_us_per_msg", "p50_ms", "p99_ms", "p999_ms", "max_ms"),
    )
    out = {k: row.get(k) for k in keep}
    out["cpu_pct_of_core"] = (row.get("cpu_pct") or {}).get("detector")
    return out


def _latency(bench: Bench, rate: float, machines: int, label: str, client: str) -> dict[str, Any]:
    progress(
        f"measuring the detector on {client} at {rate:,.0f} msg/s ({label}), "
        f"{machines:,} machines, {bench.plan.latency_s:g} s ..."
    )
    row = _row(bench.latency(rate, machines, label, client=client))
    progress(
        f"  {fmt(row['cpu_pct_of_core'], 1)} % of a core, "
        f"{fmt(row['server_cpu_us_per_msg'])} CPU µs/msg, p50 {fmt(row['p50_ms'], 2)} ms, "
        f"p99 {fmt(row['p99_ms'], 2)} ms, p99.9 {fmt(row['p999_ms'], 2)} ms, lost {row['lost']}"
    )
    return row


def fixed_rates(bench: Bench, max_rate: float | None) -> tuple[list[dict[str, Any]], ...]:
    """The default transport's grid (rates x machines), and paho's rows at the grid's rates
    with ``TRANSPORT_MACHINES`` machines (the transports compared)."""
    rates = [(r, f"{r:,.0f} msg/s") for r in GRID_RATES]
    if max_rate:
        rates.append((0.8 * max_rate, "80 % of max"))
    grid = [
        _latency(bench, rate, machines, label, DEFAULT_CLIENT)
        for rate, label in rates
        for machines in GRID_MACHINES
    ]
    others = [
        _latency(bench, rate, TRANSPORT_MACHINES, f"{rate:,.0f} msg/s", client)
        for rate in GRID_RATES
        for client in TRANSPORT_CLIENTS
        if client != DEFAULT_CLIENT
    ]
    return grid, others


def cpu_split(bench: Bench, raw: Path) -> dict[str, Any]:
    """One more run at ``PROFILED`` with py-spy attached (GIL samples only: the CPU the
    detector's Python spends, not its waits); samples per part of the detector."""
    rate, machines = PROFILED
    plan = bench.plan
    bench.plan = replace(plan, latency_s=plan.latency_s * PROFILED_LONGER)  # more samples
    try:
        with spied(bench, raw, gil=True):
            row = _latency(bench, rate, machines, f"{rate:,.0f} msg/s, profiled", DEFAULT_CLIENT)
    finally:
        bench.plan = plan
    profile = Profile.parse(raw.read_text().splitlines()) if raw.exists() else Profile()
    total = max(1, profile.samples)
    return {
        "rate": rate,
        "machines": machines,
        "samples": profile.samples,
        "share_pct": {
            part: round(100 * profile.split[part] / total, 1) for part in (*SPLIT_PARTS, "other")
        },
        "run": row,
        "top_self": [
            {"function": name, "share_pct": round(100 * n / total, 1)}
            for name, n in profile.self_time.most_common(12)
        ],
    }


def goals(sat: dict[str, dict[str, Any]], grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals against this run's figures (the default transport)."""

    def at(rate: float, machines: int) -> dict[str, Any] | None:
        found = [
            r
            for r in grid
            if r["target_msgs_per_s"] == round(rate, 1) and r["machines"] == machines
        ]
        return found[0] if found else None

    out: list[dict[str, Any]] = []
    cpu = sat[f"detector {DEFAULT_CLIENT}"]["cpu_us_per_msg"]
    out.append(
        {
            "goal": f"CPU per message at saturation <= {GOAL_SATURATION_US:g} µs",
            "value": fmt(cpu, 1),
            "met": None if cpu is None else cpu <= GOAL_SATURATION_US,
        }
    )
    for rate, limit in GOAL_CPU_PCT.items():
        rows = [r for r in grid if r["target_msgs_per_s"] == rate]
        worst = max((r["cpu_pct_of_core"] or 0.0 for r in rows), default=None)
        out.append(
            {
                "goal": f"CPU at {rate:,.0f} msg/s <= {limit:g} % of a core (worst of "
                f"{', '.join(fmt(r['machines']) for r in rows)} machines)",
                "value": f"{fmt(worst, 1)} %",
                "met": None if worst is None else worst <= limit,
            }
        )
    row = at(1000.0, 1000)
    p99 = row["p99_ms"] if row else None
    out.append(
        {
            "goal": f"p99 publish -> verdict at 1,000 msg/s, 1,000 machines <= {GOAL_P99_MS:g} ms",
            "value": f"{fmt(p99, 2)} ms",
            "met": None if p99 is None else p99 <= GOAL_P99_MS,
        }
    )
    lost = sum(r["lost"] or 0 for r in grid) + sat[f"detector {DEFAULT_CLIENT}"]["lost"]
    dups = sum(r["duplicates"] or 0 for r in grid) + sat[f"detector {DEFAULT_CLIENT}"]["duplicates"]
    out.append(
        {
            "goal": "loss 0 and duplicates 0 (every run of the default transport)",
            "value": f"{lost} / {dups}",
            "met": lost == 0 and dups == 0,
        }
    )
    return out


def markdown(report: dict[str, Any]) -> str:
    """Both tables, the command first."""
    env = report["environment"]
    sat = report["saturation"]
    lines = [
        "# The detector per MQTT transport",
        "",
        f"Produced by `{env['command']}` on {env['date']} (load average at start "
        f"{env['load_average_at_start']}, at end {env['load_average_at_end']}); "
        f"{report['messages']:,} readings per saturation run, 10 machines, median of "
        f"{report['rounds']} round(s).",
        "",
        "## At saturation",
        "",
        "| process | msg/s | CPU µs/msg | lost | duplicates |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in sat.items():
        lines.append(
            f"| {name} | {fmt(row['msgs_per_s'])} | {fmt(row['cpu_us_per_msg'], 1)} | "
            f"{row['lost']} | {row['duplicates']} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {fmt(v, 3)} |" for k, v in report["ratios"].items()]
    grid, compared = report["fixed_rates"], report["compared"]
    lines += [
        "",
        f"## At fixed rates ({TRANSPORT_MACHINES} machines; CPU of the detector process)",
        "",
        "| transport | rate | sent | lost | CPU µs/msg | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [*compared, *grid]:
        if r["machines"] != TRANSPORT_MACHINES or r["target_msgs_per_s"] not in GRID_RATES:
            continue
        lines.append(
            f"| {r['client']} | {r['rate']} | {fmt(r['sent'])} | {fmt(r['lost'])} | "
            f"{fmt(r['server_cpu_us_per_msg'], 1)} | {fmt(r['p50_ms'], 2)} | "
            f"{fmt(r['p99_ms'], 2)} | {fmt(r['max_ms'], 2)} |"
        )
    lines += [
        "",
        f"## The default transport ({DEFAULT_CLIENT}) at fixed rates, by machine count",
        "",
        "CPU of the detector process over the run, in % of one core and per message; latency "
        "from the publisher's send to the verdict's arrival at a subscriber.",
        "",
        "| rate | machines | achieved msg/s | sent | lost | duplicates | CPU % of a core | "
        "CPU µs/msg | p50 ms | p99 ms | p99.9 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in grid:
        lines.append(
            f"| {r['rate']} ({fmt(r['target_msgs_per_s'])}) | {fmt(r['machines'])} | "
            f"{fmt(r['achieved_msgs_per_s'])} | {fmt(r['sent'])} | {fmt(r['lost'])} | "
            f"{fmt(r['duplicates'])} | {fmt(r['cpu_pct_of_core'], 1)} | "
            f"{fmt(r['server_cpu_us_per_msg'], 1)} | {fmt(r['p50_ms'], 2)} | "
            f"{fmt(r['p99_ms'], 2)} | {fmt(r['p999_ms'], 2)} | {fmt(r['max_ms'], 2)} |"
        )
    split = report["cpu_split"]
    run = split["run"]
    lines += [
        "",
        f"## Where the detector's CPU goes ({DEFAULT_CLIENT}, {fmt(split['rate'])} msg/s, "
        f"{fmt(split['machines'])} machines)",
        "",
        f"py-spy attached to one more run of the detector, {PROFILED_LONGER} times as long "
        f"as the others ({fmt(split['samples'])} samples at "
        f"{SAMPLE_RATE_HZ} Hz, `--gil`: only while it runs Python, not while it waits; that run: "
        f"{fmt(run['cpu_pct_of_core'], 1)} % of a core, {fmt(run['server_cpu_us_per_msg'])} "
        "µs/msg). A sample belongs to the innermost frame that names a part "
        "(`bench/profile.py`, `split_of`): transport = socket, packets, acks (the mqtt5 "
        "driver, selectors); decode = payload to validated reading (ingest, contracts, "
        "pydantic); scoring = features, forest, thresholds, envelope, explanations; "
        "publish = verdict bytes and queuing its PUBLISH; engine = the rest of the detector "
        "(engine, alert state, runner, loop, checkpoint, metrics).",
        "",
        "| part | share of samples |",
        "|---|---:|",
    ]
    lines += [f"| {part} | {fmt(v, 1)} % |" for part, v in split["share_pct"].items()]
    lines += ["", "| heaviest functions (self) | share |", "|---|---:|"]
    lines += [f"| `{t['function']}` | {fmt(t['share_pct'], 1)} % |" for t in split["top_self"]]
    lines += ["", "## Goals (issue #23), from this run", "", "| goal | value | met |"]
    lines += ["|---|---:|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {fmt(g['met'])} |" for g in report["goals"]]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.transports``."""
    parser = argparse.ArgumentParser(prog="python -m bench.transports", description=__doc__)
    parser.add_argument("--dataset", type=Path, help="AI4I CSV to train on (default: data/)")
    parser.add_argument("--messages", type=int, default=20_000, help="readings per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--latency-s", type=float, default=6.0, help="seconds per fixed rate")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    args = parser.parse_args(argv)
    dataset = find_dataset(args.dataset)
    command = shlex.join(["python", "-m", "bench.transports", *(argv or sys.argv[1:])])
    load_at_start = os.getloadavg()
    plan: Plan = replace(FULL, latency_s=args.latency_s)
    with tempfile.TemporaryDirectory(prefix="factorywatch-transports-") as tmp:
        workdir = Path(tmp)
        progress(f"training a model on {dataset} ...")
        train(dataset, workdir / "model", no_verify=False)
        bench = Bench(workdir, workdir / "model", plan)
        bench.broker.start()
        try:
            sat = saturation(bench, args.messages, args.rounds)
            grid, compared = fixed_rates(bench, sat[f"detector {DEFAULT_CLIENT}"]["msgs_per_s"])
            split = cpu_split(bench, workdir / "profile-detector.txt")
        finally:
            bench.broker.stop()
    ratios = {
        f"detector {c} / relay {c}": _ratio(
            sat[f"detector {c}"]["msgs_per_s"], sat[f"relay {c}"]["msgs_per_s"]
        )
        for c in TRANSPORT_CLIENTS
    }
    ratios["detector mqtt5 / detector paho5 (msg/s)"] = _ratio(
        sat["detector mqtt5"]["msgs_per_s"], sat["detector paho5"]["msgs_per_s"]
    )
    ratios["detector mqtt5 / detector paho5 (CPU per message)"] = _ratio(
        sat["detector mqtt5"]["cpu_us_per_msg"], sat["detector paho5"]["cpu_us_per_msg"]
    )
    report = {
        "saturation": sat,
        "ratios": ratios,
        "fixed_rates": grid,
        "compared": compared,
        "cpu_split": split,
        "goals": goals(sat, grid),
        "messages": args.messages,
        "rounds": args.rounds,
        "environment": environment(command, load_at_start),
    }
    text = markdown(report)
    print(text)
    write_files(args.out, "transports", report, text, progress, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
