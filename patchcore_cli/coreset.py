"""Greedy coreset subsampling of the patch memory bank (paper §3.2, Algorithm 1).

PatchCore keeps the subset of patch features that greedily minimises the coverage radius: start from one
point, then repeatedly add the point farthest from everything selected so far (minimax facility location,
i.e. Gonzalez's greedy k-center). Distances are taken on a random Gaussian projection (§3.2, by the
Johnson-Lindenstrauss lemma), which changes the work per distance from D to `projection_dim`.

The naive loop updates every point's nearest-selected distance after each pick, streaming all N x d' values
k times. We run the same algorithm with Gonzalez's clusters: each point remembers the selected point it is
closest to, each selected point keeps its member list, its radius and its farthest member. A new center
c can only take points from a cluster j when d(c, center_j) < 2 * radius_j, and a member x only when
d(c, center_j) < 2 * d(x, center_j) (triangle inequality), so most clusters and most points are never
touched. The result is the exact greedy order: same picks, same ties (lowest index wins), as the naive loop.
"""

from __future__ import annotations

import numba
import numpy as np

# Pruning compares distances computed with rounding; widening the triangle-inequality bound by this factor
# keeps every point that could possibly move, so pruning never changes the result.
_SLACK = 1.0 + 1e-6
# Center-to-center distances are summed this many dimensions at a time, stopping early once the partial
# sum already rules the cluster out (16 float32 = one cache line).
_BLOCK = 16
# Exact distances only need reassociation (vectorised sums) and fused multiply-add; no NaN/inf shortcuts.
_FASTMATH = {"reassoc", "contract"}
_CHUNK_ROWS = 16384


def random_projection(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Project N x D features to N x dim float32 with a seeded Gaussian matrix (paper §3.2).

    The matrix is D x dim, drawn from `np.random.default_rng(seed).standard_normal` and scaled by
    1/sqrt(dim) so that distances are preserved in expectation. Rows are projected in chunks, so a
    float16 input is never copied whole to float32.
    """
    features = np.asarray(features)
    n, d = features.shape
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((d, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, n)
        np.matmul(features[lo:hi].astype(np.float32, copy=False), matrix, out=out[lo:hi])
    return out


def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    start: int | None = None,
) -> np.ndarray:
    """Pick `n_select` rows of `features` by greedy k-center (paper §3.2, Algorithm 1).

    features: N x D float array (float16/float32/float64). Distances are Euclidean on
    `random_projection(features, projection_dim, seed)`, or on the features themselves when
    `projection_dim` is None or D <= projection_dim.
    start: the first pick; by default `int(np.random.default_rng(seed).integers(N))`.
    Each further pick is the unselected row farthest from its nearest selected row; ties go to the lowest
    index, and once every remaining row coincides with a selected one the lowest unselected indices follow.
    Returns n_select unique int64 row indices in selection order. Memory is O(N * d').
    """
    features = np.asarray(features)
    _check_arguments(features, n_select, projection_dim, start)
    n, d = features.shape
    if start is None:
        start = int(np.random.default_rng(seed).integers(n))
    if projection_dim is not None and d > projection_dim:
        points = random_projection(features, projection_dim, seed)
    else:
        points = np.array(features, dtype=np.float32, order="C")  # a copy: the search reorders its rows
    if not np.isfinite(points).all():
        raise ValueError("features are too large to project: the projection overflows float32")
    return _greedy_kcenter(points, int(n_select), int(start))


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


def _check_arguments(features: np.ndarray, n_select: int, projection_dim: int | None, start: int | None) -> None:
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


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@numba.njit(cache=True, fastmath=_FASTMATH, inline="always")
def _sqdist(a: np.ndarray, i: int, b: np.ndarray, j: int) -> float:
    # Squared distance between rows a[i] and b[j]. Rows are indexed, not sliced: a slice costs more than
    # the arithmetic. float32 coordinates, float64 sum: squares are exact, only the summation order rounds.
    total = 0.0
    for t in range(a.shape[1]):
        diff = np.float64(a[i, t]) - np.float64(b[j, t])
        total += diff * diff
    return total


@numba.njit(cache=True, fastmath=_FASTMATH, inline="always")
def _sqdist_until(a: np.ndarray, i: int, b: np.ndarray, j: int, bound: float) -> float:
    # Squared distance, or any partial sum >= bound: the terms are non-negative, so it can only grow.
    d = a.shape[1]
    total = 0.0
    lo = 0
    while lo + _BLOCK <= d:
        for t in range(lo, lo + _BLOCK):
            diff = np.float64(a[i, t]) - np.float64(b[j, t])
            total += diff * diff
        if total >= bound:
            return total
        lo += _BLOCK
    for t in range(lo, d):
        diff = np.float64(a[i, t]) - np.float64(b[j, t])
        total += diff * diff
    return total


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


@numba.njit(cache=True, fastmath=_FASTMATH)
def _greedy_kcenter(points: np.ndarray, n_select: int, start: int) -> np.ndarray:
    # N x d float32 -> n_select int64 indices in greedy order. Reorders the rows of `points` in place.
    n = points.shape[0]
    order = np.empty(n_select, dtype=np.int64)
    is_center = np.zeros(n, dtype=np.bool_)  # by original index
    centers = np.empty((n_select, points.shape[1]), dtype=np.float32)  # contiguous for the center scan
    orig = np.arange(n)  # original index of each row of `points`
    row_of = np.arange(n)
    # Each cluster's members occupy pool[seg_start : seg_start + seg_len]; points that change cluster are
    # appended at the end, and _compact rewrites the pool (and the rows of `points`) cluster by cluster.
    # Room for 2N appends: one iteration can move at most N points, so compaction happens after >= N moves.
    capacity = 3 * n
    pool_row = np.empty(capacity, dtype=np.int64)
    pool_d2 = np.empty(capacity, dtype=np.float64)  # squared distance to the cluster's center
    seg_start = np.zeros(n_select, dtype=np.int64)
    seg_len = np.zeros(n_select, dtype=np.int64)
    radius2 = np.zeros(n_select, dtype=np.float64)
    far = np.zeros(n_select, dtype=np.int64)  # original index of the farthest member
    touched = np.empty(n_select, dtype=np.int64)
    between2 = np.empty(n_select, dtype=np.float64)
    leaves = 1
    while leaves < n_select:
        leaves *= 2
    tree = np.full(2 * leaves, -1, dtype=np.int64)

    order[0] = start
    is_center[start] = True
    centers[0] = points[start]
    far[0] = start
    for i in range(n):
        d2 = _sqdist_until(points, i, centers, 0, np.inf)
        pool_row[i] = i
        pool_d2[i] = d2
        if d2 > radius2[0]:
            radius2[0] = d2
            far[0] = i
    seg_len[0] = n
    used = n
    _tree_update(tree, 0, radius2, far)

    for t in range(1, n_select):
        best = tree[1]
        if radius2[best] <= 0.0:
            # Every remaining point duplicates a selected one: all distances are 0, so ties decide.
            i = 0
            for s in range(t, n_select):
                while is_center[i]:
                    i += 1
                order[s] = i
                is_center[i] = True
            break
        c = far[best]
        order[t] = c
        is_center[c] = True
        centers[t] = points[row_of[c]]

        n_touched = 0
        volume = 0
        for j in range(t):
            r2 = radius2[j]
            if r2 <= 0.0:  # members at distance 0 cannot get strictly closer
                continue
            bound = 4.0 * r2 * _SLACK
            b2 = _sqdist_until(centers, t, centers, j, bound)
            if b2 < bound:
                touched[n_touched] = j
                between2[n_touched] = b2
                n_touched += 1
                volume += seg_len[j]
        if used + volume > capacity:
            used = _compact(points, orig, row_of, pool_row, pool_d2, seg_start, seg_len, t)

        new_start = used
        new_radius2 = -1.0
        new_far = n
        for q in range(n_touched):
            j = touched[q]
            # A member x can only move when d(c, center_j) < 2 d(x, center_j).
            stay_below = between2[q] / (4.0 * _SLACK)
            keep = seg_start[j]
            keep_radius2 = -1.0
            keep_far = n
            for pos in range(seg_start[j], seg_start[j] + seg_len[j]):
                row = pool_row[pos]
                di = pool_d2[pos]
                if di > stay_below:
                    d2 = _sqdist_until(points, row, centers, t, di)
                    if d2 < di:
                        pool_row[used] = row
                        pool_d2[used] = d2
                        used += 1
                        if d2 > new_radius2 or (d2 == new_radius2 and orig[row] < new_far):
                            new_radius2 = d2
                            new_far = orig[row]
                        continue
                pool_row[keep] = row
                pool_d2[keep] = di
                keep += 1
                if di > keep_radius2 or (di == keep_radius2 and orig[row] < keep_far):
                    keep_radius2 = di
                    keep_far = orig[row]
            seg_len[j] = keep - seg_start[j]
            radius2[j] = keep_radius2
            far[j] = keep_far
            _tree_update(tree, j, radius2, far)
        seg_start[t] = new_start
        seg_len[t] = used - new_start
        radius2[t] = new_radius2
        far[t] = new_far
        _tree_update(tree, t, radius2, far)
    return order


@numba.njit(cache=True)
def _compact(
    points: np.ndarray,
    orig: np.ndarray,
    row_of: np.ndarray,
    pool_row: np.ndarray,
    pool_d2: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    n_clusters: int,
) -> int:
    # Rewrite the pool as consecutive segments and move the rows of `points` into the same order, so a
    # cluster's members are read as one contiguous block. Returns the pool's new fill level (N).
    n = points.shape[0]
    source = np.empty(n, dtype=np.int64)  # new row -> old row
    d2 = np.empty(n, dtype=np.float64)
    filled = 0
    for j in np.argsort(seg_start[:n_clusters]):
        lo = seg_start[j]
        seg_start[j] = filled
        for q in range(seg_len[j]):
            source[filled] = pool_row[lo + q]
            d2[filled] = pool_d2[lo + q]
            filled += 1
    # Permute the rows in place, cycle by cycle, so no second N x d array is needed.
    done = np.zeros(n, dtype=np.bool_)
    saved = np.empty(points.shape[1], dtype=points.dtype)
    for first in range(n):
        if done[first]:
            continue
        saved[:] = points[first]
        row = first
        while source[row] != first:
            points[row] = points[source[row]]
            done[row] = True
            row = source[row]
        points[row] = saved
        done[row] = True
    old_orig = orig.copy()
    for row in range(n):
        orig[row] = old_orig[source[row]]
        row_of[orig[row]] = row
        pool_row[row] = row
        pool_d2[row] = d2[row]
    return n
