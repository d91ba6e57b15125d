"""Many flat forests in one arena, so rows of different forests are scored in one walk.

A model per machine means a batch's readings belong to as many forests as machines; scoring
each machine's few rows in a call of its own costs a fixed overhead per call and walks one
row at a time (no overlap between walks). ``ForestStack`` keeps the node arrays of every
forest it holds end to end in one arena; each row names its forest, and one compiled walk
advances (row, tree) cells of every row together. The arena holds ``FlatForest``'s node
records (8 bytes each, in cache-line blocks of two or three tree levels, children relative
to their tree's first record, so a forest's records are copied as they are) and each
forest's table of path lengths: 1,000 forests are hundreds of MB, so nearly every block a
row visits is a cache miss, and the fewer lines per path the cheaper a model per machine.
Root and table indices stay relative to their forest (the arena adds the forest's bases),
and each row adds its own forest's path lengths in tree order, so a row's score is
bit-identical to ``FlatForest.score``.

A forest added walks its slice of the arena from then on (``FlatForest.share``), so its
nodes are held once, not twice; the arena grows by doubling as forests are added (up to
half of it spare) and is compacted when more than half of it belongs to forests no longer
held (``retain``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numba
import numpy as np
import numpy.typing as npt

from factorywatch.model.fastforest import (
    _LEAF_INDEX,
    FlatForest,
    _advance,
    _aligned_words,
    _prefetch,
)

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.int64]
_BLOCK_CELLS: Final = 64  # as in model.fastforest: cells advanced together
_compiled: list[bool] = []
# per forest: record base, first root, first path length, trees, levels, denominator
_Meta = tuple[
    IndexArray, IndexArray, IndexArray, IndexArray, IndexArray, FloatArray
]  # the walk was compiled in this process


class ForestStack:
    """Forests end to end in one arena; ``score`` takes rows of any of them at once."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}  # id(forest) -> its number in the stack
        self._forests: list[FlatForest] = []
        self._used = 0  # arena records in use (live or dead)
        self._roots_used = 0
        self._lengths_used = 0
        self._words = np.empty(0, np.uint32)  # two per record: FlatForest's
        self._lengths = np.empty(0, np.float64)  # each forest's distinct path lengths
        self._roots = np.empty(0, np.int32)
        # per forest: record base, first root, first path length; trees, levels, denominator
        self._node_base: list[int] = []
        self._length_base: list[int] = []
        self._root_base: list[int] = []
        self._meta_cache: _Meta | None
        self._meta_cache = None
        self._dead_nodes = 0

    def __len__(self) -> int:
        return len(self._forests)

    def __contains__(self, forest: object) -> bool:
        return id(forest) in self._index

    def add(self, forest: FlatForest) -> int:
        """Hold ``forest`` (once); its number in the stack."""
        known = self._index.get(id(forest))
        if known is not None:
            return known
        words, lengths, roots = forest.node_arrays()
        records, trees, count = forest.n_records, roots.shape[0], lengths.shape[0]
        grew = self._reserve(self._used + records, self._roots_used + trees,
                             self._lengths_used + count)  # fmt: skip
        lo, hi = self._used, self._used + records
        self._words[2 * lo : 2 * hi] = words
        self._lengths[self._lengths_used : self._lengths_used + count] = lengths
        self._roots[self._roots_used : self._roots_used + trees] = roots
        self._node_base.append(lo)
        self._length_base.append(self._lengths_used)
        self._lengths_used += count
        self._root_base.append(self._roots_used)
        self._used = hi
        self._roots_used += trees
        number = len(self._forests)
        self._forests.append(forest)
        self._index[id(forest)] = number
        self._meta_cache = None
        # The forest walks its slice of the arena: its own arrays are freed (held once).
        # When the arena moved, every held forest follows it, so the old arena is freed.
        for k in range(len(self._forests)) if grew else (number,):
            self._share(k)
        if not _compiled:  # compile the walk now (once per process), not on a batch
            self.score(np.zeros((1, forest.n_features)), [number])
            _compiled.append(True)
        return number

    def _share(self, k: int) -> None:
        forest = self._forests[k]
        lo, first, table = self._node_base[k], self._root_base[k], self._length_base[k]
        hi = lo + forest.n_records
        forest.share(
            (
                self._words[2 * lo : 2 * hi],
                self._lengths[table : table + forest.node_arrays()[1].shape[0]],
                self._roots[first : first + forest.n_trees],
            )
        )

    def number(self, forest: FlatForest) -> int:
        """The number ``add`` gave ``forest`` (KeyError if it is not held)."""
        return self._index[id(forest)]

    def retain(self, forests: Iterable[object]) -> None:
        """Forget the forests not in ``forests`` (numbers may change); compact when more
        than half of the arena belongs to forgotten ones. Forests are added by ``add``."""
        keep = {id(f) for f in forests}
        dead = [f for f in self._forests if id(f) in self._index and id(f) not in keep]
        if not dead:
            return
        self._dead_nodes += sum(f.n_records for f in dead)
        if 2 * self._dead_nodes > self._used:
            self._rebuild([f for f in self._forests if id(f) in keep])
            return
        # forgotten, their nodes left in place until a compaction: no copy per unbinding
        for f in dead:
            del self._index[id(f)]

    def _rebuild(self, forests: list[FlatForest]) -> None:
        fresh = ForestStack()
        for f in forests:
            fresh.add(f)
        self.__dict__.update(fresh.__dict__)

    def _reserve(self, records: int, roots: int, lengths: int) -> bool:
        """Room for ``records`` records, ``roots`` roots and ``lengths`` path lengths;
        whether the arena moved."""
        grew = False
        if 2 * records > self._words.shape[0]:
            # cache-line aligned: a forest's blocks (multiples of 8 records) stay aligned
            words = _aligned_words(2 * max(records, self._words.shape[0], 1024))  # doubles
            words[: 2 * self._used] = self._words[: 2 * self._used]
            self._words = words
            grew = True
        if lengths > self._lengths.shape[0]:
            grown_lengths = np.empty(max(lengths, 2 * self._lengths.shape[0], 1024), np.float64)
            grown_lengths[: self._lengths_used] = self._lengths[: self._lengths_used]
            self._lengths = grown_lengths
            grew = True
        if roots > self._roots.shape[0]:
            grown_roots = np.empty(max(roots, 2 * self._roots.shape[0], 256), np.int32)
            grown_roots[: self._roots_used] = self._roots[: self._roots_used]
            self._roots = grown_roots
            grew = True
        return grew

    def _meta(self) -> _Meta:
        if self._meta_cache is None:
            f = self._forests
            self._meta_cache = (
                np.asarray(self._node_base, np.int64),
                np.asarray(self._root_base, np.int64),
                np.asarray(self._length_base, np.int64),
                np.asarray([x.n_trees for x in f], np.int64),
                np.asarray([x.levels for x in f], np.int64),
                np.asarray([x.denominator for x in f], np.float64),
            )
        return self._meta_cache

    def score(self, features: npt.ArrayLike, forest_of_row: npt.ArrayLike) -> FloatArray:
        """Row ``i`` scored by forest number ``forest_of_row[i]``: ``FlatForest.score``'s value.

        Every row's forest must take ``features.shape[1]`` features.
        """
        matrix = np.asarray(features)
        which = np.asarray(forest_of_row, dtype=np.int64)
        rows = matrix.shape[0] if matrix.ndim == 2 else -1
        if rows < 0 or which.shape != (rows,):
            raise ValueError(f"expected a feature matrix and one forest per row, got "
                             f"{matrix.shape} and {which.shape}")  # fmt: skip
        if not rows:
            return np.empty(0, np.float64)
        if which.min() < 0 or which.max() >= len(self._forests):
            raise ValueError(f"forest numbers must be in 0..{len(self._forests) - 1}")
        width = matrix.shape[1]
        wrong = {self._forests[k].n_features for k in set(which.tolist())} - {width}
        if wrong:
            raise ValueError(f"rows have {width} features; forests of the rows take {wrong}")
        node_base, root_base, length_base, trees, levels, denominator = self._meta()
        x32 = matrix.astype(np.float32)
        aug = np.concatenate((x32, -x32, np.abs(x32)), axis=-1).ravel()
        totals = np.empty(rows, dtype=np.float64)
        _walk_stacked(
            aug,
            3 * width,
            node_base[which],
            root_base[which],
            length_base[which],
            trees[which],
            max(int(levels[which].max()), 1),
            self._roots,
            self._words,
            self._words.view(np.float32),
            self._lengths,
            totals,
        )
        denominators = denominator[which]
        flat = denominators == 0.0  # one training sample: FlatForest's 0.5
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.asarray(2.0 ** -(totals / denominators), dtype=np.float64)
        if flat.any():
            out[flat] = 0.5
        return out


@numba.njit(nogil=True, cache=False)
def _walk_stacked(  # noqa: PLR0917 - numba compiles positional parameters only
    aug: npt.NDArray[np.float32],
    width: int,
    node_base: IndexArray,
    root_base: IndexArray,
    length_base: IndexArray,
    trees: IndexArray,
    moves: int,
    roots: npt.NDArray[np.int32],
    words: npt.NDArray[np.uint32],
    cuts: npt.NDArray[np.float32],
    lengths: FloatArray,
    totals: FloatArray,
) -> None:  # pragma: no cover - compiled: covered through ForestStack.score
    """``model.fastforest._walk`` with a forest per row (roots relative to its base).

    Cells are ordered tree-major, so each row adds its trees' path lengths in tree order
    (bit-identical to its own forest's walk). A shallower forest walks the deepest one's
    levels: its leaves point at themselves, so the extra moves change nothing.
    """
    rows = totals.shape[0]
    most = 0
    for row in range(rows):
        most = max(most, trees[row])
    per_block = max(1, _BLOCK_CELLS // rows)
    nodes = np.empty(per_block * rows, np.int64)
    bases = np.empty(per_block * rows, np.int64)
    owner = np.empty(per_block * rows, np.int64)
    totals[:] = 0.0
    for first in range(0, most, per_block):
        last = min(most, first + per_block)
        cells = 0
        for tree in range(first, last):
            for row in range(rows):
                if tree >= trees[row]:
                    continue
                root = node_base[row] + roots[root_base[row] + tree]
                _prefetch(words, 2 * root)
                nodes[cells] = root
                bases[cells] = root
                owner[cells] = row
                cells += 1
        _advance(aug, width, owner, bases, nodes, cells, moves, words, cuts)
        for cell in range(cells):
            row = owner[cell]
            totals[row] += lengths[length_base[row] + (words[2 * nodes[cell]] & _LEAF_INDEX)]
