"""Fit in bounded memory (the embedding store, the hierarchical coreset) and `fit --update`.

References are computed here from the same embeddings with the plain in-memory functions (`greedy_coreset`
on an array, `TrainingPatches`), so each test pins what the streamed engine must reproduce exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchcore_cli import bank as bank_io
from patchcore_cli import config as config_mod
from patchcore_cli import coreset, engine
from patchcore_cli.cli import app
from patchcore_cli.coreset import (
    apportion,
    bank_size,
    budget_for,
    greedy_coreset,
    max_rows_for,
    provisional_keep,
    random_projection,
    shard_start,
    working_set,
)
from patchcore_cli.data import list_images
from patchcore_cli.errors import BankError, ConfigError, InputError, WeightsError
from patchcore_cli.sharding import MAX_MEMORY, Shard, ShardedCoreset, default_max_memory, picks, plan
from patchcore_cli.store import ImageRows, Store, StoreWriter
from tests.conftest import TINY_CONFIG, TINY_OPTIONS

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, code: int, *fragments: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


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


@pytest.mark.parametrize("share", [0.01, 0.1, 0.9])
@pytest.mark.parametrize("cap", [1, 7, 50, 400])
def test_capped_provisional_picks_cover_every_final_share(share, cap):
    """With a cap on the bank, a shard picks for the rows seen so far (streamed) or for all of them
    (planned): either way enough for its part, and planned never more than its part + 1."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        sizes = rng.integers(1, 500, rng.integers(2, 9))
        total = int(sizes.sum())
        target = bank_size(total, share, cap)
        assert target == min(total, max(1, round(share * total)), cap)
        parts = apportion(target, sizes)
        streamed = [
            provisional_keep(int(size), share, cap, int(seen))
            for size, seen in zip(sizes, sizes.cumsum(), strict=True)
        ]
        planned = [provisional_keep(int(size), share, cap, total) for size in sizes]
        assert (parts <= streamed).all() and (parts <= planned).all()
        assert (np.array(planned) <= parts + 2).all()


def test_bank_size_without_a_cap_is_the_share():
    assert bank_size(1000, 0.1) == bank_size(1000, 0.1, 0) == 100
    assert bank_size(1000, 0.1, 60) == 60 and bank_size(1000, 0.1, 500) == 100
    assert bank_size(3, 0.1, 5) == 1 and bank_size(3, 1.0, 2) == 2


def test_budget_arithmetic_is_consistent():
    width = 128
    assert max_rows_for(budget_for(1000, width), width) == 1000
    assert max_rows_for(budget_for(1000, width) - 1, width) == 999
    assert working_set(1000, 1000, width) <= budget_for(1000, width)
    assert max_rows_for(1024, width) == 0


# --- the sharded coreset, on arrays ----------------------------------------------------------------------


def shard_runs(counts: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Row ranges of the shards a stream of images (`counts` rows each) is cut into: an image starts a new
    shard when it would take the current one past max_rows."""
    runs, lo, at = [], 0, 0
    for count in counts:
        if at + count - lo > max_rows:
            runs.append((lo, at))
            lo = at
        at += count
    return [*runs, (lo, at)]


def reference_coreset(rows, counts, max_rows, share, projection, seed, target=None) -> np.ndarray:
    """The hierarchical coreset written out with plain `greedy_coreset` calls on arrays: the stream row
    indices of the bank rows, in bank order."""
    runs = shard_runs(counts, max_rows)
    target = max(1, round(share * len(rows))) if target is None else target
    if len(runs) == 1:
        return greedy_coreset(rows, target, projection, seed)
    parts = apportion(target, np.array([hi - lo for lo, hi in runs]))
    picks = []
    for index, ((lo, hi), part) in enumerate(zip(runs, parts, strict=True)):
        if part:
            start = shard_start(seed, index, hi - lo)
            picks.append(lo + greedy_coreset(rows[lo:hi], int(part), projection, seed, start=start))
    return np.concatenate(picks)


def run_sharded(tmp_path, rows, counts, budget, share=0.1, projection=8, seed=3, target=None, split=0):
    """A ShardedCoreset fed `rows` image by image (`counts`), its first `split` rows splittable."""
    shards = ShardedCoreset(tmp_path, rows.shape[1], share, projection, seed, budget, engine.Timings())
    if split:
        shards.add(rows[:split])
    at = split
    for number, count in enumerate(counts):
        shards.add(rows[at : at + count], f"image-{number}")
        at += count
    chosen = shards.finish(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # shards and picks are deleted as they go
    return chosen


def test_sharded_coreset_within_budget_is_one_greedy_pass(tmp_path):
    rng = np.random.default_rng(4)
    counts = rng.integers(20, 60, 30).tolist()
    rows = rng.standard_normal((sum(counts), 24)).astype(np.float32)
    chosen = run_sharded(tmp_path, rows, counts, budget=budget_for(len(rows), 8))
    expected = greedy_coreset(rows, round(0.1 * len(rows)), 8, 3)
    assert chosen.passes == 1
    np.testing.assert_array_equal(chosen.source, expected)
    np.testing.assert_array_equal(chosen.rows, rows[expected])


@pytest.mark.parametrize("max_rows", [150, 400, 1000])
def test_sharded_coreset_equals_the_reference_of_its_shards(tmp_path, max_rows):
    rng = np.random.default_rng(5)
    counts = rng.integers(20, 60, 40).tolist()  # ragged images, as with aspect or tile framing
    rows = rng.standard_normal((sum(counts), 24)).astype(np.float32)
    chosen = run_sharded(tmp_path, rows, counts, budget=budget_for(max_rows, 8))
    expected = reference_coreset(rows, counts, max_rows, 0.1, 8, 3)
    assert chosen.passes == len(shard_runs(counts, max_rows)) > 1
    assert len(chosen.source) == round(0.1 * len(rows))  # the one-pass size
    np.testing.assert_array_equal(chosen.source, expected)
    np.testing.assert_array_equal(chosen.rows, rows[expected])


@pytest.mark.parametrize("expected", [False, True], ids=["streamed", "total-known"])
def test_capped_sharded_coreset_is_the_reference_with_fewer_picks(tmp_path, expected):
    """A cap below the share: the bank is the hierarchical coreset of `cap` rows, the same whether or not
    the total was known up front; knowing it, each shard picks no more than its part + 1."""
    rng = np.random.default_rng(5)
    counts = rng.integers(20, 60, 40).tolist()
    rows = rng.standard_normal((sum(counts), 24)).astype(np.float32)
    cap = 61  # the share would keep round(0.1 * rows) = 150-ish
    shards = ShardedCoreset(
        tmp_path, 24, 0.1, 8, 3, budget_for(400, 8), engine.Timings(), cap=cap,
        expected=len(rows) if expected else 0,
    )  # fmt: skip
    at = 0
    for number, count in enumerate(counts):
        shards.add(rows[at : at + count], f"image-{number}")
        at += count
    uncapped = [provisional_keep(size, 0.1) for size in shards.sizes]
    chosen = shards.finish()
    assert len(chosen.source) == cap < round(0.1 * len(rows))
    np.testing.assert_array_equal(chosen.source, reference_coreset(rows, counts, 400, 0.1, 8, 3, target=cap))
    parts = apportion(cap, np.array([hi - lo for lo, hi in shard_runs(counts, 400)]))
    kept = np.array(shards.kept[:-1])
    assert (kept <= np.array(uncapped)).all() and kept.sum() < sum(uncapped)
    if expected:
        assert (np.array(shards.kept) <= parts + 2).all()


def test_sharded_coreset_refuses_fewer_rows_than_expected(tmp_path):
    shards = ShardedCoreset(
        tmp_path, 24, 0.1, 8, 3, budget_for(400, 8), engine.Timings(), cap=5, expected=100
    )
    shards.add(np.ones((50, 24), dtype=np.float32), "image-0")
    with pytest.raises(ValueError, match="fewer than the 100 expected"):
        shards.finish()


def test_sharded_coreset_splits_rows_given_without_an_image(tmp_path):
    """An update streams the old bank's rows first; they may be cut anywhere, its images may not."""
    rng = np.random.default_rng(6)
    counts = [40] * 10
    rows = rng.standard_normal((330 + 400, 24)).astype(np.float32)
    target = 150
    chosen = run_sharded(
        tmp_path, rows, counts, budget_for(100, 8), share=target / len(rows), target=target, split=330
    )
    expected = reference_coreset(rows, [1] * 330 + counts, 100, 0, 8, 3, target=target)
    np.testing.assert_array_equal(chosen.source, expected)


def test_sharded_coreset_keeping_everything_keeps_the_order(tmp_path):
    rows = np.random.default_rng(7).standard_normal((300, 24)).astype(np.float32)
    chosen = run_sharded(tmp_path, rows, [30] * 10, budget_for(100, 8), share=1.0)
    assert chosen.passes == 4
    np.testing.assert_array_equal(chosen.source, np.arange(300))


@pytest.mark.parametrize(
    ("max_rows", "share", "cap"),
    [
        (150, 0.1, 0),
        (400, 0.1, 0),
        (10**4, 0.1, 0),
        (100, 1.0, 0),
        (90, 0.003, 0),
        (150, 0.1, 40),
        (10**4, 0.5, 9),
    ],
)
def test_plan_cuts_the_shards_and_picks_of_a_sharded_coreset(tmp_path, max_rows, share, cap):
    """Planned before any row is seen, then taken shard by shard with `picks`: the streamed coreset."""
    rng = np.random.default_rng(9)
    counts = rng.integers(20, 60, 40).tolist()
    rows = rng.standard_normal((sum(counts), 24)).astype(np.float32)
    budget = budget_for(max_rows, 8)
    streamed = ShardedCoreset(tmp_path, 24, share, 8, 3, budget, engine.Timings(), cap=cap)
    at = 0
    for number, count in enumerate(counts):
        streamed.add(rows[at : at + count], f"image-{number}")
        at += count
    chosen = streamed.finish()
    shards = plan(counts, [f"image-{i}" for i in range(len(counts))], share, 24, 8, budget, cap)
    assert sum(s.part for s in shards) == bank_size(len(rows), share, cap)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    assert [(s.lo, s.hi) for s in shards] == [
        (int(np.searchsorted(offsets, lo)), int(np.searchsorted(offsets, hi)))
        for lo, hi in shard_runs(counts, max_rows)
    ]
    assert len(shards) == chosen.passes and [s.rows for s in shards] == [
        hi - lo for lo, hi in shard_runs(counts, max_rows)
    ]
    assert (shards[0].index is None) == (len(shards) == 1)
    source = []
    for shard in reversed(shards):  # in any order: each pass depends only on its rows and its index
        lo, hi = offsets[shard.lo], offsets[shard.hi]
        taken = picks(rows[lo:hi], shard.keep, shard.index, share, 8, 3)
        assert len(taken) == shard.keep >= shard.part
        source.insert(0, lo + taken[: shard.part])
    np.testing.assert_array_equal(np.concatenate(source), chosen.source)


def test_plan_refuses_an_image_larger_than_one_pass_as_the_stream_does(tmp_path):
    budget = budget_for(50, 8)
    with pytest.raises(ConfigError) as planned:
        plan([30, 64, 70], ["a.png", "b.png", "c.png"], 0.1, 24, 8, budget)
    streamed = ShardedCoreset(tmp_path, 24, 0.1, 8, 3, budget, engine.Timings())
    streamed.add(np.zeros((30, 24), np.float32), "a.png")
    with pytest.raises(ConfigError) as added:
        streamed.add(np.zeros((64, 24), np.float32), "b.png")
    assert planned.value.message == added.value.message
    assert "one image's 64 patches (b.png)" in planned.value.message


def test_sharded_coreset_refuses_an_image_larger_than_one_pass(tmp_path):
    shards = ShardedCoreset(tmp_path, 24, 0.1, 8, 3, budget_for(50, 8), engine.Timings())
    with pytest.raises(ConfigError, match=r"too small for the coreset of one image's 64 patches \(a\.png\)"):
        shards.add(np.zeros((64, 24), np.float32), "a.png")
    with pytest.raises(
        ConfigError, match=r"100 B is too small for the coreset of one patch; give at least 1\.6 KB"
    ):
        ShardedCoreset(tmp_path, 24, 0.1, 8, 3, 100, engine.Timings()).add(np.zeros((3, 24)))


# --- the streamed fit ------------------------------------------------------------------------------------

PATCHES = 64  # 64 px crop, stride 8: 8 x 8 patches per image
WIDTH = 128  # distances on the 128-d projection of the 384-d tiny embeddings
TWO_IMAGES = budget_for(2 * PATCHES, WIDTH)  # a coreset budget of two images per greedy pass


@pytest.fixture(scope="module")
def config():
    return config_mod.build(**TINY_CONFIG)


@pytest.fixture(scope="module")
def train(washer):
    return list_images([washer / "train" / "good"])


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """Six images of different shapes: with framing "aspect" their patch counts differ."""
    folder = tmp_path_factory.mktemp("ragged")
    rng = np.random.default_rng(8)
    for number, size in enumerate([(96, 96), (150, 96), (96, 160), (200, 100), (120, 96), (96, 96)]):
        pixels = rng.integers(90, 160, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number}.png")
    return list_images([folder])


def training_patches(paths, config) -> engine.TrainingPatches:
    """Every patch of `paths` in memory, embedded the way a fit embeds them: today's in-RAM fit."""
    extractor = engine.Extractor(config)
    batches = engine.embed_paths(paths, [extractor], engine.Timings(), engine._Silent(), 10**8)
    return engine.TrainingPatches.collect(batches)


def reference_fit(paths, config, max_rows: int):
    """(bank rows, calibration record) of a fit, from in-memory patches and plain greedy passes."""
    training = training_patches(paths, config)
    counts = np.diff(training.offsets).tolist()
    selected = reference_coreset(
        training.rows, counts, max_rows, config.coreset, config.projection_dim, config.seed
    )
    bank = training.rows[selected]
    source = training.image_of_row[selected]
    scores, maps = engine.leave_one_out(training, bank, source, config, engine._Silent())
    return bank, engine.calibrate(scores, maps, config), training


def test_streamed_fit_within_its_budget_is_the_in_memory_fit(train, config, tmp_path):
    """The one-pass path, bit for bit: the same greedy pass over the same rows, the same calibration."""
    training = training_patches(train, config)
    n_select = round(config.coreset * len(training.rows))
    selected = greedy_coreset(training.rows, n_select, config.projection_dim, config.seed)
    scores, maps = engine.leave_one_out(
        training, training.rows[selected], training.image_of_row[selected], config, engine._Silent()
    )
    result = engine.fit(train, config, max_memory=2**30, work_dir=tmp_path)
    assert result.coreset_passes == [1]
    np.testing.assert_array_equal(result.bank.memory_bank, training.rows[selected])
    assert result.bank.calibration == engine.calibrate(scores, maps, config)
    np.testing.assert_array_equal(result.calibration_scores, scores)
    assert result.bank.n_patches == len(training.rows) == 8 * PATCHES
    assert result.bank.calibration_sample == engine.sample_record(scores, maps)
    assert list(tmp_path.iterdir()) == []


def test_hierarchical_fit_equals_the_reference_of_its_shards(train, config, tmp_path):
    result = engine.fit(train, config, max_memory=TWO_IMAGES, work_dir=tmp_path)
    bank, calibration, _ = reference_fit(train, config, 2 * PATCHES)
    assert result.coreset_passes == [4]
    np.testing.assert_array_equal(result.bank.memory_bank, bank)
    assert result.bank.memory_bank.shape[0] == round(config.coreset * 8 * PATCHES)
    assert result.bank.calibration == calibration
    assert list(tmp_path.iterdir()) == []


def test_capped_fit_is_the_reference_coreset_of_cap_rows(train, config, tmp_path):
    """A cap below the share, in one pass and in shards: the greedy coreset of `cap` rows, stored in the
    bank's config, and a bank without the field (fitted before it existed) had no cap."""
    training = training_patches(train, config)
    capped = dataclasses.replace(config, coreset_max_rows=17)
    one = engine.fit(train, capped, work_dir=tmp_path)
    np.testing.assert_array_equal(
        one.bank.memory_bank,
        training.rows[greedy_coreset(training.rows, 17, config.projection_dim, config.seed)],
    )
    sharded = engine.fit(train, capped, max_memory=TWO_IMAGES, work_dir=tmp_path)
    reference = reference_coreset(
        training.rows,
        [PATCHES] * 8,
        2 * PATCHES,
        config.coreset,
        config.projection_dim,
        config.seed,
        target=17,
    )
    np.testing.assert_array_equal(sharded.bank.memory_bank, training.rows[reference])
    assert one.bank.config["coreset_max_rows"] == 17
    stored = {key: value for key, value in one.bank.config.items() if key != "coreset_max_rows"}
    assert config_mod.from_bank(stored).coreset_max_rows == 0


def test_coreset_max_rows_must_not_be_negative():
    for value in (-1, -3, "-3", "many"):  # auto is spelled auto, never -1
        with pytest.raises(ConfigError, match=r"coreset_max_rows must be auto, 0 \(no cap\)"):
            config_mod.build(**TINY_CONFIG, coreset_max_rows=value)


@pytest.mark.parametrize("budget", [None, 3 * 96], ids=["one-pass", "shards"])
def test_streamed_fit_of_ragged_images_equals_the_reference(ragged, config, tmp_path, budget):
    """Framing "aspect": images with 64 to 128 patches each, shards cut between images."""
    config = dataclasses.replace(config, framing="aspect")
    max_rows = 10**9 if budget is None else budget
    result = engine.fit(
        ragged, config, max_memory=budget_for(max_rows, WIDTH) if budget else None, work_dir=tmp_path
    )
    bank, calibration, training = reference_fit(ragged, config, max_rows)
    assert len(set(np.diff(training.offsets).tolist())) > 3  # ragged indeed
    assert result.coreset_passes == [len(shard_runs(np.diff(training.offsets).tolist(), max_rows))]
    np.testing.assert_array_equal(result.bank.memory_bank, bank)
    assert result.bank.calibration == calibration
    assert list(tmp_path.iterdir()) == []


def fit_apart(paths, config, budget, tmp_path):
    """A fit planned from the images' patch counts, its shards fitted one by one in reverse order and
    put together: what `fit --ray` does, without Ray."""
    names = [str(path) for path in paths]
    extractor = engine.Extractor(config)
    views = engine.view_sizes(config)
    views = [views] * len(paths) if views else engine.frame_images(paths, config, 10**8)
    counts, jobs = engine.plan_fit(names, config, extractor, views, budget)
    fits = [
        engine.fit_shard(paths[job.first : job.last], config, job, 10**8, tmp_path) for job in reversed(jobs)
    ][::-1]
    assert list(tmp_path.iterdir()) == []
    member = engine.fit_from_shards(
        names, config, extractor, jobs, fits, counts, engine.Timings(), engine._Silent()
    )
    return engine.combine_members([member], config, len(paths), engine.Timings()), jobs


@pytest.mark.parametrize(
    ("framing", "max_rows", "cap"),
    [
        ("whole", 7 * PATCHES, 0),
        ("whole", None, 0),
        ("aspect", 3 * 96, 0),
        ("tile", 1600, 0),
        ("whole", 3 * PATCHES, 20),
        ("aspect", 3 * 96, 25),
    ],
)
def test_shards_fitted_apart_give_the_streamed_fit(train, ragged, config, tmp_path, framing, max_rows, cap):
    """Bit for bit: bank rows, calibration, patch count, passes and the stored sample (None: the default
    budget, one pass), with and without a cap on the bank's rows. A pass of seven of the eight square
    images leaves the last shard one image, which resnet18 embeds differently in a batch of its own: its
    job embeds the whole batch around it."""
    paths = train if framing == "whole" else ragged
    config = dataclasses.replace(
        config, framing=framing, tile_size=48 if framing == "tile" else 0, coreset_max_rows=cap
    )
    budget = default_max_memory() if max_rows is None else budget_for(max_rows, WIDTH)
    apart, jobs = fit_apart(paths, config, budget, tmp_path)
    streamed = engine.fit(paths, config, max_memory=budget, work_dir=tmp_path)
    assert apart.coreset_passes == streamed.coreset_passes == [len(jobs)]
    assert (len(jobs) > 1) == (max_rows is not None)
    np.testing.assert_array_equal(apart.bank.memory_bank, streamed.bank.memory_bank)
    assert apart.bank.calibration == streamed.bank.calibration
    assert apart.bank.calibration_sample == streamed.bank.calibration_sample
    assert apart.n_patches == streamed.n_patches == apart.bank.n_patches
    assert apart.bank.config == streamed.bank.config
    if cap:
        assert len(apart.bank.memory_bank) == cap < round(config.coreset * apart.n_patches)
    if max_rows == 7 * PATCHES:
        assert [(job.shard.lo, job.shard.hi, job.first, job.last) for job in jobs] == [
            (0, 7, 0, 8),
            (7, 8, 0, 8),
        ]


def test_fit_from_shards_refuses_other_weights_and_other_counts(config):
    """A worker with other weights, or an image whose patch count changed since the plan: no bank."""
    extractor = engine.Extractor(config)
    job = engine.ShardJob(Shard(None, 0, 2, 128, 12, 12), 0, 2, ())
    rows = np.zeros((12, extractor.dim), np.float32)
    part = engine.ShardFit(rows, np.arange(12), [64, 64], [[(8, 8)]] * 2, [], [], "0123456789abcdef")
    args = (["a.png", "b.png"], config, extractor, [job], [part])
    with pytest.raises(WeightsError, match="a worker found weights with sha256 0123456789ab, this machine"):
        engine.fit_from_shards(*args, [64, 64], engine.Timings(), engine._Silent())
    part.weights_sha256 = extractor.loaded.weights_sha256
    with pytest.raises(InputError, match=r"^b\.png: 64 patches when fitted, 80 when the shards were planned"):
        engine.fit_from_shards(*args, [64, 80], engine.Timings(), engine._Silent())


def test_batch_bounds_follow_embed_paths():
    assert engine.batch_bounds([1] * 10, 4) == [0, 4, 8, 10]
    assert engine.batch_bounds([1] * 8, 4) == [0, 4, 8]
    assert engine.batch_bounds([3, 3, 9, 1, 1], 4) == [0, 2, 3, 5]  # a batch ends once it holds 4 views
    assert engine.batch_bounds([], 4) == [0]


def test_fit_removes_its_work_files_on_error(train, config, tmp_path, monkeypatch):
    seen = []

    def fail(*args, **kwargs):
        seen.append(sorted(p.name for p in tmp_path.glob(".patchcore-work-*/*")))
        raise RuntimeError("boom")

    monkeypatch.setattr(coreset, "greedy_coreset", fail)
    with pytest.raises(RuntimeError, match="boom"):
        engine.fit(train, config, max_memory=TWO_IMAGES, work_dir=tmp_path)
    assert seen == [["calibration.npy", "picks.npy", "shard-0.npy"]]  # the first shard, being reduced
    assert list(tmp_path.iterdir()) == []


class _InterruptAfter:
    """A progress sink that presses Ctrl-C once `count` images have been embedded."""

    def __init__(self, count: int, folder: Path) -> None:
        self.count, self.folder, self.stage, self.files = count, folder, "", []

    def start(self, stage: str, total: int | None) -> None:
        self.stage = stage

    def advance(self, count: int = 1) -> None:
        if self.stage == "features":
            self.count -= count
            if self.count <= 0:
                self.files = sorted(p.name for p in self.folder.glob(".patchcore-work-*/*"))
                raise KeyboardInterrupt


def test_ctrl_c_in_the_middle_of_a_streamed_fit_leaves_no_work_files(train, config, tmp_path):
    config = dataclasses.replace(config, batch_size=1)
    progress = _InterruptAfter(5, tmp_path)  # two shards reduced, the third holding image 4
    with pytest.raises(KeyboardInterrupt):
        engine.fit(train, config, progress, max_memory=TWO_IMAGES, work_dir=tmp_path)
    assert progress.files == ["calibration.npy", "picks.npy", "shard-2.npy"]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_streamed_fit_from_the_cli_keeps_the_old_bank(washer, tmp_path, monkeypatch):
    out = tmp_path / "bank.st"
    good = washer / "train" / "good"
    assert invoke("fit", good, "--out", out, *TINY_OPTIONS).exit_code == 0
    before = out.read_bytes()
    real, calls = coreset.greedy_coreset, []

    def second_shard_interrupts(*args, **kwargs):
        calls.append(sorted(p.name for p in tmp_path.glob(".patchcore-work-*/*")))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(coreset, "greedy_coreset", second_shard_interrupts)
    result = invoke("fit", good, "--out", out, "--max-memory", TWO_IMAGES, *TINY_OPTIONS)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert calls[1] == ["calibration.npy", "picks.npy", "shard-1.npy"]
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.st"]


def test_work_dir_holds_the_work_files(washer, tmp_path, monkeypatch):
    work, seen = tmp_path / "scratch", []
    work.mkdir()
    real = coreset.greedy_coreset

    def look(*args, **kwargs):
        seen.append(sorted(p.name for p in work.glob(".patchcore-work-*/*.npy")))
        return real(*args, **kwargs)

    monkeypatch.setattr(coreset, "greedy_coreset", look)
    out = tmp_path / "bank.st"
    result = invoke("fit", washer / "train" / "good", "--out", out, "--work-dir", work, *TINY_OPTIONS)
    assert result.exit_code == 0, result.output
    assert seen == [["calibration.npy", "picks.npy", "shard-0.npy"]]  # in --work-dir, not beside --out
    assert list(work.iterdir()) == []
    missing = invoke(
        "fit", washer / "train" / "good", "--out", out, "--work-dir", tmp_path / "no", *TINY_OPTIONS
    )
    assert_refused(missing, 6, str(tmp_path / "no"), "cannot create a work folder")


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("lots", ["--max-memory", "cannot read 'lots'", "2GB"]),
        ("0", ["--max-memory", "must be positive"]),
        ("1KB", ["--max-memory 1.0 KB is too small", "one image's 64 patches", "000.png", "give at least"]),
    ],
)
def test_bad_max_memory_is_exit_2(washer, tmp_path, value, fragments):
    result = invoke(
        "fit", washer / "train" / "good", "--out", tmp_path / "b.st", "--max-memory", value, *TINY_OPTIONS
    )
    assert_refused(result, 2, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_default_budget_is_a_bounded_share_of_memory():
    assert 0 < default_max_memory() <= MAX_MEMORY == 2**30


def test_fit_reports_its_coreset_passes(washer, tmp_path):
    good = washer / "train" / "good"
    result = invoke(
        "fit", good, "--out", tmp_path / "b.st", "--max-memory", TWO_IMAGES, *TINY_OPTIONS, "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["coreset_passes"] == [4] and report["bank_rows"] == 51 and report["bank_images"] == 8
    table = invoke("fit", good, "--out", tmp_path / "b.st", "--max-memory", TWO_IMAGES, *TINY_OPTIONS)
    assert "4 shards (--max-memory)" in table.stdout


def test_fit_caps_the_bank_from_the_cli_and_says_so(washer, tmp_path):
    good = washer / "train" / "good"
    args = ("fit", good, "--out", tmp_path / "b.st", *TINY_OPTIONS)
    result = invoke(*args, "--coreset-max-rows", "20", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bank_rows"] == 20
    assert bank_io.load(tmp_path / "b.st").config["coreset_max_rows"] == 20
    assert (
        "capped at 20 rows (--coreset-max-rows): 3.91% of the patches"
        in invoke(*args, "--coreset-max-rows", "20").stdout
    )
    assert "capped" not in invoke(*args, "--coreset-max-rows", "51").stdout  # the share is 51 rows
    bad = invoke(*args, "--coreset-max-rows", "-3")
    assert bad.exit_code == 2 and "coreset_max_rows must be auto, 0 (no cap)" in bad.output


def test_benchmark_takes_the_budget(washer):
    result = invoke(
        "benchmark", "folder", "--good", washer / "test" / "good", "--train", washer / "train" / "good",
        "--defect", washer / "test" / "hole", "--no-pixel-metrics", "--max-memory", TWO_IMAGES,
        *TINY_OPTIONS, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["bank_rows"] == 51


# --- fit --update --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halves(train):
    return train[:4], train[4:]


@pytest.fixture(scope="module")
def old_bank(halves, config, tmp_path_factory):
    path = tmp_path_factory.mktemp("update") / "old.st"
    bank_io.save(engine.fit(halves[0], config).bank, path)
    return path


def reference_update(old: bank_io.Bank, paths, config, max_rows: int = 10**9):
    """(bank rows, calibration record) of an update, from in-memory patches and plain greedy passes."""
    new = training_patches(paths, config)
    both = np.concatenate([old.memory_bank, new.rows])
    old_rows = len(old.memory_bank)
    target = round(config.coreset * (old.n_patches + len(new.rows)))
    counts = [1] * old_rows + np.diff(new.offsets).tolist()  # old rows may be cut anywhere
    selected = reference_coreset(both, counts, max_rows, 0, config.projection_dim, config.seed, target=target)
    source = np.where(selected < old_rows, -1, new.image_of_row[np.maximum(selected - old_rows, 0)])
    stored = old.calibration_sample
    k_old, k_new = engine._update_sample_sizes(
        len(stored["scores"]), old.n_train_images, len(paths), config.calibration_images
    )
    scores, maps = engine.leave_one_out(new, both[selected], source, config, engine._Silent(), count=k_new)
    kept = engine.calibration_sample(len(stored["scores"]), k_old, config.seed)
    fresh = engine.sample_record(scores, maps)
    pooled = np.concatenate([np.array(stored["scores"])[kept], fresh["scores"]])
    maxima = np.concatenate([np.array(stored["map_maxima"])[kept], fresh["map_maxima"]])
    calibration = engine.threshold_from_scores(pooled, maxima, config.target_fpr, config.threshold_sigma)
    return both[selected], calibration, selected


def test_update_is_the_coreset_of_old_rows_and_new_patches(old_bank, halves, config, tmp_path):
    old = bank_io.load(old_bank)
    result = engine.update(old, halves[1], str(old_bank), work_dir=tmp_path)
    rows, calibration, selected = reference_update(old, halves[1], config)
    np.testing.assert_array_equal(result.bank.memory_bank, rows)
    assert result.bank.calibration == calibration
    assert result.bank.n_patches == old.n_patches + 4 * PATCHES == 8 * PATCHES
    assert result.bank.n_train_images == 8 and result.n_images == 4
    assert result.bank.memory_bank.shape[0] == round(config.coreset * 8 * PATCHES)  # a refit's size
    assert result.bank.config == old.config and result.bank.weights_sha256 == old.weights_sha256
    assert result.coreset_passes == [1]
    # Old rows that survive are the old rows, bit for bit.
    from_old = selected < len(old.memory_bank)
    assert 0 < from_old.sum() < len(selected)
    np.testing.assert_array_equal(result.bank.memory_bank[from_old], old.memory_bank[selected[from_old]])
    assert list(tmp_path.iterdir()) == []


def test_hierarchical_update_equals_the_reference(old_bank, halves, config):
    old = bank_io.load(old_bank)
    result = engine.update(old, halves[1], str(old_bank), max_memory=TWO_IMAGES)
    rows, calibration, _ = reference_update(old, halves[1], config, max_rows=2 * PATCHES)
    assert result.coreset_passes[0] > 1
    np.testing.assert_array_equal(result.bank.memory_bank, rows)
    assert result.bank.calibration == calibration


def test_update_recalibrates_by_the_banks_rule(old_bank, halves):
    """Target FPR by default; a bank fitted with the sigma rule keeps it."""
    old = bank_io.load(old_bank)
    updated = engine.update(old, halves[1], str(old_bank)).bank.calibration
    assert updated["target_fpr"] == 0.02 and updated["n_images"] == 8
    sigma = dataclasses.replace(old, config={**old.config, "target_fpr": None})
    record = engine.update(sigma, halves[1], str(old_bank)).bank.calibration
    assert record["target_fpr"] is None and record["threshold_sigma"] == 3.0
    assert record["image_threshold"] == pytest.approx(record["image_mean"] + 3.0 * record["image_std"])


@pytest.mark.parametrize(
    ("stored", "n_old", "n_new", "count", "expected"),
    [
        (4, 4, 4, 75, (4, 4)),  # everything fits the sample: every old score, every new image
        (75, 200, 3, 75, (74, 1)),  # a few confirmed false alarms count by their number
        (75, 200, 200, 75, (37, 38)),
        (75, 200, 1, 75, (75, 0)),
        (5, 200, 10, 75, (5, 4)),  # the bank stored fewer scores than its share: all of them
    ],
)
def test_update_sample_counts_old_and_new_images_by_their_numbers(stored, n_old, n_new, count, expected):
    assert engine._update_sample_sizes(stored, n_old, n_new, count) == expected


def test_update_is_deterministic_and_without_images_the_identity(old_bank, halves):
    old = bank_io.load(old_bank)
    first = engine.update(old, halves[1], str(old_bank))
    second = engine.update(bank_io.load(old_bank), halves[1], str(old_bank))
    np.testing.assert_array_equal(first.bank.memory_bank, second.bank.memory_bank)
    assert first.bank.calibration == second.bank.calibration
    assert engine.update(old, [], str(old_bank)).bank is old


def test_update_refuses_settings_that_contradict_the_bank(old_bank, halves):
    old = bank_io.load(old_bank)
    with pytest.raises(ConfigError, match=r"coreset 0\.2 \(bank: 0\.1\), crop 96 \(bank: 64\)"):
        engine.update(old, halves[1], str(old_bank), options={"coreset": 0.2, "crop": 96, "seed": 42})
    with pytest.raises(ConfigError, match=r"target_fpr 0\.05 \(bank: 0\.02\)"):
        engine.update(old, halves[1], str(old_bank), options={"target_fpr": 0.05})
    with pytest.raises(ConfigError, match=r"backbone 'resnet50' \(bank: 'resnet18'\)"):
        engine.update(old, halves[1], str(old_bank), options={"backbone": "resnet50"})
    # Settings equal to the bank's, and run-time ones, are fine.
    engine.update(old, [], str(old_bank), options={"backbone": "resnet18", "seed": 42, "batch_size": 3})


def test_update_refuses_other_weights(old_bank, halves):
    old = bank_io.load(old_bank)
    other = dataclasses.replace(old, weights_sha256="0" * 64)
    with pytest.raises(BankError, match="pass the same --weights"):
        engine.update(other, halves[1], "other.st", weights="random")


def test_update_refuses_a_bank_without_a_calibration_sample(old_bank):
    old = bank_io.load(old_bank)
    with pytest.raises(BankError, match="refit it once"):
        engine.update(dataclasses.replace(old, calibration_sample=None), [], "old.st")
    with pytest.raises(BankError, match="refit it once"):
        engine.update(dataclasses.replace(old, n_patches=None), [], "old.st")


def test_update_refuses_an_ensemble(old_bank, halves):
    old = bank_io.load(old_bank)
    ensemble = dataclasses.replace(
        old, config={**old.config, "backbone": "resnet18+resnet50"}, members=[old, old]
    )
    with pytest.raises(BankError, match="ensemble bank"):
        engine.update(ensemble, halves[1], "ens.st")


def test_bank_keeps_its_patch_count_and_calibration_sample(old_bank, tmp_path):
    old = bank_io.load(old_bank)
    assert old.n_patches == 4 * PATCHES and len(old.calibration_sample["scores"]) == 4
    for damage, problem in [
        ({"n_patches": -25}, "bad n_patches '-25'"),
        ({"calibration_sample": {"scores": [1.0, 2.0], "map_maxima": [1.0]}}, "bad calibration_sample"),
        ({"calibration_sample": {"scores": [1.0, True], "map_maxima": [1, 2]}}, "bad calibration_sample"),
        ({"calibration_sample": {"scores": [1.0, 10**400], "map_maxima": [1, 2]}}, "bad calibration_sample"),
    ]:
        bank_io.save(dataclasses.replace(old, **damage), tmp_path / "bad.st")
        with pytest.raises(BankError, match=problem):
            bank_io.load(tmp_path / "bad.st")


def test_update_from_the_cli(old_bank, halves, tmp_path):
    path = tmp_path / "bank.st"
    shutil.copy(old_bank, path)
    before = path.read_bytes()
    refused = invoke("fit", "--update", path, *halves[1], "--coreset", "0.3")
    assert_refused(refused, 2, str(path), "--update keeps the bank's settings", "coreset 0.3 (bank: 0.1)")
    assert path.read_bytes() == before
    result = invoke("fit", "--update", path, *halves[1], "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bank"] == str(path) and report["images"] == 4 and report["bank_images"] == 8
    assert bank_io.load(path).n_train_images == 8
    assert [p.name for p in tmp_path.iterdir()] == ["bank.st"]
    table = invoke("fit", "--update", path, *halves[1][:1], "--out", tmp_path / "more.st")
    assert table.exit_code == 0, table.output
    assert "1 new, 9 in all" in table.stdout
    assert bank_io.load(path).n_train_images == 8  # --out: the bank it started from is unchanged


def test_operator_loop_a_confirmed_image_scores_lower_after_the_update(old_bank, washer, tmp_path):
    """`score` flags an image, an operator confirms it is good, `fit --update` adds it."""
    path = tmp_path / "bank.st"
    shutil.copy(old_bank, path)
    confirmed = washer / "test" / "scratch" / "000.png"

    def score() -> float:
        result = invoke("score", confirmed, "--bank", path, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["results"][0]["score"]

    before = score()
    assert invoke("fit", "--update", path, confirmed).exit_code == 0
    assert score() < before


def test_ctrl_c_during_an_update_keeps_the_bank(old_bank, halves, tmp_path, monkeypatch):
    path = tmp_path / "bank.st"
    shutil.copy(old_bank, path)
    before = path.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "leave_one_out", interrupt)
    result = invoke("fit", "--update", path, *halves[1])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.st"]


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda p: None, ["bank file not found"]),
        (lambda p: p.write_bytes(b"not a bank"), ["not a bank file"]),
    ],
    ids=["missing", "corrupt"],
)
def test_update_with_a_bad_bank_is_exit_4(halves, tmp_path, damage, fragments):
    path = tmp_path / "bank.st"
    damage(path)
    assert_refused(invoke("fit", "--update", path, *halves[1]), 4, str(path), *fragments)
