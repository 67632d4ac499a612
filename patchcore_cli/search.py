"""Exact nearest-neighbour search over a memory bank, pruned by the bank's own structure.

Brute force compares every query patch with every bank row: at 224 px with `efficientnet_lite0` that is
784 x 16,386 x 152 multiply-adds per image, about 40 ms on two cores, and it grows with the fourth power
of the image side. `ClusterIndex` returns the same nearest row and the same distance with a few percent of
that work, using three bounds that can only rule rows out, never change the answer:

1. Clusters. The bank is split into about sqrt(M) clusters. Their seeds are the bank's first rows, which in
   a coreset bank are the first greedy k-center picks (paper §3.2), so they are spread over the bank; a few
   Lloyd iterations then tighten them. Each cluster keeps its center c, its radius r (its farthest member)
   and its members sorted by distance to c, farthest first. By the triangle inequality every member m of
   a cluster has d(q, m) >= d(q, c) - r, and d(q, m) >= |d(q, c) - d(m, c)|.
2. A principal-axes bound. Each row is also described by its coordinates on the bank's top principal axes
   plus the norm of what those axes leave out (the residual). The distance between two such short
   descriptions never exceeds the true distance: |P(q - m)|^2 + (|R q| - |R m|)^2 <= |q - m|^2.
3. The full distance, from float32 coordinates with float64 sums of direct differences, so there is no
   cancellation in |q|^2 + |m|^2 - 2 q.m.

For each query the nearest cluster is searched first, which gives a distance to beat; then the other
clusters whose bound is below it, nearest bound first. Within a cluster, members outside the band
[d(q, c) - best, d(q, c) + best] are skipped, and the rest go through bound 2 before bound 3. Ties go to
the lowest bank row. Every bound is widened by a margin larger than its rounding error (see the margins
below), so the result is the brute-force result.

Calibration scores each training image against the bank without that image's own patches: `skip` gives
each query a source id whose rows are left out, so the index is built once, not once per image.

Banks without cluster structure defeat bounds 1 and 2: the patches of a fine random texture (Magnetic
Tile) sit at nearly equal distances from each other, so almost every cluster has to be opened. For them
the index has a second, dense path, exact too:

4. Each row m is turned onto the bank's top principal axes, as many as keep 90 % of its variance, plus
   one column for the norm r_m of what they leave out: m'. Since q.m <= q'.m' (Cauchy-Schwarz on the
   left-out parts), |q|^2 + |m|^2 - 2 q'.m' is a lower bound of |q - m|^2. A bfloat16 matrix product of
   the whole bank with a block of queries (about the bank mean, scaled by a power of two; float32 sums,
   rounded to bfloat16) gives every q'.m' within E (|q|^2 + |m|^2) / 2,
   E = 3 * 2^-8 + 2^-14 + (D + 64) 2^-23 + 2^-30: the inputs' and the output's rounding (2^-8 each,
   relative), the float32 sums (the standard D-term bound) and the float64 rotation, with room to
   spare. For each query the row with the lowest bound is measured exactly; its distance limits the
   nearest, so only the rows whose lower bound lies below it can be nearest, and they are measured
   exactly as in 3. On Magnetic Tile these are a few rows per query, and every row tied at the nearest
   distance is among them. Fewer axes make the product cheaper and the bound looser (more rows to
   measure); 90 % was the fastest share there, at 224 and 320. CPUs with AVX-512 BF16 or AMX run these
   products several times faster than float32 ones (3.5x here); where a CPU lacks them the product is
   slow, and the trial below keeps the clusters.

Which path is faster depends on the bank, the queries and the CPU, not on their answers, which are the
same: the first call with enough queries runs both on the same queries, keeps the faster (`path`), and
keeps the clusters should their answers ever differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np

from patchcore_cli.jit import ensure_cache_dir

ensure_cache_dir()  # before the kernels below are defined: numba picks their cache folder then

_FASTMATH = {"reassoc", "contract"}  # vectorised float64 sums; no NaN/inf shortcuts
_PCA_DIM = 32  # principal axes in bound 2; more axes prune more rows but cost more per row checked
_PCA_SAMPLE = 4096  # rows used to estimate the principal axes; any orthonormal basis gives a valid bound
_LLOYD_ROUNDS = 2
_MAX_CLUSTERS = 1024
_CHUNK = 16  # queries per parallel work item
# Margins, relative to the squared norms involved (taken about the bank mean):
# - center distances come from a float64 |q|^2 + |c|^2 - 2 q.c, whose error is below D * 2^-53 of the norms;
# - residual norms come from float64 |x|^2 - |Px|^2, so a residual near 0 is known to about sqrt(D * 2^-53)
#   of the norm;
_CENTER_MARGIN = 1e-10
# - bound 2 is summed in float32 from float32 descriptions, each coordinate within 2^-24 of the norms;
#   with the residual's uncertainty above, its error stays below 1e-5 of the squared norms.
_AUG_MARGIN = 1e-5
_FLOAT32_SAFE_EXPONENT = 60  # descriptions are kept below 2^60, so their float32 squares stay finite
_DENSE_BLOCK = 448  # queries per matrix product of the dense path, at most ...
_DENSE_PRODUCTS = 2**25  # ... so many bfloat16 products (64 MiB) at a time, over all threads: narrower
# blocks made the product slower on large banks (Magnetic Tile at 320 and 448, docs/benchmarks.md)
# A skipped row's product q.m is set to this bfloat16 (about -1e38, a float32's top half), so that its
# bounds (|m|^2 is at most D after scaling, less twice the product) stay finite and above any limit a row
# that is not skipped sets.
_OUT_OF_REACH = np.uint16(0xFE96)
_DENSE_KEPT = 0.90  # share of the bank's variance the dense path's product keeps (its principal axes) ...
_DENSE_WIDTH = 16  # ... in a multiple of so many columns, the last one the residual norm
_SCAN = 64  # rows per chunk whose candidates the dense path looks for only if the chunk's bound allows
_DENSE_FLOOR = 2.0**-100  # absolute slack of bound 4, for products of coordinates so small they underflow
_TRIAL = 512  # queries the first large call times both paths on


class ClusterIndex:
    """Exact nearest bank row for each query (see the module docstring for how).

    bank: M x D float32 rows. sources: optional M int64 ids (e.g. the training image a row came from) that
    `nearest(..., skip=...)` can leave out. The index holds a reordered float32 copy of the bank plus
    O(M * 33) float64 bound data.
    """

    def __init__(self, bank: np.ndarray, sources: np.ndarray | None = None) -> None:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty M x D array, got shape {bank.shape}")
        rows, dim = bank.shape
        self.rows, self.dim = rows, dim
        self.mean = bank.mean(axis=0, dtype=np.float64)
        assign, centers = _clusters(bank, self.mean)
        centered = bank.astype(np.float64) - self.mean  # M x D
        member_d = np.sqrt(((centered - centers[assign]) ** 2).sum(1))
        order = np.argsort(assign, kind="stable")  # grouped by cluster
        counts = np.bincount(assign, minlength=len(centers))
        self.start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.row = order.astype(np.int64)  # bank row of each position
        self.bank = np.ascontiguousarray(bank[order])
        self.radius = np.maximum.reduceat(member_d[order], self.start[:-1])  # farthest member of each
        self.centers = centers
        self.center_sq = (centers * centers).sum(1)
        self.sources = (
            np.full(rows, -1, np.int64)
            if sources is None
            else np.ascontiguousarray(np.asarray(sources, dtype=np.int64)[order])
        )
        self.axes = _principal_axes(centered)  # D x k
        bank_aug, bank_sq = self._describe(centered[order])
        # Bound 2 runs in float32. For data so large that its squares would overflow float32, the
        # descriptions are scaled by a power of two (exactly) and the bound scaled back in float64.
        largest = float(np.sqrt(bank_sq.max()))
        self.shrink = 2.0 ** -max(0, math.ceil(math.log2(max(largest, 1.0))) - _FLOAT32_SAFE_EXPONENT)
        self.bank_aug_t = np.ascontiguousarray(bank_aug.T * self.shrink, dtype=np.float32)  # (k+1) x M
        self.bank_margin = _AUG_MARGIN * bank_sq
        # The dense path (bound 4): coordinates about the mean, scaled by a power of two (exact) to at
        # most 1, so products and squares neither overflow nor, for normal data, vanish. Its bfloat16
        # copy of the bank is made when the path first runs (`_dense_tables`).
        largest_coordinate = float(np.abs(centered).max())
        self.dense_scale = 2.0 ** -math.ceil(math.log2(largest_coordinate)) if largest_coordinate > 0 else 1.0
        # (dim + 64) 2^-23: float32 sums of at most dim products, and the bound's few float32 operations;
        # 2^-30: the float64 rotation onto the principal axes and the residual norms.
        self.dense_error = 3 * 2.0**-8 + 2.0**-14 + (dim + 64) * 2.0**-23 + 2.0**-30
        self._dense: tuple | None = None
        self.path: str | None = None  # "clusters" or "dense", chosen by the first large call
        self.trial: dict[str, float] = {}  # seconds each path took on the trial queries

    def _describe(self, centered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N x D float64 rows about the bank mean -> (N x (k+1) projections plus residual norm, N norms^2)."""
        projected = centered @ self.axes
        sq = (centered * centered).sum(1)
        residual = np.sqrt(np.maximum(sq - (projected * projected).sum(1), 0.0))
        return np.concatenate([projected, residual[:, None]], 1), sq

    def nearest(self, queries: np.ndarray, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Q x D queries -> (Q float64 squared distances, Q int64 bank rows) of each nearest bank row.

        skip: optional Q source ids; query i ignores bank rows whose source is skip[i] (a negative id
        skips nothing). A query that finds no row (all skipped) gets distance inf and row -1.
        """
        # Writable as well as contiguous: a read-only array (a row of a memory-mapped bank) is another
        # type to numba, and would compile the kernels a second time.
        queries = np.require(queries, np.float32, ["C", "W"])
        count = queries.shape[0]
        skips = np.full(count, -1, np.int64) if skip is None else np.ascontiguousarray(skip, np.int64)
        if skips.shape != (count,):
            raise ValueError(f"skip must hold one source id per query ({count}), got shape {skips.shape}")
        if self.path is None and count >= _TRIAL:
            self._choose(queries[:_TRIAL], skips[:_TRIAL])
        if self.path == "dense":
            return self.nearest_dense(queries, skips)
        return self.nearest_clusters(queries, skips)

    def _choose(self, queries: np.ndarray, skips: np.ndarray) -> None:
        """Time both paths on the same queries and keep the faster; the clusters if their answers differ
        (they cannot, by bound 4, unless a torch backend rounds its bfloat16 products otherwise). Each
        runs once on one query first, so that compiling or loading its kernels is not timed."""
        import time

        found = {}
        for path, run in (("clusters", self.nearest_clusters), ("dense", self.nearest_dense)):
            run(queries[:1], skips[:1])
            began = time.perf_counter()
            found[path] = run(queries, skips)
            self.trial[path] = time.perf_counter() - began
        same = all(np.array_equal(a, b) for a, b in zip(found["clusters"], found["dense"], strict=True))
        self.path = min(self.trial, key=self.trial.__getitem__) if same else "clusters"
        if self.path == "clusters":
            self._dense = None  # the bfloat16 copy of the bank is not needed any more

    def nearest_clusters(self, queries: np.ndarray, skips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`nearest` by bounds 1 to 3 (float32 C-contiguous writable queries, one skip id each)."""
        count = queries.shape[0]
        out_d2 = np.empty(count, np.float64)
        out_row = np.empty(count, np.int64)
        if count == 0:
            return out_d2, out_row
        centered = queries.astype(np.float64) - self.mean
        aug, query_sq = self._describe(centered)
        aug = np.ascontiguousarray(aug * self.shrink, dtype=np.float32)
        center_d2 = query_sq[:, None] + self.center_sq[None, :] - 2.0 * (centered @ self.centers.T)
        tables = (self.bank, self.bank_aug_t, self.bank_margin, self.center_sq, self.radius, self.start)
        bounds = np.linspace(0, count, min(count, max(1, _threads())) + 1).astype(int)

        def run(lo: int, hi: int) -> None:
            _nearest(
                queries[lo:hi], aug[lo:hi], query_sq[lo:hi], center_d2[lo:hi], *tables, self.row,
                self.sources, skips[lo:hi], self.shrink ** -2, out_d2[lo:hi], out_row[lo:hi],
            )  # fmt: skip

        _in_threads(run, bounds)
        return out_d2, out_row

    def nearest_dense(self, queries: np.ndarray, skips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`nearest` by bound 4 and exact distances (float32 C-contiguous writable queries, one skip id
        each)."""
        import torch

        count = queries.shape[0]
        out_d2 = np.empty(count, np.float64)
        out_row = np.empty(count, np.int64)
        if count == 0:
            return out_d2, out_row
        bank16, axes, low, *by_source = self._dense_tables()
        scaled = (queries.astype(np.float64) - self.mean) * self.dense_scale
        turned, residual = _turn(scaled, axes)
        scaled16 = torch.from_numpy(np.concatenate([turned, residual[:, None]], 1).astype(np.float32))
        scaled16 = scaled16.to(torch.bfloat16)
        # A query's lower bounds are low[j] - 2 q'.m' + (1 - E) |q|^2, and its nearest distance is at most
        # that of any row: with these, a distance d2 limits the rows to those with low[j] - 2 q'.m' below
        # d2 scale^2 - (1 - E) |q|^2 (in float64, rounded up to float32 by the kernel). The floor covers
        # products of coordinates so small they underflow.
        offset = (1.0 - self.dense_error) * (scaled * scaled).sum(1) - _DENSE_FLOOR
        # Each thread takes blocks of queries and runs all of a block itself: the product (torch held to
        # this one thread), the chunk scan, the pick. torch's own threads would otherwise keep spinning on
        # their cores for milliseconds after each product, while our threads scan it (1.1-1.6x slower).
        threads = max(1, _threads())
        step = min(count, max(16, min(_DENSE_BLOCK, _DENSE_PRODUCTS // threads // self.rows)))
        starts = iter(range(0, count, step))  # next() is atomic: each block goes to one thread
        chunks = -(-self.rows // _SCAN)
        tables = (low, offset, self.dense_scale**2, queries, self.bank, self.row, self.sources, skips)

        def run(_lo: int, _hi: int) -> None:
            torch.set_num_threads(1)  # this thread's own setting (the caller's is put back below)
            # Bank rows by queries: a row's products with the block's queries lie side by side, so the
            # scan runs along them in vector registers.
            products = torch.empty((self.rows, step), dtype=torch.bfloat16)
            chunk_min = np.empty((chunks, step), np.float32)
            for lo in starts:
                width = min(count, lo + step) - lo
                block = products if width == step else torch.empty((self.rows, width), dtype=torch.bfloat16)
                torch.mm(bank16, scaled16[lo : lo + width].t(), out=block)
                bits = block.view(torch.int16).numpy().view(np.uint16)  # bfloat16: a float32's top 16 bits
                _dense_skip(bits, lo, skips, *by_source)
                least = chunk_min if width == step else np.empty((chunks, width), np.float32)
                _dense_chunk_min(bits, low, least)
                _dense_pick(bits, lo, least, *tables, out_d2, out_row)

        blocks = -(-count // step)
        before = torch.get_num_threads()
        try:
            _in_threads(run, np.arange(min(blocks, threads) + 1))
        finally:
            torch.set_num_threads(before)
        return out_d2, out_row

    def _dense_tables(self) -> tuple:
        """The tables of bound 4, in index order, made once: (M x W bfloat16 bank, its axes, low,
        source_ids, source_start, source_pos).

        A row m is described by its coordinates on the bank's top W - 1 principal axes and the norm r_m
        of what they leave out, m' (`_turn`). For a query q the same way, q.m <= q'.m', so
        |q|^2 + |m|^2 - 2 q'.m' is a lower bound of |q - m|^2. Per row, low is |m|^2 less its share of
        the product's error bound. The last three list each source's positions, for queries to leave
        out."""
        import torch

        if self._dense is None:
            scaled = (self.bank.astype(np.float64) - self.mean) * self.dense_scale
            axes = _dense_axes(scaled)
            turned, residual = _turn(scaled, axes)
            bank16 = torch.from_numpy(np.concatenate([turned, residual[:, None]], 1).astype(np.float32))
            bank16 = bank16.to(torch.bfloat16).contiguous()
            low = ((scaled * scaled).sum(1) * (1.0 - self.dense_error)).astype(np.float32)
            # Each source's positions, for queries to leave out: source_pos[source_start[k] ..
            # source_start[k + 1] - 1] are the positions of source source_ids[k].
            by_source = np.argsort(self.sources, kind="stable")
            source_ids, first = np.unique(self.sources[by_source], return_index=True)
            source_start = np.append(first, self.rows).astype(np.int64)
            self._dense = (bank16, axes, low, source_ids, source_start, by_source.astype(np.int64))
        return self._dense

    def neighbours(
        self, queries: np.ndarray, k: int, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Q x D queries -> (Q x k float64 squared distances, Q x k int64 bank rows), nearest first.

        For a few queries (paper eq. 7 asks for b neighbours of one bank row per image), by brute force
        with the same exact distances and the same tie rule; missing neighbours are inf / -1.
        """
        queries = np.require(queries, np.float32, ["C", "W"])  # see `nearest`
        count = queries.shape[0]
        skips = np.full(count, -1, np.int64) if skip is None else np.ascontiguousarray(skip, np.int64)
        out_d2 = np.full((count, k), np.inf)
        out_row = np.full((count, k), -1, np.int64)
        _neighbours(queries, self.bank, self.row, self.sources, skips, out_d2, out_row)
        return out_d2, out_row


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class _Workers:
    """Threads kept for the parallel parts of searches: starting a thread pool cost about 0.3 ms a call.
    They are daemon threads, so an idle one never holds up the interpreter's exit, and `_in_threads`
    waits for every part it hands out before it returns or raises."""

    def __init__(self, count: int) -> None:
        import os
        import queue
        import threading

        self.pid, self.count = os.getpid(), count
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        for number in range(count):
            threading.Thread(target=self._serve, name=f"search-{number}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            run, lo, hi, done = self.tasks.get()
            try:
                run(lo, hi)
            except BaseException as exc:  # handed to the caller, which raises it
                done.put(exc)
            else:
                done.put(None)


_WORKERS: _Workers | None = None


def _in_threads(run: Callable[[int, int], None], bounds: np.ndarray) -> None:
    """run(lo, hi) for each consecutive pair of `bounds`: the first in this thread, the others in kept
    worker threads (the kernels release the GIL)."""
    global _WORKERS
    import os
    import queue

    parts = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    if len(parts) > 1:
        workers = _WORKERS
        if workers is None or workers.pid != os.getpid() or workers.count < len(parts) - 1:
            workers = _WORKERS = _Workers(len(parts) - 1)
        done: queue.SimpleQueue = queue.SimpleQueue()
        for lo, hi in parts[1:]:
            workers.tasks.put((run, lo, hi, done))
    failure = None
    try:
        run(*parts[0])
    finally:
        for _ in parts[1:]:
            failure = done.get() or failure
    if failure is not None:
        raise failure


def _clusters(bank: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """M x D bank -> (M cluster ids, C x D float64 centers about `mean`), empty clusters dropped.

    Seeds: the first C rows. Any partition gives exact answers; a tight one prunes more.
    """
    import torch

    rows = bank.shape[0]
    count = max(1, min(_MAX_CLUSTERS, round(math.sqrt(rows))))
    points = torch.from_numpy(bank - mean.astype(np.float32))  # M x D float32, about the mean
    centers = points[:count].clone()
    for _ in range(_LLOYD_ROUNDS + 1):
        # argmin_c |x - c|^2 = argmin_c |c|^2 - 2 x.c; float32 is fine, the assignment needs no exactness
        assign = torch.addmm((centers * centers).sum(1)[None, :], points, centers.T, alpha=-2.0).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, points)
        sizes = torch.bincount(assign, minlength=count).clamp_(min=1)
        centers = sums / sizes[:, None].float()
    assign_np = assign.numpy()
    used = np.unique(assign_np)
    remap = np.full(count, -1, np.int64)
    remap[used] = np.arange(len(used))
    # Centers in float64 as the members' exact mean, so member distances and radii are consistent.
    ids = remap[assign_np]
    exact = np.zeros((len(used), bank.shape[1]), np.float64)
    np.add.at(exact, ids, bank.astype(np.float64) - mean)
    exact /= np.bincount(ids, minlength=len(used))[:, None]
    return ids, exact


def _axes_of(centered: np.ndarray, sample_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """M x D float64 rows about their mean -> (D variances, D x D axes), largest first, from about
    `sample_rows` evenly spaced rows."""
    sample = centered[:: max(1, centered.shape[0] // sample_rows)]
    values, vectors = np.linalg.eigh(sample.T @ sample)
    return values[::-1], vectors[:, ::-1]


def _principal_axes(centered: np.ndarray) -> np.ndarray:
    """M x D float64 rows about their mean -> D x k orthonormal top principal axes (k = min(32, D))."""
    _, vectors = _axes_of(centered, _PCA_SAMPLE)
    return np.ascontiguousarray(vectors[:, : min(_PCA_DIM, centered.shape[1])])


def _dense_axes(centered: np.ndarray) -> np.ndarray:
    """M x D float64 rows about their mean -> D x (W - 1) orthonormal top principal axes for bound 4: the
    fewest that keep _DENSE_KEPT of the variance of a sample, W a multiple of _DENSE_WIDTH; all D axes if
    that is not fewer columns than D. Any orthonormal axes give a valid bound; more keep it tighter."""
    dim = centered.shape[1]
    values, vectors = _axes_of(centered, 4 * _PCA_SAMPLE)
    values = np.maximum(values, 0.0)
    kept = np.cumsum(values) / max(float(values.sum()), 1e-300)
    wanted = int(np.searchsorted(kept, _DENSE_KEPT)) + 1
    width = -(-(wanted + 1) // _DENSE_WIDTH) * _DENSE_WIDTH
    return np.ascontiguousarray(vectors[:, : width - 1] if width - 1 < dim else vectors)


def _turn(scaled: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N x D float64 rows -> (N x k coordinates on the k axes, N norms of the rest). The norms come from
    |x|^2 - |Px|^2, so they are padded by 2^-24 |x|, far above that difference's float64 error: a norm
    too large loosens bound 4 a little, one too small would break it."""
    turned = scaled @ axes
    squares = (scaled * scaled).sum(1)
    rest = np.sqrt(np.maximum(squares - (turned * turned).sum(1), 0.0))
    return turned, rest + np.sqrt(squares) * 2.0**-24


@numba.njit(cache=True, fastmath=_FASTMATH)
def _exact_sq(queries: np.ndarray, i: int, bank: np.ndarray, j: int) -> float:
    # float32 coordinates, float64 differences and sum: the squares are exact, only the summation rounds.
    total = 0.0
    for t in range(queries.shape[1]):
        diff = np.float64(queries[i, t]) - np.float64(bank[j, t])
        total += diff * diff
    return total


@numba.njit(cache=True, fastmath=_FASTMATH)
def _visit(
    r: int,
    cluster: int,
    best: tuple[float, float, int],
    queries: np.ndarray,
    aug: np.ndarray,
    query_sq: np.ndarray,
    bank: np.ndarray,
    bank_aug_t: np.ndarray,
    bank_margin: np.ndarray,
    start: np.ndarray,
    row: np.ndarray,
    sources: np.ndarray,
    skip: int,
    unshrink: float,
    bound: np.ndarray,
) -> tuple[float, float, int]:
    # Search one cluster for query r. best = (squared distance, distance, bank row). The rounding of the
    # sqrt is far inside the center margin, which every cluster bound compared with it carries.
    # Bound 2 for all members first, vectorised along the members (bank_aug_t is (k+1) x M), then the
    # exact distance where the bound does not rule a member out.
    best_d2, best_d, best_row = best
    lo, hi = start[cluster], start[cluster + 1]
    size = hi - lo
    bound[:size] = 0.0
    for t in range(bank_aug_t.shape[0]):
        value = aug[r, t]
        coordinate = bank_aug_t[t, lo:hi]  # a slice: indexing [t, lo + p] in the loop does not vectorise
        for p in range(size):
            diff = value - coordinate[p]
            bound[p] += diff * diff
    slack = _AUG_MARGIN * query_sq[r]
    for p in range(size):
        if bound[p] * unshrink - bank_margin[lo + p] - slack > best_d2:
            continue
        if skip >= 0 and sources[lo + p] == skip:
            continue
        d2 = _exact_sq(queries, r, bank, lo + p)
        if d2 < best_d2 or (d2 == best_d2 and row[lo + p] < best_row):
            best_d2, best_row = d2, row[lo + p]
            best_d = math.sqrt(d2)
    return best_d2, best_d, best_row


@numba.njit(cache=True, nogil=True)
def _nearest(
    queries: np.ndarray,
    aug: np.ndarray,
    query_sq: np.ndarray,
    center_d2: np.ndarray,
    bank: np.ndarray,
    bank_aug_t: np.ndarray,
    bank_margin: np.ndarray,
    center_sq: np.ndarray,
    radius: np.ndarray,
    start: np.ndarray,
    row: np.ndarray,
    sources: np.ndarray,
    skip: np.ndarray,
    unshrink: float,
    out_d2: np.ndarray,
    out_row: np.ndarray,
) -> None:
    count = queries.shape[0]
    clusters = radius.shape[0]
    largest = 0
    for j in range(clusters):
        largest = max(largest, start[j + 1] - start[j])
    for chunk in range((count + _CHUNK - 1) // _CHUNK):
        near = np.empty(clusters)
        key = np.empty(clusters)
        pending = np.empty(clusters, np.int64)
        bound = np.empty(largest, np.float32)
        for r in range(chunk * _CHUNK, min(count, (chunk + 1) * _CHUNK)):
            first = 0
            for j in range(clusters):
                margin = _CENTER_MARGIN * (query_sq[r] + center_sq[j])
                near[j] = math.sqrt(max(center_d2[r, j] - margin, 0.0))
                key[j] = near[j] - radius[j]  # no member of cluster j is nearer than this
                if near[j] < near[first]:
                    first = j
            best = (np.inf, np.inf, np.int64(-1))
            best = _visit(
                r, first, best, queries, aug, query_sq, bank, bank_aug_t, bank_margin, start, row,
                sources, skip[r], unshrink, bound,
            )  # fmt: skip
            size = 0
            for j in range(clusters):
                if j != first and key[j] <= best[1]:
                    pending[size] = j
                    size += 1
            if size > 0:
                ranked = pending[:size][np.argsort(key[pending[:size]])]
                for j in ranked:
                    if key[j] > best[1]:
                        break
                    best = _visit(
                        r, j, best, queries, aug, query_sq, bank, bank_aug_t, bank_margin, start, row,
                        sources, skip[r], unshrink, bound,
                    )  # fmt: skip
            out_d2[r] = best[0]
            out_row[r] = best[2]


@numba.njit(cache=True, nogil=True)
def _dense_skip(
    bits: np.ndarray,
    first: int,
    skip: np.ndarray,
    source_ids: np.ndarray,
    source_start: np.ndarray,
    source_pos: np.ndarray,
) -> None:
    # A skipped row bounds nothing: its product with query first + i is put out of reach of any limit.
    for i in range(bits.shape[1]):
        wanted = skip[first + i]
        if wanted < 0:
            continue
        k = np.searchsorted(source_ids, wanted)
        if k < source_ids.shape[0] and source_ids[k] == wanted:
            for p in range(source_start[k], source_start[k + 1]):
                bits[source_pos[p], i] = _OUT_OF_REACH


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dense_chunk_min(bits: np.ndarray, low: np.ndarray, chunk_min: np.ndarray) -> None:
    # For each chunk of _SCAN rows: each query's smallest low[j] - 2 q'.m' over the chunk's rows,
    # from the products' bfloat16 bits (rows by queries). The inner loops run along the queries, element
    # by element, so LLVM vectorises them (a min reduction along the rows it does not).
    count, width = bits.shape
    wide = np.empty(width, np.uint32)
    values = wide.view(np.float32)
    two = np.float32(2.0)
    for c in range(chunk_min.shape[0]):
        least = chunk_min[c]
        for i in range(width):
            least[i] = np.float32(3.0e38)
        for j in range(c * _SCAN, min(count, (c + 1) * _SCAN)):
            line = bits[j]
            for i in range(width):  # exact: bfloat16 is a float32's top half
                wide[i] = np.uint32(line[i]) << np.uint32(16)
            floor = low[j]
            for i in range(width):
                least[i] = min(least[i], floor - two * values[i])


@numba.njit(cache=True, nogil=True)
def _dense_pick(
    bits: np.ndarray,
    first: int,
    chunk_min: np.ndarray,
    low: np.ndarray,
    offset: np.ndarray,
    scale_sq: float,
    queries: np.ndarray,
    bank: np.ndarray,
    row: np.ndarray,
    sources: np.ndarray,
    skip: np.ndarray,
    out_d2: np.ndarray,
    out_row: np.ndarray,
) -> None:
    # Bound 4 for the block's queries (query first + i for column i). The row with the lowest
    # lower bound is measured first; its distance limits the rest to the rows whose lower bound is below
    # it, which are measured exactly; ties to the lowest bank row. A chunk's rows are looked at only if
    # the chunk's lowest bound is below the limit.
    count, width = bits.shape
    one = np.empty(1, np.uint32)
    value = one.view(np.float32)
    two = np.float32(2.0)
    lowest = np.full(width, np.float32(3.0e38))
    at = np.zeros(width, np.int64)
    for c in range(chunk_min.shape[0]):
        for i in range(width):
            if chunk_min[c, i] < lowest[i]:
                lowest[i], at[i] = chunk_min[c, i], c
    best_d2 = np.full(width, np.inf)
    best_row = np.full(width, np.int64(-1))
    limit = np.full(width, np.float32(3.0e38))
    for i in range(width):
        r = first + i
        c = at[i]
        j_lowest, lowest_bound = -1, np.float32(3.0e38)
        for j in range(c * _SCAN, min(count, (c + 1) * _SCAN)):
            if skip[r] >= 0 and sources[j] == skip[r]:
                continue
            one[0] = np.uint32(bits[j, i]) << np.uint32(16)
            bound = low[j] - two * value[0]
            if bound < lowest_bound:
                j_lowest, lowest_bound = j, bound
        if j_lowest >= 0:
            best_d2[i], best_row[i] = _exact_sq(queries, r, bank, j_lowest), row[j_lowest]
            wanted = best_d2[i] * scale_sq - offset[r]
            limit[i] = np.float32(wanted)
            if np.float64(limit[i]) < wanted:  # round up, never down
                limit[i] = np.nextafter(limit[i], np.float32(np.inf))
    # Chunk by chunk, so that each test reads the chunk's bounds for all the queries side by side.
    for c in range(chunk_min.shape[0]):
        for i in range(width):
            if chunk_min[c, i] > limit[i]:
                continue
            r = first + i
            for j in range(c * _SCAN, min(count, (c + 1) * _SCAN)):
                one[0] = np.uint32(bits[j, i]) << np.uint32(16)
                if low[j] - two * value[0] > limit[i]:
                    continue
                if skip[r] >= 0 and sources[j] == skip[r]:
                    continue
                d2 = _exact_sq(queries, r, bank, j)
                if d2 < best_d2[i] or (d2 == best_d2[i] and row[j] < best_row[i]):
                    best_d2[i], best_row[i] = d2, row[j]
    for i in range(width):
        out_d2[first + i] = best_d2[i]
        out_row[first + i] = best_row[i]


@numba.njit(cache=True, nogil=True)
def _neighbours(
    queries: np.ndarray,
    bank: np.ndarray,
    row: np.ndarray,
    sources: np.ndarray,
    skip: np.ndarray,
    out_d2: np.ndarray,
    out_row: np.ndarray,
) -> None:
    # Brute-force k nearest rows (k = out_d2.shape[1]), kept sorted by (distance, row) by insertion.
    k = out_d2.shape[1]
    for r in range(queries.shape[0]):
        for p in range(bank.shape[0]):
            if skip[r] >= 0 and sources[p] == skip[r]:
                continue
            d2 = _exact_sq(queries, r, bank, p)
            slot = k
            while slot > 0 and (
                d2 < out_d2[r, slot - 1] or (d2 == out_d2[r, slot - 1] and row[p] < out_row[r, slot - 1])
            ):
                slot -= 1
            if slot == k:
                continue
            for move in range(k - 1, slot, -1):
                out_d2[r, move] = out_d2[r, move - 1]
                out_row[r, move] = out_row[r, move - 1]
            out_d2[r, slot] = d2
            out_row[r, slot] = row[p]
