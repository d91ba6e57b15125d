"""Time scikit-learn's ``score_samples`` against ``FlatForest`` for one reading and a batch."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorywatch.model.fastforest import FlatForest

N_TRAIN = 10_000
N_FEATURES = 4
N_TREES = 200
BATCH = 256


def median_us(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``call`` in microseconds over ``repeats`` calls (after a warm-up)."""
    for _ in range(min(20, repeats)):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    """Train the production-shaped forest, time both scorers and print a table."""
    rng = np.random.default_rng(0)
    forest = IsolationForest(n_estimators=N_TREES, random_state=0).fit(
        rng.normal(size=(N_TRAIN, N_FEATURES))
    )
    flat = FlatForest.from_sklearn(forest)
    one = rng.normal(size=(1, N_FEATURES))
    batch = rng.normal(size=(BATCH, N_FEATURES)) * 2.0
    diff = np.abs(flat.score(batch) + forest.score_samples(batch)).max()

    cases = [
        ("1 reading", one, 2_000, 300),
        (f"batch of {BATCH}", batch, 200, 30),
    ]
    print(f"IsolationForest: {N_TREES} trees, trained on {N_TRAIN:,} x {N_FEATURES} rows")
    print(f"max |FlatForest - sklearn| on the batch: {diff:.3g}\n")
    header = (
        f"{'case':<14} {'sklearn µs/reading':>19} {'FlatForest µs/reading':>22} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, rows, fast_repeats, slow_repeats in cases:
        n = rows.shape[0]
        slow = median_us(partial(forest.score_samples, rows), slow_repeats) / n
        fast = median_us(partial(flat.score, rows), fast_repeats) / n
        print(f"{name:<14} {slow:>19.1f} {fast:>22.2f} {slow / fast:>8.0f}x")


if __name__ == "__main__":
    main()
