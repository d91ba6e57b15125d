"""``python -m bench.features``: what windowed features cost, through the real broker.

Two generic models are trained with the real CLI (``factorywatch train --csv``) on a normal
run of the scenario pump (``sensors/scenarios.py``, eight channels): the ``point`` preset
(channels only) and the ``windowed`` preset (what the default, ``auto``, gives every channel whose
level holds: + rolling mean and log std per
channel, the windows in each machine's keyed state). Each is served by a real detector behind
the bench's Mosquitto and driven with ``Bench.throughput`` (closed-loop publisher, verdicts
counted by a subscriber process) at 1,000 machines, alternating the two presets for
``repeats`` rounds; the report quotes medians and the ratio windowed / point (goal >= 0.8).

Per-machine models (``per-machine``): the same detector serving a model per machine, each
fitted by live calibration (``detect --asset-config`` with ``calibrate: {readings: N,
default: true}``, the windowed preset, 200 trees): a calibration phase publishes N readings
of each of ``--calibrate-live`` machines to a detector that fits and promotes their models
(``models/machines/<m>/current``, timed); each other machine of the 1,000 gets a copy of one
of those artifacts (its own files, so its own forest in memory: 1,000 forests, as 1,000
calibrations would give; a fit takes about 1 s of scikit-learn here, too long to make 1,000
of in a bench run; ``--calibrate-live 1000`` does all of them live). Its throughput rounds
run between the others' (a fresh detector, which binds the 1,000 promoted models at start,
as after a restart); the report quotes per-machine / windowed (one global model), goal
>= 0.8.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.harness import (
    DETECTOR_READY,
    FULL,
    QUICK,
    Bench,
    Plan,
    Server,
    bench_env,
    progress,
)
from bench.load import PROJECT_DIR, ChannelSource, Publisher, SubscriberProcess
from bench.profile import SAMPLE_RATE_HZ, Profile
from bench.report import fmt, write_files
from bench.system import environment
from factorywatch.broker import free_port
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine
from factorywatch.launch import Launched, cli_command
from factorywatch.model import artifact
from factorywatch.sensors import scenarios
from factorywatch.topics import Topics

PRESETS: Final = ("point", "windowed")
PER_MACHINE: Final = "per-machine"
SETUPS: Final = (*PRESETS, PER_MACHINE)
MACHINES: Final = 1000
CALIBRATE_READINGS: Final = 200  # the README's advice: ``readings: 200`` or more
CALIBRATE_LIVE: Final = 40  # machines calibrated live (about 1 s of fitting each)
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


def _start_calibrating(
    bench: Bench, root: str, folder: Path, model_dir: Path, readings: int
) -> Server:
    """``factorywatch detect`` with an asset config that calibrates every machine."""
    asset = folder / "calibrate.json"
    spec = {"readings": readings, "default": True}
    asset.write_text(json.dumps({"calibrate": spec}))
    command = cli_command(
        "detect",
        "--port",
        str(bench.broker.port),
        "--topic-root",
        root,
        "--model-dir",
        str(model_dir),
        "--asset-config",
        str(asset),
        "--state-dir",
        str(folder / "state"),
    )
    extra = {"FACTORYWATCH_DETECTOR_METRICS_PORT": str(free_port()),
             "FACTORYWATCH_DETECTOR_METRICS_HOST": "127.0.0.1"}  # fmt: skip
    server = Server("detector", command, folder / "detector.log", folder, bench_env(extra))
    server.wait_log(DETECTOR_READY, 60.0)
    return server


def calibrate(
    bench: Bench, windowed: Path, workdir: Path, *, live: int, needed: int
) -> tuple[Path, dict[str, Any]]:
    """A model directory where each of 1,000 machines has its own live-calibrated model.

    ``live`` machines calibrate through a real detector (their first N readings published,
    the fits timed until every model is promoted); the others get copies of those artifacts.
    """
    model_dir = workdir / "model-per-machine"
    shutil.copytree(windowed, model_dir, symlinks=True)  # the global default: windowed
    root, folder = bench.fresh("calibration")
    source = ChannelSource(live, seed=1)  # the first machines of the 1,000-machine source
    count = live * needed
    readings, topics = source.take(count), source.topics(root)
    progress(f"calibrating {live} machines live ({needed} readings each) ...")
    detector = _start_calibrating(bench, root, folder, model_dir, needed)
    subscriber = SubscriberProcess(
        bench.broker.port, root, expect=count, out=folder / "received.json", idle_s=30.0,
        deadline_s=count / 200.0 + 60.0,
    )  # fmt: skip
    publisher = Publisher(bench.settings(root), clients=bench.plan.publishers).start()
    try:
        began = time.perf_counter()
        publisher.blast(readings, topics, window=bench.window, answered=subscriber.answered)
        received = subscriber.result(count / 200.0 + 90.0)
        published = time.perf_counter() - began
        deadline = time.monotonic() + 30.0 + 10.0 * live  # a fit takes about 1-2 s here
        while len(artifact.routed_versions(model_dir)) < live and time.monotonic() < deadline:
            if not detector.running():
                break
            time.sleep(0.5)  # polling the model directory, not waiting blindly
        fitted = len(artifact.routed_versions(model_dir))
        elapsed = time.perf_counter() - began
    finally:
        detector.stop()
        publisher.close()
        subscriber.kill()
    if fitted < live or received.messages < count:
        raise SystemExit(
            f"error: {fitted}/{live} machines calibrated, {received.messages}/{count} "
            f"CALIBRATING verdicts:\n{detector.log()[-3000:]}"
        )
    ids = ChannelSource(MACHINES).ids
    machines = model_dir / artifact.ROUTE_FOLDERS["machine"]
    for index in range(live, MACHINES):
        source_dir = machines / ids[index % live]
        shutil.copytree(source_dir, machines / ids[index], symlinks=True)
    progress(f"  {live} models fitted and promoted in {elapsed:.0f} s; "
             f"{MACHINES - live} machines given a copy of one")  # fmt: skip
    return model_dir, {
        "readings": needed,
        "machines_live": live,
        "machines_copied": MACHINES - live,
        "publish_s": round(published, 1),
        "calibrated_s": round(elapsed, 1),
        "fits_per_s": round(live / elapsed, 2),
        "calibrating_verdicts": received.messages,
    }


def _bound_routes(bench: Bench) -> int:
    """How many machines' own models the last run's detector bound (its log says)."""
    log = sorted((bench.workdir / "runs").glob("*-detector-*/detector-*.log"))[-1]
    return log.read_text().count('"route_model_bound"')


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def measure(bench: Bench, plan: Plan, dirs: dict[str, Path]) -> dict[str, Any]:
    """Throughput rounds (set-ups alternating) at 1,000 machines; medians and the ratios."""
    source = ChannelSource(MACHINES, seed=1)
    count = plan.throughput_msgs
    source.take(count)  # generated before any timing starts
    runs: list[dict[str, Any]] = []
    for round_no in range(1, plan.repeats + 1):
        for preset in SETUPS:
            progress(
                f"measuring detector, {preset}, {MACHINES:,} machines, "
                f"{count:,} messages, round {round_no}/{plan.repeats} ..."
            )
            row = bench.throughput(
                "detector", MACHINES, count, source=source, model_dir=dirs[preset]
            )
            row["target"] = f"detector {preset}"
            row["preset"] = preset
            if preset == PER_MACHINE:
                row["machine_models_bound"] = _bound_routes(bench)
                if row["machine_models_bound"] != MACHINES:
                    raise SystemExit(f"error: the detector bound {row['machine_models_bound']} "
                                     f"machines' models, not {MACHINES}")  # fmt: skip
            runs.append(row)
            progress(
                f"  {fmt(row['msgs_per_s'])} msg/s, {row['unique_verdicts']:,}/"
                f"{row['acknowledged']:,} verdicts, lost {row['lost']}, "
                f"duplicates {row['duplicates']}"
            )
    rates = {p: _median([r["msgs_per_s"] for r in runs if r["preset"] == p]) for p in SETUPS}
    cpu = {
        p: _median([r.get("server_cpu_us_per_msg") for r in runs if r["preset"] == p])
        for p in SETUPS
    }
    point, windowed, own = rates["point"], rates["windowed"], rates[PER_MACHINE]
    ratio = round(windowed / point, 3) if point and windowed else None
    per_machine = round(own / windowed, 3) if own and windowed else None
    cpu_ratio = (
        round(cpu["windowed"] / cpu[PER_MACHINE], 3)
        if cpu["windowed"] and cpu[PER_MACHINE]
        else None
    )
    return {
        "machines": MACHINES,
        "msgs_per_s": rates,
        "detector_cpu_us_per_msg": cpu,
        "windowed_vs_point": ratio,
        "per_machine_vs_windowed": per_machine,
        "per_machine_vs_windowed_cpu": cpu_ratio,
        "goal": {
            "goal": "windowed features vs point model throughput, 1,000 machines",
            "target": f">= {GOAL_WINDOWED_VS_POINT}",
            "measured": ratio,
            "met": None if ratio is None else ratio >= GOAL_WINDOWED_VS_POINT,
        },
        "goal_per_machine": {
            "goal": "a live-calibrated model per machine vs one global windowed model, "
            "throughput at 1,000 machines",
            "target": f">= {GOAL_WINDOWED_VS_POINT}",
            "measured": per_machine,
            "met": None if per_machine is None else per_machine >= GOAL_WINDOWED_VS_POINT,
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
    lines = ["# Profile: point, windowed and per-machine models in the detector (py-spy)", ""]
    for preset, model_dir in dirs.items():
        raw = out / f"profile-features-{preset}.txt"
        progress(f"profiling the detector, {preset}, {messages:,} readings ...")
        row = _profiled_run(bench, model_dir, source, messages, raw)
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
        "# Cost of windowed features and per-machine models",
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
    for preset in SETUPS:
        rounds = ", ".join(fmt(r["msgs_per_s"]) for r in t["runs"] if r["preset"] == preset)
        engine = report["state"].get(preset, {}).get("engine_cpu_us_per_reading")
        lines.append(
            f"| {preset} | {fmt(t['msgs_per_s'][preset])} | {rounds} | "
            f"{fmt(t['detector_cpu_us_per_msg'][preset])} | "
            f"{'-' if engine is None else fmt(engine, 1)} |"
        )
    met = {True: "met", False: "NOT met", None: "-"}
    goal, own = t["goal"], t["goal_per_machine"]
    c = report["calibration"]
    lines += [
        "",
        f"windowed / point: **{fmt(t['windowed_vs_point'], 3)}** (goal {goal['target']}: "
        f"{met[goal['met']]}); per-machine / windowed: **{fmt(t['per_machine_vs_windowed'], 3)}** "
        f"(goal {own['target']}: {met[own['met']]}; by detector CPU per message "
        f"{fmt(t['per_machine_vs_windowed_cpu'], 3)}); lost {t['lost']}, duplicates "
        f"{t['duplicates']} over all runs.",
        "",
        f"per-machine: every machine served by a model of its own (windowed preset, 200 trees), "
        f"fitted by live calibration on {c['readings']} readings: {c['machines_live']} machines "
        f"calibrated live through the detector ({c['calibrating_verdicts']:,} CALIBRATING "
        f"verdicts; fitted and promoted in {fmt(c['calibrated_s'], 1)} s, "
        f"{fmt(c['fits_per_s'], 2)} fits/s), the other {c['machines_copied']:,} given a copy "
        "of one of their artifacts (a forest of its own in memory each).",
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


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.features", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--state-machines", type=int, default=STATE_MACHINES)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument(
        "--calibrate-live",
        type=int,
        help=f"machines calibrated live (default {CALIBRATE_LIVE}; the others get copies)",
    )
    parser.add_argument("--calibrate-readings", type=int, help="a calibration window's N")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on the detector per set-up instead"
    )
    args = parser.parse_args(argv)
    args.calibrate_live = args.calibrate_live or (4 if args.quick else CALIBRATE_LIVE)
    args.calibrate_readings = args.calibrate_readings or (50 if args.quick else CALIBRATE_READINGS)
    if not 1 <= args.calibrate_live <= MACHINES:
        parser.error(f"--calibrate-live must be in 1..{MACHINES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.features``."""
    args = _arguments(argv)
    live, needed = args.calibrate_live, args.calibrate_readings
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
                dirs[PER_MACHINE], _ = calibrate(
                    bench, dirs["windowed"], workdir, live=live, needed=needed
                )
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
            dirs[PER_MACHINE], calibration = calibrate(
                bench, dirs["windowed"], workdir, live=live, needed=needed
            )
            throughput = measure(bench, plan, dirs)
        finally:
            bench.broker.stop()
    report = {
        "throughput": throughput,
        "calibration": calibration,
        "state": state,
        "repeats": plan.repeats,
        "quick": bool(args.quick),
        "runtime_s": round(time.perf_counter() - began, 1),
        "environment": environment(command, load_at_start),
    }
    text = markdown(report)
    print(text)
    write_files(args.out, "bench-features", report, text, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
