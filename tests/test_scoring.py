"""Nearest-neighbour distances, the eq. 7 image score and the smoothed anomaly map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from patchcore_cli.scoring import NearestNeighbours, anomaly_map, gaussian_blur, image_score


def test_distances_are_euclidean_and_exact():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(7, 6)).astype(np.float32)
    distances, indices = NearestNeighbours(bank).search(queries, 3)
    brute = np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=2)
    np.testing.assert_array_equal(indices, np.argsort(brute, axis=1)[:, :3])
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :3], rtol=1e-4)


def test_eq7_reweighting_matches_a_hand_computation():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]], dtype=np.float32)
    patches = np.array([[0.1, 0.0], [0.0, -3.0]], dtype=np.float32)
    search = NearestNeighbours(bank)
    distances, nearest = search.search(patches, 1)
    # Worst patch (0, -3) -> m* = (0, 0) at distance 3; N_b(m*) for b = 3 is (0,0), (1,0), (0,2).
    gaps = np.array([3.0, np.hypot(1.0, 3.0), 5.0])
    expected = (1 - np.exp(gaps[0]) / np.exp(gaps).sum()) * 3.0
    assert image_score(patches, distances[:, 0], nearest[:, 0], search, 3) == pytest.approx(
        expected, rel=1e-5
    )
    assert image_score(patches, distances[:, 0], nearest[:, 0], search, 1) == pytest.approx(3.0)

    # image_score "map": the map's peak takes the place of s*, with the worst patch's eq. 7 weight.
    d, n = distances[:, 0], nearest[:, 0]
    assert image_score(patches, d, n, search, 3, peak=2.5) == pytest.approx(expected / 3.0 * 2.5, rel=1e-5)
    assert image_score(patches, d, n, search, 1, peak=2.5) == 2.5


@pytest.mark.parametrize("size", [224, 37, 6])
def test_blur_matches_scipy_mirror_mode(size):
    maps = torch.rand(2, 1, size, size)
    ours = gaussian_blur(maps, 4.0)[1, 0].numpy()
    np.testing.assert_allclose(
        ours, gaussian_filter(maps[1, 0].double().numpy(), 4.0, mode="mirror"), atol=1e-5
    )


def test_anomaly_map_keeps_the_peak_where_the_patch_is():
    scores = torch.zeros(1, 28, 28)
    scores[0, 20, 5] = 10.0
    amap = anomaly_map(scores, 224, sigma=4.0)[0]
    row, col = np.unravel_index(int(torch.argmax(amap)), amap.shape)
    assert abs(row - (20 + 0.5) * 8) <= 4 and abs(col - (5 + 0.5) * 8) <= 4


@pytest.mark.parametrize("k", [1, 4])
def test_exact_search_equals_faiss(k):
    rng = np.random.default_rng(1)
    bank, queries = (
        rng.normal(size=(300, 20)).astype(np.float32),
        rng.normal(size=(40, 20)).astype(np.float32),
    )
    ours, theirs = NearestNeighbours(bank, "exact"), NearestNeighbours(bank, "faiss")
    (d1, i1), (d2, i2) = ours.search(queries, k), theirs.search(queries, k)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_hnsw_finds_most_true_neighbours():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 16)) * 5
    bank = (centres[rng.integers(0, 20, 2000)] + rng.normal(size=(2000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 20, 200)] + rng.normal(size=(200, 16))).astype(np.float32)
    exact = NearestNeighbours(bank, "exact").search(queries)[1]
    approx = NearestNeighbours(bank, "hnsw").search(queries)[1]
    assert (exact == approx).mean() > 0.9


def test_wide_banks_are_searched_exactly():
    rng = np.random.default_rng(0)
    bank, queries = (
        rng.normal(size=(200, 1024)).astype(np.float32),
        rng.normal(size=(9, 1024)).astype(np.float32),
    )
    distances, indices = NearestNeighbours(bank, "exact").search(queries, 1)
    brute = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64), axis=2)
    np.testing.assert_array_equal(indices[:, 0], brute.argmin(1))
    np.testing.assert_allclose(distances[:, 0], brute.min(1), rtol=1e-6)


def test_skip_is_for_the_exact_index_only():
    bank = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="cannot leave rows out"):
        NearestNeighbours(bank, "faiss").search(bank, 1, np.zeros(4, np.int64))
