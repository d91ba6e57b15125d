"""FlatForest's packed node records walk exactly the paths of the slot arrays they came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.ensemble import IsolationForest

from factorywatch.model.fastforest import FlatForest, _unpack
from factorywatch.model.forest_stack import ForestStack
from tests.property.test_fastforest import _training_data, _tricky_queries

Matrix = npt.NDArray[np.float64]


def _slot_arrays_from_sklearn(forest: IsolationForest) -> tuple[npt.NDArray[np.generic], ...]:
    """The slot arrays ``from_sklearn`` builds, before they are packed (captured)."""
    captured: dict[str, npt.NDArray[np.generic]] = {}
    original = FlatForest.__init__

    def spy(self: FlatForest, **kwargs: object) -> None:
        captured.update({k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)})
        captured["levels"] = np.asarray(kwargs["levels"])
        original(self, **kwargs)  # type: ignore[arg-type]

    FlatForest.__init__ = spy  # type: ignore[method-assign]
    try:
        FlatForest.from_sklearn(forest)
    finally:
        FlatForest.__init__ = original  # type: ignore[method-assign]
    return tuple(captured[k] for k in ("columns", "cuts", "children", "values", "roots", "levels"))


def _walk_slots(arrays: tuple[npt.NDArray[np.generic], ...], queries: Matrix) -> Matrix:
    """Path-length totals walking ``from_sklearn``'s own slot arrays, in numpy."""
    columns, cuts, children, values, roots, levels = arrays
    x32 = queries.astype(np.float32)
    aug = np.concatenate((x32, -x32, np.abs(x32)), axis=1)
    rows = np.arange(queries.shape[0])
    totals = np.zeros(queries.shape[0], np.float64)
    for root in roots:
        slot = root + (aug[:, columns[root]] > cuts[root])
        for _ in range(int(levels) - 1):
            child = children[slot]
            slot = child + (aug[rows, columns[child]] > cuts[child])
        totals += values[children[slot]]
    return totals


@st.composite
def forests(draw: st.DrawFn) -> tuple[IsolationForest, Matrix]:
    """A fitted forest (any shape, missing values, odd cuts) and tricky rows for it."""
    n_samples = draw(st.integers(1, 300))
    n_features = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    train = _training_data(draw(st.sampled_from(["normal", "ties", "wide", "missing"])), rng,
                           n_samples, n_features)  # fmt: skip
    forest = IsolationForest(
        n_estimators=draw(st.integers(1, 12)),
        max_samples=draw(st.integers(1, n_samples)),
        max_features=draw(st.sampled_from([1.0, 0.5])),
        random_state=draw(st.integers(0, 2**31 - 1)),
    ).fit(train)
    if draw(st.booleans()):  # non-finite cuts and flipped missing-value directions
        for index, estimator in enumerate(forest.estimators_):
            tree = estimator.tree_
            splits = np.flatnonzero(tree.children_left >= 0)
            tree.threshold[splits[::3]] = (np.inf, -np.inf, np.nan)[index % 3]
            flip = splits[1::2]
            tree.missing_go_to_left[flip] = 1 - tree.missing_go_to_left[flip]
    return forest, _tricky_queries(forest, train, rng)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(forests())
def test_packed_records_score_bit_identically_to_the_slot_arrays(
    case: tuple[IsolationForest, Matrix],
) -> None:
    """The packed walk's per-row path-length sums equal the slot arrays' walk bit for bit,
    and slot arrays rebuilt from the records (what ``save`` writes) walk the same paths."""
    forest, queries = case
    flat = FlatForest.from_sklearn(forest)
    slots = _slot_arrays_from_sklearn(forest)
    totals = _walk_slots(slots, queries)
    expected = (
        np.full(queries.shape[0], 0.5)
        if flat.denominator == 0.0
        else np.asarray(2.0 ** -(totals / flat.denominator), dtype=np.float64)
    )
    np.testing.assert_array_equal(flat.score(queries), expected)
    rebuilt = (*_unpack(*flat.node_arrays()), slots[-1])
    np.testing.assert_array_equal(_walk_slots(rebuilt, queries), totals)


def test_saved_records_load_to_the_same_records(tmp_path: Path) -> None:
    """save() writes slot arrays, one node each (no padding); loading them packs exactly the
    records the forest had."""
    rng = np.random.default_rng(4)
    forest = IsolationForest(n_estimators=30, random_state=2).fit(rng.normal(size=(600, 4)))
    flat = FlatForest.from_sklearn(forest)
    flat.save(tmp_path / "forest.npz")
    again = FlatForest.load(tmp_path / "forest.npz")
    for mine, theirs in zip(flat.node_arrays(), again.node_arrays(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    nodes = sum(e.tree_.node_count for e in forest.estimators_)
    assert flat.n_records % 8 == 0
    assert flat.n_records >= nodes
    with np.load(tmp_path / "forest.npz") as saved:  # the blocks' padding is not written
        assert saved["children"].shape == (2 * nodes,)


def test_slots_that_are_not_trees_are_refused() -> None:
    """A node reached twice (two parents) cannot be packed and is refused, not misread."""
    rng = np.random.default_rng(5)
    forest = IsolationForest(n_estimators=2, random_state=0).fit(rng.normal(size=(50, 2)))
    columns, cuts, children, values, roots, levels = _slot_arrays_from_sklearn(forest)
    shared = np.array(children, copy=True)
    shared[1] = shared[0]  # the root's two outcomes lead to one child (allowed) ...
    shared[shared[0] + 1] = shared[0]  # ... whose second outcome leads back to itself
    with pytest.raises(ValueError, match="not trees"):
        FlatForest(
            n_features=2,
            columns=columns,  # type: ignore[arg-type]
            cuts=cuts,  # type: ignore[arg-type]
            children=shared,
            values=values,  # type: ignore[arg-type]
            roots=roots,  # type: ignore[arg-type]
            levels=int(levels),
            denominator=1.0,
        )


def test_stacked_records_stay_on_cache_lines_as_the_arena_grows_and_compacts() -> None:
    """Every tree's first block starts a cache line, in a forest of its own and in a
    ForestStack's arena after it grew and was compacted; the scores do not change."""
    rng = np.random.default_rng(6)
    forests = [
        FlatForest.from_sklearn(
            IsolationForest(n_estimators=3 + k, max_samples=20 + 30 * k, random_state=k).fit(
                rng.normal(size=(400, 3))
            )
        )
        for k in range(9)
    ]
    rows = rng.normal(size=(60, 3))
    before = [f.score(rows) for f in forests]

    def aligned(forest: FlatForest) -> bool:
        words, _, roots = forest.node_arrays()
        return words.ctypes.data % 64 == 0 and bool(np.all(roots % 8 == 0))

    assert all(aligned(f) for f in forests)
    stack = ForestStack()
    for forest in forests:  # the arena moves several times
        stack.add(forest)
    stack.retain(forests[6:])  # two thirds forgotten: compacted
    for forest in forests[:3]:
        stack.add(forest)
    held = [*forests[6:], *forests[:3]]
    assert all(aligned(f) for f in held)
    which = np.arange(60) % len(held)
    got = stack.score(rows, [stack.number(held[k]) for k in which])
    for k, forest in enumerate(held):
        np.testing.assert_array_equal(forest.score(rows), before[forests.index(forest)])
        np.testing.assert_array_equal(got[which == k], before[forests.index(forest)][which == k])
