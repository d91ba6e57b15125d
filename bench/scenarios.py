"""What ``make bench`` measures, in which order, and the figures and goals it derives.

Throughput rounds alternate every target (so a load change on the shared machine hits them
all alike) and the report quotes each target's median over the rounds:

* relays, one per Python MQTT client (``bench.relay``: paho MQTT 5, paho MQTT 3.1.1, gmqtt):
  the fastest is the ceiling the goal uses;
* Mosquitto's own ceiling with Debian's C clients (``bench.ceiling``): one hop, and the same
  two hops as a relay done by ``mosquitto_sub | mosquitto_pub``;
* the detector with each transport it can use (the compiled-codec ``mqtt5`` driver, the
  default; paho MQTT 5; paho MQTT 3.1.1), sharded by line, and with 1,000 machines; once, the
  naive per-message scikit-learn path.

Then latency at fixed rates (and, per transport, the detector's CPU per message and latency
at each fixed rate: the cost at the rates plants run), and batched payloads.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Final

from bench.ceiling import CeilingProbe
from bench.harness import DEFAULT, DETECTOR_DEFAULT_CLIENT, Bench, Plan, progress
from bench.relay import CLIENTS as RELAY_CLIENTS
from bench.report import fmt
from bench.system import proc_status_mb

# Goals of the issue, as ratios measured in one run.
GOAL_VS_RELAY: Final = 0.9
GOAL_VS_NAIVE: Final = 20.0
GOAL_P99_MS: Final = 10.0
# "No loss of throughput" with 1,000 machines, allowing for run-to-run noise on 2 cores.
GOAL_MACHINES_RATIO: Final = 0.95
# Scale-out by production line: this many relays / detectors, one per line, on one broker.
SHARDS: Final = 2
DETECTOR_CLIENTS: Final = ("paho5", "paho311", "mqtt5")
# The transports compared at fixed rates (CPU per message, latency), with this many machines.
TRANSPORT_CLIENTS: Final = ("paho5", "mqtt5")
TRANSPORT_MACHINES: Final = 100
DEFAULT_CLIENT: Final = DETECTOR_DEFAULT_CLIENT


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _show(row: dict[str, Any]) -> None:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in row["cpu_pct"].items() if v is not None)
    progress(
        f"  {row['target']}: {fmt(row['msgs_per_s'])} msg/s, "
        f"{row['unique_verdicts']:,}/{row['acknowledged']:,} verdicts, lost {row['lost']}, "
        f"duplicates {row['duplicates']} (CPU: {cpu})"
    )


def relay_label(client: str) -> str:
    """The report's name of a relay run."""
    return f"relay {client}"


def detector_label(client: str) -> str:
    """The report's name of a detector run (``detector`` alone: the default transport)."""
    return "detector" if client == DEFAULT_CLIENT else f"detector {client}"


def throughput_rounds(
    bench: Bench, plan: Plan, probe: CeilingProbe
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every throughput target once per round; the Python runs and the C ceiling runs."""
    runs: list[dict[str, Any]] = []
    ceiling_runs: list[dict[str, Any]] = []
    count = plan.throughput_msgs
    payloads = [r.payload for r in bench.source(10).take(count)]

    def run(
        label: str, what: str, kind: str, machines: int, *, shards: int = 1, client: str = DEFAULT
    ) -> None:
        progress(f"measuring {what} ({machines:,} machines, {count:,} messages) ...")
        runs.append(bench.throughput(kind, machines, count, shards=shards, client=client))
        runs[-1]["target"] = label
        _show(runs[-1])

    for round_no in range(1, plan.repeats + 1):
        tag = f"round {round_no}/{plan.repeats}"
        progress(f"measuring Mosquitto's own ceiling with C clients, {tag} ...")
        for c_run in (probe.one_hop(payloads), probe.c_relay(payloads)):
            ceiling_runs.append(c_run.as_dict())
            progress(f"  {c_run.path}: {fmt(c_run.msgs_per_s)} msg/s")
        for client in RELAY_CLIENTS:
            run(relay_label(client), f"relay ceiling, {client}, {tag}", "relay", 10, client=client)
        for client in DETECTOR_CLIENTS:
            label = detector_label(client)
            run(label, f"detector, {client}, {tag}", "detector", 10, client=client)
        for kind in ("relay", "detector"):
            run(
                f"{kind} x{SHARDS}",
                f"{SHARDS} {kind}s, one per line, {tag}",
                kind,
                10,
                shards=SHARDS,
            )
        run("detector-1000", f"detector, {tag}", "detector", 1000)
    progress(f"measuring naive per-message scikit-learn path ({plan.naive_msgs:,} messages) ...")
    runs.append(bench.throughput("naive", 10, plan.naive_msgs))
    runs[-1]["target"] = "naive"
    _show(runs[-1])
    return runs, ceiling_runs


def _latencies(bench: Bench, plan: Plan, detector: float | None) -> list[dict[str, Any]]:
    def show(row: dict[str, Any]) -> None:
        progress(
            f"  {row['through']}: p50 {fmt(row['p50_ms'], 2)} ms, p99 {fmt(row['p99_ms'], 2)} "
            f"ms, max {fmt(row['max_ms'], 2)} ms, sent {row['sent']:,} at "
            f"{fmt(row['achieved_msgs_per_s'])} msg/s, lost {row['lost']}"
        )

    rates: list[tuple[float, str]] = [(r, f"{r:,.0f} msg/s") for r in plan.fixed_rates]
    if detector:
        rates.append((0.8 * detector, "80 % of detector max"))
    rows = []
    relay_rate = plan.fixed_rates[-1]
    progress(
        f"measuring latency through the bare relay at {relay_rate:,.0f} msg/s, 100 machines "
        "(the floor: broker and client library only) ..."
    )
    rows.append(bench.latency(relay_rate, 100, f"{relay_rate:,.0f} msg/s", kind="relay"))
    show(rows[-1])
    for rate, label in rates:
        for machines in plan.latency_machines:
            progress(
                f"measuring latency at {rate:,.0f} msg/s ({label}), {machines:,} machines, "
                f"{plan.latency_s:g} s ..."
            )
            rows.append(bench.latency(rate, machines, label))
            show(rows[-1])
    return rows


def transport_rows(bench: Bench, plan: Plan) -> list[dict[str, Any]]:
    """The detector on each transport at each fixed rate: CPU µs per message, p50/p99."""
    rows = []
    for rate in plan.fixed_rates:
        for client in TRANSPORT_CLIENTS:
            progress(
                f"measuring the detector on {client} at {rate:,.0f} msg/s, "
                f"{TRANSPORT_MACHINES} machines, {plan.latency_s:g} s ..."
            )
            row = bench.latency(rate, TRANSPORT_MACHINES, f"{rate:,.0f} msg/s", client=client)
            rows.append(row)
            progress(
                f"  {fmt(row.get('server_cpu_us_per_msg'))} CPU µs/msg, p50 "
                f"{fmt(row['p50_ms'], 2)} ms, p99 {fmt(row['p99_ms'], 2)} ms, lost {row['lost']}"
            )
    return rows


def measure(bench: Bench, plan: Plan, probe: CeilingProbe) -> dict[str, Any]:
    """Every measurement, in order; returns the report's figures."""
    runs, ceiling_runs = throughput_rounds(bench, plan, probe)

    def rate_of(target: str) -> float | None:
        return _median([r["msgs_per_s"] for r in runs if r["target"] == target])

    def cpu_of(target: str) -> float | None:
        return _median([r.get("server_cpu_us_per_msg") for r in runs if r["target"] == target])

    def c_rate(prefix: str) -> float | None:
        return _median([r["msgs_per_s"] for r in ceiling_runs if r["path"].startswith(prefix)])

    relays = {client: rate_of(relay_label(client)) for client in RELAY_CLIENTS}
    fastest_client = max(
        (c for c in relays if relays[c] is not None), key=lambda c: relays[c] or 0.0, default=None
    )
    fastest = relays[fastest_client] if fastest_client else None
    detectors = {client: rate_of(detector_label(client)) for client in DETECTOR_CLIENTS}
    detector = detectors[DEFAULT_CLIENT]
    relay_sharded = rate_of(f"relay x{SHARDS}")
    detector_sharded = rate_of(f"detector x{SHARDS}")
    best_relay_setup = max((r for r in (fastest, relay_sharded) if r is not None), default=None)
    detector_1000 = rate_of("detector-1000")
    naive = rate_of("naive")
    one_hop, c_relay = c_rate("one hop"), c_rate("C relay")

    latency_rows = _latencies(bench, plan, detector)
    by_transport = transport_rows(bench, plan)
    progress(f"measuring batched payloads ({plan.batch_readings:,} readings, 100 machines) ...")
    batch = bench.batch_throughput(100, plan.batch_readings)
    progress(
        f"  {fmt(batch['readings_per_s'])} readings/s "
        f"({batch['readings_per_batch']} readings per batch), lost {batch['lost']}"
    )
    if bench.broker.process is not None:
        bench.note_peak("broker", proc_status_mb(bench.broker.process.pid, "VmHWM"))

    at_1000 = {
        str(r["machines"]): r["p99_ms"]
        for r in latency_rows
        if r["target_msgs_per_s"] == 1000.0 and r["through"] == "detector"
    }
    p99_at_1000 = max((v for v in at_1000.values() if v is not None), default=None)
    ratios = {
        "detector_vs_fastest_relay": _ratio(detector, fastest),
        **{
            f"detector_{client}_vs_fastest_relay": _ratio(rate, fastest)
            for client, rate in detectors.items()
            if client != DEFAULT_CLIENT
        },
        "detector_vs_relay_same_client": _ratio(detector, relays[DEFAULT_CLIENT]),
        "fastest_relay_vs_c_relay": _ratio(fastest, c_relay),
        **{f"relay_{client}_vs_c_relay": _ratio(rate, c_relay) for client, rate in relays.items()},
        "detector_vs_c_relay": _ratio(detector, c_relay),
        "detector_vs_broker_one_hop": _ratio(detector, one_hop),
        "sharded_detector_vs_best_relay": _ratio(detector_sharded, best_relay_setup),
        "detector_vs_naive": _ratio(detector, naive),
        "machines_1000_vs_10": _ratio(detector_1000, detector),
    }
    return {
        "relay_msgs_per_s_by_client": relays,
        "fastest_relay_client": fastest_client,
        "fastest_relay_msgs_per_s": fastest,
        "mosquitto_c_one_hop_msgs_per_s": one_hop,
        "mosquitto_c_relay_msgs_per_s": c_relay,
        "detector_msgs_per_s_by_client": detectors,
        "detector_client": DEFAULT_CLIENT,
        "detector_msgs_per_s": detector,
        "detector_1000_machines_msgs_per_s": detector_1000,
        "shards": SHARDS,
        "relay_sharded_msgs_per_s": relay_sharded,
        "detector_sharded_msgs_per_s": detector_sharded,
        "naive_msgs_per_s": naive,
        "cpu_us_per_msg": {
            **{relay_label(c): cpu_of(relay_label(c)) for c in RELAY_CLIENTS},
            **{detector_label(c): cpu_of(detector_label(c)) for c in DETECTOR_CLIENTS},
            f"detector x{SHARDS}": cpu_of(f"detector x{SHARDS}"),
            "detector-1000": cpu_of("detector-1000"),
            "naive": cpu_of("naive"),
            "batch": batch.get("server_cpu_us_per_msg"),
        },
        "p99_ms_at_1000": p99_at_1000,
        "p99_ms_at_1000_by_machines": at_1000,
        "machines": latency_rows,
        "transports_at_fixed_rates": by_transport,
        "batch_readings_per_s": batch.get("readings_per_s"),
        "batch": batch,
        "peak_memory_mb": dict(bench.peak_mb),
        "ratios": ratios,
        "goals": goals(ratios, p99_at_1000),
        "throughput_runs": runs,
        "ceiling_runs": ceiling_runs,
        "lost_in_throughput_runs": sum(r["lost"] for r in runs),
    }


def goals(ratios: dict[str, float | None], p99_at_1000: float | None) -> list[dict[str, Any]]:
    """The issue's goals next to what was measured (informational: nothing is asserted)."""

    def row(name: str, target: str, value: float | None, met: bool | None) -> dict[str, Any]:
        return {"goal": name, "target": target, "measured": value, "met": met}

    def at_least(value: float | None, goal: float) -> bool | None:
        return None if value is None else value >= goal

    vs_relay, vs_naive = ratios["detector_vs_fastest_relay"], ratios["detector_vs_naive"]
    machines, sharded = ratios["machines_1000_vs_10"], ratios["sharded_detector_vs_best_relay"]
    return [
        row(
            "detector (default transport) vs the fastest relay (QoS 1), one process each",
            f">= {GOAL_VS_RELAY}",
            vs_relay,
            at_least(vs_relay, GOAL_VS_RELAY),
        ),
        row(
            f"{SHARDS} detectors (one per line) vs the best relay set-up (1 or {SHARDS})",
            f">= {GOAL_VS_RELAY}",
            sharded,
            at_least(sharded, GOAL_VS_RELAY),
        ),
        row(
            "detector vs naive path",
            f">= {GOAL_VS_NAIVE:g}",
            vs_naive,
            at_least(vs_naive, GOAL_VS_NAIVE),
        ),
        row(
            "p99 at 1,000 msg/s (worst machine count), ms",
            f"<= {GOAL_P99_MS:g}",
            p99_at_1000,
            None if p99_at_1000 is None else p99_at_1000 <= GOAL_P99_MS,
        ),
        row(
            "1,000 vs 10 machines throughput",
            f">= {GOAL_MACHINES_RATIO} (no loss, within noise)",
            machines,
            at_least(machines, GOAL_MACHINES_RATIO),
        ),
    ]
