"""``python -m bench.transports``: the detector on each MQTT transport, in one run.

The part of ``make bench`` that compares the detector's transports (``mqtt5``, the compiled
codec and the default, and ``paho5``, paho-mqtt), alone and quicker: its own Mosquitto and a
model trained on the dataset, then per round a relay and a detector on each transport at
saturation (msg/s, CPU µs per message of the process under test), then the detector on each
transport at the fixed rates (100 and 1,000 msg/s, 100 machines: CPU µs per message, p50/p99
publish -> verdict). Writes ``<out>/transports.json`` and ``<out>/transports.md``; nothing is
asserted.
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
from typing import Any

from bench.harness import FULL, Bench, find_dataset, progress, train
from bench.report import fmt, write_files
from bench.scenarios import TRANSPORT_CLIENTS, TRANSPORT_MACHINES, transport_rows
from bench.system import environment


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
    lines += [
        "",
        f"## At fixed rates ({TRANSPORT_MACHINES} machines; CPU of the detector process)",
        "",
        "| transport | rate | sent | lost | CPU µs/msg | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["fixed_rates"]:
        lines.append(
            f"| {r['client']} | {r['rate']} | {fmt(r['sent'])} | {fmt(r['lost'])} | "
            f"{fmt(r.get('server_cpu_us_per_msg'), 1)} | {fmt(r['p50_ms'], 2)} | "
            f"{fmt(r['p99_ms'], 2)} | {fmt(r['max_ms'], 2)} |"
        )
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
    plan = replace(FULL, latency_s=args.latency_s)
    with tempfile.TemporaryDirectory(prefix="factorywatch-transports-") as tmp:
        workdir = Path(tmp)
        progress(f"training a model on {dataset} ...")
        train(dataset, workdir / "model", no_verify=False)
        bench = Bench(workdir, workdir / "model", plan)
        bench.broker.start()
        try:
            sat = saturation(bench, args.messages, args.rounds)
            fixed = transport_rows(bench, plan)
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
        "fixed_rates": fixed,
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
