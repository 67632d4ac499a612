"""The shared engine: batch-size independence, heatmap localisation, calibration from good images only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore_cli import config as config_mod
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit, threshold_from_scores
from patchcore_cli.errors import InputError
from patchcore_cli.features import crop_geometry, preprocess, preprocess_mask
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def fitted(washer):
    config = config_mod.build(**TINY_CONFIG)
    return fit(list_images([washer / "train" / "good"]), config)


def test_bank_shape_follows_coreset_ratio(fitted):
    bank = fitted.bank
    assert fitted.n_images == 8
    assert fitted.n_patches == 8 * 8 * 8  # 64 px crop, stride 8 -> 8 x 8 patches per image
    assert bank.memory_bank.shape == (round(0.1 * fitted.n_patches), 128 + 256)
    assert bank.config["backbone"] == "resnet18" and bank.config["layers"] == ["layer2", "layer3"]


def test_scores_do_not_depend_on_batch_size(fitted, washer):
    paths = list_images([washer / "test"])
    runs = []
    for batch_size in (1, 3, 16):
        scorer = Scorer(fitted.bank, batch_size=batch_size)
        results = scorer.score_paths(paths, keep_maps=True)
        runs.append((np.array([r.score for r in results]), np.stack([r.anomaly_map for r in results])))
    for scores, maps in runs[1:]:
        np.testing.assert_allclose(scores, runs[0][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(maps, runs[0][1], rtol=1e-5, atol=1e-5)


def test_heatmap_peaks_at_the_defect(tmp_path):
    # Good images: smooth grey-level gradients with noise. The defect: a bright checkered square.
    rng = np.random.default_rng(0)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        base = np.linspace(90, 150, 96)[None, :, None] + rng.normal(0, 3, (96, 96, 3))
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(good / f"{i}.png")
    defect = np.linspace(90, 150, 96)[None, :, None] + rng.normal(0, 3, (96, 96, 3))
    checker = (np.indices((16, 16)).sum(0) % 2 * 255)[..., None]
    defect[60:76, 20:36] = checker
    Image.fromarray(defect.clip(0, 255).astype(np.uint8)).save(tmp_path / "defect.png")
    config = config_mod.build(**{**TINY_CONFIG, "image_size": 96, "crop": 96, "coreset": 0.5})
    result = Scorer(fit(list_images([good]), config).bank).score_paths(
        [tmp_path / "defect.png"], keep_maps=True
    )[0]
    row, col = np.unravel_index(np.argmax(result.anomaly_map), result.anomaly_map.shape)
    assert 52 <= row <= 84 and 12 <= col <= 44
    assert result.anomalous


def test_threshold_is_mean_plus_k_std_of_good_scores():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    record = threshold_from_scores(scores, scores * 2, k=3.0)
    assert record["image_threshold"] == pytest.approx(2.5 + 3 * scores.std(ddof=1))
    assert record["calibration_fpr"] == 0.0
    assert record["n_images"] == 4


def test_fit_refuses_a_single_image(washer):
    one = list_images([washer / "train" / "good"])[:1]
    with pytest.raises(InputError, match="at least 2"):
        fit(one, config_mod.build(**TINY_CONFIG))


def test_mask_follows_the_image_transform():
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 90:110] = True
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")
    np.testing.assert_array_equal(preprocess_mask(mask, 64, 48), preprocess(image, 64, 48)[..., 0] >= 128)
    geometry = crop_geometry((200, 100), 64, 48)
    left, top, right, bottom = geometry.box
    assert (right - left) == pytest.approx(75.0) and (bottom - top) == pytest.approx(75.0)
    assert left == pytest.approx(62.5) and top == pytest.approx(12.5)


def test_ensemble_bank_round_trips_and_scores(washer, tmp_path):
    from patchcore_cli import bank as bank_io

    config = config_mod.build(**{**TINY_CONFIG, "backbone": "resnet18+efficientnet_lite0"})
    fitted = fit(list_images([washer / "train" / "good"]), config)
    assert [m.config["backbone"] for m in fitted.bank.members] == ["resnet18", "efficientnet_lite0"]
    assert fitted.bank.rows == sum(m.memory_bank.shape[0] for m in fitted.bank.members)
    path = tmp_path / "ensemble.st"
    bank_io.save(fitted.bank, path)
    loaded = bank_io.load(path)
    for saved, original in zip(loaded.members, fitted.bank.members, strict=True):
        np.testing.assert_array_equal(np.asarray(saved.memory_bank), original.memory_bank)
        assert saved.calibration == original.calibration
    paths = list_images([washer / "test"])
    direct = Scorer(fitted.bank, extractors=fitted.extractors).score_paths(paths, keep_maps=True)
    reloaded = Scorer(loaded).score_paths(paths, keep_maps=True)
    np.testing.assert_allclose([r.score for r in direct], [r.score for r in reloaded], rtol=1e-5)
    # Combined scores are in good-std units: the calibration images average about zero.
    assert abs(fitted.bank.calibration["image_mean"]) < 1e-6
    assert direct[0].anomaly_map.shape == (64, 64)


def test_ensemble_refuses_a_single_weights_file(tmp_path):
    from patchcore_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="fits one backbone"):
        config_mod.build(backbone="resnet18+resnet50", weights=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("reduction", ["avgpool", "random"])
def test_three_stages_reduced_to_dim(washer, reduction):
    import torch

    from patchcore_cli.features import embed

    # Stage k's values sit near 10 * k, so the columns show where they came from.
    maps = [torch.rand(2, 24, 16, 16) + 10, torch.rand(2, 40, 8, 8) + 20, torch.rand(2, 112, 4, 4) + 30]
    out = embed(maps, 96, reduction, seed=1)
    assert out.shape == (2, 16 * 16, 96)
    np.testing.assert_array_equal(out.numpy(), embed(maps, 96, reduction, seed=1).numpy())  # seeded
    assert embed(maps, 512, reduction).shape == (2, 256, 176)  # enough room: no reduction at all
    if reduction == "avgpool":  # each stage keeps an equal share of 32 columns, in stage order
        interior = out.reshape(2, 16, 16, 96)[:, 6:10, 6:10]  # away from the zero-padded border
        for stage in range(3):
            block = interior[..., 32 * stage : 32 * (stage + 1)]
            assert 10 * (stage + 1) < float(block.min()) and float(block.max()) < 10 * (stage + 1) + 1


def test_fit_with_three_layers_and_random_reduction(washer):
    config = config_mod.build(
        **{**TINY_CONFIG, "layers": "layer1,layer2,layer3", "dim": 48, "reduction": "random"}
    )
    fitted = fit(list_images([washer / "train" / "good"]), config)
    assert fitted.bank.memory_bank.shape[1] == 48
    assert fitted.n_patches == 8 * 16 * 16  # layer1 has stride 4: 16 x 16 patches at a 64 px crop
    result = Scorer(fitted.bank).score_paths(list_images([washer / "test" / "hole"]), keep_maps=True)[0]
    assert result.anomaly_map.shape == (64, 64)
