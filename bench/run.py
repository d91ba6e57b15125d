"""``python -m bench.run``: throughput and latency against the relay ceilings, in one run.

Starts its own Mosquitto (the project's config, open mode, a free port, a temporary work
directory), trains a model into a temporary model directory with the real CLI, then measures
(``bench/scenarios.py``): relays per MQTT client and Mosquitto's own ceiling with C clients;
the detector per transport, sharded and with 1,000 machines; the naive path; latency at
fixed rates; batched payloads; peak memory. Figures go to ``<out>/bench.json`` and
``<out>/bench.md`` (``bench/report.py``); nothing is asserted. ``--quick`` shrinks
everything for a smoke test.

Modules: ``harness`` (processes and one measurement), ``system`` (CPU, memory, machine),
``scenarios`` (what is measured, ratios, goals), ``report`` (Markdown), ``ceiling`` (C
clients), ``relay`` and ``load`` (the processes the harness runs).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.ceiling import CeilingProbe
from bench.harness import FULL, QUICK, Bench, SysWatcher, find_dataset, progress, train
from bench.report import markdown, setup_text, write_files
from bench.scenarios import SHARDS, measure
from bench.system import environment


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, help="AI4I CSV to train on (default: data/)")
    parser.add_argument(
        "--no-verify", action="store_true", help="accept a dataset whose sha256 is unknown"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    dataset = find_dataset(args.dataset)
    command = shlex.join(["python", "-m", "bench.run", *(argv or sys.argv[1:])])
    began = time.perf_counter()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="factorywatch-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "model"
        progress(f"training a model on {dataset} ...")
        version = train(dataset, model_dir, no_verify=args.no_verify)
        bench = Bench(workdir, model_dir, plan)
        progress(f"starting mosquitto on 127.0.0.1:{bench.broker.port} ...")
        bench.broker.start()
        watcher: SysWatcher | None = None
        try:
            watcher = SysWatcher(bench.settings("sys"))
            report = measure(bench, plan, CeilingProbe(bench.broker.port, workdir / "ceiling"))
            watcher.settle()  # the broker's last $SYS figures are in
            report["broker_dropped"] = watcher.dropped()
        finally:
            if watcher is not None:
                watcher.close()
            bench.broker.stop()
    report = {
        **report,
        "model_version": version,
        "quick": bool(args.quick),
        "runtime_s": round(time.perf_counter() - began, 1),
        "setup": setup_text(plan.publishers, plan.window, SHARDS),
        "environment": environment(command, load_at_start),
    }
    text = markdown(report)
    print(text)
    write_files(args.out, "bench", report, text, progress, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
