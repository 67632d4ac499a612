"""Metrics against independent references: scikit-learn, hand counts, brute-force loops over thresholds."""

from __future__ import annotations

import bisect
import math
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, roc_curve

from patchcore_cli.metrics import (
    aupro,
    f1_max_threshold,
    image_auroc,
    image_metrics,
    image_roc_curve,
    per_defect_auroc,
    pixel_auroc,
    pixel_metrics,
    pixel_roc_curve,
    thresholded_metrics,
)

# ---------------------------------------------------------------- references


def regions_8_connected(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Connected components of a 2-D bool mask by flood fill, diagonal neighbours included."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, region = deque([start]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def trapezoid_up_to(xs: list[float], ys: list[float], x_max: float) -> float:
    """Trapezoid area of a curve with non-decreasing xs from xs[0] to x_max, y interpolated at x_max."""
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 <= x_max:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            last = bisect.bisect_right(xs, x_max) - 1  # the last point at or left of x_max
            x0, y0, x1, y1 = xs[last], ys[last], xs[last + 1], ys[last + 1]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            return area + 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """PRO and FPR recomputed from scratch at every distinct score, then integrated."""
    regions = [(i, region) for i, mask in enumerate(masks) for region in regions_8_connected(mask)]
    good = ~masks
    xs, ys = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        flagged = maps >= t
        xs.append(int((flagged & good).sum()) / int(good.sum()))
        overlaps = [sum(bool(flagged[i][p]) for p in region) / len(region) for i, region in regions]
        ys.append(sum(overlaps) / len(overlaps))
    return trapezoid_up_to(xs, ys, fpr_limit) / fpr_limit


def random_blob_masks(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """N x H x W masks of random rectangles plus scattered pixels, so regions touch diagonally too."""
    masks = np.zeros((n, height, width), dtype=bool)
    for mask in masks:
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, height), rng.integers(0, width)
            mask[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = True
        mask |= rng.random((height, width)) < 0.05
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, levels: int | None) -> np.ndarray:
    """Scores that lean towards the masks; `levels` quantises them to force ties, None keeps them distinct."""
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps


# ---------------------------------------------------------------- image AUROC


def test_image_auroc_hand_example_with_ties() -> None:
    # pairs (anomalous, good): 0.5>0.1 wins, 0.5=0.5 draws, 0.9 beats both -> (1 + 0.5 + 2) / 4
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(0.875)


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(40) + 0.3 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_image_auroc_single_class_is_nan(labels: list[int]) -> None:
    assert math.isnan(image_auroc(np.array(labels, dtype=int), np.arange(len(labels), dtype=float)))


@pytest.mark.parametrize(
    ("labels", "scores"),
    [([0, 1], [0.1]), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, float("nan")]), ([[0, 1]], [[0.1, 0.2]])],
)
def test_image_inputs_are_validated(labels: list, scores: list) -> None:
    with pytest.raises(ValueError):
        image_auroc(np.array(labels), np.array(scores))


# ---------------------------------------------------------------- per-defect AUROC


def test_per_defect_auroc_one_good_image_one_defect_type() -> None:
    result = per_defect_auroc(["crack", "good", "crack"], np.array([0.9, 0.5, 0.2]))
    assert result == {"crack": pytest.approx(0.5)}


def test_per_defect_auroc_compares_each_type_with_good_only() -> None:
    types = ["good", "good", "scratch", "scratch", "hole", "good"]
    scores = np.array([0.1, 0.4, 0.3, 0.9, 0.05, 0.2])
    # scratch 0.3 beats 0.1 and 0.2, 0.9 beats all three -> 5/6; hole 0.05 beats none -> 0
    assert per_defect_auroc(types, scores) == {"hole": 0.0, "scratch": pytest.approx(5 / 6)}


def test_per_defect_auroc_without_good_images_is_nan() -> None:
    result = per_defect_auroc(["crack", "hole"], np.array([0.3, 0.4]))
    assert list(result) == ["crack", "hole"]
    assert all(math.isnan(value) for value in result.values())


# ---------------------------------------------------------------- thresholds


def test_thresholded_metrics_hand_counted() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.7, 0.2, 0.5, 0.9, 0.3])
    # flagged (>= 0.5): good 0.5 and 0.7 (fp = 2), anomalous 0.5 and 0.9 (tp = 2); 0.3 is missed (fn = 1)
    result = thresholded_metrics(labels, scores, 0.5)
    assert result == {
        "threshold": 0.5,
        "balanced_accuracy": pytest.approx((2 / 3 + 2 / 4) / 2),
        "f1": pytest.approx(2 * 2 / (2 * 2 + 2 + 1)),
        "precision": pytest.approx(0.5),
        "recall": pytest.approx(2 / 3),
        "tpr": pytest.approx(2 / 3),
        "fpr": pytest.approx(0.5),
        "tp": 2,
        "fp": 2,
        "tn": 2,
        "fn": 1,
    }
    assert all(type(result[key]) is int for key in ("tp", "fp", "tn", "fn"))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, scores >= 0.5))
    assert result["f1"] == pytest.approx(f1_score(labels, scores >= 0.5))


def test_thresholded_metrics_nothing_flagged() -> None:
    result = thresholded_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 1.0)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (0, 0, 1, 2)
    assert result["precision"] == 0.0
    assert result["f1"] == 0.0
    assert result["recall"] == 0.0
    assert result["fpr"] == 0.0
    assert result["balanced_accuracy"] == pytest.approx(0.5)


def test_thresholded_metrics_only_good_images() -> None:
    result = thresholded_metrics(np.array([0, 0, 0, 0]), np.array([0.1, 0.2, 0.3, 0.9]), 0.25)
    assert math.isnan(result["tpr"]) and math.isnan(result["recall"])
    assert result["fpr"] == pytest.approx(0.5)
    assert result["balanced_accuracy"] == pytest.approx(0.5)  # the TNR alone: one class present
    assert result["f1"] == 0.0
    nothing_flagged = thresholded_metrics(np.array([0, 0]), np.array([0.1, 0.2]), 0.5)
    assert math.isnan(nothing_flagged["f1"])
    assert nothing_flagged["balanced_accuracy"] == 1.0


def exhaustive_f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    best_threshold, best_f1 = math.nan, -1.0
    for t in sorted(set(scores.tolist())):  # ascending, so ">" keeps the lowest of equal F1s
        flagged = scores >= t
        tp = int((flagged & (labels == 1)).sum())
        precision = tp / int(flagged.sum())
        recall = tp / int((labels == 1).sum())
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 > best_f1 + 1e-12:
            best_threshold, best_f1 = t, f1
    return best_threshold, best_f1


@pytest.mark.parametrize("seed", range(8))
def test_f1_max_threshold_matches_exhaustive_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[0] = 1
    scores = np.round(rng.random(30) + 0.4 * labels, 1)  # coarse rounding: many ties
    threshold, f1 = f1_max_threshold(labels, scores)
    expected_threshold, expected_f1 = exhaustive_f1_max(labels, scores)
    assert threshold == expected_threshold
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert f1 == pytest.approx(f1_score(labels, scores >= threshold), abs=1e-12)


def test_f1_max_threshold_edge_cases() -> None:
    assert f1_max_threshold(np.array([0, 1, 1]), np.array([0.2, 0.5, 0.7])) == (0.5, 1.0)
    # 0.3 flags both images (F1 = 2/3); 0.9 flags only the good one (F1 = 0)
    assert f1_max_threshold(np.array([1, 0]), np.array([0.3, 0.9])) == (0.3, pytest.approx(2 / 3))
    assert f1_max_threshold(np.array([1, 1]), np.array([0.4, 0.6])) == (0.4, 1.0)
    # 0.9 catches one anomaly of two (F1 2/3), 0.3 both with two false alarms (4/6): the lower one wins
    assert f1_max_threshold(np.array([1, 0, 0, 1]), np.array([0.9, 0.7, 0.5, 0.3])) == (
        0.3,
        pytest.approx(2 / 3),
    )
    assert all(math.isnan(value) for value in f1_max_threshold(np.array([0, 0]), np.array([0.4, 0.6])))


# ---------------------------------------------------------------- image_metrics


def test_image_metrics_bundles_the_image_level_metrics() -> None:
    types = ["good", "good", "crack", "hole", "crack"]
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.5, 0.9, 0.7])
    result = image_metrics(labels, scores, types, calibrated_threshold=0.55)
    assert set(result) == {"image_auroc", "per_defect_auroc", "calibrated", "oracle"}
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["per_defect_auroc"] == per_defect_auroc(types, scores)
    assert result["calibrated"] == thresholded_metrics(labels, scores, 0.55)
    oracle_threshold, oracle_f1 = f1_max_threshold(labels, scores)
    assert result["oracle"]["threshold"] == oracle_threshold
    assert result["oracle"]["f1"] == pytest.approx(oracle_f1)

    uncalibrated = image_metrics(labels, scores, types, calibrated_threshold=None)
    assert uncalibrated["calibrated"] is None


def test_image_metrics_only_good_images() -> None:
    result = image_metrics(np.array([0, 0]), np.array([0.1, 0.2]), ["good", "good"], 0.15)
    assert math.isnan(result["image_auroc"])
    assert result["per_defect_auroc"] == {}
    assert result["oracle"] is None
    assert result["calibrated"]["fp"] == 1


def test_image_metrics_rejects_labels_that_contradict_defect_types() -> None:
    with pytest.raises(ValueError, match="defect type"):
        image_metrics(np.array([0, 0]), np.array([0.1, 0.2]), ["good", "crack"], None)
    with pytest.raises(ValueError):
        image_metrics(np.array([0, 1]), np.array([0.1, 0.2]), ["good"], None)


# ---------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("levels", [None, 5])
def test_pixel_auroc_matches_sklearn(levels: int | None) -> None:
    rng = np.random.default_rng(7)
    masks = random_blob_masks(rng, 4, 20, 24)
    maps = random_maps(rng, masks, levels).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_hand_example_with_ties() -> None:
    masks = np.array([[[False, False], [True, True]]])
    maps = np.array([[[0.1, 0.5], [0.5, 0.9]]])
    assert pixel_auroc(masks, maps) == pytest.approx(0.875)
    assert pixel_auroc(masks.astype(np.uint8) * 255, maps) == pytest.approx(0.875)  # 0/255 masks


def test_pixel_auroc_without_defect_pixels_is_nan() -> None:
    assert math.isnan(pixel_auroc(np.zeros((2, 3, 3), bool), np.ones((2, 3, 3))))


def test_pixel_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((2, 3, 3), bool), np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((3, 3), bool), np.ones((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        aupro(np.eye(3, dtype=bool)[None], np.full((1, 3, 3), np.inf))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(3, dtype=bool)[None], np.ones((1, 3, 3)), fpr_limit=0.0)


# ---------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 10])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, levels: int | None, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 3, 12, 12)
    masks[0, 5, 5] = True  # at least one region
    maps = random_maps(rng, masks, levels)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(brute_force_aupro(masks, maps, fpr_limit), abs=1e-9)


def test_aupro_with_limit_exactly_on_a_curve_point() -> None:
    rng = np.random.default_rng(11)
    masks = random_blob_masks(rng, 2, 10, 10)
    masks[1, 0, 0] = True
    maps = random_maps(rng, masks, 4)
    good = ~masks
    t = np.sort(np.unique(maps[good]))[-3]  # a threshold at which the FPR steps
    fpr_limit = int(((maps >= t) & good).sum()) / int(good.sum())
    assert aupro(masks, maps, fpr_limit) == pytest.approx(brute_force_aupro(masks, maps, fpr_limit), abs=1e-9)


def test_aupro_uses_8_connectivity_hand_example() -> None:
    # regions: {(0,0), (1,1)} joined diagonally, and {(3,3)}. Scores: (0,0) and (3,3) high, (1,1) low,
    # good pixels in between. PRO jumps to (1/2 + 1) / 2 = 0.75 at FPR 0 and stays there until FPR 1.
    # With 4-connectivity there would be three regions and the answer 2/3.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, [0, 1, 3], [0, 1, 3]] = True
    maps = np.full((1, 4, 4), 2.0)
    maps[0, 0, 0] = maps[0, 3, 3] = 3.0
    maps[0, 1, 1] = 1.0
    assert aupro(masks, maps, 1.0) == pytest.approx(0.75)
    assert aupro(masks, maps, 0.3) == pytest.approx(0.75)


def test_aupro_regions_do_not_join_across_images() -> None:
    # the same pixel in two images is two regions; only the first is found, so PRO = 1/2 throughout
    masks = np.zeros((2, 3, 3), bool)
    masks[:, 1, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 1, 1] = 1.0
    maps[1, 1, 1] = -1.0
    assert aupro(masks, maps, 0.3) == pytest.approx(0.5)


def test_perfect_separation_gives_one() -> None:
    rng = np.random.default_rng(3)
    masks = random_blob_masks(rng, 3, 16, 16)
    masks[0, 2, 2] = True
    maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert pixel_auroc(masks, maps) == 1.0
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert pixel_metrics(masks, -maps) == {"pixel_auroc": 0.0, "aupro": pytest.approx(0.0)}


def test_aupro_without_regions_is_nan() -> None:
    assert math.isnan(aupro(np.zeros((2, 4, 4), bool), np.ones((2, 4, 4))))
    assert math.isnan(aupro(np.ones((1, 4, 4), bool), np.ones((1, 4, 4))))  # no good pixels: FPR undefined


def test_pixel_metrics_agrees_with_the_single_metrics() -> None:
    rng = np.random.default_rng(5)
    masks = random_blob_masks(rng, 3, 15, 15)
    masks[2, 7, 7] = True
    maps = random_maps(rng, masks, 6).astype(np.float32)
    result = pixel_metrics(masks, maps, fpr_limit=0.2)
    assert result == {
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, 0.2),
    }
    assert all(type(value) is float for value in result.values())  # plain floats serialise as JSON


# ---------------------------------------------------------------- ROC curve points


def test_image_roc_curve_matches_sklearn_with_ties():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 12, 60).astype(float) + labels  # many ties, within and across classes
    curve = image_roc_curve(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(curve["fpr"], fpr)
    np.testing.assert_array_equal(curve["tpr"], tpr)
    np.testing.assert_array_equal(curve["thresholds"], thresholds)
    assert math.isclose(np.trapezoid(curve["tpr"], curve["fpr"]), image_auroc(labels, scores))


def test_roc_curves_are_none_without_both_classes():
    assert image_roc_curve(np.zeros(4, int), np.arange(4.0)) is None
    assert pixel_roc_curve(np.zeros((1, 3, 3), bool), np.ones((1, 3, 3))) is None
    with pytest.raises(ValueError, match="max_points"):
        pixel_roc_curve(np.ones((1, 3, 3), bool), np.ones((1, 3, 3)), max_points=3)


def pixel_case(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 40, 40), dtype=bool)
    masks[0, 5:15, 5:20] = True
    masks[2, 30:38, 1:9] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    return masks, maps


def test_full_pixel_roc_curve_matches_sklearn():
    masks, maps = pixel_case()
    curve = pixel_roc_curve(masks, maps, max_points=None)
    fpr, tpr, thresholds = roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    np.testing.assert_array_equal(curve["fpr"], fpr)
    np.testing.assert_array_equal(curve["tpr"], tpr)
    np.testing.assert_array_equal(curve["thresholds"], thresholds)


@pytest.mark.parametrize("max_points", [4, 51, 200])
def test_thinned_pixel_roc_curve_is_on_the_exact_curve_and_dense_enough(max_points):
    masks, maps = pixel_case()
    exact = pixel_roc_curve(masks, maps, max_points=None)
    thinned = pixel_roc_curve(masks, maps, max_points=max_points)
    assert len(thinned["fpr"]) <= max_points + 1
    assert (thinned["fpr"][0], thinned["tpr"][0]) == (0.0, 0.0)
    assert (thinned["fpr"][-1], thinned["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(thinned["fpr"]) >= 0) and np.all(np.diff(thinned["tpr"]) >= 0)
    points = zip(exact["fpr"], exact["tpr"], strict=True)
    vertices = dict(zip(exact["thresholds"].tolist(), points, strict=True))
    for threshold, fpr, tpr in zip(thinned["thresholds"], thinned["fpr"], thinned["tpr"], strict=True):
        assert vertices[threshold] == (fpr, tpr)
    # Continuous scores, so no ties: each step spans at most one rank interval of either class.
    per_class = max_points // 2
    n_defect, n_good = int(masks.sum()), int((~masks).sum())
    tpr_step = math.ceil((n_defect - 1) / (per_class - 1)) / n_defect
    fpr_step = math.ceil((n_good - 1) / (per_class - 1)) / n_good
    assert np.diff(thinned["tpr"]).max() <= tpr_step + 1e-12  # rates are differences of two divisions
    assert np.diff(thinned["fpr"]).max() <= fpr_step + 1e-12
    area = np.trapezoid(thinned["tpr"], thinned["fpr"])
    assert abs(area - pixel_auroc(masks, maps)) <= 4 / max_points
    again = pixel_roc_curve(masks, maps, max_points=max_points)
    assert all(np.array_equal(thinned[key], again[key]) for key in thinned)
