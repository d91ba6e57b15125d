"""Isolation Forest scorer that flattens scikit-learn's trees and scores exactly, compiled.

The trees become flat arrays once (numpy); walking them is one small loop compiled by numba,
about 5 µs per reading with 300 trees against about 12 µs for the same walk as numpy
array operations and 9-13 ms for a ``score_samples`` call (``python -m bench.bench_scorer``).
The compiled walk is cached on disk (numba ``cache=True``; ``NUMBA_CACHE_DIR`` when set, else
``__pycache__`` beside this file, else a private folder in the temporary directory, as in a
container whose installed package is read-only; no cache when none is writable), so only the
first process after an install or an upgrade compiles it; every later detector start loads
it, which takes a restarted detector's model load from about 5 to about 1 CPU-second.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]  # numba's own dependency, untyped
from numba.core import cgutils, types
from numba.extending import intrinsic

if TYPE_CHECKING:  # scoring a saved forest needs no scikit-learn (memory, start-up)
    from sklearn.ensemble import IsolationForest


def _compile_cache() -> bool:
    """Whether numba may cache the compiled walk, and where (see the module doc): numba
    refuses to import a cached function when no cache folder is writable."""
    config: Any = numba.config  # its settings are set at import, untyped
    if config.CACHE_DIR:
        return True
    for folder, own in ((Path(__file__).parent / "__pycache__", False), (_private_tmp(), True)):
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            if own:
                config.CACHE_DIR = str(folder)
            return True
    return False


def _private_tmp() -> Path:
    return Path(tempfile.gettempdir()) / f"factorywatch-numba-{os.getuid()}"


_CACHE: Final = _compile_cache()
FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]
SlotArray = npt.NDArray[np.int32]
Float32Array = npt.NDArray[np.float32]
WordArray = npt.NDArray[np.uint32]

_LEAF: Final = -1
_BLOCK_CELLS: Final = 64  # (row, tree) walks advanced together: enough to overlap, in L1
_COLUMN_SHIFT: Final = 16  # a node's word: column << 16 | first child (relative to its root)
_CHILD_MASK: Final = 0xFFFF
_MAX_TREE_NODES: Final = 1 << 16  # records (with padding) a tree's 16-bit child reaches
_MAX_COLUMNS: Final = 1 << 16
_BLOCK_NODES: Final = 8  # records per 64-byte cache line
_LEAF_NAN: Final = 0x7FC00000  # a quiet float32 NaN; its low 22 bits: a path length's index
_LEAF_INDEX: Final = 0x3FFFFF


@intrinsic
def _prefetch_line(typingctx: Any, array: Any, index: Any) -> Any:  # pragma: no cover
    """Ask for ``array[index]``'s cache line now (LLVM's prefetch; no fault, no result).

    The walks know a cell's next record one pass over all cells before they read it: asked
    for at once, many misses are in flight together instead of the few the CPU's
    reordering window holds.
    """
    del typingctx

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(  # type: ignore[no-untyped-call]
            context, builder, array_type, view, [args[1]], wraparound=False
        )
        bytes_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module,
            ir.FunctionType(ir.VoidType(), [bytes_pointer, i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        # read, high temporal locality, data cache
        builder.call(function, [builder.bitcast(pointer, bytes_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


_prefetch = cast(Callable[[npt.NDArray[Any], int], None], _prefetch_line)


def _average_path_length(n_samples: npt.ArrayLike) -> FloatArray:
    """c(n) of Liu et al., with exactly scikit-learn's arithmetic (0 for n <= 1, 1 for n == 2)."""
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros(n.shape, dtype=np.float64)
    big = n > 2
    out[n == 2] = 1.0
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _node_depths(left: IndexArray, right: IndexArray) -> FloatArray:
    """Depth of every node counting the root as 1 (what ``Tree.compute_node_depths`` returns)."""
    depths = np.zeros(left.shape[0], dtype=np.float64)
    depths[0] = 1.0
    for node in range(left.shape[0]):  # children always come after their parent
        if left[node] != _LEAF:
            depths[left[node]] = depths[right[node]] = depths[node] + 1.0
    return depths


def _round_down_f32(values: FloatArray) -> Float32Array:
    """The largest float32 <= each value, so ``x32 <= t64`` iff ``x32 <= result``."""
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float32)
    too_big = rounded.astype(np.float64) > values
    rounded[too_big] = np.nextafter(rounded[too_big], np.float32(-np.inf))
    return rounded


class FlatForest:
    """All trees of a fitted ``IsolationForest`` in flat arrays, walked by a compiled loop.

    Each node owns two consecutive *slots* (``2 * node`` and ``2 * node + 1``). A slot holds
    the column of the augmented row ``[x, -x, |x|]`` the node compares, a float32 cut ``u``
    and the slot of the child to visit when ``column > u`` is False (first slot) or True
    (second slot). Comparing ``x > t`` or ``-x > u`` covers both missing-value directions
    because NaN compares False; leaves point at themselves, so walking a fixed number of
    levels lands every (row, tree) pair on its leaf. A slot's value is its leaf's path length
    ``depth + c(n_node_samples)``, as in ``IsolationForest.score_samples``.

    The slots are the constructor's (and ``save``'s) format; the walk reads them packed
    (``_pack``): one 8-byte record per node, in cache-line blocks that hold two or three
    levels of a tree, a leaf's path length found through its record. A path touches about
    half the cache lines and a visit one instead of three, which matters when many forests
    (a model per machine) do not fit in cache; the paths and sums are the slots' own, so
    the scores are bit-identical.
    """

    def __init__(
        self,
        *,
        n_features: int,
        columns: IndexArray,
        cuts: Float32Array,
        children: IndexArray,
        values: FloatArray,
        roots: IndexArray,
        levels: int,
        denominator: float,
    ) -> None:
        self.n_features = n_features
        self.n_trees = int(roots.shape[0])
        self.levels = levels
        self.denominator = denominator
        if children.shape[0] >= np.iinfo(np.int32).max:
            raise ValueError(f"forest too large to flatten: {children.shape[0]} slots")
        _check_structure(n_features, columns, cuts, children, values, roots, levels, denominator)
        words, path_lengths, tree_roots = _pack(
            columns, cuts, children, values, roots, levels, n_features
        )
        self._words: WordArray = words
        self._path_lengths: FloatArray = path_lengths
        self._roots: SlotArray = tree_roots
        self._uses_abs = bool(np.any(columns >= 2 * n_features))
        self._width = (3 if self._uses_abs else 2) * n_features
        # Compile the walk now (about 0.5 s, once per process), not on the first reading.
        self.score(np.zeros((1, n_features)))

    @property
    def n_records(self) -> int:
        """Node records of all trees, with the padding of their blocks (8 bytes each)."""
        return int(self._words.shape[0] // 2)

    def node_arrays(self) -> tuple[WordArray, FloatArray, SlotArray]:
        """The arrays the walk reads: node records (two words each), the distinct path
        lengths, each tree's first record."""
        return self._words, self._path_lengths, self._roots

    def share(self, arrays: tuple[WordArray, FloatArray, SlotArray]) -> None:
        """Walk ``arrays`` (equal copies of ``node_arrays``, views of a ``ForestStack``'s
        arena) from now on, so that a stacked forest's nodes are held once."""
        new: list[npt.NDArray[Any]] = list(arrays)
        old: list[npt.NDArray[Any]] = list(self.node_arrays())
        if any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(new, old, strict=True)):
            raise ValueError("shared forest arrays differ in shape or type from the forest's")
        self._words, self._path_lengths, self._roots = arrays

    def save(self, path: Path) -> None:
        """Write the flat arrays to ``path`` (``.npz``: plain arrays, nothing pickled)."""
        columns, cuts, children, values, roots = _unpack(
            self._words, self._path_lengths, self._roots
        )
        with path.open("wb") as out:
            np.savez(
                out,
                columns=columns,
                cuts=cuts,
                children=children,
                values=values,
                roots=roots,
                scalars=np.array([self.n_features, self.levels], dtype=np.int64),
                denominator=np.array([self.denominator], dtype=np.float64),
            )

    @classmethod
    def load(cls, path: Path) -> FlatForest:
        """Read what ``save`` wrote; anything else raises (``ValueError``, ``KeyError``,
        ``EOFError``, ``zipfile.BadZipFile``)."""
        with path.open("rb") as raw, np.load(raw, allow_pickle=False) as data:
            n_features, levels = (int(v) for v in data["scalars"])
            return cls(
                n_features=n_features,
                columns=data["columns"],
                cuts=data["cuts"],
                children=data["children"],
                values=data["values"],
                roots=data["roots"],
                levels=levels,
                denominator=float(data["denominator"][0]),
            )

    @classmethod
    def from_sklearn(cls, forest: IsolationForest) -> FlatForest:
        """Flatten a fitted ``sklearn.ensemble.IsolationForest``."""
        n_features = int(forest.n_features_in_)
        subsample = int(forest._max_features) != n_features  # sklearn's own test
        max_samples = int(getattr(forest, "_max_samples", forest.max_samples_))
        precomputed = hasattr(forest, "_decision_path_lengths") and hasattr(
            forest, "_average_path_length_per_tree"
        )
        columns: list[IndexArray] = []
        cuts: list[Float32Array] = []
        children: list[IndexArray] = []
        values: list[FloatArray] = []
        roots: list[int] = []
        levels = 0
        offset = 0
        for index, (estimator, features) in enumerate(
            zip(forest.estimators_, forest.estimators_features_, strict=True)
        ):
            tree = estimator.tree_
            left = np.asarray(tree.children_left, dtype=np.intp)
            right = np.asarray(tree.children_right, dtype=np.intp)
            n_nodes = left.shape[0]
            if precomputed:
                depths = np.asarray(forest._decision_path_lengths[index], dtype=np.float64)
                average = np.asarray(forest._average_path_length_per_tree[index], np.float64)
            else:
                depths = _node_depths(left, right)
                average = _average_path_length(tree.n_node_samples)
            node_values = depths + average - 1.0
            col, cut, child = _flatten_tree(
                left=left,
                right=right,
                feature=np.asarray(tree.feature, dtype=np.intp),
                threshold=np.asarray(tree.threshold, dtype=np.float64),
                missing_left=np.asarray(tree.missing_go_to_left, dtype=bool),
                global_features=(
                    np.asarray(features, dtype=np.intp)
                    if subsample
                    else np.arange(n_features, dtype=np.intp)
                ),
                n_features=n_features,
            )
            columns.append(col)
            cuts.append(cut)
            children.append(child + 2 * offset)
            values.append(np.repeat(node_values, 2))
            roots.append(2 * offset)
            levels = max(levels, int(tree.max_depth))
            offset += n_nodes
        n_trees = len(roots)
        return cls(
            n_features=n_features,
            columns=np.concatenate(columns),
            cuts=np.concatenate(cuts),
            children=np.concatenate(children),
            values=np.concatenate(values),
            roots=np.asarray(roots, dtype=np.intp),
            levels=levels,
            denominator=float(n_trees * _average_path_length([max_samples])[0]),
        )

    def score(self, features: npt.ArrayLike) -> FloatArray:
        """Return ``-forest.score_samples(features)``: one score in (0, 1] per row."""
        matrix = np.asarray(features)
        if matrix.ndim != 2 or matrix.shape[1] != self.n_features:
            raise ValueError(
                f"expected a (n_rows, {self.n_features}) feature matrix, got {matrix.shape}"
            )
        rows = matrix.shape[0]
        if self.denominator == 0.0:  # one training sample: sklearn's ratio is 1, score 2**-1
            return np.full(rows, 0.5, dtype=np.float64)
        totals = np.empty(rows, dtype=np.float64)
        if rows:
            _walk(
                self._augment(matrix.astype(np.float32)).ravel(),
                self._width,
                self._roots,
                self._words,
                self._words.view(np.float32),
                self._path_lengths,
                max(self.levels, 1),
                totals,
            )
        return np.asarray(2.0 ** -(totals / self.denominator), dtype=np.float64)

    def _augment(self, x32: Float32Array) -> Float32Array:
        """Rows ``[x, -x]`` (and ``|x|`` when some cut is +inf or NaN), as float32."""
        parts = (x32, -x32, np.abs(x32)) if self._uses_abs else (x32, -x32)
        return np.concatenate(parts, axis=-1)


def _check_structure(  # noqa: PLR0917 - the arrays of one forest
    n_features: int,
    columns: IndexArray,
    cuts: Float32Array,
    children: IndexArray,
    values: FloatArray,
    roots: IndexArray,
    levels: int,
    denominator: float,
) -> None:
    """Refuse arrays the compiled walk would read out of bounds with (a corrupt file).

    The walk has no bounds checks: a bad slot or column index would read (or crash on)
    memory outside the forest, so every index is checked once, here.
    """
    slots = children.shape[0]
    shapes = {a.shape for a in (columns, cuts, children, values)}
    if n_features < 1 or len(shapes) != 1 or children.ndim != 1 or roots.ndim != 1:
        raise ValueError(f"inconsistent forest arrays: {n_features} features, shapes {shapes}")
    in_range = (
        (slots == 0 or (children.min() >= 0 and children.max() < slots))
        and (roots.size == 0 or (roots.min() >= 0 and roots.max() < slots))
        and (slots == 0 or (columns.min() >= 0 and columns.max() < 3 * n_features))
    )
    if not in_range:
        raise ValueError("forest arrays hold slot or column indices out of range")
    if not (0 <= levels <= slots and np.isfinite(values).all()):
        raise ValueError(f"forest has {levels} levels or non-finite path lengths")
    if not (np.isfinite(denominator) and denominator >= 0.0):
        raise ValueError(f"forest denominator {denominator} is not a finite number >= 0")


@numba.njit(nogil=True, cache=_CACHE)
def _walk(  # noqa: PLR0917 - numba compiles positional parameters only
    aug: Float32Array,
    width: int,
    roots: SlotArray,
    words: WordArray,
    cuts: Float32Array,
    path_lengths: FloatArray,
    moves: int,
    totals: FloatArray,
) -> None:  # pragma: no cover - compiled: covered through FlatForest.score
    """Per-row sums over trees of path lengths, written into ``totals``.

    Compiled by numba. Cells (one row in one tree) advance level by level in blocks of a few
    trees, so the CPU overlaps many independent walks and a block's nodes stay in cache;
    each row adds its trees' path lengths in tree order, as scikit-learn does (bit-identical).
    A node is one 8-byte record (``words[2n]`` its cut, read through ``cuts``, a float32 view
    of ``words``; ``words[2n + 1]`` its column and first child); see ``_pack``.
    """
    rows = totals.shape[0]
    n_trees = roots.shape[0]
    per_block = max(1, _BLOCK_CELLS // rows)
    nodes = np.empty(per_block * rows, np.int64)
    bases = np.empty(per_block * rows, np.int64)
    owner = np.empty(per_block * rows, np.int64)
    for cell in range(per_block * rows):
        owner[cell] = cell % rows
    totals[:] = 0.0
    for first in range(0, n_trees, per_block):
        last = min(n_trees, first + per_block)
        cells = 0
        for tree in range(first, last):
            for _row in range(rows):
                bases[cells] = roots[tree]
                nodes[cells] = roots[tree]
                cells += 1
        _advance(aug, width, owner, bases, nodes, cells, moves, words, cuts)
        cell = 0
        for _tree in range(first, last):
            for row in range(rows):
                totals[row] += path_lengths[words[2 * nodes[cell]] & _LEAF_INDEX]
                cell += 1


@numba.njit(nogil=True, cache=_CACHE)
def _advance(  # noqa: PLR0917 - numba compiles positional parameters only
    aug: Float32Array,
    width: int,
    owner: IndexArray,
    bases: IndexArray,
    nodes: IndexArray,
    cells: int,
    moves: int,
    words: WordArray,
    cuts: Float32Array,
) -> None:  # pragma: no cover - compiled: covered through the walks
    """Move the first ``cells`` cells ``moves`` levels down their trees (a leaf points at
    itself). Cell ``c`` is at record ``nodes[c]`` of the tree rooted at ``bases[c]`` and
    compares row ``owner[c]`` of ``aug`` (rows ``width`` wide); each record read is asked for
    one pass over the cells before it is needed (``_prefetch``). Both walks (one forest,
    ``_walk``; a forest per row, ``model.forest_stack``) advance their cells here."""
    for _move in range(moves):
        for cell in range(cells):
            node = nodes[cell]
            word = words[2 * node + 1]
            node = (
                bases[cell]
                + (word & _CHILD_MASK)
                + (aug[owner[cell] * width + (word >> _COLUMN_SHIFT)] > cuts[2 * node])
            )
            nodes[cell] = node
            _prefetch(words, 2 * node)


def _aligned_words(count: int) -> WordArray:
    """``count`` uint32 words starting on a cache line (64 bytes), so blocks stay in one."""
    raw = np.empty(count + _BLOCK_NODES * 2, np.uint32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip : skip + count]


def _pack(  # noqa: PLR0917 - the arrays of one forest
    columns: IndexArray,
    cuts: Float32Array,
    children: IndexArray,
    values: FloatArray,
    roots: IndexArray,
    levels: int,
    n_features: int,
) -> tuple[WordArray, FloatArray, SlotArray]:
    """The slot arrays as node records: ``(words, path lengths, each tree's first record)``.

    A record is 8 bytes: a float32 cut, then a word holding the column (high 16 bits) and
    the first child's record relative to the tree's first (low 16 bits); the walk goes to
    ``child + (column > cut)``, so a node's two children are neighbours. Records come in
    cache-line blocks of 8, filled breadth first while a node's children fit: a tree's
    first block holds its root and the next two levels, every other block a pair of
    siblings, their children and more while there is room (a small subtree: all of it), so
    a root-to-leaf path at depth 9 reads 4-5 cache lines, not 10. A leaf's cut is a NaN (nothing
    compares greater, so it stays put) whose payload is its path length's index in the
    forest's table of distinct path lengths: the last visit needs no other line. A node
    whose two outcomes lead to one child gets the cut +inf. Paths are those of the slot
    arrays, move for move, and the lengths are the same float64s: scores are bit-identical.
    """
    order, first_child, single, tree_start, depth = _renumber(
        np.asarray(children, np.int64), np.asarray(roots, np.int64)
    )
    if order.shape[0] == 0 and roots.shape[0] > 0:
        raise ValueError("forest arrays are not trees (a node reached twice or a bad child)")
    if depth > max(levels, 1):
        raise ValueError(f"a tree is {depth} levels deep; the forest walks {levels}")
    sizes = np.diff(np.append(tree_start, order.shape[0]))
    if sizes.size and sizes.max() > _MAX_TREE_NODES:
        raise ValueError(f"a tree of {sizes.max()} records: at most {_MAX_TREE_NODES} fit")
    if 3 * n_features > _MAX_COLUMNS:
        raise ValueError(f"{n_features} features: at most {_MAX_COLUMNS // 3} fit a record")
    node = order >= 0  # the others pad blocks: leaves of length 0, never reached
    first = 2 * np.where(node, order, 0)
    leaf = first_child < 0
    lengths = np.where(node & leaf, values[first], 0.0)
    table, index = np.unique(lengths[leaf], return_inverse=True)
    if table.shape[0] > _LEAF_INDEX + 1:
        raise ValueError(f"{table.shape[0]} distinct path lengths: at most {_LEAF_INDEX + 1}")
    node_cuts = np.where(single, np.float32(np.inf), cuts[first]).astype(np.float32)
    cut_bits = node_cuts.view(np.uint32)
    cut_bits[leaf] = _LEAF_NAN | index.astype(np.uint32)
    node_columns = np.where(leaf | single, 0, columns[first]).astype(np.uint32)
    own = np.repeat(tree_start, sizes)  # each record's tree's first record
    relative = np.where(leaf, np.arange(order.shape[0]), first_child) - own
    words = _aligned_words(2 * order.shape[0])
    words[0::2] = cut_bits
    words[1::2] = (node_columns << _COLUMN_SHIFT) | relative.astype(np.uint32)
    return words, np.ascontiguousarray(table, dtype=np.float64), tree_start.astype(np.int32)


def _unpack(
    words: WordArray, path_lengths: FloatArray, roots: SlotArray
) -> tuple[SlotArray, Float32Array, SlotArray, FloatArray, SlotArray]:
    """Slot arrays (what ``save`` writes, ``_pack``'s input) of the node records.

    The blocks' padding is left out (the file is no larger than the trees); inner nodes get
    the path length 0, never read (the walk ends on leaves). ``_pack`` makes the same
    records of them again: it numbers nodes by following children from the roots.
    """
    n_nodes = words.shape[0] // 2
    cuts = words.view(np.float32)[0::2].copy()
    leaf = np.isnan(cuts)
    index = np.where(leaf, words[0::2] & _LEAF_INDEX, 0)
    lengths = np.where(leaf, path_lengths[index], 0.0) if path_lengths.size else cuts * 0.0
    columns = (words[1::2] >> _COLUMN_SHIFT).astype(np.int32)
    tree_roots = roots.astype(np.int64)
    sizes = np.diff(np.append(tree_roots, n_nodes))
    own = np.repeat(tree_roots, sizes)
    child = own + (words[1::2] & _CHILD_MASK).astype(np.int64)
    # The second outcome of a cut of +inf (or NaN) never happens: it leads where the first does.
    second = np.where((cuts == np.inf) | leaf, child, child + 1)
    cuts[leaf] = 0.0
    kept = np.zeros(n_nodes, dtype=bool)  # roots and every node a record leads to
    kept[tree_roots] = True
    kept[child[~leaf]] = True
    kept[second[~leaf]] = True
    number = np.cumsum(kept) - 1  # a kept record's node number in the file
    slot_children = np.empty(2 * int(kept.sum()), np.int32)
    slot_children[0::2] = 2 * number[child[kept]]
    slot_children[1::2] = 2 * number[second[kept]]
    return (
        np.repeat(columns[kept], 2),
        np.repeat(cuts[kept], 2),
        slot_children,
        np.repeat(lengths[kept], 2),
        (2 * number[tree_roots]).astype(np.int32),
    )


@numba.njit(cache=_CACHE)
def _place_children(  # noqa: PLR0917 - numba compiles positional parameters only
    parent: int,
    count: int,
    children: npt.NDArray[np.int64],
    order: npt.NDArray[np.int64],
    new_of: npt.NDArray[np.int64],
    first_child: npt.NDArray[np.int64],
    single: npt.NDArray[np.bool_],
    depth: npt.NDArray[np.int64],
) -> int:  # pragma: no cover - compiled: covered through FlatForest
    """Give record ``parent``'s children the next numbers from ``count``; the next free
    number, or -1 when the slots are not a tree."""
    old = order[parent]
    false_slot, true_slot = children[2 * old], children[2 * old + 1]
    if false_slot % 2 or true_slot % 2:
        return -1
    if false_slot == true_slot == 2 * old:  # a leaf
        return count
    first_child[parent] = count
    single[parent] = false_slot == true_slot
    for slot in (false_slot, true_slot):
        kid = slot // 2
        if new_of[kid] == count - 1 and single[parent]:
            break  # one child for both outcomes: placed once
        if new_of[kid] >= 0:
            return -1
        new_of[kid], order[count], depth[count] = count, kid, depth[parent] + 1
        count += 1
    return count


@numba.njit(cache=_CACHE)
def _renumber(
    children: npt.NDArray[np.int64], roots: npt.NDArray[np.int64]
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.int64],
    int,
]:  # pragma: no cover - compiled: covered through FlatForest
    """Record numbers in cache-line blocks (see ``_pack``), tree after tree.

    Returns, per record: its old node (-1: padding), its first child's record (-1: a leaf),
    whether both outcomes lead to one child; each tree's first record; the deepest depth.
    Empty arrays when the slots do not form trees (a node reached twice, an odd child slot).
    """
    n_old = children.shape[0] // 2
    cap = _BLOCK_NODES * (n_old + 1)
    order = np.full(cap, -1, np.int64)
    first_child = np.full(cap, -1, np.int64)
    single = np.zeros(cap, np.bool_)
    depth = np.zeros(cap, np.int64)
    new_of = np.full(n_old, -1, np.int64)
    tree_start = np.empty(roots.shape[0], np.int64)
    deferred = np.empty(cap, np.int64)  # records whose children start a block of their own
    bad = (order[:0], first_child[:0], single[:0], tree_start[:0], 0)
    count = 0
    for tree in range(roots.shape[0]):
        root = roots[tree]
        if root % 2 or new_of[root // 2] >= 0:
            return bad
        tree_start[tree] = count
        new_of[root // 2], order[count], depth[count] = count, root // 2, 0
        block, count = count, count + 1
        head = tail = 0
        while True:
            # Breadth first through the block: a node's children join it while they fit.
            parent = block
            while parent < count:
                old = order[parent]
                false_slot, true_slot = children[2 * old], children[2 * old + 1]
                if not false_slot == true_slot == 2 * old:  # not a leaf
                    need = 1 if false_slot == true_slot else 2
                    if count + need <= block + _BLOCK_NODES:
                        count = _place_children(
                            parent, count, children, order, new_of, first_child, single, depth
                        )
                        if count < 0:
                            return bad
                    else:
                        deferred[tail] = parent
                        tail += 1
                parent += 1
            count = -(-count // _BLOCK_NODES) * _BLOCK_NODES
            if head == tail:
                break
            block = count  # the next deferred node's children start a block
            count = _place_children(
                deferred[head], count, children, order, new_of, first_child, single, depth
            )
            if count < 0:
                return bad
            head += 1
    return order[:count], first_child[:count], single[:count], tree_start, depth.max()


def _flatten_tree(
    *,
    left: IndexArray,
    right: IndexArray,
    feature: IndexArray,
    threshold: FloatArray,
    missing_left: npt.NDArray[np.bool_],
    global_features: IndexArray,
    n_features: int,
) -> tuple[IndexArray, Float32Array, IndexArray]:
    """Slot arrays (column, cut, child slot) of one tree, slots numbered from 0."""
    n_nodes = left.shape[0]
    nodes = np.arange(n_nodes, dtype=np.intp)
    leaf = left == _LEAF
    split = ~leaf
    column = np.zeros(n_nodes, dtype=np.intp)
    cut = np.zeros(n_nodes, dtype=np.float32)
    when_false = nodes.copy()  # leaves loop on themselves
    when_true = nodes.copy()
    go_left = split & missing_left
    go_right = split & ~missing_left
    nan_cut = np.isnan(threshold)
    inf_cut = threshold == np.inf
    plain = ~(nan_cut | inf_cut)
    x_col = global_features[np.where(split, feature, 0)]
    rounded = _round_down_f32(np.where(plain, threshold, 0.0))

    # Missing goes left: right iff x > t, i.e. x32 > largest float32 <= t (NaN: False -> left).
    m = go_left & plain
    column[m], cut[m], when_false[m], when_true[m] = x_col[m], rounded[m], left[m], right[m]
    # Missing goes right: left iff x <= t, i.e. -x32 > next float32 below -t (NaN -> right).
    m = go_right & plain
    column[m] = x_col[m] + n_features
    cut[m] = np.nextafter(-rounded[m], np.float32(-np.inf))
    when_false[m], when_true[m] = right[m], left[m]
    # Cut +inf: every number goes left; only NaN may go right (|x| > -1 is False only for NaN).
    m = split & inf_cut
    when_false[m] = np.where(missing_left[m], left[m], right[m])
    when_true[m] = left[m]
    column[m], cut[m] = x_col[m] + 2 * n_features, np.float32(-1.0)
    # Cut NaN: every number goes right; only NaN may go left.
    m = split & nan_cut
    when_false[m] = np.where(missing_left[m], left[m], right[m])
    when_true[m] = right[m]
    column[m], cut[m] = x_col[m] + 2 * n_features, np.float32(-1.0)

    slots_column = np.repeat(column, 2)
    slots_cut = np.repeat(cut, 2)
    slots_child = np.empty(2 * n_nodes, dtype=np.intp)
    slots_child[0::2] = 2 * when_false
    slots_child[1::2] = 2 * when_true
    return slots_column, slots_cut, slots_child
