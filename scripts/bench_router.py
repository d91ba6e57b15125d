"""Engine throughput with routes: ``python scripts/bench_router.py`` prints figures.

The pure engine (no broker) handles batches of 256 JSON readings from 1,000 machines
(5 channels, a windowed Isolation Forest model as ``train --csv`` makes) in four set-ups:
one default model (the fast path), 4 group models, a model per machine, and every machine
calibrating (and, with ``--distinct``, a model per machine whose forests are 1,000 copies in
memory rather than one shared forest: the cache misses of real per-machine models). Prints
readings per CPU second (median of ``--repeat`` runs) and the JSON size of the per-machine
state. Also: the false-alarm rate a live calibration window of N normal
readings gives on the next 5,000 normal readings (target 1 %). ``--walk``: only the forest
walk (``ForestStack.score``), batches of 256 rows each of a random one of ``--machines``
copies of one forest, against the same rows all of one forest: microseconds per row. Nothing
is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace

import numpy as np

from factorywatch.contracts import Telemetry
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine, EngineSettings
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.fastforest import FlatForest
from factorywatch.model.generic import Trained, fit_columns, score_recording
from factorywatch.model.pipeline import Pipeline
from factorywatch.topics import Topics

CHANNELS = ("vibration_rms", "current_a", "pressure_bar", "temperature_c", "flow_rate")
TOPICS = Topics("bench")
SHIFT = 3.0
SHIFTED = 200


def normal(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Five correlated channels of a machine running normally."""
    load = rng.normal(size=n)
    return {c: 10.0 * (i + 1) + (i + 1) * load + rng.normal(size=n) for i, c in enumerate(CHANNELS)}


def loaded(trained: Trained) -> LoadedModel:
    card = trained.card
    return LoadedModel(
        card=card,
        scorer=trained.scorer,
        center=np.asarray(card.feature_center),
        scale=np.asarray(card.feature_scale),
        pipeline=Pipeline(card.pipeline) if card.pipeline else None,
    )


def messages(machines: int, readings: int, seed: int, start: int = 0) -> list[Received]:
    rng = np.random.default_rng(seed)
    columns = normal(rng, readings)
    now = time.time()
    out = []
    for i in range(readings):
        machine = f"m{i % machines:04d}"
        wire = Telemetry(
            machine_id=machine,
            line="line1",
            seq=start + i,
            ts=now,
            readings={c: float(columns[c][i]) for c in CHANNELS},
        )
        out.append(
            Received(TOPICS.telemetry("line1", machine), wire.encode(), now, time.perf_counter(), i)
        )
    return out


def run(engine: Engine, batch: list[Received], size: int) -> float:
    """Readings per CPU second of this process (the machine is shared: wall time is noisy)."""
    start = time.process_time()
    for i in range(0, len(batch), size):
        engine.handle(batch[i : i + size], time.time())
    return len(batch) / (time.process_time() - start)


def throughput(args: argparse.Namespace) -> None:
    # only the fast path with --plain: it runs on code that predates the router, for a before
    default = loaded(fit_columns(normal(np.random.default_rng(1), 2000), trees=200))
    if args.plain:
        values = []
        for repeat in range(args.repeat):
            engine = Engine(default, TOPICS)
            run(engine, messages(args.machines, 2 * args.machines, 100 + repeat), args.batch)
            batch = messages(args.machines, args.readings, repeat, start=10**6)
            values.append(run(engine, batch, args.batch))
        print(f"one default model: {statistics.median(values):,.0f} readings/s")
        return
    from factorywatch.detector.router import Router  # noqa: PLC0415
    from factorywatch.model.asset import CalibrateSpec, GroupSpec  # noqa: PLC0415

    other = loaded(fit_columns(normal(np.random.default_rng(2), 2000), trees=200))
    machines = [f"m{i:04d}" for i in range(args.machines)]
    groups = {f"g{k}": GroupSpec(machines=[f"m*{k}"]) for k in "0123456789"[:4]}

    def setups() -> dict[str, Engine]:
        plain = Engine(default, TOPICS)
        # --per-call: one score call per route (the engine before routes were stacked)
        routed = EngineSettings(stack_routes=not args.per_call)
        grouped = Engine(default, TOPICS, routed, router=Router(default, groups))
        for g in groups:
            grouped.bind_group(g, other)
        per_machine = Engine(default, TOPICS, routed)
        for m in machines:
            per_machine.bind(m, other)
        distinct = Engine(default, TOPICS, routed)
        if args.distinct:  # each machine its own copy: 1,000 forests' memory, not one's
            for m in machines:
                distinct.bind(m, replace(other, scorer=copy.deepcopy(other.scorer), states={}))
        spec = CalibrateSpec(readings=10**6, family="pca", default=True)
        calibrating_ = Engine(default, TOPICS, router=Router(default, None, spec))
        return {
            "one default model (fast path)": plain,
            "4 group models (+ default)": grouped,
            f"a model per machine ({len(machines)})": per_machine,
            **(
                {f"a model per machine, {len(machines)} forests in memory": distinct}
                if args.distinct
                else {}
            ),
            "every machine calibrating": calibrating_,
        }

    figures: dict[str, list[float]] = {}
    states: dict[str, float] = {}
    for repeat in range(args.repeat):
        for name, engine in setups().items():
            warm = messages(args.machines, 2 * args.machines, seed=100 + repeat)
            run(engine, warm, args.batch)  # every machine seen, windows full
            batch = messages(args.machines, args.readings, seed=repeat, start=10**6)
            figures.setdefault(name, []).append(run(engine, batch, args.batch))
            states[name] = len(json.dumps(engine.snapshot()["states"])) / engine.machine_count()
    base = statistics.median(figures["one default model (fast path)"])
    print(f"engine.handle, {args.machines} machines, batches of {args.batch}, {args.readings} "
          f"readings, median of {args.repeat}")  # fmt: skip
    print("| set-up | readings/s | vs one model | state JSON bytes/machine |")
    print("|---|---:|---:|---:|")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {median / base:.2f} x | {states[name]:,.0f} |")


def walk(args: argparse.Namespace) -> None:
    """The stacked walk alone: rows of ``args.machines`` distinct forests vs of one."""
    from factorywatch.model.forest_stack import ForestStack  # noqa: PLC0415

    rng = np.random.default_rng(1)
    forest = fit_columns(normal(rng, 2000), trees=200).scorer
    assert isinstance(forest, FlatForest)
    shared, distinct = ForestStack(), ForestStack()
    shared.add(forest)
    numbers = [distinct.add(copy.deepcopy(forest)) for _ in range(args.machines)]
    rows = rng.normal(size=(args.readings, forest.n_features))
    which = np.asarray(numbers)[rng.integers(0, args.machines, size=args.readings)]

    def per_row(stack: ForestStack, forests: np.ndarray) -> float:
        start = time.process_time()
        for i in range(0, args.readings, args.batch):
            stack.score(rows[i : i + args.batch], forests[i : i + args.batch])
        return (time.process_time() - start) / args.readings * 1e6

    one, many = [], []
    for _ in range(args.repeat):
        one.append(per_row(shared, np.zeros(args.readings, np.int64)))
        many.append(per_row(distinct, which))
    print(f"ForestStack.score, 200 trees, batches of {args.batch}, {args.readings} rows, "
          f"median of {args.repeat}: rows of one forest {statistics.median(one):.1f} µs/row, "
          f"rows of {args.machines} forests {statistics.median(many):.1f} µs/row")  # fmt: skip
    print(f"cache lines (64 bytes) a root-to-leaf path reads, mean over 100 rows x "
          f"{forest.n_trees} trees: {_lines_per_path(forest, rows[:100]):.2f}; "
          f"{forest.n_records:,} records of 8 bytes")  # fmt: skip


def _lines_per_path(forest: FlatForest, rows: np.ndarray) -> float:
    """Distinct 64-byte lines of node records each (row, tree) path visits, on average."""
    words, _, roots = forest.node_arrays()
    cuts, word = words.view(np.float32)[0::2], words[1::2]
    lines = 0
    for x in rows.astype(np.float32):
        aug = np.concatenate((x, -x, np.abs(x)))
        for root in roots.tolist():
            node, seen = root, {root // 8}
            for _ in range(forest.levels):
                node = root + int(word[node] & 0xFFFF) + int(aug[word[node] >> 16] > cuts[node])
                seen.add(node // 8)
            lines += len(seen)
    return lines / (rows.shape[0] * roots.shape[0])


def far(args: argparse.Namespace) -> None:
    from factorywatch.detector import calibration_window  # noqa: PLC0415
    from factorywatch.model.asset import CalibrateSpec  # noqa: PLC0415

    print(
        "\nlive calibration: false-alarm rate on the next 5,000 normal readings "
        f"(target {CalibrateSpec(readings=60).far:.1%}, the default), "
        f"and recall on {SHIFTED} readings after them with one channel shifted by "
        f"{SHIFT:g} standard deviations (its noise in the window)"
    )
    print("| window N | family | FAR median | FAR p90 | recall median | runs |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in (60, 200, 500):
        for family in ("iforest", "pca"):
            rates, recalls = [], []
            for seed in range(args.far_runs):
                rng = np.random.default_rng(1000 + seed)
                stream = normal(rng, n + 5000 + SHIFTED)
                step = SHIFT * float(np.std(stream["pressure_bar"][:n]))
                stream["pressure_bar"][n + 5000 :] += step
                request = calibration_window.FitRequest(
                    machine="m",
                    line="l",
                    channels=CHANNELS,
                    rows=tuple(zip(*(stream[c][:n].tolist() for c in CHANNELS), strict=True)),
                    spec=CalibrateSpec(readings=n, family=family).fit_spec(seed=seed),
                )
                model = calibration_window.fit(request)
                after = score_recording(model, {c: stream[c][n:] for c in CHANNELS})
                rates.append(float(after.flagged[:5000].mean()))
                recalls.append(float(after.flagged[5000:].mean()))
            print(
                f"| {n} | {family} | {statistics.median(rates):.2%} | "
                f"{float(np.quantile(rates, 0.9)):.2%} | {statistics.median(recalls):.1%} | "
                f"{len(rates)} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--far-runs", type=int, default=10)
    parser.add_argument("--skip-far", action="store_true")
    parser.add_argument("--plain", action="store_true", help="only the one-model fast path")
    parser.add_argument(
        "--per-call",
        action="store_true",
        help="score each route with a call of its own (routes not stacked), for a before",
    )
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="also a model per machine with a forest of its own in memory (a copy each)",
    )
    parser.add_argument("--only-far", action="store_true", help="only the calibration figures")
    parser.add_argument("--walk", action="store_true", help="only the stacked forest walk")
    args = parser.parse_args()
    if args.walk:
        walk(args)
        return
    if not args.only_far:
        throughput(args)
    if not args.skip_far and not args.plain:
        far(args)


if __name__ == "__main__":
    main()
