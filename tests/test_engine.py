"""The shared engine: batch-size independence, heatmap localisation, calibration from good images only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore_cli import config as config_mod
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit, threshold_from_scores
from patchcore_cli.errors import InputError
from patchcore_cli.geometry import Framing, preprocess
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


@pytest.mark.parametrize("search_rows", [1, 150, 10**9])
def test_batches_searched_together_give_the_same_results_in_order(
    fitted, washer, tmp_path, monkeypatch, search_rows
):
    # The backbone's batches (2 images, 64 patches each) are searched together once they hold
    # `_SEARCH_ROWS` patches: every batch on its own (1), about two at a time (150), all at the end. The
    # results, an unreadable file among them, come in input order, each handed on as it is scored.
    from patchcore_cli import engine

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = list_images([washer / "test"])
    paths = [*paths[:3], broken, *paths[3:]]
    reference = Scorer(fitted.bank, batch_size=2).score_paths(paths, keep_maps=True, skip_bad=True)
    monkeypatch.setattr(engine, "_SEARCH_ROWS", search_rows)
    searches = []
    real = Scorer._score_batch

    def counted(self, items, embeddings, keep_maps):
        searches.append(len(items))
        return real(self, items, embeddings, keep_maps)

    monkeypatch.setattr(Scorer, "_score_batch", counted)
    handed = []
    results = Scorer(fitted.bank, batch_size=2).score_paths(
        paths, keep_maps=True, skip_bad=True, on_result=handed.append
    )
    assert [r.path for r in results] == [r.path for r in handed] == [r.path for r in reference] == paths
    assert results[3].error is not None and results[3].score is None
    good = [i for i in range(len(paths)) if i != 3]
    for i in good:
        assert results[i].score == pytest.approx(reference[i].score, rel=1e-5)
        np.testing.assert_allclose(results[i].anomaly_map, reference[i].anomaly_map, rtol=1e-5, atol=1e-5)
    batches = -(-(len(paths) - 1) // 2)
    expected = {1: batches, 150: -(-batches // 2)}.get(search_rows, 1)
    assert len([n for n in searches if n]) == expected, searches


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


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_a_defect_of_another_hue_at_the_same_brightness_is_found(tmp_path, fmt):
    """Colour contrast survives decoding (PNG, and JPEG with its subsampled chroma), the resize and the
    normalisation: a square that differs from the part only in hue, at the same luma, is flagged and
    located. A pipeline that worked on grey levels would see no defect at all."""
    rng = np.random.default_rng(1)
    part, spot = np.array([170.0, 80.0, 80.0]), np.array([84.0, 120.0, 100.0])
    luma = np.array([0.299, 0.587, 0.114])  # the weights of Pillow's (and JPEG's) grey conversion
    assert abs(part @ luma - spot @ luma) < 0.5  # the premise: the same brightness

    def picture(with_spot: bool) -> Image.Image:
        pixels = part + rng.normal(0, 4, (96, 96, 3))
        if with_spot:
            pixels[56:76, 24:44] = spot + rng.normal(0, 4, (20, 20, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        picture(False).save(good / f"{i}.{fmt}", quality=90)
    tests = [tmp_path / f"good_test.{fmt}", tmp_path / f"defect.{fmt}"]
    picture(False).save(tests[0], quality=90)
    picture(True).save(tests[1], quality=90)
    grey = np.asarray(Image.open(tests[1]).convert("L"), dtype=float)
    assert abs(grey[60:72, 28:40].mean() - grey[:40].mean()) < 3  # the spot is invisible in grey
    config = config_mod.build(**{**TINY_CONFIG, "image_size": 96, "crop": 96, "coreset": 0.5})
    scorer = Scorer(fit(list_images([good]), config).bank)
    clean, defect = scorer.score_paths(tests, keep_maps=True)
    assert defect.anomalous and not clean.anomalous
    row, col = np.unravel_index(np.argmax(defect.anomaly_map), defect.anomaly_map.shape)
    assert 48 <= row <= 84 and 16 <= col <= 52


def test_threshold_is_mean_plus_k_std_of_good_scores():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    record = threshold_from_scores(scores, scores * 2, target_fpr=None, k=3.0)
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
    framing = Framing("crop", crop=48, image_size=64)
    geometry = framing.frame((200, 100))
    np.testing.assert_array_equal(framing.mask(mask, geometry), preprocess(image, 64, 48)[..., 0] >= 128)
    left, top, right, bottom = geometry.box
    assert (right - left) == pytest.approx(75.0) and (bottom - top) == pytest.approx(75.0)
    assert left == pytest.approx(62.5) and top == pytest.approx(12.5)


def test_whole_framing_keeps_what_the_crop_cuts_off():
    # A defect at the far right of a 2:1 image: the centre crop drops it, whole framing keeps it.
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 180:196] = True
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")
    crop = Framing("crop", crop=48, image_size=64)
    assert not crop.mask(mask, crop.frame((200, 100))).any()
    whole = preprocess(image, 64, 48, "whole")
    assert whole.shape == (48, 48, 3)
    framing = Framing("whole", crop=48, image_size=64)
    geometry = framing.frame((200, 100))
    kept = framing.mask(mask, geometry)
    np.testing.assert_array_equal(kept, whole[..., 0] >= 128)
    np.testing.assert_array_equal(framing.render(image, geometry)[0], whole)
    rows, cols = np.nonzero(kept)
    # x 180..196 of 200 -> 43.2..47.0 of 48; y 40..60 of 100 -> 19.2..28.8
    assert cols.min() >= 42 and rows.min() >= 18 and rows.max() <= 29
    assert geometry.box == (0.0, 0.0, 200.0, 100.0)


def test_whole_framing_finds_a_defect_at_the_edge(tmp_path):
    from patchcore_cli.report import map_to_original

    # Wide good images (3:1); the defect sits at the far left, where a centre crop would not look.
    rng = np.random.default_rng(1)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        base = np.full((64, 192, 3), 120.0) + rng.normal(0, 3, (64, 192, 3))
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(good / f"{i}.png")
    defect = np.full((64, 192, 3), 120.0) + rng.normal(0, 3, (64, 192, 3))
    defect[20:44, 4:28] = (np.indices((24, 24)).sum(0) % 2 * 255)[..., None]
    Image.fromarray(defect.clip(0, 255).astype(np.uint8)).save(tmp_path / "defect.png")
    scores = {}
    for framing in ("crop", "whole"):
        config = config_mod.build(**{**TINY_CONFIG, "image_size": 64, "crop": 64, "framing": framing})
        fitted = fit(list_images([good]), config)
        assert fitted.bank.config["framing"] == framing
        result = Scorer(fitted.bank).score_paths([tmp_path / "defect.png"], keep_maps=True)[0]
        scores[framing] = result.score
        full, inspected = map_to_original(result.anomaly_map, result.geometry)
        if framing == "whole":
            assert inspected.all() and full.shape == (64, 192)
            row, col = np.unravel_index(np.argmax(full), full.shape)
            assert 12 <= row <= 52 and col <= 40
        else:
            assert not inspected[:, :60].any()
    assert scores["whole"] > scores["crop"]


def test_banks_from_before_framing_and_weighting_keep_their_behaviour():
    config = config_mod.build(**TINY_CONFIG, framing="whole", stage_weighting="equal")
    fitted = config_mod.resolve_rows(config)
    stored = fitted.model_dict()  # as fit stores it: the row cap resolved
    assert config_mod.from_bank(stored).framing == "whole"
    assert config_mod.from_bank(stored).stage_weighting == "equal"
    del stored["framing"], stored["stage_weighting"], stored["patch_size"]  # a bank from before them
    old = config_mod.from_bank(stored)
    assert (old.framing, old.stage_weighting, old.patch_size) == ("crop", "none", 3)


def test_banks_from_before_the_map_peak_keep_the_largest_patch_score():
    stored = config_mod.resolve_rows(config_mod.build(**TINY_CONFIG)).model_dict()
    assert config_mod.from_bank(stored).image_score == "map"  # the default for new banks
    del stored["image_score"]
    assert config_mod.from_bank(stored).image_score == "patch"


@pytest.mark.parametrize("image_score", ["map", "patch"])
def test_image_score_is_the_peak_it_names_in_scoring_and_in_calibration(washer, image_score):
    """Without the eq. 7 weight (b = 1), the image score is s* itself: the peak of the image's anomaly
    map ("map") or its largest patch score ("patch"), in `score` and in the leave-one-out calibration
    alike, so that the threshold is on the same scale as the scores."""
    config = config_mod.build(**TINY_CONFIG, num_neighbors=1, image_score=image_score)
    result = fit(list_images([washer / "train" / "good"]), config)
    assert result.bank.config["image_score"] == image_score
    sample = result.bank.calibration_sample
    scores, maxima = np.array(sample["scores"]), np.array(sample["map_maxima"])
    results = Scorer(result.bank).score_paths(list_images([washer / "test"]), keep_maps=True)
    scored = np.array([r.score for r in results])
    peaks = np.array([r.anomaly_map.max() for r in results])
    if image_score == "map":
        np.testing.assert_allclose(scores, maxima, rtol=1e-6)
        np.testing.assert_allclose(scored, peaks, rtol=1e-6)
    else:  # the blur lowers a lone peak: the largest patch score lies above the map's
        assert (scores > maxima).all() and (scored > peaks).all()


def test_patch_size_is_the_neighbourhood_each_feature_is_averaged_over():
    import torch

    from patchcore_cli.features import embed

    torch.manual_seed(0)
    maps = [torch.randn(1, 4, 9, 9), torch.randn(1, 6, 9, 9)]
    single = embed(maps, 1024, patch_size=1).reshape(9, 9, 10)
    five = embed(maps, 1024, patch_size=5).reshape(9, 9, 10)
    # Away from the border, p = 5 is the mean of the 5 x 5 block of p = 1 features (zero padding counts).
    np.testing.assert_allclose(five[4, 4, :4], single[2:7, 2:7, :4].mean((0, 1)), rtol=1e-5, atol=1e-6)
    assert embed(maps, 1024).shape == five.reshape(1, 81, 10).shape


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


def test_equal_stage_weighting_balances_the_distance_without_losing_channels():
    import torch

    from patchcore_cli.features import embed

    torch.manual_seed(0)
    # Two stages of unit-variance noise, 40 and 112 channels, on the same grid.
    maps = [torch.randn(4, 40, 8, 8), torch.randn(4, 112, 8, 8)]
    plain = embed(maps, 1024).reshape(-1, 152)
    equal = embed(maps, 1024, weighting="equal").reshape(-1, 152)
    # Nothing is averaged away: each stage's columns are its plain columns times one factor.
    np.testing.assert_allclose(equal[:, :40], plain[:, :40] * np.sqrt(76 / 40), rtol=1e-6)
    np.testing.assert_allclose(equal[:, 40:], plain[:, 40:] * np.sqrt(76 / 112), rtol=1e-6)

    def stage_shares(rows):
        diff = (rows[1:] - rows[:-1]) ** 2
        return float(diff[:, :40].sum()), float(diff[:, 40:].sum())

    low, high = stage_shares(plain)
    assert high > 2.5 * low  # unweighted, the wide stage dominates the distance
    low, high = stage_shares(equal)
    assert 0.8 < high / low < 1.25  # weighted, the two stages weigh about the same
    # Pooled to equal shares, the widths already match: the weighting changes nothing.
    np.testing.assert_array_equal(embed(maps, 96, weighting="equal").numpy(), embed(maps, 96).numpy())


def test_fit_with_three_layers_and_random_reduction(washer):
    config = config_mod.build(
        **{**TINY_CONFIG, "layers": "layer1,layer2,layer3", "dim": 48, "reduction": "random"}
    )
    fitted = fit(list_images([washer / "train" / "good"]), config)
    assert fitted.bank.memory_bank.shape[1] == 48
    assert fitted.n_patches == 8 * 16 * 16  # layer1 has stride 4: 16 x 16 patches at a 64 px crop
    result = Scorer(fitted.bank).score_paths(list_images([washer / "test" / "hole"]), keep_maps=True)[0]
    assert result.anomaly_map.shape == (64, 64)


@pytest.mark.slow
def test_auto_crop_follows_the_training_images_and_the_bank_keeps_the_side(tmp_path):
    from patchcore_cli.data import ImageBytes
    from patchcore_cli.engine import shorter_sides

    rng = np.random.default_rng(0)
    for i, size in enumerate([(400, 330), (330, 360), (500, 340), (90, 120)]):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = sorted(tmp_path.glob("*.png"))
    assert shorter_sides(paths) == [330, 330, 340, 90]  # the unreadable file is decoding's to report
    data = ImageBytes("mem://0.png", (tmp_path / "0.png").read_bytes())
    assert shorter_sides([data]) == [330]
    good = paths[:4]
    options = {k: v for k, v in TINY_CONFIG.items() if k != "crop"}
    config = config_mod.build(**options, crop="auto", coreset=0.05, calibration_images=4)
    fitted = fit(good, config)
    assert fitted.bank.config["crop"] == 320  # median shorter side 340 reaches 320, not 448
    assert fitted.bank.config["coreset_max_rows"] == 25 * 40 * 40  # auto: 25 views of layer2's grid at 320
    assert "max_crop" not in fitted.bank.config
    scorer = Scorer(fitted.bank)
    assert scorer.config.crop == 320
    small = config_mod.build(**options, crop="auto", coreset=0.05, max_crop=448)
    assert config_mod.resolve_crop(small, shorter_sides(good)).crop == 320
