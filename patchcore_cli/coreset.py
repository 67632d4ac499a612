"""Greedy coreset subsampling of the patch memory bank (paper §3.2, Algorithm 1).

PatchCore keeps the subset of patch features that greedily minimises the coverage radius: start from one
point, then repeatedly add the point farthest from everything selected so far (minimax facility location,
i.e. Gonzalez's greedy k-center). Distances are taken on a random Gaussian projection (§3.2, by the
Johnson-Lindenstrauss lemma), which changes the work per distance from D to `projection_dim`.

The naive loop updates every point's nearest-selected distance after each pick, streaming all N x d' values
k times. We run the same algorithm with Gonzalez's clusters: each point remembers the selected point it is
closest to, each selected point keeps its members, its radius and its farthest member. A new center c can
only take points from a cluster j when d(c, center_j) < 2 * radius_j, and a member x only when
d(c, center_j) < 2 * d(x, center_j) (triangle inequality). Before any exact distance, a 32-dimensional
PCA "sketch" of the points, whose distances never exceed the true ones, rules out most of the rest. The
members of a cluster sit together in memory, farthest first. The result is the exact greedy order, ties to
the lowest index, as the naive loop gives; only the work changes.

Speed depends on the data. Patch features lie near a low-dimensional surface and prune well: PatchCore-10%
of 164,000 EfficientNet-Lite0 patches takes about 3 s on two cores, where the naive loop takes over a
minute. Points spread evenly in many dimensions, such as Gaussian noise or the patches of a texture like
Magnetic Tile, prune badly: there the covering radius is not much smaller than the typical distance, so a
new center can take points from most clusters. When the pruned search costs more than the batched form of
the naive loop would, it hands over to it. From _DIRECT_ROWS rows on, the batched loop runs from the first
pick: the pruned search's first picks take nearly every row, on one core, and on every patch set measured
(bottle, capsule and Magnetic Tile at 224 and 320) it handed over after its first 64 picks anyway.

The batched loop takes the farthest rows several at a time, for as long as that provably gives the same order
(`_batched_greedy`), and one pass over the rows then applies the whole batch. The pass rules out almost every
row-center pair by the sketch before the exact distance: first on the sketch's 16 leading coordinates, from
float32 products run along the rows (16 multiply-adds a pair, against 128 for the distance), then on the whole
sketch. On the 373,184 Magnetic Tile patches at 224 this leaves 1 pair in 55 to the whole sketch and 1 in 480
to the distance at 8,000 picks (1 in 450 and 1 in 5,000 at 30,000). Rows whose value has fallen far below the
best candidate's are frozen, left out of the passes until a pick could reach them, and most are never needed
again: there the passes take about half of the row-center pairs, and PatchCore-10% took about 8-10 s, against
12-13 s without frozen rows and 46 s without the sketch's first bound. With the default row cap (19,600 picks)
and the batched start it takes 3.7-4.4 s.
"""

from __future__ import annotations

import math
from typing import Protocol

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from patchcore_cli.jit import ensure_cache_dir

ensure_cache_dir()  # before the kernels below are defined: numba picks their cache folder then

# Pruning compares distances computed with rounding; widening each bound by a relative slack (and, for the
# float32 sketch, an absolute tolerance) keeps every point that could possibly move, so pruning never changes
# the result, only the work.
_SLACK = 1.0 + 1e-6
_SKETCH_SLACK = 1.0 + 1e-4
# Sketch width: more coordinates rule out more points, but every scan reads them all. On EfficientNet
# patch features 32 (two cache lines per point) beat 16, 24 and 48.
_SKETCH_DIM = 32
_SKETCH_MAX_SQUARE = 1e30  # float32 sums of 32 squares of sketch coordinates must stay finite
_SKETCH_SAMPLE = 4096  # rows used to estimate the principal axes; any orthonormal basis is a valid bound
_SCAN_BLOCK = 256  # centers per block in the vectorised center scan
# Where pruning fails (points spread evenly in many dimensions), the batched plain loop (`_batched_greedy`)
# is cheaper. Every _WINDOW picks the pruned work is compared with what _WINDOW batched picks would cost,
# in row-reads: a pool entry costs about one, an exact distance at a scattered row about _EXACT_COST, and a
# batched pick about one _HANDOVER-th of a pass over the rows (measured on Magnetic Tile, capsule and bottle
# patches, and the synthetic washer's: 2 to 16 all beat the earlier 1, within noise of each other).
_WINDOW = 64
# ... and from this many rows on the batched loop runs from the first pick (see the module's docstring).
_DIRECT_ROWS = 1 << 16
_EXACT_COST = 4
_HANDOVER = 4
# Exact distances only need reassociation (vectorised sums) and fused multiply-add; no NaN/inf shortcuts.
_FASTMATH = {"reassoc", "contract"}
_CHUNK_ROWS = 16384
# The fallback's batches: candidates per pass, and rows per parallel work item of a pass.
_BATCH = 256
_PASS_ROWS = 2048
# The fallback's first bound: the distance on the 16 leading sketch coordinates (`_mark` spells them out),
# for _SUB rows at a time.
_LEADING = 16
_SUB = 256
# The fallback's frozen rows (`_batched_greedy`): rows below _FREEZE times the best candidate's value are
# set aside once there are at least _FREEZE_MIN of them and a quarter of the rows in the passes; when a
# frozen row might come first, those at or above _THAW times the best value are brought back. 0.6 / 0.8 was
# the fastest of 0.4-0.9 / 0.7-0.95 on Magnetic Tile patches at 224; on capsule's at 320 all were alike.
_FREEZE = 0.6
_THAW = 0.8
_FREEZE_MIN = _PASS_ROWS


class RowSource(Protocol):
    """N x D rows read in contiguous slices (`source[lo:hi]` -> ndarray), such as a `store.Store` on disk.
    A numpy array is one."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def ndim(self) -> int: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


def _rows(features: object) -> np.ndarray | RowSource:
    # A row source (an array, a store) is read a slice at a time; anything else (lists) becomes an array.
    if all(hasattr(features, name) for name in ("shape", "dtype", "ndim", "__getitem__")):
        return features  # type: ignore[return-value]
    return np.asarray(features)


def random_projection(features: np.ndarray | RowSource, dim: int, seed: int) -> np.ndarray:
    """Project N x D features to N x dim float32 with a seeded Gaussian matrix (paper §3.2).

    The matrix is D x dim, drawn from `np.random.default_rng(seed).standard_normal` and scaled by
    1/sqrt(dim) so that distances are preserved in expectation. Rows are projected in chunks, so a
    float16 input is never copied whole to float32, and a row source on disk is read a chunk at a time.
    """
    features = _rows(features)
    n, d = features.shape
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((d, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, n)
        np.matmul(features[lo:hi].astype(np.float32, copy=False), matrix, out=out[lo:hi])
    return out


def greedy_coreset(
    features: np.ndarray | RowSource,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    start: int | None = None,
) -> np.ndarray:
    """Pick `n_select` rows of `features` by greedy k-center (paper §3.2, Algorithm 1).

    features: N x D float array (float16/float32/float64), or a row source such as a `store.Store`, read a
    chunk at a time so that only the points distances are taken on are held in memory. Distances are
    Euclidean on `random_projection(features, projection_dim, seed)`, or on the features themselves when
    `projection_dim` is None or D <= projection_dim.
    start: the first pick; by default `int(np.random.default_rng(seed).integers(N))`.
    Each further pick is the unselected row farthest from its nearest selected row; ties go to the lowest
    index, and once every remaining row coincides with a selected one the lowest unselected indices follow.
    Returns n_select unique int64 row indices in selection order. Memory is O(N * d'), at most
    `working_set(N, n_select, d')` bytes.

    The order does not depend on n_select: the first k picks of a larger selection are the selection of k
    with the same start. A hierarchical fit relies on this to trim a shard's picks once it knows its share.
    """
    features = _rows(features)
    _check_arguments(features, n_select, projection_dim, start)
    n, d = features.shape
    if start is None:
        start = int(np.random.default_rng(seed).integers(n))
    if projection_dim is not None and d > projection_dim:
        points = random_projection(features, projection_dim, seed)
    else:
        points = np.empty((n, d), dtype=np.float32)  # a copy: the search reorders its rows
        for lo in range(0, n, _CHUNK_ROWS):
            points[lo : lo + _CHUNK_ROWS] = features[lo : lo + _CHUNK_ROWS]
    if not np.isfinite(points).all():
        raise ValueError("features are too large: converting or projecting them to float32 overflows")
    sketch, tolerance = _sketch(points)
    if n >= _DIRECT_ROWS:
        order, made, orig, nearest, row_sketch, centers, is_center = _first_pick(
            points, sketch, n_select, start
        )
    else:
        order, made, orig, nearest, row_sketch, centers, is_center = _greedy_kcenter(
            points, sketch, tolerance, int(n_select), int(start)
        )
    if made < n_select:
        del sketch  # the fallback reads the rows' sketches in `row_sketch`
        _batched_greedy(points, orig, nearest, row_sketch, tolerance, centers, order, is_center, made)
    return order


def covering_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """Largest distance from any row of `features` (N x D) to its nearest row among `selected` (k indices).

    This is the quantity greedy k-center minimises; it is computed in float64, in row blocks, with
    O(N * D + block * k) memory.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty 2-D array (N x D), got shape {features.shape}")
    selected = np.asarray(selected)
    if selected.ndim != 1 or selected.size == 0 or not np.issubdtype(selected.dtype, np.integer):
        raise ValueError("selected must be a non-empty 1-D array of row indices")
    n = features.shape[0]
    if selected.min() < 0 or selected.max() >= n:
        raise ValueError(f"selected indices must lie in [0, {n}), got {selected.min()}..{selected.max()}")
    # Centering first reduces cancellation in |x|^2 + |s|^2 - 2 x.s.
    mean = features.mean(axis=0, dtype=np.float64)
    centers = features[selected].astype(np.float64) - mean
    center_sq = np.einsum("ij,ij->i", centers, centers)
    block = max(1, 4_000_000 // len(selected))
    worst = 0.0
    for lo in range(0, n, block):
        rows = features[lo : lo + block].astype(np.float64) - mean
        d2 = np.einsum("ij,ij->i", rows, rows)[:, None] + center_sq[None, :] - 2.0 * (rows @ centers.T)
        worst = max(worst, float(d2.min(axis=1).max()))
    return float(np.sqrt(max(worst, 0.0)))


# --- the working set of one greedy pass, and shares of a hierarchical coreset --------------------------
#
# One greedy pass holds every input row's point and sketch, so its memory grows with its rows. A fit whose
# patches need more than its budget takes the coreset in shards (see sharding.py): each shard's greedy
# coreset keeps the shard's share of the bank, and their picks together are the bank.

# Bytes of one greedy pass per input row, besides 4 per coordinate of its point: the sketch (4 *
# _SKETCH_DIM), the pool of cluster members (3 entries of 16 + 4 * _SKETCH_DIM), index and distance arrays,
# and the transient arrays of the start (sorting, float64 distances, compaction). Per pick: the center's
# point and sketch and a dozen per-cluster numbers. Measured with ru_maxrss on EfficientNet-Lite0 patches
# on the earlier engine (docs/scale.md); the estimate is kept above the measurement.
_ROW_BYTES = 1300
_PICK_BYTES = 4 * _SKETCH_DIM + 160


def working_set(rows: int, picks: int, width: int) -> int:
    """Estimated peak bytes of `greedy_coreset` choosing `picks` of `rows` rows, distances taken on `width`
    coordinates (the projection dimension, or the feature dimension when that is smaller)."""
    return rows * (4 * width + _ROW_BYTES) + picks * (4 * width + _PICK_BYTES)


def max_rows_for(budget: int, width: int) -> int:
    """The most rows one greedy pass may take within `budget` bytes, even if it kept all of them."""
    return max(0, int(budget) // (8 * width + _ROW_BYTES + _PICK_BYTES))


def budget_for(rows: int, width: int) -> int:
    """The smallest budget for which `max_rows_for` allows `rows` rows."""
    return rows * (8 * width + _ROW_BYTES + _PICK_BYTES)


def apportion(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split `total` in proportion to `sizes` (ints): floors, then one more for the largest remainders, ties
    to the lower index (Hamilton's method). The parts sum to `total`; each is the floor or the ceiling of
    its exact share, so none exceeds its size when total <= sum(sizes)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    whole = int(sizes.sum())
    scaled = int(total) * sizes
    parts, remainders = scaled // whole, scaled % whole
    extra = int(total) - int(parts.sum())
    order = np.lexsort((np.arange(len(sizes)), -remainders))
    parts[order[:extra]] += 1
    return parts


def bank_size(total: int, share: float, cap: int = 0) -> int:
    """Rows of the coreset of `total` rows: max(1, round(share * total)), at most `cap` rows when cap > 0
    (`coreset_max_rows`, resolved: never auto), at most `total`."""
    if cap < 0:
        raise ValueError(f"coreset_max_rows must be resolved before the coreset (resolve_rows), got {cap}")
    size = max(1, round(share * total))
    if cap > 0:
        size = min(size, cap)
    return min(total, size)


def provisional_keep(rows: int, share: float, cap: int = 0, seen: int = 0) -> int:
    """Picks to take from a shard of `rows` rows before the bank's size is known: ceil(share * rows) + 1, at
    most rows. That covers the shard's part (`apportion`) of any bank of at most share * total + 1/2 rows
    (or of one row), a part of at most ceil(share * rows + 1/2); `greedy_coreset`'s prefix property trims
    the picks to it later.

    With a cap on the bank (`bank_size`), a part is also at most ceil(cap * rows / total), and `seen`, the
    rows known so far (this shard's included, or all of them when known up front), is at most the total:
    so ceil(cap * rows / seen) + 1 picks cover it too, and far fewer are taken once the cap binds."""
    keep = math.ceil(share * rows) + 1
    if cap > 0 and seen > 0:
        keep = min(keep, -(-cap * rows // seen) + 1)
    return min(rows, keep)


def shard_start(seed: int, index: int, rows: int) -> int:
    """The first pick of shard `index` (of `rows` rows) of a hierarchical coreset, drawn from (seed, index)
    so that each shard's pass depends on nothing but its rows and its place."""
    return int(np.random.default_rng([seed, index]).integers(rows))


def _check_arguments(
    features: np.ndarray | RowSource, n_select: int, projection_dim: int | None, start: int | None
) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N x D), got shape {features.shape}")
    n, d = features.shape
    if n == 0 or d == 0:
        raise ValueError(f"features must be non-empty, got shape {features.shape}")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise ValueError(f"features must be a real numeric array, got dtype {features.dtype}")
    if not _is_int(n_select) or not 1 <= n_select <= n:
        raise ValueError(f"n_select must be an integer in [1, {n}] (number of features), got {n_select!r}")
    if projection_dim is not None and (not _is_int(projection_dim) or projection_dim < 1):
        raise ValueError(f"projection_dim must be a positive integer or None, got {projection_dim!r}")
    if start is not None and (not _is_int(start) or not 0 <= start < n):
        raise ValueError(f"start must be a row index in [0, {n}), got {start!r}")
    # Checked in chunks: a single np.isfinite over a large float16 bank would allocate N x D booleans.
    for lo in range(0, n, _CHUNK_ROWS):
        if not np.isfinite(features[lo : lo + _CHUNK_ROWS]).all():
            raise ValueError("features contain NaN or infinite values")


def _sketch(points: np.ndarray) -> tuple[np.ndarray, float]:
    """N x d float32 -> N x s float32 coordinates on the top principal axes, and an absolute tolerance.

    Distances between sketches never exceed the true distances (an orthonormal basis, cut short), so they
    can rule points out. The axes are estimated on a strided sample: a poor estimate only weakens the bound.
    The tolerance absorbs the float32 rounding of the sketch (relative 2^-24 of a coordinate, at most the
    largest distance to the mean, B): with 32 coordinates the error is below 1e-8 B^2, we allow 1e-6 B^2.
    At scales where float32 squares could overflow the sketch is all zeros: it then rules nothing out.
    """
    n, d = points.shape
    sample = points[:: max(1, n // _SKETCH_SAMPLE)].astype(np.float64)
    mean = sample.mean(axis=0)
    sample -= mean
    _, axes = np.linalg.eigh(sample.T @ sample)
    basis = axes[:, ::-1][:, : min(_SKETCH_DIM, d)]  # eigh sorts ascending
    # Fewer dimensions than sketch slots: the spare coordinates stay 0 and add nothing to the bound.
    sketch = np.zeros((n, _SKETCH_DIM), dtype=np.float32)
    largest = 0.0
    for lo in range(0, n, _CHUNK_ROWS):
        rows = points[lo : lo + _CHUNK_ROWS].astype(np.float64) - mean
        largest = max(largest, float(np.einsum("ij,ij->i", rows, rows).max()))
        if largest <= _SKETCH_MAX_SQUARE:
            sketch[lo : lo + _CHUNK_ROWS, : basis.shape[1]] = rows @ basis
    if largest > _SKETCH_MAX_SQUARE:
        sketch[:] = 0.0
    return sketch, 1e-6 * largest


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@numba.njit(cache=True, fastmath=_FASTMATH)
def _sqdist(a: np.ndarray, i: int, b: np.ndarray, j: int) -> float:
    # Squared distance between rows a[i] and b[j]. Rows are indexed, not sliced: a slice costs more than
    # the arithmetic. float32 coordinates, float64 sum: squares are exact, only the summation order rounds.
    total = 0.0
    for t in range(a.shape[1]):
        diff = np.float64(a[i, t]) - np.float64(b[j, t])
        total += diff * diff
    return total


@numba.njit(cache=True, fastmath=_FASTMATH)
def _sketch_sqdist(a: np.ndarray, i: int, b: np.ndarray, j: int) -> float:
    # The sketch lower bound, in float32. The loop runs to the array's width, a run-time value: LLVM
    # vectorises it, where a constant trip count gets unrolled into scalar code.
    total = np.float32(0.0)
    for t in range(a.shape[1]):
        diff = a[i, t] - b[j, t]
        total += diff * diff
    return total


@numba.njit(cache=True)
def _copy_row(dst: np.ndarray, i: int, src: np.ndarray, j: int) -> None:
    # dst[i] = src[j], as a plain loop: slice assignment compiles far more code (seconds of first-call time).
    for u in range(src.shape[1]):
        dst[i, u] = src[j, u]


@numba.njit(cache=True)
def _copy_entry(
    pool_row: np.ndarray, pool_d2: np.ndarray, pool_sketch: np.ndarray, src: int, dst: int
) -> None:
    # Element by element: assigning a row slice costs several times more than copying 32 floats.
    pool_row[dst] = pool_row[src]
    pool_d2[dst] = pool_d2[src]
    for u in range(pool_sketch.shape[1]):
        pool_sketch[dst, u] = pool_sketch[src, u]


@numba.njit(cache=True)
def _wins(a: int, b: int, radius2: np.ndarray, far: np.ndarray) -> bool:
    # Cluster a beats b when its farthest member is farther, or equally far with a lower index.
    if b < 0:
        return True
    if a < 0:
        return False
    return radius2[a] > radius2[b] or (radius2[a] == radius2[b] and far[a] < far[b])


@numba.njit(cache=True)
def _tree_update(tree: np.ndarray, leaf: int, radius2: np.ndarray, far: np.ndarray) -> None:
    # Tournament tree over clusters: tree[1] is the cluster holding the next greedy pick.
    node = tree.shape[0] // 2 + leaf
    tree[node] = leaf
    node //= 2
    while node >= 1:
        left = tree[2 * node]
        right = tree[2 * node + 1]
        tree[node] = left if _wins(left, right, radius2, far) else right
        node //= 2


def _first_pick(
    points: np.ndarray, sketch: np.ndarray, n_select: int, start: int
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # The state after the first pick, as `_greedy_kcenter` returns it when it hands over: every row's
    # squared distance to the start, in the rows' own order.
    n = points.shape[0]
    order = np.empty(n_select, dtype=np.int64)
    order[0] = start
    is_center = np.zeros(n, dtype=np.bool_)
    is_center[start] = True
    centers = np.empty((n_select, points.shape[1]), dtype=np.float32)
    centers[0] = points[start]
    return order, 1, np.arange(n), _distances_to(points, centers, 0), sketch, centers, is_center


@numba.njit(cache=True, fastmath=_FASTMATH, parallel=True)
def _distances_to(points: np.ndarray, centers: np.ndarray, j: int) -> np.ndarray:
    # Squared distances (`_sqdist`) of every row of `points` to centers[j].
    out = np.empty(points.shape[0], dtype=np.float64)
    for i in numba.prange(points.shape[0]):
        out[i] = _sqdist(points, i, centers, j)
    return out


@numba.njit(cache=True, fastmath=_FASTMATH)
def _greedy_kcenter(
    points: np.ndarray, sketch: np.ndarray, tolerance: float, n_select: int, start: int
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # points N x d float32, sketch N x s float32 -> n_select int64 indices in greedy order, with the picks
    # made so far. Reorders the rows of `points` in place (`orig` remembers where each came from).
    #
    # Where pruning fails it stops and returns its state for `_batched_greedy`: the picks made, `orig`,
    # each row's squared distance to its nearest pick and its sketch (by row of `points`), the picks'
    # points and `is_center`. The caller runs that fallback: numba's cache mishandles a parallel kernel
    # (`_batch_pass`) called from another cached kernel, and a later process that loads them crashes.
    n = points.shape[0]
    # The sketch width, read from the array: were it the constant, LLVM would see it through the
    # allocations below and unroll the bound loops into scalar code instead of vectorising them.
    s = sketch.shape[1]
    order = np.empty(n_select, dtype=np.int64)
    is_center = np.zeros(n, dtype=np.bool_)  # by original index
    orig = np.arange(n)  # original index of each row of `points`
    centers = np.empty((n_select, points.shape[1]), dtype=np.float32)
    # Centers' sketches, transposed: the scan over all centers runs along j and vectorises.
    center_sketch = np.empty((s, n_select), dtype=np.float32)
    new_sketch = np.empty((1, s), dtype=np.float32)
    threshold = np.empty(n_select, dtype=np.float64)  # sketch distance^2 from which a cluster is safe
    scan = np.empty(_SCAN_BLOCK, dtype=np.float32)

    # The pool: cluster j's members are entries seg_start[j] .. seg_start[j] + seg_len[j] - 1, farthest
    # first, so a scan stops at the first member too close to move. An entry is the point's row in
    # `points`, its squared distance to the cluster's center, and its sketch. Points that change cluster
    # are appended at the end; _compact rewrites the pool. Room for 2N appends: one pick moves at most
    # N points, so compaction waits for at least N moves.
    capacity = 3 * n
    pool_row = np.empty(capacity, dtype=np.int64)
    pool_d2 = np.empty(capacity, dtype=np.float64)
    pool_sketch = np.empty((capacity, s), dtype=np.float32)
    seg_start = np.zeros(n_select, dtype=np.int64)
    seg_len = np.zeros(n_select, dtype=np.int64)
    radius2 = np.zeros(n_select, dtype=np.float64)
    far = np.zeros(n_select, dtype=np.int64)  # original index of the farthest member, lowest on ties
    far_pos = np.zeros(n_select, dtype=np.int64)  # its pool position
    touched = np.empty(n_select, dtype=np.int64)
    between2 = np.empty(n_select, dtype=np.float64)
    scanned_end = np.empty(n_select, dtype=np.int64)
    checks_from = np.empty(n_select + 1, dtype=np.int64)
    check_pos = np.empty(n, dtype=np.int64)
    check_d2 = np.empty(n, dtype=np.float64)
    leaves = 1
    while leaves < n_select:
        leaves *= 2
    tree = np.empty(2 * leaves, dtype=np.int64)
    for node in range(2 * leaves):
        tree[node] = -1

    order[0] = start
    is_center[start] = True
    _copy_row(centers, 0, points, start)
    d2_start = np.empty(n, dtype=np.float64)
    for i in range(n):
        d2_start[i] = _sqdist(points, i, centers, 0)
    for pos, i in enumerate(_farthest_first(d2_start)):
        pool_row[pos] = i
        pool_d2[pos] = d2_start[i]
        for u in range(s):
            pool_sketch[pos, u] = sketch[i, u]
    used = n
    seg_len[0] = n
    for u in range(s):
        center_sketch[u, 0] = sketch[start, u]
    _set_radius(0, pool_row, pool_d2, orig, seg_start, seg_len, radius2, far, far_pos, threshold, tolerance)
    _tree_update(tree, 0, radius2, far)

    work = 0
    for t in range(1, n_select):
        best = tree[1]
        if radius2[best] <= 0.0:
            _fill_ties(order, is_center, t)
            break
        c = far[best]
        order[t] = c
        is_center[c] = True
        p = far_pos[best]
        _copy_row(centers, t, points, pool_row[p])
        for u in range(s):
            new_sketch[0, u] = pool_sketch[p, u]
            center_sketch[u, t] = pool_sketch[p, u]

        # Clusters that can lose points to c: d(c, center_j) < 2 radius_j. A vectorised pass over the
        # sketches of all centers, then exact distances for the few it leaves, in a loop of their own.
        n_candidates = 0
        for lo in range(0, t, _SCAN_BLOCK):
            hi = min(lo + _SCAN_BLOCK, t)
            # Slices, so the inner index starts at 0 and LLVM vectorises without negative-index gathers.
            block = scan[: hi - lo]
            for q in range(hi - lo):
                block[q] = 0.0
            for u in range(s):
                cu = center_sketch[u, t]
                row = center_sketch[u, lo:hi]
                for q in range(hi - lo):
                    diff = row[q] - cu
                    block[q] += diff * diff
            limit = threshold[lo:hi]
            for q in range(hi - lo):
                if block[q] < limit[q]:
                    touched[n_candidates] = lo + q
                    n_candidates += 1
        n_touched = 0
        volume = 0
        for q in range(n_candidates):
            j = touched[q]
            b2 = _sqdist(centers, t, centers, j)
            if b2 < 4.0 * radius2[j] * _SLACK:
                touched[n_touched] = j
                between2[n_touched] = b2
                n_touched += 1
                volume += seg_len[j]
        if used + volume > capacity:
            used = _compact(
                points, orig, pool_row, pool_d2, pool_sketch, seg_start, seg_len, far_pos, t, used
            )

        # Members that can move: d(c, center_j) < 2 d(x, center_j), and the sketch bound below
        # d(x, center_j). Exact distances come in a loop of their own, whose independent loads overlap.
        n_checks = 0
        for q in range(n_touched):
            j = touched[q]
            stay_below = between2[q] / (4.0 * _SLACK)
            checks_from[q] = n_checks
            pos = seg_start[j]
            end = pos + seg_len[j]
            while pos < end and pool_d2[pos] > stay_below:
                if _sketch_sqdist(pool_sketch, pos, new_sketch, 0) < pool_d2[pos] * _SKETCH_SLACK + tolerance:
                    check_pos[n_checks] = pos
                    n_checks += 1
                pos += 1
            scanned_end[q] = pos
            work += pos - seg_start[j]
        checks_from[n_touched] = n_checks
        work += _EXACT_COST * n_checks
        for q in range(n_checks):
            check_d2[q] = _sqdist(points, pool_row[check_pos[q]], centers, t)

        new_start = used
        for q in range(n_touched):
            k = checks_from[q]
            if k == checks_from[q + 1]:
                continue
            j = touched[q]
            lo = seg_start[j]
            keep = lo
            for pos in range(lo, scanned_end[q]):
                if k < checks_from[q + 1] and check_pos[k] == pos:
                    d2 = check_d2[k]
                    k += 1
                    if d2 < pool_d2[pos]:
                        _copy_entry(pool_row, pool_d2, pool_sketch, pos, used)
                        pool_d2[used] = d2
                        used += 1
                        continue
                if keep != pos:
                    _copy_entry(pool_row, pool_d2, pool_sketch, pos, keep)
                keep += 1
            moved = scanned_end[q] - keep
            if moved == 0:
                continue
            # Close the gap: shift the members that stayed up against the part that was not scanned.
            for pos in range(keep - 1, lo - 1, -1):
                _copy_entry(pool_row, pool_d2, pool_sketch, pos, pos + moved)
            seg_start[j] = lo + moved
            seg_len[j] -= moved
            _set_radius(
                j, pool_row, pool_d2, orig, seg_start, seg_len, radius2, far, far_pos, threshold, tolerance
            )
            _tree_update(tree, j, radius2, far)
        _sort_entries(pool_row, pool_d2, pool_sketch, new_start, used)
        seg_start[t] = new_start
        seg_len[t] = used - new_start
        _set_radius(
            t, pool_row, pool_d2, orig, seg_start, seg_len, radius2, far, far_pos, threshold, tolerance
        )
        _tree_update(tree, t, radius2, far)
        if t % _WINDOW == 0:
            if work * _HANDOVER > _WINDOW * n:
                nearest = np.empty(n, dtype=np.float64)
                row_sketch = np.empty((n, s), dtype=np.float32)  # by row of `points`
                for j in range(t + 1):
                    for pos in range(seg_start[j], seg_start[j] + seg_len[j]):
                        nearest[pool_row[pos]] = pool_d2[pos]
                        for u in range(s):
                            row_sketch[pool_row[pos], u] = pool_sketch[pos, u]
                return order, t + 1, orig, nearest, row_sketch, centers, is_center
            work = 0
    return order, n_select, orig, order[:0].astype(np.float64), sketch[:0], centers, is_center


def _batched_greedy(
    points: np.ndarray,
    orig: np.ndarray,
    nearest: np.ndarray,
    sketch: np.ndarray,
    tolerance: float,
    centers: np.ndarray,
    order: np.ndarray,
    is_center: np.ndarray,
    first: int,
) -> dict[str, int]:
    """Picks first.. of the plain greedy loop, several per pass over the rows. `nearest` holds each row's
    squared distance to its nearest pick, and `sketch` its sketch (`_sketch`, with its `tolerance`), both
    by row of `points`. Returns counts: the passes, the row-center pairs the passes took, and how often
    rows were frozen and brought back (below).

    After a pass, take the _BATCH rows that come first in greedy order: largest `nearest`, then lowest
    index. Every other row ranks below the last of them, the boundary, and picks only lower its value,
    so while the best candidate still ranks at or above the boundary it is the next pick (`_batch_picks`).
    Each pick lowers the candidates' values as the plain loop would (with `_sqdist`, only on a strictly
    smaller distance); once the best falls below the boundary, one pass (`_batch_pass`) applies the batch's
    picks to the rows and finds the next candidates. The pass computes the same `_sqdist`, so the two
    cannot disagree.

    Rows far below the best candidate's value are frozen: left out of the passes, with the value they had
    then. A row's value only falls, so that is an upper bound of its true value, and while the best
    candidate is above every frozen value it is still the next pick. When it is not, the frozen rows near
    the top are brought up to date, by a pass of their own against the picks made since they were frozen
    (the same distances, so the same values as if they had taken part), and those still far below are
    frozen again. Most rows fall below the last pick's value long before the end and are never brought
    back. On patch features the passes then take half to three quarters of the row-center pairs. A frozen
    row's `nearest` is left at its upper bound.
    """
    n = points.shape[0]
    width = min(_BATCH, n)
    n_blocks = (n + _PASS_ROWS - 1) // _PASS_ROWS
    top = (
        np.empty((n_blocks, width), dtype=np.float64),
        np.empty((n_blocks, width), dtype=np.int64),
        np.empty((n_blocks, width), dtype=np.int64),
        np.zeros(n_blocks, dtype=np.int64),
    )
    norms = _norms(sketch)
    center_sketch = np.zeros((order.shape[0], sketch.shape[1]), dtype=np.float32)
    center_norms = np.empty(order.shape[0], dtype=np.float64)
    counts = {"passes": 0, "pairs": 0, "frozen": 0, "thawed": 0}
    active = np.flatnonzero(nearest > 0.0)  # rows of `points` in the passes, in order
    frozen = active[:0]
    ceiling = -1.0  # the largest value of a frozen row (-1: none)
    since = np.zeros(n, dtype=np.int64)  # a frozen row's value takes the picks before this one into account

    def apply_new(rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        # `apply` to rows whose leading coordinates are not laid out yet; returns them.
        leading = _leading(sketch, rows)
        apply(rows, leading, lo, hi)
        return leading

    def apply(rows: np.ndarray, leading: np.ndarray, lo: int, hi: int) -> None:
        # One pass: picks lo .. hi - 1 lower the values of `rows`, and the candidates are found among them.
        fixed = (points, sketch, leading, norms, centers, center_sketch, center_norms)
        _batch_pass(*fixed, lo, hi, nearest, orig, tolerance, rows, *top)
        counts["pairs"] += rows.size * (hi - lo)

    def freeze(rows: np.ndarray, t: int) -> None:
        nonlocal frozen, ceiling
        rows = rows[nearest[rows] > 0.0]  # rows at distance 0 can neither move nor come first
        if rows.size:
            since[rows] = t
            frozen = np.concatenate([frozen, rows])
            ceiling = max(ceiling, float(nearest[rows].max()))
            counts["frozen"] += rows.size

    leading = apply_new(active, first, first)
    t = first
    while True:
        best = _best_value(top[0], top[3])
        if frozen.size and best <= ceiling:
            # A frozen row might come first: bring back those near the top, by when they were frozen.
            values = nearest[frozen]
            back = values >= _THAW * (best if best > 0.0 else ceiling)
            thawed, frozen = frozen[back], frozen[~back]
            ceiling = float(values[~back].max()) if frozen.size else -1.0
            counts["thawed"] += thawed.size
            for when in np.unique(since[thawed]):
                apply_new(np.sort(thawed[since[thawed] == when]), int(when), t)
            cold = nearest[thawed] < _FREEZE * best
            freeze(thawed[cold], t)
            in_pass = np.zeros(n, dtype=np.bool_)  # a mask, not np.union1d: no sort of the rows
            in_pass[active] = True
            in_pass[thawed[~cold]] = True
            active = np.flatnonzero(in_pass)
            leading = apply_new(active, t, t)  # no picks: the candidates, the thawed rows among them
            continue
        start = t
        t = _batch_picks(
            points,
            sketch,
            norms,
            centers,
            center_sketch,
            center_norms,
            t,
            nearest,
            orig,
            order,
            is_center,
            ceiling,
            *top,
        )
        if t < 0:  # every pick is made
            return counts
        apply(active, leading, start, t)
        counts["passes"] += 1
        cold = nearest[active] < _FREEZE * _best_value(top[0], top[3])
        many = int(np.count_nonzero(cold))
        if many >= _FREEZE_MIN and 4 * many >= active.size:
            freeze(active[cold], t)
            active = active[~cold]
            leading = _leading(sketch, active)


def _best_value(top_val: np.ndarray, top_size: np.ndarray) -> float:
    # The largest value among the last pass's candidates, -1 when there are none.
    filled = np.arange(top_val.shape[1]) < top_size[:, None]
    return float(top_val[filled].max()) if filled.any() else -1.0


@numba.njit(cache=True)
def _batch_picks(
    points: np.ndarray,
    sketch: np.ndarray,
    norms: np.ndarray,
    centers: np.ndarray,
    center_sketch: np.ndarray,
    center_norms: np.ndarray,
    t: int,
    nearest: np.ndarray,
    orig: np.ndarray,
    order: np.ndarray,
    is_center: np.ndarray,
    frozen: float,
    top_val: np.ndarray,
    top_orig: np.ndarray,
    top_row: np.ndarray,
    top_size: np.ndarray,
) -> int:
    # The picks from t on that the last pass's candidates settle (see _batched_greedy). Returns the next
    # pick to make, or -1 once `order` is full. `frozen` is the largest value of a frozen row (-1: none);
    # a candidate at or below it may not come first.
    n = points.shape[0]
    width = top_val.shape[1]
    candidates = np.empty(width, dtype=np.int64)
    value = np.empty(width, dtype=np.float64)  # each candidate's distance^2 to its nearest pick so far
    n_candidates = _merge_top(top_val, top_orig, top_row, top_size, candidates)
    for k in range(n_candidates):
        value[k] = nearest[candidates[k]]
    # Rows left out rank below the last candidate; when there is room to spare, all of them are at 0.
    bound = 0.0
    bound_orig = n
    if n_candidates == width:
        bound = value[width - 1]
        bound_orig = orig[candidates[width - 1]]
    first = t
    while t < order.shape[0]:
        best = -1
        for k in range(n_candidates):
            if value[k] >= 0.0 and (
                best < 0 or _ranks_below(value[best], orig[candidates[best]], value[k], orig[candidates[k]])
            ):
                best = k
        if best < 0 or _ranks_below(value[best], orig[candidates[best]], bound, bound_orig):
            break
        if value[best] <= frozen:
            break
        if value[best] <= 0.0:  # every row is at distance 0 from a pick
            _fill_ties(order, is_center, t)
            return -1
        r = candidates[best]
        order[t] = orig[r]
        is_center[orig[r]] = True
        _copy_row(centers, t, points, r)
        _copy_row(center_sketch, t, sketch, r)
        center_norms[t] = norms[r]
        t += 1
        value[best] = -1.0  # picked
        for k in range(n_candidates):
            if value[k] > 0.0:
                d2 = _sqdist(points, candidates[k], centers, t - 1)
                if d2 < value[k]:
                    value[k] = d2
    if t == order.shape[0]:
        return -1
    if t == first:  # no candidates: every row is at distance 0 from a pick
        _fill_ties(order, is_center, t)
        return -1
    return t


@numba.njit(cache=True)
def _leading(sketch: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # The leading sketch coordinates of `rows` (rows of `sketch`) as `_batch_pass` reads them, _SUB rows at
    # a time, coordinate by coordinate (zero past the last row).
    m = rows.shape[0]
    leading = np.zeros(((m + _SUB - 1) // _SUB, _LEADING, _SUB), dtype=np.float32)
    for p in range(m):
        r = rows[p]
        for u in range(min(_LEADING, sketch.shape[1])):
            leading[p // _SUB, u, p % _SUB] = sketch[r, u]
    return leading


@numba.njit(cache=True)
def _norms(sketch: np.ndarray) -> np.ndarray:
    # Squared norms (float64) of the rows' leading sketch coordinates.
    n = sketch.shape[0]
    norms = np.zeros(n, dtype=np.float64)
    for r in range(n):
        for u in range(min(_LEADING, sketch.shape[1])):
            v = np.float64(sketch[r, u])
            norms[r] += v * v
    return norms


@numba.njit(cache=True, fastmath=_FASTMATH, parallel=True)
def _batch_pass(
    points: np.ndarray,
    sketch: np.ndarray,
    leading: np.ndarray,
    norms: np.ndarray,
    centers: np.ndarray,
    center_sketch: np.ndarray,
    center_norms: np.ndarray,
    lo: int,
    hi: int,
    nearest: np.ndarray,
    orig: np.ndarray,
    tolerance: float,
    rows: np.ndarray,
    top_val: np.ndarray,
    top_orig: np.ndarray,
    top_row: np.ndarray,
    top_size: np.ndarray,
) -> None:
    # Lower `nearest` of `rows` (rows of `points`, with their leading sketch coordinates in `leading`)
    # against centers lo .. hi - 1 and keep, per block of _PASS_ROWS of them, the rows that come first in
    # greedy order (rows at distance 0 are left out). Blocks are fixed, so nothing depends on the number of
    # threads.
    #
    # A center can only lower a row's value when the sketch distance between them is below it (the sketch's
    # bound, as in the pruned search). Two cheaper steps rule out almost every pair before the exact
    # distance. First the distance on the _LEADING leading sketch coordinates, a bound of the sketch's, from
    # float32 dot products run along the rows: |x - c|^2 >= (|x|^2 + |c|^2) S - 2 x.c - floor, where S
    # and floor cover the float32 dot (any order: within gamma (|x|^2 + |c|^2) / 2, gamma = k 2^-24 /
    # (1 - k 2^-24), taken twice; underflow: the 2^-118 terms) and float64 rounding (`rel`). The test runs
    # in float32 as a_c - 2 x.c < l_x, with a_c = |c|^2 S' and l_x = limit + floor - |x|^2 S' rounded up,
    # where S' = S - 2^-21 absorbs the float32 rounding of both sides (below 2^-22 (|x|^2 + |c|^2)). Then
    # the whole sketch distance, and only where both leave the pair in, the distance, with `_sqdist`.
    n = rows.shape[0]
    used = (n + _PASS_ROWS - 1) // _PASS_ROWS  # blocks with rows; the threads share these alone
    gamma = 2.0 * _LEADING * 2.0**-24
    rel = max(1e-13, 8.0 * (_LEADING + 8) * 2.0**-53)
    shrink = 1.0 - gamma - rel - 2.0**-118 * _LEADING - 2.0**-21
    floor = 3.0 * 2.0**-118 * _LEADING
    m = hi - lo
    scaled = np.empty(max(m, 1), dtype=np.float32)
    for q in range(m):
        scaled[q] = center_norms[lo + q] * shrink
    for b in range(used, top_val.shape[0]):
        top_size[b] = 0
    for b in numba.prange(used):
        r0 = b * _PASS_ROWS
        r1 = min(r0 + _PASS_ROWS, n)
        val = top_val[b]
        org = top_orig[b]
        row = top_row[b]
        limits = np.empty(_SUB, dtype=np.float32)
        mask = np.empty(_SUB, dtype=np.uint32)
        size = 0
        for s0 in range(r0, r1, _SUB):
            s1 = min(s0 + _SUB, r1)
            w = s1 - s0
            block = leading[s0 // _SUB]
            for c0 in range(lo, hi, 32):
                c1 = min(c0 + 32, hi)
                # The limits follow the rows' values down as the centers lower them.
                for p in range(s0, s1):
                    near = nearest[rows[p]]
                    if near > 0.0:
                        lim = near * _SKETCH_SLACK + tolerance + floor - norms[rows[p]] * shrink
                        limits[p - s0] = lim + 2.0**-22 * abs(lim) + 2.0**-100
                    else:
                        limits[p - s0] = -3.0e38  # rows at distance 0 cannot come closer
                for r in range(w):
                    mask[r] = 0
                for j in range(c0, c1):
                    bit = np.uint32(1) << np.uint32(j - c0)
                    a = scaled[j - lo]
                    _mark(block, center_sketch, j, a, limits, mask, bit, w)
                for r in range(w):
                    bits = mask[r]
                    if bits == 0:
                        continue
                    x = rows[s0 + r]
                    near = nearest[x]
                    gate = near * _SKETCH_SLACK + tolerance
                    while bits != 0:
                        j = c0 + trailing_zeros(bits)
                        bits &= bits - np.uint32(1)
                        if _sketch_sqdist(sketch, x, center_sketch, j) >= gate:
                            continue
                        d2 = _sqdist(points, x, centers, j)
                        if d2 < near:
                            near = d2
                            gate = near * _SKETCH_SLACK + tolerance
                    nearest[x] = near
            for p in range(s0, s1):
                x = rows[p]
                if nearest[x] > 0.0:
                    size = _heap_push(val, org, row, size, nearest[x], orig[x], x)
        top_size[b] = size


@numba.njit(cache=True, fastmath=_FASTMATH, inline="always")
def _mark(
    block: np.ndarray,
    center_sketch: np.ndarray,
    j: int,
    a: np.float32,
    limits: np.ndarray,
    mask: np.ndarray,
    bit: np.uint32,
    w: int,
) -> None:
    # Set `bit` in mask[r] for each row r of the block (its leading sketch coordinates, coordinate by
    # coordinate) whose bound against center j falls below limits[r] (see _batch_pass). Written out term by
    # term, so that the loop over the rows vectorises with every coordinate of the center in a register.
    c = center_sketch
    x0, x1, x2, x3 = c[j, 0], c[j, 1], c[j, 2], c[j, 3]
    x4, x5, x6, x7 = c[j, 4], c[j, 5], c[j, 6], c[j, 7]
    x8, x9, x10, x11 = c[j, 8], c[j, 9], c[j, 10], c[j, 11]
    x12, x13, x14, x15 = c[j, 12], c[j, 13], c[j, 14], c[j, 15]
    k0, k1, k2, k3 = block[0], block[1], block[2], block[3]
    k4, k5, k6, k7 = block[4], block[5], block[6], block[7]
    k8, k9, k10, k11 = block[8], block[9], block[10], block[11]
    k12, k13, k14, k15 = block[12], block[13], block[14], block[15]
    two = np.float32(2.0)
    zero = np.uint32(0)
    for r in range(w):
        dot = (
            k0[r] * x0 + k1[r] * x1 + k2[r] * x2 + k3[r] * x3
            + k4[r] * x4 + k5[r] * x5 + k6[r] * x6 + k7[r] * x7
            + k8[r] * x8 + k9[r] * x9 + k10[r] * x10 + k11[r] * x11
            + k12[r] * x12 + k13[r] * x13 + k14[r] * x14 + k15[r] * x15
        )  # fmt: skip
        mask[r] |= bit if a - two * dot < limits[r] else zero


@numba.njit(cache=True)
def _ranks_below(v1: float, o1: int, v2: float, o2: int) -> bool:
    # Entry 1 comes after entry 2 in greedy order: farther from the picks first, then lower index.
    return v1 < v2 or (v1 == v2 and o1 > o2)


@numba.njit(cache=True)
def _heap_push(val: np.ndarray, org: np.ndarray, row: np.ndarray, size: int, v: float, o: int, r: int) -> int:
    # Keep the len(val) entries that come first in greedy order, as a heap with the last of them at the
    # root. Returns the new size.
    cap = val.shape[0]
    if size < cap:
        k = size
        while k > 0:
            parent = (k - 1) // 2
            if not _ranks_below(v, o, val[parent], org[parent]):
                break
            val[k] = val[parent]
            org[k] = org[parent]
            row[k] = row[parent]
            k = parent
        val[k] = v
        org[k] = o
        row[k] = r
        return size + 1
    if _ranks_below(val[0], org[0], v, o):
        _sift_down(val, org, row, cap, v, o, r)
    return size


@numba.njit(cache=True, inline="always")
def _sift_down(
    val: np.ndarray, org: np.ndarray, row: np.ndarray, size: int, v: float, o: int, r: int
) -> None:
    # Put entry (v, o, r) in place of the root of the heap's first `size` entries.
    k = 0
    while True:
        child = 2 * k + 1
        if child >= size:
            break
        if child + 1 < size and _ranks_below(val[child + 1], org[child + 1], val[child], org[child]):
            child += 1
        if not _ranks_below(val[child], org[child], v, o):
            break
        val[k] = val[child]
        org[k] = org[child]
        row[k] = row[child]
        k = child
    val[k] = v
    org[k] = o
    row[k] = r


@numba.njit(cache=True)
def _merge_top(
    top_val: np.ndarray, top_orig: np.ndarray, top_row: np.ndarray, top_size: np.ndarray, out: np.ndarray
) -> int:
    # The rows that come first in greedy order among all blocks' heaps, best first, into `out`.
    width = out.shape[0]
    val = np.empty(width, dtype=np.float64)
    org = np.empty(width, dtype=np.int64)
    row = np.empty(width, dtype=np.int64)
    size = 0
    for b in range(top_val.shape[0]):
        for k in range(top_size[b]):
            size = _heap_push(val, org, row, size, top_val[b, k], top_orig[b, k], top_row[b, k])
    # Pop the root (the last in greedy order) into the back of `out`.
    for q in range(size - 1, -1, -1):
        out[q] = row[0]
        _sift_down(val, org, row, q, val[q], org[q], row[q])
    return size


@numba.njit(cache=True)
def _fill_ties(order: np.ndarray, is_center: np.ndarray, first: int) -> None:
    # Every remaining point duplicates a selected one: all distances are 0, so the lowest indices follow.
    i = 0
    for t in range(first, order.shape[0]):
        while is_center[i]:
            i += 1
        order[t] = i
        is_center[i] = True


@numba.njit(cache=True)
def _set_radius(
    j: int,
    pool_row: np.ndarray,
    pool_d2: np.ndarray,
    orig: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    radius2: np.ndarray,
    far: np.ndarray,
    far_pos: np.ndarray,
    threshold: np.ndarray,
    tolerance: float,
) -> None:
    # Radius and farthest member of cluster j, read from the head of its sorted segment.
    lo = seg_start[j]
    radius2[j] = pool_d2[lo]
    far[j] = orig[pool_row[lo]]
    far_pos[j] = lo
    for pos in range(lo + 1, lo + seg_len[j]):
        if pool_d2[pos] != radius2[j]:
            break
        if orig[pool_row[pos]] < far[j]:
            far[j] = orig[pool_row[pos]]
            far_pos[j] = pos
    # A cluster of radius 0 cannot lose points: its threshold is unreachable.
    threshold[j] = 4.0 * radius2[j] * _SKETCH_SLACK + tolerance if radius2[j] > 0.0 else -1.0


@numba.njit(cache=True)
def _sort_entries(
    pool_row: np.ndarray, pool_d2: np.ndarray, pool_sketch: np.ndarray, lo: int, hi: int
) -> None:
    # Sort pool entries lo .. hi - 1 by squared distance, farthest first.
    rows = pool_row[lo:hi].copy()
    d2 = pool_d2[lo:hi].copy()
    sketches = pool_sketch[lo:hi].copy()
    for q, k in enumerate(_farthest_first(d2)):
        pool_row[lo + q] = rows[k]
        pool_d2[lo + q] = d2[k]
        for u in range(pool_sketch.shape[1]):
            pool_sketch[lo + q, u] = sketches[k, u]


@numba.njit(cache=True)
def _farthest_first(d2: np.ndarray) -> np.ndarray:
    # Indices that sort d2 in decreasing order: a bottom-up merge sort, because np.argsort adds about a
    # second of compile time to the first call.
    m = d2.shape[0]
    order = np.arange(m)
    merged = np.empty(m, dtype=np.int64)
    width = 1
    while width < m:
        for lo in range(0, m, 2 * width):
            mid = min(lo + width, m)
            hi = min(lo + 2 * width, m)
            a = lo
            b = mid
            for k in range(lo, hi):
                if b >= hi or (a < mid and d2[order[a]] >= d2[order[b]]):
                    merged[k] = order[a]
                    a += 1
                else:
                    merged[k] = order[b]
                    b += 1
        order, merged = merged, order
        width *= 2
    return order


@numba.njit(cache=True)
def _permute_rows(rows: np.ndarray, source: np.ndarray) -> None:
    # rows[r] <- rows[source[r]] for every r, in place, cycle by cycle: no second N x d array.
    done = np.zeros(rows.shape[0], dtype=np.bool_)
    saved = np.empty((1, rows.shape[1]), dtype=rows.dtype)
    for first in range(rows.shape[0]):
        if done[first]:
            continue
        _copy_row(saved, 0, rows, first)
        r = first
        while source[r] != first:
            _copy_row(rows, r, rows, source[r])
            done[r] = True
            r = source[r]
        _copy_row(rows, r, saved, 0)
        done[r] = True


@numba.njit(cache=True)
def _compact(
    points: np.ndarray,
    orig: np.ndarray,
    pool_row: np.ndarray,
    pool_d2: np.ndarray,
    pool_sketch: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    far_pos: np.ndarray,
    n_clusters: int,
    used: int,
) -> int:
    # Rewrite the pool as consecutive segments, and move the rows of `points` into the same order so a
    # cluster's members are read as one contiguous block. Returns the pool's new fill level (N).
    n = points.shape[0]
    owner = np.empty(used, dtype=np.int64)  # the cluster whose segment starts at each pool position
    for pos in range(used):
        owner[pos] = -1
    for j in range(n_clusters):
        owner[seg_start[j]] = j
    source = np.empty(n, dtype=np.int64)  # new row -> old row
    filled = 0
    # Segments in pool order: each moves down (or stays), never onto one not yet moved.
    for lo in range(used):
        j = owner[lo]
        if j < 0:
            continue
        far_pos[j] += filled - lo
        seg_start[j] = filled
        for pos in range(lo, lo + seg_len[j]):
            if pos != filled:
                _copy_entry(pool_row, pool_d2, pool_sketch, pos, filled)
            source[filled] = pool_row[filled]
            pool_row[filled] = filled
            filled += 1
    _permute_rows(points, source)
    old_orig = orig.copy()
    for r in range(n):
        orig[r] = old_orig[source[r]]
    return n
