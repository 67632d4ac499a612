"""The pruned exact search against brute force: same nearest row and distance, on adversarial data too."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore_cli import search
from patchcore_cli.search import ClusterIndex

# "dense-axes": the dense path with a product on so few principal axes that most of each row is left to
# the residual column, so that its bound is loose and many rows are measured.
PATHS = pytest.mark.parametrize("path", ["clusters", "dense", "dense-axes"])


def forced(bank, path, sources=None) -> ClusterIndex:
    """An index that answers every call by `path` (the clusters, or the dense matrix products)."""
    index = ClusterIndex(bank, sources)
    index.path = "dense" if path.startswith("dense") else path
    if path == "dense-axes":
        kept, search._DENSE_KEPT = search._DENSE_KEPT, 0.3
        try:
            index._dense_tables()
        finally:
            search._DENSE_KEPT = kept
    return index


def brute(bank: np.ndarray, queries: np.ndarray, skip=None, sources=None) -> tuple[np.ndarray, np.ndarray]:
    """float64 direct differences; ties to the lowest row; rows of the query's skip id left out."""
    d2 = ((queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    if skip is not None:
        d2[np.asarray(sources)[None, :] == np.asarray(skip)[:, None]] = np.inf
    rows = d2.argmin(1)
    best = d2[np.arange(len(queries)), rows]
    rows[~np.isfinite(best)] = -1
    return best, rows


def assert_same(bank, queries, found, skip=None, sources=None):
    d2, rows = found
    ref_d2, ref_rows = brute(bank, queries, skip, sources)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-12, atol=0)
    # The returned row is at the minimal distance, and it is the lowest such row whenever the minimum
    # is clear of float64 rounding (exact duplicates included: they round identically).
    full = ((queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    for q, (row, ref) in enumerate(zip(rows, ref_rows, strict=True)):
        if ref < 0:
            assert row == -1
            continue
        tied = np.flatnonzero(np.abs(full[q] - ref_d2[q]) <= 1e-12 * max(ref_d2[q], 1e-300))
        if skip is not None:
            tied = tied[np.asarray(sources)[tied] != skip[q]]
        assert row in tied
        if len(tied) == 1 or np.all(full[q, tied] == ref_d2[q]):
            assert row == tied.min()


def clustered(rng, rows, dim, centres=20, spread=1.0, scale=5.0):
    middle = rng.normal(size=(centres, dim)) * scale
    return (middle[rng.integers(0, centres, rows)] + rng.normal(size=(rows, dim)) * spread).astype(np.float32)


@pytest.mark.parametrize(
    ("rows", "dim"), [(1, 3), (2, 1), (7, 5), (300, 20), (2000, 64), (1500, 152), (400, 300)]
)
@PATHS
def test_equals_brute_force_on_clustered_and_plain_data(rows, dim, path):
    rng = np.random.default_rng(rows + dim)
    bank = clustered(rng, rows, dim)
    queries = np.concatenate([clustered(rng, 60, dim), rng.normal(size=(20, dim)).astype(np.float32) * 9])
    assert_same(bank, queries, forced(bank, path).nearest(queries))


@PATHS
def test_duplicate_rows_resolve_to_the_lowest_row(path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 16)).astype(np.float32)
    bank = np.concatenate([base, base[::-1], base])  # every row three times, in two orders
    queries = np.concatenate([base[:10], base[:10] + 0.01, rng.normal(size=(10, 16)).astype(np.float32)])
    d2, rows = forced(bank, path).nearest(queries)
    _, ref_rows = brute(bank, queries)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(d2[:10], 0.0)


@PATHS
def test_exact_ties_between_distinct_rows_go_to_the_lowest_row(path):
    # Rows at +e_i and -e_i around the origin: the query at 0 is equally far from all of them.
    dim = 8
    eye = np.eye(dim, dtype=np.float32)
    bank = np.concatenate([eye * 3, -eye * 3, eye * 7])
    rng = np.random.default_rng(1)
    bank = bank[rng.permutation(len(bank))]
    queries = np.zeros((3, dim), np.float32)
    d2, rows = forced(bank, path).nearest(queries)
    first = np.flatnonzero(np.abs(bank).max(1) == 3).min()
    assert (rows == first).all() and np.allclose(d2, 9.0)


@PATHS
def test_all_rows_identical(path):
    bank = np.ones((100, 12), np.float32)
    d2, rows = forced(bank, path).nearest(np.zeros((4, 12), np.float32))
    assert (rows == 0).all() and np.allclose(d2, 12.0)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1e6, 1e18, 1e30, 1e37])
@PATHS
def test_huge_and_tiny_norms(scale, path):
    rng = np.random.default_rng(2)
    bank = (clustered(rng, 500, 24) * scale).astype(np.float32)
    queries = (clustered(rng, 40, 24) * scale).astype(np.float32)
    assert np.isfinite(bank).all() and np.isfinite(queries).all()
    assert_same(bank, queries, forced(bank, path).nearest(queries))


@PATHS
def test_large_common_offset_does_not_cancel_away_the_differences(path):
    # |q|^2 + |m|^2 - 2 q.m would lose everything here in float32; direct differences keep it exact.
    rng = np.random.default_rng(3)
    bank = (1e4 + rng.normal(size=(800, 32))).astype(np.float32)
    queries = (1e4 + rng.normal(size=(50, 32))).astype(np.float32)
    assert_same(bank, queries, forced(bank, path).nearest(queries))


@PATHS
def test_mixed_scales_in_one_bank(path):
    rng = np.random.default_rng(4)
    bank = np.concatenate([rng.normal(size=(300, 10)) * 1e-3, rng.normal(size=(300, 10)) * 1e3]).astype(
        np.float32
    )
    queries = np.concatenate([rng.normal(size=(30, 10)) * 1e-3, rng.normal(size=(30, 10)) * 1e3]).astype(
        np.float32
    )
    assert_same(bank, queries, forced(bank, path).nearest(queries))


@PATHS
def test_skip_leaves_out_each_querys_own_source(path):
    rng = np.random.default_rng(5)
    bank = clustered(rng, 600, 20)
    sources = rng.integers(0, 6, len(bank))
    queries = bank[::10] + 0.001  # each query's own row is nearest unless skipped
    skip = sources[::10]
    found = forced(bank, path, sources).nearest(queries, skip)
    assert_same(bank, queries, found, skip, sources)
    assert (sources[found[1]] != skip).all()


@PATHS
def test_skipping_every_row_gives_no_neighbour(path):
    bank = np.random.default_rng(6).normal(size=(30, 4)).astype(np.float32)
    sources = np.zeros(30, np.int64)
    d2, rows = forced(bank, path, sources).nearest(bank[:3], np.array([0, -1, 0]))
    assert rows.tolist()[0] == -1 and rows.tolist()[2] == -1 and np.isinf(d2[[0, 2]]).all()
    assert rows[1] == 1 and d2[1] == 0.0


def test_neighbours_are_the_k_nearest_with_ties_by_row():
    rng = np.random.default_rng(7)
    base = clustered(rng, 200, 12)
    bank = np.concatenate([base, base[:50]])  # duplicates: equal distances, lower row first
    queries = base[:20] + 0.05
    d2, rows = ClusterIndex(bank).neighbours(queries, 9)
    full = ((queries.astype(np.float64)[:, None] - bank.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(bank)), full.shape), full), axis=1)[:, :9]
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_allclose(d2, np.take_along_axis(full, order, 1), rtol=1e-12)


@PATHS
def test_batches_split_across_threads_agree_with_one_thread(monkeypatch, path):
    import patchcore_cli.search as search

    rng = np.random.default_rng(8)
    bank, queries = clustered(rng, 1000, 30), clustered(rng, 257, 30)
    index = ClusterIndex(bank)
    index.path = path
    monkeypatch.setattr(search, "_threads", lambda: 1)
    one = index.nearest(queries)
    monkeypatch.setattr(search, "_threads", lambda: 3)
    three = index.nearest(queries)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 120),
    dim=st.integers(1, 40),
    grid=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
@PATHS
def test_property_equals_brute_force(rows, dim, grid, seed, path):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(rows, dim))
    queries = rng.normal(size=(17, dim))
    if grid:  # snap to a coarse grid: many exact ties and duplicates
        bank, queries = np.round(bank / grid) * grid, np.round(queries / grid) * grid
    bank, queries = bank.astype(np.float32), queries.astype(np.float32)
    assert_same(bank, queries, forced(bank, path).nearest(queries))


def test_the_first_large_call_times_both_paths_and_keeps_the_faster():
    rng = np.random.default_rng(9)
    bank, queries = clustered(rng, 3000, 24), clustered(rng, 600, 24)
    index = ClusterIndex(bank)
    small = index.nearest(queries[:100])
    assert index.path is None  # too few queries to judge by
    found = index.nearest(queries)
    assert index.path in ("clusters", "dense") and set(index.trial) == {"clusters", "dense"}
    assert index.path == min(index.trial, key=index.trial.get)
    assert_same(bank, queries, found)
    np.testing.assert_array_equal(small[1], found[1][:100])


def test_dense_path_in_blocks_of_few_queries(monkeypatch):
    import patchcore_cli.search as search

    monkeypatch.setattr(search, "_DENSE_PRODUCTS", 1)  # 16 queries per product
    rng = np.random.default_rng(10)
    bank, queries = clustered(rng, 700, 40), clustered(rng, 53, 40)
    sources = rng.integers(0, 5, len(bank))
    skip = rng.integers(-1, 5, len(queries))
    assert_same(bank, queries, forced(bank, "dense", sources).nearest(queries, skip), skip, sources)


def test_the_dense_path_gives_the_caller_back_its_torch_threads(monkeypatch):
    """Each search thread holds torch to one thread while it multiplies; the caller is one of them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.setattr(search, "_DENSE_PRODUCTS", 1)  # 16 queries per block: blocks for each thread
        rng = np.random.default_rng(14)
        bank, queries = clustered(rng, 500, 24), clustered(rng, 100, 24)
        assert_same(bank, queries, forced(bank, "dense").nearest(queries))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_dense_path_on_a_texture_like_bank():
    """No cluster structure at all: rows at nearly equal distances, the case the dense path is for."""
    rng = np.random.default_rng(11)
    bank = rng.normal(size=(4000, 152)).astype(np.float32)
    queries = rng.normal(size=(300, 152)).astype(np.float32)
    queries[:20] = bank[100:120]  # exact matches
    queries[20:40] = bank[200:220] + np.float32(1e-4)
    assert_same(bank, queries, forced(bank, "dense").nearest(queries))


def test_the_trial_keeps_the_clusters_if_the_dense_answers_ever_differ(monkeypatch):
    rng = np.random.default_rng(12)
    bank, queries = clustered(rng, 2000, 16), clustered(rng, 600, 16)
    index = ClusterIndex(bank)
    real = index.nearest_dense

    def off_by_one(queries, skips):
        d2, rows = real(queries, skips)
        return d2, (rows + 1) % len(bank)

    monkeypatch.setattr(index, "nearest_dense", off_by_one)
    monkeypatch.setattr(index, "trial", {"clusters": 9.0, "dense": 0.0})
    index._choose(queries, np.full(len(queries), -1, np.int64))
    assert index.path == "clusters" and index._dense is None  # its tables freed
    assert_same(bank, queries, index.nearest(queries))


@pytest.mark.parametrize("kept", [0.3, 0.93, 1.0])
@pytest.mark.parametrize("data", ["clustered", "offset", "mixed", "low-rank"])
def test_the_dense_lower_bound_never_exceeds_the_distance(monkeypatch, kept, data):
    """Bound 4 itself, pair by pair: low[j] - 2 q'.m' from the bfloat16 product, less the query's offset,
    is at most the squared distance (in the index's scaled coordinates), and the true nearest row is
    always among the rows it lets through."""
    import torch

    monkeypatch.setattr(search, "_DENSE_KEPT", kept)
    rng = np.random.default_rng(13)
    if data == "clustered":
        bank, queries = clustered(rng, 600, 48), clustered(rng, 80, 48)
    elif data == "offset":
        bank = (rng.normal(size=(600, 32)) + 1e4).astype(np.float32)
        queries = (rng.normal(size=(80, 32)) + 1e4).astype(np.float32)
    elif data == "mixed":
        bank = (rng.normal(size=(600, 24)) * np.exp(rng.uniform(-8, 8, size=(600, 1)))).astype(np.float32)
        queries = (rng.normal(size=(80, 24)) * np.exp(rng.uniform(-8, 8, size=(80, 1)))).astype(np.float32)
    else:  # nearly all variance on 6 of 64 axes: the product keeps few of them
        basis = rng.normal(size=(6, 64))
        bank = (rng.normal(size=(600, 6)) @ basis + rng.normal(size=(600, 64)) * 0.05).astype(np.float32)
        queries = (rng.normal(size=(80, 6)) @ basis + rng.normal(size=(80, 64)) * 0.05).astype(np.float32)
    index = ClusterIndex(bank)
    bank16, axes, low, *_ = index._dense_tables()
    if kept < 1.0 and data == "low-rank":
        assert bank16.shape[1] < bank.shape[1]  # the product is narrower than the rows
    scaled = (queries.astype(np.float64) - index.mean) * index.dense_scale
    turned, residual = search._turn(scaled, axes)
    query16 = torch.from_numpy(np.concatenate([turned, residual[:, None]], 1).astype(np.float32))
    products = torch.mm(bank16, query16.to(torch.bfloat16).t()).float().numpy().astype(np.float64)
    offset = (1.0 - index.dense_error) * (scaled * scaled).sum(1) - search._DENSE_FLOOR
    bounds = low.astype(np.float64)[:, None] - 2.0 * products + offset[None, :]  # rows x queries
    rows = (index.bank.astype(np.float64) - index.mean) * index.dense_scale
    d2 = ((scaled[None, :, :] - rows[:, None, :]) ** 2).sum(-1)
    assert (bounds <= d2 * (1 + 1e-12)).all()
    assert_same(bank, queries, index.nearest_dense(queries, np.full(len(queries), -1, np.int64)))


def test_in_threads_runs_every_part_and_raises_a_failure_after_all_have_ended():
    import threading
    import time

    ran, names = [], set()

    def run(lo, hi):
        names.add(threading.current_thread().name)
        if lo == 2:
            raise ValueError("part 2")
        time.sleep(0.05)
        ran.append((lo, hi))

    with pytest.raises(ValueError, match="part 2"):
        search._in_threads(run, np.array([0, 1, 2, 3]))
    assert sorted(ran) == [(0, 1), (1, 2)]  # the failing part did not stop the others
    assert len(names) == 3  # the caller and two kept worker threads
    search._in_threads(run, np.array([0, 1]))  # one part: in this thread
    assert all(thread.daemon for thread in threading.enumerate() if thread.name.startswith("search-"))
