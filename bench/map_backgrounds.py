"""Where a bank's AUPRO is lost: the defect regions, or the rest of the defective images.

    python bench/map_backgrounds.py BANK DATASET [--far PIXELS] [--average BANK2 ...]

DATASET is as in bench/speed.py: an MVTec-layout category folder, or `magnetic_tile`. The bank must have
been fitted on that dataset's training images. The script scores the test set once, keeping the maps in
the frame `evaluate` uses, and prints one JSON line:

- `aupro`: the standard AUPRO (`metrics.aupro`: false positives counted over every pixel outside a defect,
  on good and defective images alike);
- `aupro_good_fpr`: the same regions and curve, with false positives counted on the good images only;
- per defect type, both of these, each with every good test image;
- `far_background`: per test class, the fraction of pixels more than `--far` map pixels (default 32) from
  any defect pixel of their image that reach the good images' 95th-percentile pixel score (5 % on good
  images by construction), and the median pixel score there.

If the two AUPROs are far apart and the far backgrounds of defective images are raised, the lost area is
in the defective images' backgrounds, away from the defects: a sharper map near the defects cannot win
it back.

With `--average`, each further bank (fitted on the same images, with any framing or layers) scores the
test set too. Its maps are resized bilinearly to BANK's frame, every bank's maps are standardised by the
mean and std of their good test pixels (test statistics: an upper bound for such a mix, not a method),
and the figures above are those of the averaged maps, with `image_auroc_of_peak` added.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from speed import split_of


def standardised(maps: list[np.ndarray], good: np.ndarray) -> list[np.ndarray]:
    """Maps shifted and scaled by the mean and std of the good images' pixels."""
    pixels = np.concatenate([maps[i].ravel() for i in good])
    mean, std = float(pixels.mean()), float(pixels.std())
    return [(m - mean) / std for m in maps]


def resized(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map resized bilinearly (half-pixel centres) to `shape`."""
    import torch

    if amap.shape == shape:
        return amap
    grid = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
    out = torch.nn.functional.interpolate(grid, size=shape, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def main() -> None:
    from scipy import ndimage

    from patchcore_cli import bank as bank_io
    from patchcore_cli import metrics
    from patchcore_cli.data import load_mask
    from patchcore_cli.engine import Scorer, framing_of

    parser = argparse.ArgumentParser()
    parser.add_argument("bank")
    parser.add_argument("dataset")
    parser.add_argument("--far", type=float, default=32.0)
    parser.add_argument("--average", nargs="+", default=[], metavar="BANK2")
    args = parser.parse_args()
    samples = split_of(args.dataset).test
    kinds = np.array([s.defect_type or "good" for s in samples])
    good = np.flatnonzero(kinds == "good")

    def scored(bank: str) -> tuple[list[np.ndarray], list, Scorer]:
        scorer = Scorer(bank_io.load(bank), bank_path=bank)
        results = scorer.score_paths([s.path for s in samples], keep_maps=True)
        return [r.anomaly_map.astype(np.float32, copy=False) for r in results], results, scorer

    maps, results, scorer = scored(args.bank)
    framing = framing_of(scorer.config)
    masks = [
        np.zeros(m.shape, dtype=bool)
        if s.mask is None
        else framing.mask(load_mask(s.mask, size=r.geometry.original_size), r.geometry)
        for s, r, m in zip(samples, results, maps, strict=True)
    ]
    if args.average:
        averaged = standardised(maps, good)
        for bank in args.average:
            other = [resized(m, t.shape) for m, t in zip(scored(bank)[0], maps, strict=True)]
            averaged = [a + b for a, b in zip(averaged, standardised(other, good), strict=True)]
        maps = [a / (1 + len(args.average)) for a in averaged]
    good_pixels = np.sort(np.concatenate([maps[i].ravel() for i in good]))

    def both(chosen: np.ndarray) -> dict[str, float]:
        picked = [masks[i] for i in chosen]
        defect = np.concatenate([maps[i][masks[i]] for i in chosen])
        return {
            "aupro": round(metrics.aupro(picked, [maps[i] for i in chosen]), 4),
            "aupro_good_fpr": round(metrics._aupro_from_split(picked, defect, good_pixels, 0.3), 4),
        }

    per_type = {
        kind: both(np.concatenate([good, np.flatnonzero(kinds == kind)]))
        for kind in sorted(set(kinds) - {"good"})
    }
    p95 = good_pixels[int(0.95 * (good_pixels.size - 1))]
    far: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        values = []
        for i in np.flatnonzero(kinds == kind):
            mask = masks[i]
            away = ndimage.distance_transform_edt(~mask) > args.far if mask.any() else np.ones_like(mask)
            values.append(maps[i][away])
        pooled = np.concatenate(values)
        far[kind] = {
            "images": len(values),
            "at_or_above_good_p95": round(float((pooled >= p95).mean()), 3),
            "median_score": round(float(np.median(pooled)), 2),
        }
    summary = {"bank": args.bank, "dataset": args.dataset, **both(np.arange(len(samples)))}
    if args.average:
        peaks = np.array([m.max() for m in maps])
        summary["average"] = args.average
        summary["image_auroc_of_peak"] = round(metrics.image_auroc((kinds != "good").astype(int), peaks), 4)
    print(json.dumps({**summary, "per_type": per_type, "far": args.far, "far_background": far}))


if __name__ == "__main__":
    main()
