"""``python -m bench.engine_cpu``: the engine's own CPU per reading, no broker, no transport.

An in-process ``Engine`` (``detector/engine.py``, the detector's own) takes pre-encoded
readings of ``--machines`` simulated AI4I machines in batches of ``--batch`` (decode,
features, score, verdict, alert state, publishes queued); each round is a fresh engine over
the same readings and reports ``time.process_time`` per reading. ``--profile`` runs one
round under cProfile and prints the heaviest functions and the share that building and
encoding verdicts takes. ``--compare TREE`` runs rounds alternately in subprocesses on
``TREE`` (another checkout, e.g. ``git archive main | tar -x -C /tmp/before``) and on this
one, so both are measured in the same machine moment, and quotes the medians and their ratio.
Figures depend on the machine: nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from bench.load import ReadingSource
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine
from factorywatch.model import artifact
from factorywatch.topics import Topics

BATCH: Final = 256
#: functions (file suffix, name) counted as building or encoding verdicts in a profile
VERDICT_WORK: Final = (
    ("detector/batch_scoring.py", "_verdict"),
    ("detector/batch_scoring.py", "_contributions"),
    ("detector/batch_scoring.py", "calibrating_verdicts"),
    ("factorywatch/contracts.py", "encode"),
    ("factorywatch/verdict_codec.py", "encode_verdict"),
    ("factorywatch/verdict_codec.py", "build_verdict"),
)


def _batches(machines: int, readings: int, batch: int) -> list[list[Received]]:
    source = ReadingSource(machines, seed=machines)
    taken = source.take(readings)
    topics = source.topics("bench")
    now = time.time()
    return [
        [Received(topics[r.machine], r.payload, now, 0.0) for r in taken[i : i + batch]]
        for i in range(0, len(taken), batch)
    ]


def _round(model: Any, batches: list[list[Received]]) -> float:
    """One fresh engine over ``batches``: CPU µs per reading."""
    engine = Engine(model, Topics("bench"))
    count = sum(len(b) for b in batches)
    now = time.time()
    verdicts = 0
    cpu = time.process_time()
    for batch in batches:
        verdicts += sum(len(o.verdicts) for o in engine.handle(batch, now))
    cpu = time.process_time() - cpu
    if verdicts != count:
        raise SystemExit(f"error: {count} readings gave {verdicts} verdicts")
    return cpu / count * 1e6


def _profile(model: Any, batches: list[list[Received]], top: int) -> None:
    _round(model, batches)  # warm-up: the first round compiles and fills caches
    profiler = cProfile.Profile()
    profiler.enable()
    _round(model, batches)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = max(stats.total_tt, 1e-12)  # type: ignore[attr-defined]
    share = 0.0
    for (path, _line, name), (_cc, _nc, _tt, cumulative, _callers) in raw.items():
        if any(path.endswith(suffix) and name == fn for suffix, fn in VERDICT_WORK):
            print(f"verdict work: {name} ({path}) {cumulative / total:.1%} inclusive")
            share += cumulative
    print(f"verdict build + encode: {share / total:.1%} of the engine's profiled time")
    stats.sort_stats("tottime").print_stats(top)


def _compare(args: argparse.Namespace, before: Path) -> None:
    here = Path(__file__).resolve().parents[1]
    trees = {"before": before.resolve(), "after": here}
    runs: dict[str, list[float]] = {name: [] for name in trees}
    # run_path, not the file as a script: the script's folder first on sys.path would let
    # bench/profile.py shadow the standard library's profile (which cProfile imports)
    runner = (
        "import runpy, sys; sys.argv[0] = sys.argv[1]; "
        "runpy.run_path(sys.argv.pop(1), run_name='__main__')"
    )
    command = [
        sys.executable,
        "-c",
        runner,
        str(Path(__file__).resolve()),
        "--model-dir",
        str(args.model_dir),
        "--machines",
        str(args.machines),
        "--readings",
        str(args.readings),
        "--batch",
        str(args.batch),
        "--rounds",
        str(args.rounds_each),
        "--json",
    ]
    for i in range(args.rounds):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for name in order:
            env = {**os.environ, "PYTHONPATH": str(trees[name])}
            done = subprocess.run(
                command, cwd=trees[name], env=env, capture_output=True, text=True, check=True
            )
            runs[name].append(json.loads(done.stdout.splitlines()[-1])["cpu_us_per_reading"])
            print(f"round {i + 1} {name}: {runs[name][-1]:.1f} µs/reading", flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratio = medians["after"] / medians["before"]
    print(
        f"median CPU µs/reading: before {medians['before']:.1f}, after {medians['after']:.1f}; "
        f"after / before {ratio:.3f}"
    )
    if args.out is not None:
        _write_report(args, runs, medians, ratio)


def _write_report(
    args: argparse.Namespace,
    runs: dict[str, list[float]],
    medians: dict[str, float],
    ratio: float,
) -> None:
    """``<out>/engine-cpu.md``: the comparison's rounds, medians and ratio."""
    command = " ".join(["python -m bench.engine_cpu", *sys.argv[1:]])
    lines = [
        "# The engine's CPU per reading, before / after (in-process, no broker)",
        "",
        f"`{command}`: {args.machines} AI4I machines, {args.readings} readings in batches "
        f"of {args.batch}, a fresh engine per round (best of {args.rounds_each} per "
        "subprocess), the two trees alternating; `time.process_time` per reading.",
        "",
        "| tree | median CPU µs/reading | rounds |",
        "|---|---:|---|",
        *(
            f"| {name} | {medians[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |"
            for name, values in runs.items()
        ),
        "",
        f"after / before: **{ratio:.3f}**",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine-cpu.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the rounds, the profile or the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine_cpu", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--machines", type=int, default=10)
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rounds-each", type=int, default=3, help="rounds per --compare run")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compare", type=Path, metavar="TREE")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="with --compare: write <out>/engine-cpu.md")
    args = parser.parse_args(argv)
    if args.compare is not None:
        _compare(args, args.compare)
        return
    model = artifact.load(args.model_dir)
    batches = _batches(args.machines, args.readings, args.batch)
    if args.profile:
        _profile(model, batches, args.top)
        return
    _round(model, batches)  # warm-up
    figures = [_round(model, batches) for _ in range(args.rounds)]
    best = min(figures)
    if args.json:
        print(json.dumps({"cpu_us_per_reading": best, "rounds": figures}))
    else:
        print(f"engine CPU µs/reading: best {best:.1f} of {[round(f, 1) for f in figures]}")


if __name__ == "__main__":
    main()
