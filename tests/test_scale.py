"""Fit in bounded memory (the embedding store, the hierarchical coreset) and `fit --update`.

References are computed here from the same embeddings with the plain in-memory functions (`greedy_coreset`
on an array, `TrainingPatches`), so each test pins what the streamed engine must reproduce exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from patchcore_cli.coreset import (
    apportion,
    budget_for,
    greedy_coreset,
    max_rows_for,
    provisional_keep,
    random_projection,
    working_set,
)
from patchcore_cli.store import ImageRows, Store, StoreWriter


def write_store(path, rows: np.ndarray) -> Store:
    with StoreWriter(path, rows.shape[1]) as writer:
        writer.append(rows)
        return writer.close()


# --- the store -----------------------------------------------------------------------------------------


def test_store_round_trip_take_view_and_images(tmp_path):
    rows = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    with StoreWriter(tmp_path / "s.npy", 7) as writer:
        writer.append(rows[:20])
        writer.append(rows[:0])
        writer.append(rows[20:])
        store = writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy", allow_pickle=False), rows)
    assert store.shape == (50, 7) and len(store) == 50
    np.testing.assert_array_equal(store[5:17], rows[5:17])
    picks = np.array([42, 3, 3, 17, 0])
    np.testing.assert_array_equal(store.take(picks), rows[picks])
    view = store.view(10, 30)
    assert view.shape == (20, 7)
    np.testing.assert_array_equal(view[2:5], rows[12:15])
    np.testing.assert_array_equal(view.take(np.array([19, 0])), rows[[29, 10]])
    images = ImageRows(store, [2, 9], [5, 11])  # ragged: image 2 has 5 rows, image 9 has 11
    np.testing.assert_array_equal(images[2], rows[:5])
    np.testing.assert_array_equal(images[9], rows[5:16])
    with pytest.raises(KeyError, match="image 3"):
        images[3]
    with pytest.raises(IndexError, match="contiguous"):
        store[::2]


def test_store_take_crosses_read_chunks(tmp_path, monkeypatch):
    from patchcore_cli import store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_ROWS", 7)
    rows = np.arange(300, dtype=np.float32).reshape(100, 3)
    store = write_store(tmp_path / "s.npy", rows)
    picks = np.random.default_rng(1).integers(0, 100, 60)
    np.testing.assert_array_equal(store.take(picks), rows[picks])


def test_store_writer_removes_its_file_on_error(tmp_path):
    path = tmp_path / "s.npy"
    with pytest.raises(KeyboardInterrupt), StoreWriter(path, 2) as writer:
        writer.append(np.zeros((2, 2)))
        raise KeyboardInterrupt
    assert not path.exists()
    writer = StoreWriter(path, 2)
    with pytest.raises(ValueError, match="takes rows of 2"):
        writer.append(np.zeros((2, 3)))
    writer.discard()
    assert not path.exists()


def test_store_refuses_a_truncated_or_foreign_file(tmp_path):
    np.save(tmp_path / "ints.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="not an embedding store"):
        Store(tmp_path / "ints.npy")
    write_store(tmp_path / "cut.npy", np.zeros((3, 2), dtype=np.float32))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="truncated"):
        Store(tmp_path / "cut.npy")


# --- the coreset over a store, and its budget ------------------------------------------------------------


def test_greedy_coreset_reads_a_store_like_the_array(tmp_path):
    rows = np.random.default_rng(1).standard_normal((3000, 40)).astype(np.float32)
    store = write_store(tmp_path / "s.npy", rows)
    for projection in (16, None):
        expected = greedy_coreset(rows, 300, projection, seed=5)
        np.testing.assert_array_equal(greedy_coreset(store, 300, projection, seed=5), expected)
        np.testing.assert_array_equal(greedy_coreset(store.view(0, 3000), 300, projection, seed=5), expected)
    np.testing.assert_array_equal(random_projection(store, 16, 5), random_projection(rows, 16, 5))


@pytest.mark.parametrize("kind", ["gaussian", "low-rank", "ties"])
def test_greedy_picks_are_a_prefix_of_a_larger_selection(kind):
    """A hierarchical fit trims each shard's picks to its share: that must be the smaller selection."""
    rng = np.random.default_rng(2)
    if kind == "gaussian":
        rows = rng.standard_normal((2500, 150)).astype(np.float32)
    elif kind == "low-rank":
        rows = (rng.standard_normal((2500, 4)) @ rng.standard_normal((4, 150))).astype(np.float32)
    else:
        rows = np.round(rng.standard_normal((600, 3))).astype(np.float32)
    larger = greedy_coreset(rows, len(rows) // 3, 128, seed=3, start=11)
    for k in (1, 7, 60, len(rows) // 3 - 1):
        np.testing.assert_array_equal(greedy_coreset(rows, k, 128, seed=3, start=11), larger[:k])


@pytest.mark.parametrize(
    ("total", "sizes", "expected"),
    [(10, [5, 5], [5, 5]), (7, [3, 3, 3], [3, 2, 2]), (1, [4, 4], [1, 0]), (9, [1, 2, 6], [1, 2, 6])],
)
def test_apportion_is_largest_remainder(total, sizes, expected):
    parts = apportion(total, np.array(sizes))
    assert parts.tolist() == expected and parts.sum() == total


@pytest.mark.parametrize("share", [0.01, 0.1, 0.37, 0.9])
def test_provisional_picks_cover_every_final_share(share):
    rng = np.random.default_rng(3)
    for _ in range(200):
        sizes = rng.integers(1, 500, rng.integers(2, 9))
        total = int(sizes.sum())
        target = min(total, max(1, round(share * total)))  # the one-pass bank size
        keeps = [provisional_keep(int(size), share) for size in sizes]
        assert (apportion(target, sizes) <= keeps).all()


def test_budget_arithmetic_is_consistent():
    width = 128
    assert max_rows_for(budget_for(1000, width), width) == 1000
    assert max_rows_for(budget_for(1000, width) - 1, width) == 999
    assert working_set(1000, 1000, width) <= budget_for(1000, width)
    assert max_rows_for(1024, width) == 0
