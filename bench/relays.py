"""``python -m bench.relays``: every relay client against Mosquitto's C relay, in one run.

The part of ``make bench`` that chooses a transport, alone and quicker: its own Mosquitto
(the project's config, a free port), then per round the C relay (``mosquitto_sub |
mosquitto_pub``) and one ``bench.relay`` process per client, each moving the same readings
at QoS 1 (10 machines). Reports, per client, the median over the rounds of msg/s and of the
relay process's CPU µs per message, each as a ratio to the C relay measured in the same
run (the machine may be shared: ratios, not absolute figures, compare). Writes
``<out>/relays.json`` and ``<out>/relays.md``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ceiling import CeilingProbe
from bench.harness import QUICK, Bench, progress
from bench.relay import CLIENTS
from bench.report import fmt, write_files
from bench.system import environment


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def measure(
    bench: Bench, probe: CeilingProbe, clients: Sequence[str], count: int, rounds: int
) -> dict[str, Any]:
    """Rounds of the C relay and every client's relay; the medians and ratios."""
    payloads = [r.payload for r in bench.source(10).take(count)]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in ("C relay", *clients)}
    for round_no in range(1, rounds + 1):
        progress(f"round {round_no}/{rounds}: C relay ...")
        c_run = probe.c_relay(payloads)
        runs["C relay"].append(
            {"msgs_per_s": c_run.msgs_per_s, "cpu_us_per_msg": c_run.relay_cpu_us_per_msg}
        )
        for client in clients:
            progress(f"round {round_no}/{rounds}: relay {client} ...")
            row = bench.throughput("relay", 10, count, client=client)
            runs[client].append(
                {
                    "msgs_per_s": row["msgs_per_s"],
                    "cpu_us_per_msg": row.get("server_cpu_us_per_msg"),
                    "lost": row["lost"],
                    "duplicates": row["duplicates"],
                }
            )
            progress(
                f"  {fmt(row['msgs_per_s'])} msg/s, {fmt(row.get('server_cpu_us_per_msg'))} "
                f"CPU µs/msg, lost {row['lost']}"
            )
    c_rate = _median([r["msgs_per_s"] for r in runs["C relay"]])
    c_cpu = _median([r["cpu_us_per_msg"] for r in runs["C relay"]])
    table = {}
    for name, rows in runs.items():
        rate = _median([r["msgs_per_s"] for r in rows])
        cpu = _median([r["cpu_us_per_msg"] for r in rows])
        table[name] = {
            "msgs_per_s": rate,
            "cpu_us_per_msg": cpu,
            "msgs_per_s_vs_c_relay": _ratio(rate, c_rate),
            "cpu_vs_c_relay": _ratio(cpu, c_cpu),
            "lost": sum(r.get("lost", 0) for r in rows),
            "duplicates": sum(r.get("duplicates", 0) for r in rows),
        }
    return {"relays": table, "runs": runs, "messages": count, "rounds": rounds}


def markdown(report: dict[str, Any]) -> str:
    """The table, the command first."""
    env = report["environment"]
    lines = [
        "# Relays: each MQTT client against Mosquitto's C relay",
        "",
        f"Produced by `{env['command']}` on {env['date']}; {report['messages']:,} readings "
        f"per run, QoS 1, 10 machines, median of {report['rounds']} round(s).",
        "",
        "| relay | msg/s | vs C relay | CPU µs/msg | CPU vs C relay | lost | dup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["relays"].items():
        lines.append(
            f"| {name} | {fmt(row['msgs_per_s'])} | {fmt(row['msgs_per_s_vs_c_relay'], 2)} "
            f"| {fmt(row['cpu_us_per_msg'])} | {fmt(row['cpu_vs_c_relay'], 1)} "
            f"| {row['lost']} | {row['duplicates']} |"
        )
    lines += [
        "",
        "CPU is the relay's own process(es) only (for the C relay: `mosquitto_sub` and "
        "`mosquitto_pub`), from `/proc` over the run; msg/s is from the first publish to the "
        "last message received.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.relays``."""
    parser = argparse.ArgumentParser(prog="python -m bench.relays", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="readings per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    parser.add_argument(
        "--clients", default=",".join(CLIENTS), help=f"comma-separated, of {', '.join(CLIENTS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    args = parser.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    unknown = sorted(set(clients) - set(CLIENTS))
    if unknown:
        parser.error(f"unknown clients: {', '.join(unknown)}")
    command = shlex.join(["python", "-m", "bench.relays", *(argv or sys.argv[1:])])
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="factorywatch-relays-") as tmp:
        workdir = Path(tmp)
        bench = Bench(workdir, workdir / "no-model", QUICK)  # relays need no model
        bench.broker.start()
        try:
            probe = CeilingProbe(bench.broker.port, workdir / "ceiling")
            report = measure(bench, probe, clients, args.messages, args.rounds)
        finally:
            bench.broker.stop()
    report["environment"] = environment(command, load_at_start)
    text = markdown(report)
    print(text)
    write_files(args.out, "relays", report, text, progress, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
