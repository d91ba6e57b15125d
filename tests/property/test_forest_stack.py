"""ForestStack must give every row exactly its own forest's FlatForest score."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.ensemble import IsolationForest

from factorywatch.model.fastforest import FlatForest
from factorywatch.model.forest_stack import ForestStack
from tests.property.test_fastforest import _training_data, _tricky_queries

Matrix = npt.NDArray[np.float64]


@st.composite
def stacked_cases(draw: st.DrawFn) -> tuple[list[FlatForest], Matrix, npt.NDArray[np.int64]]:
    """2-4 forests of different sizes and depths on the same features, rows for any of them."""
    n_features = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    forests, queries = [], []
    for _ in range(draw(st.integers(2, 4))):
        n_samples = draw(st.integers(1, 200))
        kind = draw(st.sampled_from(["normal", "ties", "wide", "missing"]))
        train = _training_data(kind, rng, n_samples, n_features)
        forest = IsolationForest(
            n_estimators=draw(st.integers(1, 15)),
            max_samples=draw(st.integers(1, n_samples)),
            max_features=draw(st.sampled_from([1.0, 0.5])),
            random_state=draw(st.integers(0, 2**31 - 1)),
        ).fit(train)
        forests.append(FlatForest.from_sklearn(forest))
        queries.append(_tricky_queries(forest, train, rng))
    rows = np.concatenate(queries)
    rows = rows[rng.permutation(rows.shape[0])[: draw(st.integers(1, rows.shape[0]))]]
    which = np.asarray(rng.integers(0, len(forests), size=rows.shape[0]), dtype=np.int64)
    return forests, rows, which


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stacked_cases())
def test_stacked_scores_equal_each_forests_own(
    case: tuple[list[FlatForest], Matrix, npt.NDArray[np.int64]],
) -> None:
    """Rows of several forests scored in one walk equal each forest's own score, bit for bit,
    whether the forest scores the row alone or with the other rows of its forest."""
    forests, rows, which = case
    stack = ForestStack()
    numbers = [stack.add(f) for f in reversed(forests)][::-1]  # numbers need not be in order
    got = stack.score(rows, np.asarray(numbers)[which])
    for k, forest in enumerate(forests):
        mine = which == k
        np.testing.assert_array_equal(got[mine], forest.score(rows[mine]))
    for i in (0, rows.shape[0] - 1):
        np.testing.assert_array_equal(got[i], forests[which[i]].score(rows[i : i + 1])[0])


def _forests(count: int, n_features: int = 3) -> list[FlatForest]:
    rng = np.random.default_rng(count)
    return [
        FlatForest.from_sklearn(
            IsolationForest(n_estimators=5 + k, random_state=k).fit(
                rng.normal(size=(100, n_features))
            )
        )
        for k in range(count)
    ]


def test_retain_forgets_and_compacts_without_changing_scores() -> None:
    """Forgetting forests (then compacting the arena) keeps the others' scores; a forgotten
    forest added again gets a number and scores as before."""
    forests = _forests(4)
    stack = ForestStack()
    for f in forests:
        stack.add(f)
    rows = np.random.default_rng(1).normal(size=(40, 3))
    before = {k: f.score(rows) for k, f in enumerate(forests)}
    stack.retain(forests[1:])  # a quarter of the arena forgotten: no compaction
    assert forests[0] not in stack
    assert len(stack) == 4
    stack.retain(forests[3:])  # most of it forgotten: compacted
    assert len(stack) == 1
    assert forests[3] in stack
    np.testing.assert_array_equal(
        stack.score(rows, np.full(40, stack.number(forests[3]))), before[3]
    )
    again = stack.add(forests[0])
    np.testing.assert_array_equal(stack.score(rows, np.full(40, again)), before[0])
    # The stacked forests walk slices of one arena (held once) and still score as before.
    arena = forests[3].node_arrays()[0].base
    assert arena is not None
    assert forests[0].node_arrays()[0].base is arena
    for k, forest in enumerate(forests):
        np.testing.assert_array_equal(forest.score(rows), before[k])


def test_many_forests_added_one_by_one_keep_their_scores() -> None:
    """Adding forests one at a time (the arena moves as it grows) never changes any score."""
    forests = _forests(12)
    rows = np.random.default_rng(2).normal(size=(30, 3))
    before = [f.score(rows) for f in forests]
    stack = ForestStack()
    for f in forests:
        stack.add(f)
    which = np.arange(30) % 12
    got = stack.score(rows, which)
    for k, forest in enumerate(forests):
        np.testing.assert_array_equal(forest.score(rows), before[k])
        np.testing.assert_array_equal(got[which == k], before[k][which == k])


def test_refuses_rows_it_cannot_score() -> None:
    """A forest number out of range or rows of the wrong width raise a clear error."""
    stack = ForestStack()
    stack.add(_forests(1)[0])
    stack.add(_forests(1, n_features=2)[0])
    rows = np.zeros((2, 3))
    with pytest.raises(ValueError, match="forest numbers"):
        stack.score(rows, [0, 2])
    with pytest.raises(ValueError, match="rows have 3 features"):
        stack.score(rows, [0, 1])
    with pytest.raises(ValueError, match="one forest per row"):
        stack.score(rows, [0])
    assert stack.score(np.zeros((0, 3)), []).shape == (0,)
