"""Greedy coreset (paper §3.2): exact agreement with a plain greedy loop, and the guarantees it gives."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore_cli import coreset
from patchcore_cli.coreset import covering_radius, greedy_coreset, random_projection


def brute_force_greedy(points: np.ndarray, n_select: int, start: int) -> np.ndarray:
    """The textbook loop: after each pick, update every point's distance to its nearest pick.

    The next pick is the unpicked point with the largest such distance, the lowest index on ties.
    """
    x = points.astype(np.float64)
    nearest = ((x - x[start]) ** 2).sum(axis=1)
    picked = np.zeros(len(x), dtype=bool)
    picked[start] = True
    order = [start]
    for _ in range(n_select - 1):
        i = int(np.argmax(np.where(picked, -np.inf, nearest)))  # argmax returns the first maximum
        order.append(i)
        picked[i] = True
        nearest = np.minimum(nearest, ((x - x[i]) ** 2).sum(axis=1))
    return np.array(order)


def brute_force_radius(points: np.ndarray, selected: np.ndarray) -> float:
    x = points.astype(np.float64)
    d2 = ((x[:, None, :] - x[None, selected, :]) ** 2).sum(axis=2)
    return float(np.sqrt(d2.min(axis=1).max()))


def blobs(n_blobs: int, per_blob: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tight Gaussian blobs far apart: N x dim float32 points and each point's blob label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=100.0, size=(n_blobs, dim))
    labels = np.repeat(np.arange(n_blobs), per_blob)
    points = centres[labels] + rng.normal(scale=spread, size=(len(labels), dim))
    return points.astype(np.float32), labels


@pytest.mark.parametrize(("n_select", "seed"), [(2, 0), (30, 1), (150, 2), (300, 3)])
def test_matches_brute_force_without_projection(n_select: int, seed: int) -> None:
    features = np.random.default_rng(seed).normal(size=(300, 16)).astype(np.float32)
    start = 17 * seed
    got = greedy_coreset(features, n_select, start=start)
    np.testing.assert_array_equal(got, brute_force_greedy(features, n_select, start))
    assert got.dtype == np.int64


@pytest.mark.parametrize("projection_dim", [32, 128])
def test_matches_brute_force_on_the_projection(projection_dim: int) -> None:
    features = np.random.default_rng(7).normal(size=(300, 200)).astype(np.float32)
    projected = random_projection(features, projection_dim, seed=5)
    assert projected.shape == (300, projection_dim)
    got = greedy_coreset(features, 120, projection_dim=projection_dim, seed=5, start=9)
    np.testing.assert_array_equal(got, brute_force_greedy(projected, 120, 9))


def test_projection_is_skipped_when_it_would_not_reduce() -> None:
    features = np.random.default_rng(8).normal(size=(200, 24)).astype(np.float32)
    expected = brute_force_greedy(features, 50, 3)
    np.testing.assert_array_equal(greedy_coreset(features, 50, projection_dim=24, start=3), expected)
    np.testing.assert_array_equal(greedy_coreset(features, 50, projection_dim=None, start=3), expected)


def test_projection_roughly_keeps_distances() -> None:
    features = np.random.default_rng(9).normal(size=(50, 1000))
    projected = random_projection(features, 256, seed=0)
    original = np.linalg.norm(features[1:] - features[0], axis=1)
    kept = np.linalg.norm(projected[1:] - projected[0], axis=1)
    assert projected.dtype == np.float32
    assert np.all(np.abs(kept / original - 1.0) < 0.3)


def test_matches_brute_force_on_clustered_data_with_many_moves() -> None:
    # Low-dimensional clusters make the pruning, the sketch bound and the pool compaction all work hard.
    rng = np.random.default_rng(11)
    centres = rng.normal(scale=10.0, size=(12, 3))
    points = centres[rng.integers(12, size=3000)] + rng.normal(size=(3000, 3))
    features = np.pad(points, ((0, 0), (0, 5))).astype(np.float32)
    np.testing.assert_array_equal(
        greedy_coreset(features, 3000, start=5), brute_force_greedy(features, 3000, 5)
    )


def test_ties_go_to_the_lowest_index() -> None:
    # An integer grid, every point twice: distances tie exactly and often.
    axis = np.arange(6, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    features = np.concatenate([grid, grid[::-1]])
    for start in (0, 100, len(features) - 1):
        got = greedy_coreset(features, len(features), start=start)
        np.testing.assert_array_equal(got, brute_force_greedy(features, len(features), start))


def test_ties_go_to_the_lowest_index_on_data_that_does_not_prune() -> None:
    # Binary vectors in 12 dimensions, some repeated: pruning fails, so the search hands over to the
    # plain loop after a few dozen picks; it must break ties the same way.
    base = np.random.default_rng(24).integers(0, 2, size=(300, 12)).astype(np.float32)
    features = np.concatenate([base, base[:50]])
    got = greedy_coreset(features, len(features), start=3)
    np.testing.assert_array_equal(got, brute_force_greedy(features, len(features), 3))


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=2 * 40, max_size=2 * 40),
    n_select=st.integers(1, 40),
    start=st.integers(0, 39),
)
def test_matches_brute_force_on_small_integer_data(values: list[int], n_select: int, start: int) -> None:
    features = np.array(values, dtype=np.float32).reshape(40, 2)
    np.testing.assert_array_equal(
        greedy_coreset(features, n_select, start=start), brute_force_greedy(features, n_select, start)
    )


@pytest.mark.parametrize("scale", [1e-30, 1e19])
def test_matches_brute_force_at_extreme_scales(scale: float) -> None:
    # At these scales float32 squares underflow to 0 or overflow to inf: the bounds must not prune wrongly.
    features = (np.random.default_rng(23).normal(size=(300, 40)) * scale).astype(np.float32)
    np.testing.assert_array_equal(
        greedy_coreset(features, 100, start=8), brute_force_greedy(features, 100, 8)
    )


def test_start_point_comes_first() -> None:
    features = np.random.default_rng(12).normal(size=(100, 8)).astype(np.float32)
    assert greedy_coreset(features, 10, start=42)[0] == 42
    default = greedy_coreset(features, 10, seed=3)
    assert default[0] == np.random.default_rng(3).integers(100)
    np.testing.assert_array_equal(default, brute_force_greedy(features, 10, int(default[0])))


def test_selecting_everything_is_a_permutation() -> None:
    features = np.random.default_rng(13).normal(size=(257, 5)).astype(np.float32)
    got = greedy_coreset(features, 257)
    np.testing.assert_array_equal(np.sort(got), np.arange(257))


def test_selecting_one_point_returns_the_start() -> None:
    features = np.random.default_rng(14).normal(size=(20, 5)).astype(np.float32)
    np.testing.assert_array_equal(greedy_coreset(features, 1, start=6), [6])
    np.testing.assert_array_equal(greedy_coreset(features[:1], 1), [0])


def test_is_deterministic_for_a_seed() -> None:
    features = np.random.default_rng(15).normal(size=(500, 300)).astype(np.float32)
    first = greedy_coreset(features, 50, seed=4)
    np.testing.assert_array_equal(first, greedy_coreset(features, 50, seed=4))
    assert any(not np.array_equal(first, greedy_coreset(features, 50, seed=s)) for s in range(5, 8))


def test_leaves_the_input_untouched() -> None:
    # The search reorders its working copy of the points; the caller's array must not move.
    for dim in (8, 200):
        features = np.random.default_rng(16).normal(size=(400, dim)).astype(np.float32)
        before = features.copy()
        greedy_coreset(features, 200)
        np.testing.assert_array_equal(features, before)


def test_float16_input_equals_its_float32_copy() -> None:
    features = np.random.default_rng(17).normal(size=(300, 40)).astype(np.float16)
    np.testing.assert_array_equal(
        greedy_coreset(features, 60, projection_dim=16, seed=1),
        greedy_coreset(features.astype(np.float32), 60, projection_dim=16, seed=1),
    )


def test_prefixes_agree_and_the_radius_never_grows() -> None:
    features = np.random.default_rng(18).normal(size=(400, 6)).astype(np.float32)
    full = greedy_coreset(features, 100, start=0)
    for k in (1, 7, 50):
        np.testing.assert_array_equal(greedy_coreset(features, k, start=0), full[:k])
    radii = [covering_radius(features, full[:k]) for k in range(1, 101)]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(radii))
    assert radii[-1] < radii[0]


def test_greedy_is_within_twice_the_optimal_radius() -> None:
    features = np.random.default_rng(19).normal(size=(14, 2)).astype(np.float32)
    optimum = min(covering_radius(features, np.array(s)) for s in itertools.combinations(range(14), 3))
    for start in range(14):
        greedy = covering_radius(features, greedy_coreset(features, 3, start=start))
        assert optimum <= greedy <= 2 * optimum * (1 + 1e-9)


def test_picks_one_point_per_blob_first() -> None:
    features, labels = blobs(n_blobs=5, per_blob=60, dim=10, spread=0.5, seed=20)
    for start in (0, 123, 299):
        picked = greedy_coreset(features, 5, start=start)
        assert sorted(labels[picked]) == [0, 1, 2, 3, 4]


def test_duplicates_are_picked_once_each() -> None:
    base = np.random.default_rng(21).normal(size=(30, 4)).astype(np.float32)
    features = np.concatenate([base, base, base])  # every point three times
    got = greedy_coreset(features, 90, start=31)
    np.testing.assert_array_equal(np.sort(got), np.arange(90))
    np.testing.assert_array_equal(got, brute_force_greedy(features, 90, 31))
    # The first 30 picks cover every distinct point; after that only distance-0 ties remain.
    assert len({i % 30 for i in got[:30]}) == 30


def test_identical_points_come_in_index_order_after_the_start() -> None:
    features = np.ones((10, 3), dtype=np.float32)
    np.testing.assert_array_equal(greedy_coreset(features, 10, start=4), [4, 0, 1, 2, 3, 5, 6, 7, 8, 9])


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        (np.zeros((10, 3)), {"n_select": 0}, "n_select"),
        (np.zeros((10, 3)), {"n_select": 11}, "n_select"),
        (np.zeros((10, 3)), {"n_select": 2.5}, "n_select"),
        (np.zeros((10, 3)), {"n_select": True}, "n_select"),
        (np.zeros(10), {"n_select": 1}, "2-D"),
        (np.zeros((2, 5, 3)), {"n_select": 1}, "2-D"),
        (np.zeros((0, 3)), {"n_select": 1}, "non-empty"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), {"n_select": 1}, "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), {"n_select": 1}, "infinite"),
        (np.array([["a", "b"]]), {"n_select": 1}, "numeric"),
        (np.zeros((10, 3)), {"n_select": 2, "projection_dim": 0}, "projection_dim"),
        (np.zeros((10, 3)), {"n_select": 2, "start": 10}, "start"),
        (np.zeros((10, 3)), {"n_select": 2, "start": -1}, "start"),
    ],
)
def test_invalid_arguments_raise_value_error(features: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        greedy_coreset(features, **kwargs)


def test_covering_radius_matches_brute_force() -> None:
    features = np.random.default_rng(22).normal(size=(500, 12)).astype(np.float32) + 50.0
    selected = np.array([3, 99, 250, 499])
    assert covering_radius(features, selected) == pytest.approx(brute_force_radius(features, selected))
    assert covering_radius(features, np.arange(500)) == pytest.approx(0.0, abs=1e-6)


def test_covering_radius_rejects_bad_selections() -> None:
    features = np.zeros((5, 2))
    for selected in (np.array([], dtype=int), np.array([5]), np.array([-1]), np.array([0.5])):
        with pytest.raises(ValueError, match="selected"):
            covering_radius(features, selected)


def run_batched_fallback(
    points: np.ndarray, n_select: int, start: int, shuffle_seed: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The batched fallback from the state after the first pick, on rows shuffled as the search leaves them.

    Returns the picks (original indices), the squared distances (by original index; a frozen row's is an
    upper bound) and the fallback's counts.
    """
    points = np.asarray(points, dtype=np.float32)
    n = len(points)
    orig = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    rows = np.ascontiguousarray(points[orig])
    x = rows.astype(np.float64)
    start_row = int(np.flatnonzero(orig == start)[0])
    nearest = ((x - x[start_row]) ** 2).sum(axis=1)
    order = np.empty(n_select, dtype=np.int64)
    order[0] = start
    is_center = np.zeros(n, dtype=np.bool_)
    is_center[start] = True
    centers = np.empty((n_select, points.shape[1]), dtype=np.float32)
    centers[0] = rows[start_row]
    sketch, tolerance = coreset._sketch(rows)
    counts = coreset._batched_greedy(rows, orig, nearest, sketch, tolerance, centers, order, is_center, 1)
    by_orig = np.empty(n)
    by_orig[orig] = nearest
    return order, by_orig, counts


def fallback_data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(31)
    if kind == "normal":
        return rng.normal(size=(3000, 16)).astype(np.float32)
    if kind == "ternary":  # 27 distinct points: ties everywhere, then only distance-0 ties remain
        return rng.integers(-1, 2, size=(1500, 3)).astype(np.float32)
    if kind == "binary":
        return rng.integers(0, 2, size=(1000, 12)).astype(np.float32)
    base = rng.normal(size=(400, 6)).astype(np.float32)  # "duplicates": every point three times
    return np.concatenate([base, base[::-1], base])


@pytest.mark.parametrize("kind", ["normal", "ternary", "binary", "duplicates"])
@pytest.mark.parametrize("shuffle_seed", [None, 1])
def test_batched_fallback_matches_brute_force(kind: str, shuffle_seed: int | None) -> None:
    features = fallback_data(kind)
    n_select = min(len(features), 1200)
    order, _, counts = run_batched_fallback(features, n_select, start=7, shuffle_seed=shuffle_seed)
    np.testing.assert_array_equal(order, brute_force_greedy(features, n_select, 7))
    if kind == "normal":
        assert counts["passes"] < n_select / 8  # several picks per pass over the rows


@pytest.mark.parametrize("n_select", [1, 2, 3, 37, 300, 1001])
def test_batched_fallback_stops_anywhere_in_a_batch(n_select: int) -> None:
    features = fallback_data("normal")
    full = brute_force_greedy(features, 1001, 5)
    order, _, _ = run_batched_fallback(features, n_select, start=5, shuffle_seed=2)
    np.testing.assert_array_equal(order, full[:n_select])


def test_batched_fallback_is_the_same_on_any_number_of_threads() -> None:
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two threads")
    # More rows than one work item of a pass, so the rows are split between threads.
    features = np.random.default_rng(32).normal(size=(3 * coreset._PASS_ROWS + 5, 24)).astype(np.float32)
    features[::7] = features[3]  # duplicates, so ties cross the work items
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(run_batched_fallback(features, 1500, start=11, shuffle_seed=3))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])  # bit for bit
    np.testing.assert_array_equal(results[0][0], brute_force_greedy(features, 1500, 11))


@pytest.mark.parametrize("kind", ["normal", "ternary", "binary", "duplicates"])
def test_large_inputs_start_in_the_batched_loop_with_the_same_order(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At _DIRECT_ROWS rows and more the pruned search is skipped: its first picks scan every row on one
    # core. Lowered here so that a small problem takes that path; the pruned search must not run.
    features = fallback_data(kind)
    n_select = min(len(features), 700)
    expected = brute_force_greedy(features, n_select, 7)
    np.testing.assert_array_equal(greedy_coreset(features, n_select, projection_dim=None, start=7), expected)

    def refuse(*args: object) -> None:
        raise AssertionError("the pruned search ran")

    monkeypatch.setattr(coreset, "_DIRECT_ROWS", len(features))
    monkeypatch.setattr(coreset, "_greedy_kcenter", refuse)
    for k in (1, 2, n_select):
        got = greedy_coreset(features, k, projection_dim=None, start=7)
        np.testing.assert_array_equal(got, expected[:k])


def test_the_batched_start_takes_every_row_and_ties_to_the_lowest_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coreset, "_DIRECT_ROWS", 1)
    features = np.zeros((6, 3), dtype=np.float32)
    features[4] = 1.0
    np.testing.assert_array_equal(
        greedy_coreset(features, 6, projection_dim=None, start=2), [2, 4, 0, 1, 3, 5]
    )


@pytest.mark.parametrize("kind", ["normal", "binary", "duplicates"])
@pytest.mark.parametrize("threads", [1, 2])
def test_frozen_rows_come_back_in_time(kind: str, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Freeze as soon as 16 rows are far below the best value, so that on a small problem rows are frozen,
    # brought back and frozen again many times. The picks must still be the plain loop's.
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("needs two threads")
    monkeypatch.setattr(coreset, "_FREEZE_MIN", 16)
    features = fallback_data(kind)
    n_select = min(len(features), 1200)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        order, _, counts = run_batched_fallback(features, n_select, start=7, shuffle_seed=1)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(order, brute_force_greedy(features, n_select, 7))
    assert counts["frozen"] > 0 and counts["thawed"] > 0
    assert counts["pairs"] < 0.8 * len(features) * (n_select - 1)  # frozen rows skip passes


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_batch_pass_lowers_exactly_the_rows_a_center_comes_closer_to(offset: float) -> None:
    # Small integers, so every distance is exact. The sketch is the first 32 coordinates themselves (a
    # valid one: distances on them never exceed the true ones), not centred: far from the origin the
    # float32 dot products of the leading bound lose all precision, and the bound must let every pair
    # through. Half the rows sit exactly at their distance to a center: equal is not closer. 70 centers:
    # two full groups of 32 and a partial one.
    rng = np.random.default_rng(33)
    points = (rng.integers(-3, 4, size=(5000, 40)) + offset).astype(np.float32)
    picked = rng.choice(5000, 70, replace=False)
    centers = np.ascontiguousarray(points[picked])
    x = points.astype(np.float64)
    exact = ((x[:, None, :] - centers[None].astype(np.float64)) ** 2).sum(axis=2)
    nearest = np.where(np.arange(5000) % 2 == 0, exact[:, 17], exact.min(axis=1) + rng.integers(0, 3, 5000))
    nearest[::11] = 0.0
    expected = np.minimum(nearest, exact.min(axis=1))
    sketch = np.ascontiguousarray(points[:, :32])
    rows = np.arange(5000)
    leading, norms = coreset._leading(sketch, rows), coreset._norms(sketch)
    n_blocks = -(-5000 // coreset._PASS_ROWS)
    top = (
        np.empty((n_blocks, 8)),
        np.empty((n_blocks, 8), dtype=np.int64),
        np.empty((n_blocks, 8), dtype=np.int64),
    )
    size = np.zeros(n_blocks, dtype=np.int64)
    coreset._batch_pass(
        points,
        sketch,
        leading,
        norms,
        centers,
        sketch[picked],
        norms[picked],
        0,
        70,
        nearest,
        rows,
        0.0,
        rows,
        *top,
        size,
    )
    np.testing.assert_array_equal(nearest, expected)
    # The pass also returns the 8 rows first in greedy order of each block, rows at distance 0 left out.
    for b in range(n_blocks):
        lo, hi = b * coreset._PASS_ROWS, min((b + 1) * coreset._PASS_ROWS, 5000)
        block = [r for r in range(lo, hi) if expected[r] > 0]
        best = sorted(block, key=lambda r: (-expected[r], r))[:8]
        assert sorted(top[2][b, : size[b]].tolist()) == sorted(best)
