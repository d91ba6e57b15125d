"""The benchmark's report: ``bench.json`` as measured, ``bench.md`` for people."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from factorywatch.settings import DetectorSettings

QUICK_NOTE: Final = " (--quick: smoke-test sizes, not figures to quote)"


def fmt(value: Any, digits: int = 0) -> str:
    """A figure for people: thousands separators, a dash for nothing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


CPU_LABELS: Final = {
    "detector-1000": "detector process, 1,000 machines",
    "naive": "naive detector process",
    "batch": "detector process, batched payloads (per reading)",
}


def _cpu_text(cpu: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v is not None)


def _headline(report: dict[str, Any]) -> list[str]:
    shards = report["shards"]
    rows = [
        "| figure | value |",
        "|---|---:|",
        "| Mosquitto's own ceiling, one hop: `mosquitto_pub` -> broker -> `mosquitto_sub` "
        f"(msg/s) | {fmt(report['mosquitto_c_one_hop_msgs_per_s'])} |",
        "| Mosquitto's own ceiling, C relay: `mosquitto_sub \\| mosquitto_pub` between "
        f"C clients (msg/s) | {fmt(report['mosquitto_c_relay_msgs_per_s'])} |",
    ]
    for client, rate in report["relay_msgs_per_s_by_client"].items():
        fastest = " (fastest)" if client == report["fastest_relay_client"] else ""
        rows.append(f"| relay, {client}{fastest}, QoS 1 (msg/s) | {fmt(rate)} |")
    for client, rate in report["detector_msgs_per_s_by_client"].items():
        default = " (default)" if client == report["detector_client"] else ""
        rows.append(f"| detector, {client}{default}, 10 machines (msg/s) | {fmt(rate)} |")
    rows += [
        "| detector, 1,000 machines (msg/s) | "
        f"{fmt(report['detector_1000_machines_msgs_per_s'])} |",
        f"| {shards} relays, one per line (msg/s) | {fmt(report['relay_sharded_msgs_per_s'])} |",
        f"| {shards} detectors, one per line (msg/s) | "
        f"{fmt(report['detector_sharded_msgs_per_s'])} |",
        f"| naive per-message scikit-learn path (msg/s) | {fmt(report['naive_msgs_per_s'])} |",
        "| p99 latency at 1,000 msg/s, worst machine count (ms) | "
        f"{fmt(report['p99_ms_at_1000'], 2)} |",
        f"| batched payloads (readings/s) | {fmt(report['batch_readings_per_s'])} |",
        f"| messages lost in throughput runs | {fmt(report['lost_in_throughput_runs'])} |",
        f"| broker-dropped messages ($SYS) | {fmt(report['broker_dropped'])} |",
    ]
    for name, value in report["cpu_us_per_msg"].items():
        label = CPU_LABELS.get(name, f"{name} process")
        rows.append(f"| CPU per message, {label} (µs, median) | {fmt(value, 1)} |")
    for name, value in report["peak_memory_mb"].items():
        rows.append(f"| peak memory, {name} (VmHWM, MB) | {fmt(value, 1)} |")
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the command first, then every figure."""
    env = report["environment"]
    lines = [
        "# Benchmark: detector vs the fastest relay and Mosquitto's own ceiling",
        "",
        f"Produced by `{env['command']}` on {env['date']}, "
        f"in {report['runtime_s']:.0f} s{QUICK_NOTE if report['quick'] else ''}.",
        "",
        *_headline(report),
        "",
        "## Goals and ratios (medians of this one run)",
        "",
        "| goal | target | measured | met |",
        "|---|---|---:|---|",
    ]
    for goal in report["goals"]:
        lines.append(
            f"| {goal['goal']} | {goal['target']} | {fmt(goal['measured'], 2)} | "
            f"{fmt(goal['met'])} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {fmt(value, 3)} |" for name, value in report["ratios"].items()]
    lines += [
        "",
        "## Latency: publish -> verdict received (end to end)",
        "",
        "| through | rate | target msg/s | achieved msg/s | machines | sent | received | lost | "
        "p50 ms | p99 ms | max ms | CPU % (one core = 100) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["machines"]:
        lines.append(
            f"| {r['through']} | {r['rate']} | {fmt(r['target_msgs_per_s'])} | "
            f"{fmt(r['achieved_msgs_per_s'])} "
            f"| {fmt(r['machines'])} | {fmt(r['sent'])} | {fmt(r['received'])} | "
            f"{fmt(r['lost'])} | {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | "
            f"{fmt(r['max_ms'], 2)} | {_cpu_text(r['cpu_pct'])} |"
        )
    lines += [
        "",
        "## The detector per transport at fixed rates",
        "",
        "What a reading costs at the rates plants run (each run: one detector, "
        "publish -> verdict received; CPU of the detector process only).",
        "",
        "| transport | rate | machines | sent | lost | CPU µs/msg | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.get("transports_at_fixed_rates", []):
        lines.append(
            f"| {r['client']} | {r['rate']} | {fmt(r['machines'])} | {fmt(r['sent'])} | "
            f"{fmt(r['lost'])} | {fmt(r.get('server_cpu_us_per_msg'), 1)} | "
            f"{fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | {fmt(r['max_ms'], 2)} |"
        )
    lines += [
        "",
        "## Throughput runs (the figures above are the medians of these rounds)",
        "",
        "| C path | messages | seconds | msg/s |",
        "|---|---:|---:|---:|",
    ]
    for c in report["ceiling_runs"]:
        lines.append(
            f"| {c['path']} | {fmt(c['messages'])} | {fmt(c['seconds'], 2)} | "
            f"{fmt(c['msgs_per_s'])} |"
        )
    lines += [
        "",
        "| target | machines | messages | seconds | msg/s | acknowledged | unique verdicts | "
        "lost | duplicates | detector mean batch | CPU µs/msg | peak MB | "
        "CPU % (one core = 100) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["throughput_runs"]:
        metrics = r.get("detector_metrics") or {}
        lines.append(
            f"| {r['target']} | {fmt(r['machines'])} | {fmt(r['messages'])} | "
            f"{fmt(r['seconds'], 2)} | {fmt(r['msgs_per_s'])} | {fmt(r['acknowledged'])} | "
            f"{fmt(r['unique_verdicts'])} | {fmt(r['lost'])} | {fmt(r['duplicates'])} | "
            f"{fmt(metrics.get('mean_batch_size'), 1)} | "
            f"{fmt(r.get('server_cpu_us_per_msg'), 1)} | {fmt(r.get('server_peak_mb'), 1)} | "
            f"{_cpu_text(r['cpu_pct'])} |"
        )
    batch = report["batch"]
    lines += [
        "",
        f"Batched payloads: {fmt(batch['messages'])} "
        f"readings in {fmt(batch['batches'])} batches of up to "
        f"{batch['readings_per_batch']} readings, {fmt(batch['readings_per_s'])} readings/s, "
        f"lost {fmt(batch['lost'])}.",
        "",
        "## Set-up",
        "",
        report["setup"],
        "",
        f"Machine: {env['cpu_count']} CPUs ({env['cpu_model'] or 'unknown model'}), "
        f"Python {env['python']}, paho-mqtt {env['paho_mqtt']}, gmqtt {env['gmqtt']}, "
        f"Mosquitto {env['mosquitto']}, {env['platform']}. Load average (1, 5, 15 min) at "
        f"start {env['load_average_at_start']}, at end {env['load_average_at_end']}.",
        "",
    ]
    return "\n".join(lines)


def setup_text(publishers: int, window: int | None, shards: int) -> str:
    """How the figures were measured (in the report, so nobody has to guess)."""
    return (
        "Everything runs on this one machine and shares its CPUs (with other users' work: "
        "see 'other' in the CPU columns): Mosquitto (the project's `broker/mosquitto.conf`, "
        "open mode: anonymous, no TLS, persistence saved every second), the process under "
        f"test, the publisher (the benchmark process, {publishers} paho clients, clean "
        "sessions, QoS 1, up to 1,000 in flight each) and a subscriber in its own process "
        "(QoS 1 on `<root>/alerts/+/+/verdict`). Readings come from the simulator (anomaly "
        "rate 0.02) and are encoded before timing. Throughput = messages / (first publish -> "
        "last distinct verdict received). Relays (`python -m bench.relay --client C`) "
        "republish each reading unchanged and let their client acknowledge it at once: "
        "paho5 = paho-mqtt with MQTT 5, paho311 = paho-mqtt with MQTT 3.1.1, gmqtt = gmqtt "
        "(asyncio) with MQTT 5. Mosquitto's own ceiling uses no Python: Debian's "
        "`mosquitto_pub -l` (QoS 1, 1,000 in flight) feeds the same payloads, one hop to a "
        "`mosquitto_sub`, or two hops through `mosquitto_sub | mosquitto_pub -l` (the C "
        "relay); each subscriber's persistent session is made (SUBACK) before the load. The "
        "detector decodes, validates, scores and publishes a verdict, and acknowledges each "
        "reading only after its verdict's PUBACK (persistent session, manual ack); mqtt5 "
        "(the compiled-codec driver) is its default transport, paho5 is "
        "`FACTORYWATCH_DETECTOR_TRANSPORT=paho`, paho311 adds `FACTORYWATCH_MQTT_PROTOCOL=3.1.1`. "
        "Loss = broker-acknowledged readings - distinct verdicts. Latency = receipt time in "
        "the subscriber - publish time in the publisher (CLOCK_MONOTONIC in both). In "
        f"throughput runs the publisher keeps at most {fmt(window)} readings outstanding "
        "(published, no verdict yet), so the broker's queue stays bounded. Sharded runs "
        f"('x{shards}'): the same 10 machines spread over {shards} production lines and "
        f"{shards} relays (paho5) or detectors, each subscribed to one line (`--lines`); "
        "their CPU figures add up the shards. Each measurement has a fresh topic root and a "
        "fresh detector client id; the detector runs with its defaults (INFO logging, fast "
        f"scorer, batch_max {DetectorSettings.model_fields['batch_max'].default}, metrics on "
        "a free loopback port; the mean batch size comes from them). Naive path: the same "
        "detector with FACTORYWATCH_DETECTOR_SCORER=sklearn and "
        "FACTORYWATCH_DETECTOR_BATCH_MAX=1. Batched payloads: TelemetryBatch messages of up "
        "to 1,000 readings from gateways, at most four batches outstanding. CPU % is per "
        "process over the measurement window (100 = one core); the subscriber's includes "
        "its start-up; 'other' is everything else busy on the machine in that window."
    )


def write_files(
    out: Path,
    name: str,
    report: dict[str, Any],
    text: str,
    progress: Callable[[str], None],
    *,
    allow_nan: bool = True,
) -> None:
    """A bench's ``<out>/<name>.json`` (the figures as measured) and ``<name>.md`` (``text``)."""
    out.mkdir(parents=True, exist_ok=True)
    data, page = out / f"{name}.json", out / f"{name}.md"
    data.write_text(json.dumps(report, indent=2, allow_nan=allow_nan) + "\n")
    page.write_text(text)
    progress(f"wrote {data} and {page}")
