"""``python -m bench.warmup``: ALERTs on new machines' first readings, while windows fill.

A model per preset (``point``, ``windowed``, ``full``; window 5) is fitted on a normal run of
the scenario pump (``sensors/scenarios.py``, the bench-features training run: seed 7, 2,000
rows) and saved and loaded as the detector does. Then ``machines`` never-seen machines each
send their first ``readings`` readings, taken from later normal rows of the same run, through
``detector.batch_scoring.score`` (the detector's scoring path, each machine's windows in its
own state, starting empty). Prints the ALERT share over those verdicts and the ALERT count
per reading index. ``tests/unit/test_warmup.py`` holds the bound; nothing is asserted here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Final

import numpy as np

from factorywatch.channels import canonical
from factorywatch.contracts import Telemetry
from factorywatch.detector.batch_scoring import score
from factorywatch.model import artifact
from factorywatch.model.generic import PRESETS, fit_columns
from factorywatch.sensors.scenarios import generate

TRAIN_ROWS: Final = 2000
WINDOW: Final = 5
SEED: Final = 7


def warmup_alerts(
    preset: str, *, machines: int, readings: int = WINDOW, trees: int = 100, far: float = 0.01
) -> list[int]:
    """ALERT count at each reading index 0..readings-1 over ``machines`` new machines."""
    run = generate([], seed=SEED, train_rows=TRAIN_ROWS, rows=TRAIN_ROWS + machines * readings)
    columns = {canonical(c): np.array(v) for c, v in run.values.items()}
    model = fit_columns(
        {c: v[:TRAIN_ROWS] for c, v in columns.items()},
        preset=preset,
        window=WINDOW,
        far=far,
        trees=trees,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        artifact.save_generic(models, model.scorer, model.card)
        artifact.promote(models, model.card.version)
        loaded = artifact.load(models)
    now = time.time()
    batch = [
        Telemetry(
            machine_id=f"new-{m}",
            line="line1",
            seq=i,
            ts=now + i,
            readings={
                name: values[TRAIN_ROWS + m * readings + i] for name, values in run.values.items()
            },
        )
        for i in range(readings)  # reading i of every machine, in arrival order
        for m in range(machines)
    ]
    states: dict[str, dict[str, object]] = {}
    verdicts = score(loaded, batch, [0.0] * len(batch), explain_top_k=0, states=states)
    if len(states) != machines or len(verdicts) != len(batch):
        raise RuntimeError("every new machine must start with its own, empty windows")
    alerts = np.array([v.status == "ALERT" for v in verdicts]).reshape(readings, machines)
    return [int(n) for n in alerts.sum(axis=1)]


def main(argv: list[str] | None = None) -> None:
    """Print the warm-up ALERT share of each preset."""
    parser = argparse.ArgumentParser(prog="python -m bench.warmup", description=__doc__)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--readings", type=int, default=WINDOW)
    parser.add_argument("--trees", type=int, default=100)
    args = parser.parse_args(argv)
    for preset in PRESETS:
        counts = warmup_alerts(
            preset, machines=args.machines, readings=args.readings, trees=args.trees
        )
        share = sum(counts) / (args.machines * args.readings)
        print(
            f"{preset:9s} ALERT {share:6.1%} of the first {args.readings} verdicts of "
            f"{args.machines} new machines; per reading: {counts}"
        )


if __name__ == "__main__":
    main()
