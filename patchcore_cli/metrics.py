"""Evaluation metrics: image and per-defect AUROC, thresholded image metrics, pixel AUROC, AUPRO.

Pure functions from numpy arrays to plain floats and dicts, so results serialise to JSON as they are.
Scores follow one convention throughout: higher means more anomalous, and an image or pixel counts as
predicted anomalous iff its score is >= the threshold.

Malformed arrays (mismatched shapes, non-finite scores, labels other than 0/1) are programming errors of
the caller and raise `ValueError`; a metric that is undefined for the data given (for example AUROC when
only one class is present) is returned as `float("nan")`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GOOD = "good"  # the defect type of anomaly-free images, as MVTec AD names its folders


def _check_image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs. N labels in {0,1}, N finite scores -> (bool N, float64 N)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D arrays of equal length, got {labels.shape} and {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must contain only 0 (good) and 1 (anomalous)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (no NaN or infinity)")
    return labels.astype(bool), scores


def _check_pixel_inputs(
    masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray | Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate pixel-level inputs: N masks (nonzero = defect) and N maps, as N x H x W arrays or as
    sequences of 2-D arrays whose sizes may differ between images (each mask the size of its map).
    Returns ([N bool H_i x W_i], [N H_i x W_i maps])."""
    if len(masks) != len(maps):
        raise ValueError(f"masks and maps must be as many, got {len(masks)} and {len(maps)}")
    mask_list, map_list = [], []
    for mask, amap in zip(masks, maps, strict=True):
        mask, amap = np.asarray(mask), np.asarray(amap)
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(
                f"each mask and its map must be 2-D arrays of equal shape, got {mask.shape} and {amap.shape}"
            )
        if not np.issubdtype(amap.dtype, np.number) or not np.isfinite(amap).all():
            raise ValueError("anomaly maps must hold finite numbers (no NaN or infinity)")
        mask_list.append(mask.astype(bool, copy=False))
        map_list.append(amap)
    return mask_list, map_list


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores. N labels {0,1}, N scores -> float.

    Tied scores count half, as in the Mann-Whitney U statistic. Returns nan when fewer than two classes are
    present, because the ROC curve is then undefined.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = _check_image_inputs(labels, scores)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _split_scores(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """N masks and maps -> (scores of defect pixels, image by image in row-major order; scores of good
    pixels sorted ascending).

    Sorting only the good pixels, in place and without an index array, keeps the peak memory near one copy
    of the maps even for 900 x 900 images.
    """
    empty = np.empty(0, dtype=maps[0].dtype if maps else np.float32)
    positives = np.concatenate([empty, *(amap[mask] for mask, amap in zip(masks, maps, strict=True))])
    negatives = np.concatenate([empty, *(amap[~mask] for mask, amap in zip(masks, maps, strict=True))])
    negatives.sort()
    return positives, negatives


def _auroc_from_split(positives: np.ndarray, sorted_negatives: np.ndarray) -> float:
    """Mann-Whitney AUROC: P defect scores, M sorted good scores -> float, nan if either is empty.

    Each defect pixel wins against the good pixels below it and draws with those equal to it. Counting
    with integers keeps the result exact up to the final division.
    """
    if positives.size == 0 or sorted_negatives.size == 0:
        return float("nan")
    below = np.searchsorted(sorted_negatives, positives, side="left")
    below_or_equal = np.searchsorted(sorted_negatives, positives, side="right")
    twice_wins = int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return twice_wins / (2 * positives.size * sorted_negatives.size)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels of all images. N x H x W masks (nonzero = defect), N x H x W maps -> float.

    Computed exactly by ranking (equal to `sklearn.metrics.roc_auc_score` on the flattened arrays, ties
    counting half) in O(P log P) for P pixels. Returns nan when all pixels are good or all are defective.
    """
    masks, maps = _check_pixel_inputs(masks, maps)
    return _auroc_from_split(*_split_scores(masks, maps))


def _region_weights(masks: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """N bool masks -> (weight of each defect pixel in `_split_scores` order, number of regions).

    A region is a connected component of one image's mask under 8-connectivity, the 3 x 3 all-ones
    structuring element of the official MVTec AD evaluation script (Bergmann et al., IJCV 2021).
    A pixel's weight is 1 / (size of its region), so summing the weights of the pixels above a threshold
    and dividing by the number of regions gives the per-region overlap.
    """
    from scipy import ndimage

    eight_connected = np.ones((3, 3), dtype=bool)
    weights = []
    n_regions = 0
    for mask in masks:
        labelled, n = ndimage.label(mask, structure=eight_connected)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel())
        region_of_pixel = labelled[mask]
        weights.append(1.0 / sizes[region_of_pixel])
        n_regions += n
    if not weights:
        return np.empty(0, dtype=np.float64), 0
    return np.concatenate(weights), n_regions


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit`.

    N x H x W masks (nonzero = defect), N x H x W maps -> float in [0, 1].

    Follows the official MVTec AD evaluation (Bergmann et al., IJCV 2021), whose integration limit of 0.3
    is the default here. Every connected defect region (8-connectivity) of every image counts once, however
    large it is. For a threshold t, PRO(t) is the mean over regions of the fraction of the region's pixels
    with score >= t, and FPR(t) the fraction of good pixels, over all images, with score >= t. The curve
    starts at (0, 0) and visits every distinct score as a threshold, so the result is exact rather than
    sampled at a fixed number of thresholds. It is integrated with the trapezoid rule from FPR 0 to
    `fpr_limit`, PRO at `fpr_limit` itself interpolated linearly between its neighbours, and divided by
    `fpr_limit`.

    The work is one sort of the good pixels and one of the defect pixels, O(P log P) for P pixels. Only
    thresholds equal to a good pixel's score move the curve right; between two of them the curve climbs
    vertically, which adds no area, so each good-pixel score contributes one trapezoid whose left height is
    the PRO of the scores strictly above it and whose right height the PRO of the scores at or above it.

    Returns nan when no image has a defect region or no pixel is good.
    """
    _check_fpr_limit(fpr_limit)
    masks, maps = _check_pixel_inputs(masks, maps)
    return _aupro_from_split(masks, *_split_scores(masks, maps), fpr_limit)


def _aupro_from_split(
    masks: list[np.ndarray], positives: np.ndarray, negatives: np.ndarray, fpr_limit: float
) -> float:
    """AUPRO from N bool masks, P defect scores in `_split_scores` order, M good scores ascending."""
    weights, n_regions = _region_weights(masks)
    if n_regions == 0 or negatives.size == 0:
        return float("nan")

    order = np.argsort(positives, kind="stable")
    positives = positives[order]
    # overlap_below[k] = summed weight of the k lowest-scoring defect pixels
    overlap_below = np.concatenate(([0.0], np.cumsum(weights[order])))
    total_overlap = overlap_below[-1]

    # Only the highest good scores matter: once the FPR has passed fpr_limit, lower thresholds add no area.
    # The run of equal scores that holds index `cut` already flags more than fpr_limit * M + 1 good pixels.
    n_good = negatives.size
    cut = max(0, n_good - int(fpr_limit * n_good) - 2)
    start = int(np.searchsorted(negatives, negatives[cut], side="left"))
    top = negatives[start:]

    # Distinct good scores, highest first: each is a threshold at which the FPR steps up.
    run_starts = np.flatnonzero(np.append(True, top[1:] != top[:-1]))[::-1]
    thresholds = top[run_starts]
    fpr_right = (n_good - start - run_starts) / n_good
    fpr_left = np.concatenate(([0.0], fpr_right[:-1]))
    pro_right = (
        total_overlap - overlap_below[np.searchsorted(positives, thresholds, side="left")]
    ) / n_regions
    pro_left = (
        total_overlap - overlap_below[np.searchsorted(positives, thresholds, side="right")]
    ) / n_regions

    # Trapezoids entirely left of the limit count whole; the one that straddles it is cut at the limit.
    inside = fpr_right <= fpr_limit
    area = float(
        np.sum(0.5 * (pro_left[inside] + pro_right[inside]) * (fpr_right[inside] - fpr_left[inside]))
    )
    straddling = np.flatnonzero(~inside)
    if straddling.size:
        k = straddling[0]
        width = fpr_limit - fpr_left[k]
        pro_at_limit = pro_left[k] + (pro_right[k] - pro_left[k]) * width / (fpr_right[k] - fpr_left[k])
        area += 0.5 * (pro_left[k] + pro_at_limit) * width
    return float(area / fpr_limit)


def _f1(tp: int, fp: int, fn: int) -> float:
    """F1 as 2TP / (2TP + FP + FN): equal to the harmonic mean of precision and recall where both exist,
    0 when anomalies exist and none is caught, nan only when there is nothing to find and nothing flagged."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else float("nan")


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold that maximises image F1 on these labels, and that F1. N labels, N scores -> (t, F1).

    This is the "oracle" threshold that anomalib reports: it looks at the test labels, so it measures how
    separable the scores are, not how a deployed threshold performs. Candidates are the distinct scores
    (as in `sklearn.metrics.precision_recall_curve`); among equally good ones the lowest is returned.
    Returns (nan, nan) when no image is anomalous, since F1 is then 0 at every threshold.
    """
    labels, scores = _check_image_inputs(labels, scores)
    n_anomalous = int(labels.sum())
    if n_anomalous == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    # The last image of each run of equal scores closes the candidate threshold equal to that score.
    run_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    tp = np.cumsum(labels[order])[run_ends]
    fp = run_ends + 1 - tp
    f1 = 2 * tp / (2 * tp + fp + (n_anomalous - tp))
    # Thresholds run from high to low here, so the last maximum is the lowest threshold.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(sorted_scores[run_ends[best]]), float(f1[best])


def thresholded_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Confusion counts and rates at one threshold. N labels, N scores, threshold -> dict.

    An image is predicted anomalous iff its score >= `threshold`. Keys: `threshold`, `balanced_accuracy`,
    `f1`, `precision`, `recall`, `tpr` (equal to recall), `fpr`, and the int counts `tp`, `fp`, `tn`, `fn`.
    Zero denominators: `recall`/`tpr` is nan without anomalous images and `fpr` nan without good ones;
    `precision` is 0 when nothing is flagged (scikit-learn's `zero_division=0`); `f1` is
    2TP / (2TP + FP + FN), so 0 when anomalies exist and none is caught, nan only with nothing to find and
    nothing flagged; `balanced_accuracy` averages TPR and TNR over the classes present (as
    `sklearn.metrics.balanced_accuracy_score` does), nan for no images at all.
    """
    labels, scores = _check_image_inputs(labels, scores)
    flagged = scores >= threshold
    tp = int(np.sum(flagged & labels))
    fp = int(np.sum(flagged & ~labels))
    fn = int(np.sum(~flagged & labels))
    tn = int(np.sum(~flagged & ~labels))
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    fpr = fp / (fp + tn) if fp + tn else float("nan")
    per_class_recall = [rate for rate in (tpr, 1.0 - fpr) if not np.isnan(rate)]
    return {
        "threshold": float(threshold),
        "balanced_accuracy": float(np.mean(per_class_recall)) if per_class_recall else float("nan"),
        "f1": _f1(tp, fp, fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tpr,
        "tpr": tpr,
        "fpr": fpr,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate measured as k events in n trials -> (low, high).

    Exact (never narrower than `confidence` demands) for any n, which matters for the small good test
    sets of inspection data: 0 false positives in 20 images still allows an FPR up to 0.168. Returns
    (nan, nan) for n = 0.
    """
    from scipy.stats import beta

    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k))
    return low, high


def per_defect_auroc(defect_types: list[str], scores: np.ndarray) -> dict[str, float]:
    """AUROC of each defect type's images against the good images. N type names, N scores -> {type: AUROC}.

    Images named `"good"` are the negatives of every comparison and get no entry of their own. A type's
    AUROC is nan when there are no good images. Keys are sorted.
    """
    types = np.asarray(defect_types, dtype=object)
    scores = np.asarray(scores, dtype=np.float64)
    if types.ndim != 1 or types.shape != scores.shape:
        raise ValueError(
            f"defect_types and scores must have equal length, got {types.shape} and {scores.shape}"
        )
    is_good = types == GOOD
    result = {}
    for defect in sorted(set(defect_types) - {GOOD}):
        keep = is_good | (types == defect)
        result[defect] = image_auroc((types[keep] == defect).astype(np.int64), scores[keep])
    return result


def image_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    defect_types: list[str],
    calibrated_threshold: float | None,
) -> dict:
    """Every image-level metric. N labels, N scores, N defect types, bank threshold or None -> dict.

    Keys: `image_auroc`; `per_defect_auroc` (see `per_defect_auroc`); `calibrated`, the
    `thresholded_metrics` at the threshold stored with the memory bank (None when there is none); and
    `oracle`, the `thresholded_metrics` at the F1-maximising threshold of `f1_max_threshold` (None when no
    image is anomalous). `labels` must be 1 exactly where `defect_types` is not `"good"`.
    """
    labels, scores = _check_image_inputs(labels, scores)
    if len(defect_types) != len(labels):
        raise ValueError(f"got {len(defect_types)} defect types for {len(labels)} labels")
    if not np.array_equal(labels, np.asarray(defect_types, dtype=object) != GOOD):
        raise ValueError(f'labels must be 1 exactly for the images whose defect type is not "{GOOD}"')
    oracle_threshold, _ = f1_max_threshold(labels, scores)
    return {
        "image_auroc": image_auroc(labels, scores),
        "per_defect_auroc": per_defect_auroc(defect_types, scores),
        "calibrated": (
            None
            if calibrated_threshold is None
            else thresholded_metrics(labels, scores, calibrated_threshold)
        ),
        "oracle": None
        if np.isnan(oracle_threshold)
        else thresholded_metrics(labels, scores, oracle_threshold),
    }


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> dict:
    """Every pixel-level metric. N x H x W masks, N x H x W maps (or sequences of 2-D arrays whose sizes
    may differ per image) -> {"pixel_auroc": ..., "aupro": ...}.

    See `pixel_auroc` and `aupro`; the good pixels are split off and sorted once for both.
    """
    _check_fpr_limit(fpr_limit)
    masks, maps = _check_pixel_inputs(masks, maps)
    positives, negatives = _split_scores(masks, maps)
    return {
        "pixel_auroc": _auroc_from_split(positives, negatives),
        "aupro": _aupro_from_split(masks, positives, negatives, fpr_limit),
    }


# --- ROC curve points, for plotting -------------------------------------------------------------------

PIXEL_ROC_POINTS = 1000
"""Default cap on the points of a pixel ROC curve: a plot cannot show more, and a test set has millions."""


def _evenly_ranked(sorted_scores: np.ndarray, count: int) -> np.ndarray:
    """`count` scores at evenly spaced ranks of an ascending array, lowest and highest included."""
    ranks = np.unique(np.round(np.linspace(0, sorted_scores.size - 1, count)).astype(np.int64))
    return sorted_scores[ranks]


def _roc_from_split(
    positives: np.ndarray, sorted_negatives: np.ndarray, max_points: int | None
) -> dict[str, np.ndarray] | None:
    """ROC vertices from P defect scores and M ascending good scores (see `image_roc_curve`).

    With `max_points`, the thresholds are only the scores at `max_points // 2` evenly spaced ranks of each
    class; otherwise every distinct score.
    """
    if positives.size == 0 or sorted_negatives.size == 0:
        return None
    positives = np.sort(positives)
    if max_points is None:
        candidates = np.concatenate((positives, sorted_negatives))
    else:
        per_class = max_points // 2
        candidates = np.concatenate(
            (_evenly_ranked(positives, per_class), _evenly_ranked(sorted_negatives, per_class))
        )
    thresholds = np.unique(candidates)[::-1]
    # An image or pixel is flagged iff its score >= the threshold: those at or above, counted by rank.
    tpr = (positives.size - np.searchsorted(positives, thresholds, side="left")) / positives.size
    fpr = (sorted_negatives.size - np.searchsorted(sorted_negatives, thresholds, side="left")) / (
        sorted_negatives.size
    )
    return {
        "fpr": np.concatenate(([0.0], fpr)),
        "tpr": np.concatenate(([0.0], tpr)),
        "thresholds": np.concatenate(([np.inf], thresholds)),
    }


def image_roc_curve(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray] | None:
    """The exact ROC curve of image scores. N labels {0,1}, N scores -> {"fpr", "tpr", "thresholds"}.

    Each is a 1-D float array of the same length K + 1 for K distinct scores: thresholds run from +inf
    (nothing flagged, the point (0, 0)) down through every distinct score, the lowest flagging everything
    (the point (1, 1)). Equal to `sklearn.metrics.roc_curve(..., drop_intermediate=False)`. Joining the
    points with straight lines gives the curve whose area `image_auroc` is. Returns None when fewer than
    two classes are present.
    """
    labels, scores = _check_image_inputs(labels, scores)
    return _roc_from_split(scores[labels], np.sort(scores[~labels]), None)


def pixel_roc_curve(
    masks: np.ndarray, maps: np.ndarray, max_points: int | None = PIXEL_ROC_POINTS
) -> dict[str, np.ndarray] | None:
    """Points of the ROC curve over all pixels. N x H x W masks, N x H x W maps -> as `image_roc_curve`.

    A test set has millions of distinct pixel scores, so by default the curve is thinned deterministically:
    the thresholds are the scores at `max_points // 2` evenly spaced ranks among the defect pixels and as
    many among the good pixels (lowest and highest included). Every returned point is then a vertex of the
    exact curve, the curve still starts at (0, 0) and ends at (1, 1), there are at most `max_points` + 1
    points, and between two neighbouring points neither TPR nor FPR moves by more than about
    2 / `max_points` unless tied scores make the exact curve itself jump there. `max_points=None` returns
    every vertex. Returns None when all pixels are good or all are defective.
    """
    if max_points is not None and max_points < 4:
        raise ValueError(f"max_points must be at least 4 (two ranks per class), got {max_points}")
    masks, maps = _check_pixel_inputs(masks, maps)
    return _roc_from_split(*_split_scores(masks, maps), max_points)
