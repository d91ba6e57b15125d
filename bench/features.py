"""``python -m bench.features``: what windowed features cost, through the real broker.

Two generic models are trained with the real CLI (``factorywatch train --csv``) on a normal
run of the scenario pump (``sensors/scenarios.py``, eight channels): the ``point`` preset
(channels only) and the ``windowed`` preset (the default: + rolling mean and log std per
channel, the windows in each machine's keyed state). Each is served by a real detector behind
the bench's Mosquitto and driven with ``Bench.throughput`` (closed-loop publisher, verdicts
counted by a subscriber process) at 1,000 machines, alternating the two presets for
``repeats`` rounds; the report quotes medians and the ratio windowed / point (goal >= 0.8).

Per-machine state: an in-process engine (``detector/engine.py``, the detector's own) serving
each model takes ``window + 1`` readings of each of 10,000 machines; the JSON of its snapshot
divided by the machine count is the state a machine costs in a checkpoint.

Writes ``<out>/bench-features.{json,md}``; nothing is asserted. ``--profile`` instead runs one
throughput measurement per preset with py-spy attached to the detector (``bench.profile``'s
sampler and summary) and writes ``<out>/profile-features.md``: where the extra CPU goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.harness import FULL, QUICK, Bench, Plan, Server, bench_env, progress
from bench.load import PROJECT_DIR, ChannelSource
from bench.profile import SAMPLE_RATE_HZ, Profile
from bench.report import fmt
from bench.system import environment
from factorywatch.detector.core import Received
from factorywatch.detector.engine import Engine
from factorywatch.launch import Launched, cli_command
from factorywatch.model import artifact
from factorywatch.sensors import scenarios
from factorywatch.topics import Topics

PRESETS: Final = ("point", "windowed")
MACHINES: Final = 1000
STATE_MACHINES: Final = 10_000
GOAL_WINDOWED_VS_POINT: Final = 0.8
TRAIN_ROWS: Final = 2000
WINDOW: Final = 5
BATCH: Final = 256


def train_models(workdir: Path, trees: int) -> dict[str, Path]:
    """A point and a windowed model trained by ``factorywatch train --csv`` on a normal run."""
    csv = workdir / "pump-normal.csv"
    scenarios.write_csv(scenarios.generate([], seed=7, train_rows=TRAIN_ROWS, rows=TRAIN_ROWS), csv)
    dirs: dict[str, Path] = {}
    for preset in PRESETS:
        model_dir = workdir / f"model-{preset}"
        done = subprocess.run(
            cli_command(
                "train",
                "--csv",
                str(csv),
                "--time-column",
                scenarios.TIME,
                "--train-rows",
                str(TRAIN_ROWS),
                "--preset",
                preset,
                "--window",
                str(WINDOW),
                "--trees",
                str(trees),
                "--model-dir",
                str(model_dir),
            ),
            capture_output=True,
            text=True,
            check=False,
            cwd=PROJECT_DIR,
            env=bench_env(),
            timeout=600,
        )
        if done.returncode != 0:
            raise SystemExit(f"error: training the {preset} model failed:\n{done.stderr[-3000:]}")
        dirs[preset] = model_dir
    return dirs


def state_bytes(model_dir: Path, machines: int) -> dict[str, Any]:
    """JSON bytes of the engine's snapshot per machine, every machine's windows full.

    Also the engine's own CPU time per reading on the way (decode, features, score, verdict,
    alert state; in batches of 256): the steadier cost figure on a shared machine.
    """
    model = artifact.load(model_dir)
    engine = Engine(model, Topics("bench"))
    source = ChannelSource(machines, seed=machines)
    rows = WINDOW + 1
    readings = source.take(machines * rows)
    topics = source.topics("bench")
    now = time.time()
    batches = [
        [Received(topics[r.machine], r.payload, now, 0.0) for r in readings[i : i + BATCH]]
        for i in range(0, len(readings), BATCH)
    ]
    verdicts = 0
    cpu = time.process_time()
    for batch in batches:
        verdicts += sum(len(o.verdicts) for o in engine.handle(batch, now))
    cpu = time.process_time() - cpu
    if verdicts != len(readings):
        raise SystemExit(f"error: {len(readings)} readings gave {verdicts} verdicts")
    snapshot = engine.snapshot()
    total = len(json.dumps(snapshot, separators=(",", ":")).encode())
    states = len(json.dumps(snapshot["states"], separators=(",", ":")).encode())
    records = snapshot["states"]["machines"]
    windows = sum(len(json.dumps(r["features"], separators=(",", ":"))) for r in records)
    return {
        "machines": machines,
        "readings_per_machine": rows,
        "engine_cpu_us_per_reading": round(cpu / len(readings) * 1e6, 1),
        "snapshot_bytes": total,
        "bytes_per_machine": round(total / machines, 1),
        "state_bytes_per_machine": round(states / machines, 1),
        "feature_window_bytes_per_machine": round(windows / machines, 1),
        "example_record": records[0] if records else None,
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def measure(bench: Bench, plan: Plan, dirs: dict[str, Path]) -> dict[str, Any]:
    """Throughput rounds (presets alternating) at 1,000 machines; medians and the ratio."""
    source = ChannelSource(MACHINES, seed=1)
    count = plan.throughput_msgs
    source.take(count)  # generated before any timing starts
    runs: list[dict[str, Any]] = []
    for round_no in range(1, plan.repeats + 1):
        for preset in PRESETS:
            progress(
                f"measuring detector, {preset} features, {MACHINES:,} machines, "
                f"{count:,} messages, round {round_no}/{plan.repeats} ..."
            )
            row = bench.throughput(
                "detector", MACHINES, count, source=source, model_dir=dirs[preset]
            )
            row["target"] = f"detector {preset}"
            row["preset"] = preset
            runs.append(row)
            progress(
                f"  {fmt(row['msgs_per_s'])} msg/s, {row['unique_verdicts']:,}/"
                f"{row['acknowledged']:,} verdicts, lost {row['lost']}, "
                f"duplicates {row['duplicates']}"
            )
    rates = {p: _median([r["msgs_per_s"] for r in runs if r["preset"] == p]) for p in PRESETS}
    cpu = {
        p: _median([r.get("server_cpu_us_per_msg") for r in runs if r["preset"] == p])
        for p in PRESETS
    }
    point, windowed = rates["point"], rates["windowed"]
    ratio = round(windowed / point, 3) if point and windowed else None
    return {
        "machines": MACHINES,
        "msgs_per_s": rates,
        "detector_cpu_us_per_msg": cpu,
        "windowed_vs_point": ratio,
        "goal": {
            "goal": "windowed features vs point model throughput, 1,000 machines",
            "target": f">= {GOAL_WINDOWED_VS_POINT}",
            "measured": ratio,
            "met": None if ratio is None else ratio >= GOAL_WINDOWED_VS_POINT,
        },
        "lost": sum(r["lost"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "runs": runs,
    }


def _profiled_run(
    bench: Bench, model_dir: Path, source: ChannelSource, messages: int, raw: Path
) -> dict[str, Any]:
    """One throughput run of the detector serving ``model_dir`` with py-spy attached."""
    spy = str(Path(sys.executable).parent / "py-spy")
    original = bench.start_detector
    spies: list[Launched] = []

    def start_detector(root: str, folder: Path, **kwargs: Any) -> Server:
        server = original(root, folder, **kwargs)
        command = [spy, "record", "--pid", str(server.pid), "--format", "raw", "--rate"]
        command += [str(SAMPLE_RATE_HZ), "--nonblocking", "--output", str(raw)]
        spies.append(Launched(command, folder / "py-spy.log", name="py-spy"))
        spies[-1].wait_log("Sampling process", 30.0)
        return server

    bench.start_detector = start_detector  # type: ignore[method-assign]
    try:
        return bench.throughput("detector", MACHINES, messages, source=source, model_dir=model_dir)
    finally:
        bench.start_detector = original  # type: ignore[method-assign]
        for proc in spies:  # the detector has stopped: py-spy writes its file and exits
            proc.wait(60)


def profile(bench: Bench, dirs: dict[str, Path], messages: int, out: Path) -> str:
    """One throughput run per preset with py-spy on the detector; the summaries as Markdown."""
    source = ChannelSource(MACHINES, seed=1)
    source.take(messages)
    lines = ["# Profile: point vs windowed model in the detector (py-spy)", ""]
    for preset in PRESETS:
        raw = out / f"profile-features-{preset}.txt"
        progress(f"profiling the detector, {preset} features, {messages:,} readings ...")
        row = _profiled_run(bench, dirs[preset], source, messages, raw)
        summary = Profile.parse(raw.read_text().splitlines())
        lines += [
            f"## {preset}: {fmt(row['msgs_per_s'])} msg/s, "
            f"{fmt(row.get('server_cpu_us_per_msg'))} µs detector CPU per message, "
            f"{MACHINES:,} machines, {messages:,} readings",
            "",
            *summary.markdown(top=20),
            "",
        ]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    t = report["throughput"]
    lines = [
        "# Cost of windowed features",
        "",
        f"Command: `{report['environment']['command']}`  ",
        f"Machine: {report['environment'].get('cpu_model') or '-'}, "
        f"{report['environment']['cpus_usable']} usable CPUs; runtime {report['runtime_s']} s.",
        "",
        f"## Throughput through the real broker, {t['machines']:,} machines "
        f"(median of {report['repeats']} rounds)",
        "",
        "| model | msgs/s | rounds | detector process CPU µs/msg | engine alone CPU µs/reading |",
        "|---|---|---|---|---|",
    ]
    for preset in PRESETS:
        rounds = ", ".join(fmt(r["msgs_per_s"]) for r in t["runs"] if r["preset"] == preset)
        lines.append(
            f"| {preset} | {fmt(t['msgs_per_s'][preset])} | {rounds} | "
            f"{fmt(t['detector_cpu_us_per_msg'][preset])} | "
            f"{fmt(report['state'][preset]['engine_cpu_us_per_reading'], 1)} |"
        )
    goal = t["goal"]
    met = {True: "met", False: "NOT met", None: "-"}[goal["met"]]
    lines += [
        "",
        f"windowed / point: **{fmt(t['windowed_vs_point'], 3)}** (goal {goal['target']}: {met}); "
        f"lost {t['lost']}, duplicates {t['duplicates']} over all runs.",
        "",
        f"## Per-machine state ({report['state'][PRESETS[0]]['machines']:,} machines, "
        "windows full)",
        "",
        "| model | snapshot bytes | bytes per machine | of which machine records | of which "
        "feature windows |",
        "|---|---|---|---|---|",
    ]
    for preset in PRESETS:
        s = report["state"][preset]
        lines.append(
            f"| {preset} | {s['snapshot_bytes']:,} | {s['bytes_per_machine']:,.0f} | "
            f"{s['state_bytes_per_machine']:,.0f} | "
            f"{s['feature_window_bytes_per_machine']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.features``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.features", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--state-machines", type=int, default=STATE_MACHINES)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on the detector per preset instead"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    command = shlex.join(["python", "-m", "bench.features", *(argv or sys.argv[1:])])
    began = time.perf_counter()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="factorywatch-bench-features-") as tmp:
        workdir = Path(tmp)
        progress("training a point and a windowed model with `factorywatch train --csv` ...")
        dirs = train_models(workdir, args.trees)
        if args.profile:
            bench = Bench(workdir, dirs["point"], plan)
            bench.broker.start()
            try:
                args.out.mkdir(parents=True, exist_ok=True)
                text = profile(bench, dirs, plan.throughput_msgs, args.out)
            finally:
                bench.broker.stop()
            text = f"Produced by `{command}`.\n\n{text}"
            (args.out / "profile-features.md").write_text(text)
            print(text)
            return 0
        progress(f"measuring per-machine state at {args.state_machines:,} machines ...")
        state = {p: state_bytes(dirs[p], args.state_machines) for p in PRESETS}
        for p in PRESETS:
            progress(f"  {p}: {state[p]['bytes_per_machine']:,.0f} bytes per machine")
        bench = Bench(workdir, dirs["point"], plan)
        progress(f"starting mosquitto on 127.0.0.1:{bench.broker.port} ...")
        bench.broker.start()
        try:
            throughput = measure(bench, plan, dirs)
        finally:
            bench.broker.stop()
    report = {
        "throughput": throughput,
        "state": state,
        "repeats": plan.repeats,
        "quick": bool(args.quick),
        "runtime_s": round(time.perf_counter() - began, 1),
        "environment": environment(command, load_at_start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-features.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "bench-features.md").write_text(text)
    print(text)
    progress(f"wrote {args.out / 'bench-features.json'} and {args.out / 'bench-features.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
