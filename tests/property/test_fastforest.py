"""FlatForest must score exactly like scikit-learn's IsolationForest, on any forest and input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.ensemble import IsolationForest

from factorywatch.model.artifact import make_scorer
from factorywatch.model.fastforest import FlatForest

ATOL = 1e-9
Matrix = npt.NDArray[np.float64]


def _reference(forest: IsolationForest, queries: Matrix) -> Matrix:
    return np.asarray(-forest.score_samples(queries), dtype=np.float64)


def _training_data(kind: str, rng: np.random.Generator, n_samples: int, n_features: int) -> Matrix:
    shape = (n_samples, n_features)
    if kind == "ties":  # few distinct values: many duplicates and thresholds between them
        return rng.integers(-3, 4, size=shape).astype(np.float64)
    if kind == "wide":  # columns on very different scales, one of them constant
        data = rng.normal(size=shape) * 10.0 ** rng.integers(-4, 7, size=n_features)
        data[:, rng.integers(n_features)] = 1.25
        return data
    data = rng.normal(size=shape)
    if kind == "missing":
        data[rng.random(shape) < 0.15] = np.nan
    return data


def _tricky_queries(forest: IsolationForest, train: Matrix, rng: np.random.Generator) -> Matrix:
    """Rows on and next to every kind of cut, duplicates, far-out values, inf and NaN."""
    n_features = train.shape[1]
    subsample = int(forest._max_features) != n_features
    picks = []
    for estimator, features in zip(forest.estimators_, forest.estimators_features_, strict=True):
        tree = estimator.tree_
        split = tree.children_left >= 0
        local = tree.feature[split]
        picks.append(
            (
                np.asarray(features)[local] if subsample else local,
                tree.threshold[split],
            )
        )
    columns = np.concatenate([c for c, _ in picks]).astype(np.intp)
    cuts = np.concatenate([t for _, t in picks])
    if columns.size > 40:
        chosen = rng.choice(columns.size, 40, replace=False)
        columns, cuts = columns[chosen], cuts[chosen]
    cut32 = cuts.astype(np.float32)
    on_cut = np.concatenate(
        [
            cuts,
            cut32.astype(np.float64),
            np.nextafter(cut32, np.float32(np.inf)).astype(np.float64),
            np.nextafter(cut32, np.float32(-np.inf)).astype(np.float64),
        ]
    )
    on_columns = np.tile(columns, 4)
    rows = train[rng.integers(train.shape[0], size=on_cut.size)].copy()
    rows[np.arange(on_cut.size), on_columns] = on_cut
    duplicates = train[rng.integers(train.shape[0], size=8)]
    spread = np.where(np.isfinite(train), train, 0.0).std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    random_rows = rng.normal(size=(12, n_features)) * 3.0 * spread
    extremes = rng.choice(
        np.array([1e6, -1e6, 1e30, -1e30, np.inf, -np.inf, np.nan, 0.0]),
        size=(12, n_features),
    )
    return np.concatenate([rows, duplicates, random_rows, extremes])


@st.composite
def fitted_cases(draw: st.DrawFn) -> tuple[IsolationForest, Matrix]:
    """A fitted forest on random data with the queries to check it on."""
    n_samples = draw(st.integers(2, 300))
    n_features = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["normal", "ties", "wide", "missing"]))
    rng = np.random.default_rng(seed)
    train = _training_data(kind, rng, n_samples, n_features)
    count = draw(st.integers(1, n_samples))
    max_samples: Any = draw(st.sampled_from(["auto", count, min(1.0, (count + 0.5) / n_samples)]))
    max_features: Any = draw(
        st.one_of(st.floats(0.05, 1.0), st.integers(1, n_features), st.just(1.0))
    )
    forest = IsolationForest(
        n_estimators=draw(st.integers(1, 20)),
        max_samples=max_samples,
        max_features=max_features,
        bootstrap=draw(st.booleans()),
        random_state=draw(st.integers(0, 2**31 - 1)),
    ).fit(train)
    return forest, _tricky_queries(forest, train, rng)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fitted_cases())
def test_flat_forest_matches_sklearn(case: tuple[IsolationForest, Matrix]) -> None:
    """Batch and single-row scores equal ``-score_samples`` within 1e-9 for any forest."""
    forest, queries = case
    flat = FlatForest.from_sklearn(forest)
    expected = _reference(forest, queries)
    np.testing.assert_allclose(flat.score(queries), expected, rtol=0, atol=ATOL)
    for index in (0, queries.shape[0] // 2, queries.shape[0] - 1):
        row = queries[index : index + 1]
        np.testing.assert_allclose(flat.score(row), expected[index], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def big_forest() -> IsolationForest:
    """The production shape: 200 trees on 4 features."""
    train = np.random.default_rng(7).normal(size=(5_000, 4))
    return IsolationForest(n_estimators=200, random_state=0).fit(train)


def test_single_row_and_batch_agree(big_forest: IsolationForest) -> None:
    """Rows scored one at a time, in batches of any size, or all at once agree exactly."""
    flat = FlatForest.from_sklearn(big_forest)
    queries = np.random.default_rng(8).normal(size=(600, 4)) * 2.0
    batch = flat.score(queries)
    singles = np.array([flat.score(queries[i : i + 1])[0] for i in range(queries.shape[0])])
    np.testing.assert_allclose(singles, batch, rtol=0, atol=ATOL)
    for size in (2, 31, 63, 64, 65, 129, 257):  # around the walk's block of 64 cells
        np.testing.assert_array_equal(flat.score(queries[:size]), batch[:size])
    assert flat.score(queries[:0]).shape == (0,)
    np.testing.assert_allclose(batch, _reference(big_forest, queries), rtol=0, atol=ATOL)


def test_non_finite_cuts_follow_sklearn() -> None:
    """Cuts of +inf, -inf and NaN send numbers and NaN where sklearn's trees do."""
    rng = np.random.default_rng(3)
    forest = IsolationForest(n_estimators=12, random_state=1).fit(rng.normal(size=(300, 3)))
    for index, estimator in enumerate(forest.estimators_):
        tree = estimator.tree_
        splits = np.flatnonzero(tree.children_left >= 0)
        tree.threshold[splits[::3]] = (np.inf, -np.inf, np.nan)[index % 3]
        tree.missing_go_to_left[splits[1::2]] = 1 - tree.missing_go_to_left[splits[1::2]]
    queries = rng.normal(size=(200, 3))
    queries[rng.random(queries.shape) < 0.2] = np.nan
    queries[rng.random(queries.shape) < 0.05] = np.inf
    queries[rng.random(queries.shape) < 0.05] = -np.inf
    flat = FlatForest.from_sklearn(forest)
    np.testing.assert_allclose(flat.score(queries), _reference(forest, queries), rtol=0, atol=ATOL)


def test_without_precomputed_path_lengths(big_forest: IsolationForest) -> None:
    """Forests lacking sklearn>=1.3's cached path lengths are flattened to the same scores."""
    flat = FlatForest.from_sklearn(big_forest)
    bare = IsolationForest(n_estimators=200, random_state=0)
    bare.__dict__.update(big_forest.__dict__)
    del bare._decision_path_lengths, bare._average_path_length_per_tree
    queries = np.random.default_rng(9).normal(size=(50, 4))
    np.testing.assert_allclose(
        FlatForest.from_sklearn(bare).score(queries), flat.score(queries), rtol=0, atol=ATOL
    )


def test_saved_and_loaded_forest_scores_the_same(
    big_forest: IsolationForest, tmp_path: Path
) -> None:
    """save() then load() (forest.npz, no scikit-learn) gives bit-identical scores."""
    flat = FlatForest.from_sklearn(big_forest)
    flat.save(tmp_path / "forest.npz")
    again = FlatForest.load(tmp_path / "forest.npz")
    queries = np.random.default_rng(10).normal(size=(300, 4)) * 2.0
    queries[::7, 1] = np.nan
    np.testing.assert_array_equal(again.score(queries), flat.score(queries))
    np.testing.assert_allclose(again.score(queries), _reference(big_forest, queries), atol=ATOL)


def test_one_sample_forest_scores_half() -> None:
    """With max_samples=1 every path is empty and sklearn's score is 2**-1."""
    forest = IsolationForest(n_estimators=3, max_samples=1, random_state=0)
    forest.fit(np.arange(10.0).reshape(5, 2))
    queries = np.array([[0.0, 1.0], [50.0, -3.0]])
    np.testing.assert_allclose(
        FlatForest.from_sklearn(forest).score(queries), _reference(forest, queries), atol=ATOL
    )


def test_rejects_wrong_shape(big_forest: IsolationForest) -> None:
    """A row with the wrong number of features is refused rather than misread."""
    flat = FlatForest.from_sklearn(big_forest)
    with pytest.raises(ValueError, match="feature matrix"):
        flat.score(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="feature matrix"):
        flat.score(np.zeros(4))


def test_make_scorer_is_fast_forest(big_forest: IsolationForest) -> None:
    """Loaded models score with the flat forest."""
    assert isinstance(make_scorer(big_forest), FlatForest)
