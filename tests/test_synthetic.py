"""Tests for the procedural MVTec-layout dataset generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_cli.errors import ConfigError, OutputError
from patchcore_cli.synthetic import (
    CATEGORIES,
    DEFECT_TYPES,
    SyntheticSpec,
    add_defect,
    generate_dataset,
    generate_image,
)

SMALL = SyntheticSpec(image_size=64, n_train=3, n_test_good=2, n_test_defect_per_type=2)
ALL_DEFECTS = [(category, defect) for category in CATEGORIES for defect in DEFECT_TYPES[category]]
BT601 = np.array([0.299, 0.587, 0.114])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ BT601


def border_median(image: np.ndarray) -> float:
    lum = luma(image)
    return float(np.median(np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])))


def good_and_defective(category: str, defect: str, seed: int, size: int = 64):
    """The defective image and, from an identically seeded stream, the good image it was made from."""
    rng = np.random.default_rng(seed)
    image = generate_image(category, rng, size)
    defective, mask = add_defect(image, defect, rng)
    untouched = generate_image(category, np.random.default_rng(seed), size)
    return untouched, image, defective, mask


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "data", spec=SMALL, seed=3)


def test_layout_matches_mvtec(small_dataset: Path) -> None:
    assert names(small_dataset) == sorted([*CATEGORIES, "README.txt"])
    for category in CATEGORIES:
        folder = small_dataset / category
        assert names(folder / "train" / "good") == ["000.png", "001.png", "002.png"]
        assert names(folder / "test") == sorted(["good", *DEFECT_TYPES[category]])
        assert names(folder / "test" / "good") == ["000.png", "001.png"]
        assert names(folder / "ground_truth") == sorted(DEFECT_TYPES[category])
        for defect in DEFECT_TYPES[category]:
            assert names(folder / "test" / defect) == ["000.png", "001.png"]
            assert names(folder / "ground_truth" / defect) == ["000_mask.png", "001_mask.png"]


def test_images_and_masks_have_the_promised_format(small_dataset: Path) -> None:
    for image_path in small_dataset.rglob("test/*/*.png"):
        with Image.open(image_path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
        defect = image_path.parent.name
        if defect == "good":
            continue
        mask_path = image_path.parents[2] / "ground_truth" / defect / f"{image_path.stem}_mask.png"
        with Image.open(mask_path) as mask_image:
            assert (mask_image.mode, mask_image.size) == ("L", (64, 64))
            mask = np.asarray(mask_image)
        assert set(np.unique(mask)) == {0, 255}


def test_readme_names_the_seed(small_dataset: Path) -> None:
    text = (small_dataset / "README.txt").read_text()
    assert "synthetic" in text.lower()
    assert "seed 3" in text


def test_same_seed_gives_identical_bytes_other_seed_not(tmp_path: Path, small_dataset: Path) -> None:
    again = read_tree(generate_dataset(tmp_path / "again", spec=SMALL, seed=3))
    assert again == read_tree(small_dataset)
    other = read_tree(generate_dataset(tmp_path / "other", spec=SMALL, seed=4))
    assert other.keys() == again.keys()
    images = [name for name in again if name.endswith(".png")]
    assert all(other[name] != again[name] for name in images if "ground_truth" not in name)


def test_a_category_does_not_depend_on_the_others(tmp_path: Path, small_dataset: Path) -> None:
    alone_root = generate_dataset(tmp_path / "alone", categories=["washer"], spec=SMALL, seed=3)
    alone = read_tree(alone_root / "washer")
    assert alone == read_tree(small_dataset / "washer")


@pytest.mark.parametrize(("category", "defect"), ALL_DEFECTS)
def test_mask_is_exactly_the_changed_pixels(category: str, defect: str) -> None:
    for seed in range(6):
        untouched, image, defective, mask = good_and_defective(category, defect, seed)
        np.testing.assert_array_equal(image, untouched)  # add_defect leaves its input alone
        assert defective.shape == image.shape and defective.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        changed = (defective != untouched).any(axis=2)
        np.testing.assert_array_equal(mask, changed)
        assert mask.sum() >= 4
        # Visible: somewhere the change stands well above the sensor noise.
        assert np.abs(defective.astype(int) - untouched.astype(int)).max() >= 9


@pytest.mark.parametrize("defect", ["scratch", "color_shift", "hole"])
def test_washer_defects_land_on_the_part(defect: str) -> None:
    for seed in range(6):
        untouched, _, _, mask = good_and_defective("washer", defect, seed)
        # The metal is much brighter than the matte background the border shows.
        assert (luma(untouched)[mask] > border_median(untouched) + 30).mean() > 0.95


def test_missing_piece_replaces_metal_by_background() -> None:
    for seed in range(6):
        untouched, _, defective, mask = good_and_defective("washer", "missing_piece", seed)
        background = border_median(untouched)
        assert (luma(untouched)[mask] > background + 30).mean() > 0.5
        assert (np.abs(luma(defective)[mask] - background) < 20).mean() > 0.9


def test_color_shift_changes_hue_not_brightness() -> None:
    for seed in range(6):
        untouched, _, defective, mask = good_and_defective("washer", "color_shift", seed, size=128)
        before, after = untouched[mask].astype(float), defective[mask].astype(float)
        assert abs(luma(after).mean() - luma(before).mean()) < 2.5
        assert np.abs(after - before).max() >= 9


def test_thread_moves_the_weave_without_changing_its_colour() -> None:
    for seed in range(6):
        untouched, _, defective, mask = good_and_defective("fabric", "thread", seed, size=128)
        before, after = untouched[mask].astype(float), defective[mask].astype(float)
        assert np.abs(after.mean(axis=0) - before.mean(axis=0)).max() < 6
        assert np.abs(after - before).mean() > 10


def test_ridged_defects_are_small() -> None:
    for defect, limit in (("hairline", 0.004), ("chip", 0.002), ("dent", 0.02)):
        for seed in range(4):
            _, _, _, mask = good_and_defective("ridged", defect, seed, size=256)
            assert 0 < mask.mean() < limit, defect


@pytest.mark.parametrize("category", CATEGORIES)
def test_good_images_vary(category: str) -> None:
    images = np.stack([generate_image(category, np.random.default_rng(seed), 64) for seed in range(10)])
    assert images.shape == (10, 64, 64, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == 10
    assert images.astype(float).mean(axis=(1, 2, 3)).std() > 3  # illumination gain differs


def test_odd_sizes_and_non_square_defects_work() -> None:
    assert generate_image("ridged", np.random.default_rng(0), 97).shape == (97, 97, 3)
    patch = generate_image("fabric", np.random.default_rng(0), 96)[:48]
    for defect in DEFECT_TYPES["fabric"]:
        defective, mask = add_defect(patch, defect, np.random.default_rng(1))
        np.testing.assert_array_equal(mask, (defective != patch).any(axis=2))
        assert mask.any()


def test_global_statistics_do_not_separate_good_from_defective() -> None:
    """A trivial detector must fail: the defects are local, and good images vary more than defects shift."""
    from sklearn.metrics import roc_auc_score

    size = 128
    for category in CATEGORIES:
        train = np.stack([generate_image(category, np.random.default_rng([1, i]), size) for i in range(8)])
        median = np.median(train.astype(np.float32), axis=0)
        images, labels = [], []
        for i in range(12):
            images.append(generate_image(category, np.random.default_rng([2, i]), size))
            labels.append(0)
        for j, defect in enumerate(DEFECT_TYPES[category]):
            for i in range(4):
                rng = np.random.default_rng([3, j, i])
                images.append(add_defect(generate_image(category, rng, size), defect, rng)[0])
                labels.append(1)
        stack = np.stack(images).astype(np.float32)
        statistics = {
            "mean intensity": stack.mean(axis=(1, 2, 3)),
            "max |image - median good image|": np.abs(stack - median).max(axis=(1, 2, 3)),
        }
        for name, score in statistics.items():
            auroc = roc_auc_score(labels, score)
            # Either direction counts: a detector may flag low scores as well as high ones.
            assert max(auroc, 1 - auroc) < 0.9, f"{category}: {name} separates with AUROC {auroc:.3f}"


def test_bad_arguments_raise_domain_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown synthetic category 'bottle'"):
        generate_image("bottle", np.random.default_rng(0), 64)
    with pytest.raises(ConfigError, match="unknown synthetic defect type 'crack'"):
        add_defect(np.zeros((64, 64, 3), np.uint8), "crack", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="image_size"):
        SyntheticSpec(image_size=16)
    with pytest.raises(ConfigError, match="n_train"):
        SyntheticSpec(n_train=0)
    with pytest.raises(ConfigError, match="seed"):
        generate_dataset(tmp_path / "x", spec=SMALL, seed=-1)
    with pytest.raises(ConfigError, match="unknown synthetic category"):
        generate_dataset(tmp_path / "y", categories=["fabric", "bottle"], spec=SMALL)
    assert not (tmp_path / "y").exists()  # validated before anything is written


def test_refuses_to_write_into_a_non_empty_category(tmp_path: Path) -> None:
    (tmp_path / "washer").mkdir()
    (tmp_path / "washer" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        generate_dataset(tmp_path, spec=SMALL)
    assert names(tmp_path) == ["washer"]
    assert (tmp_path / "washer" / "keep.txt").read_text() == "mine"


def test_unwritable_root_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write"):
        generate_dataset(blocker / "data", spec=SMALL)
