"""Tables and paired bootstrap intervals from `bench/sweep.py` runs.

    python bench/compare.py BASE OTHER [OTHER...]

For each run (runs/LABEL/DATASET/results.json) it prints image AUROC, pixel AUROC and AUPRO per dataset
and their mean over the datasets both runs have, scoring ms per image and fit seconds. For each OTHER it
prints the difference in image AUROC against BASE with a 95 % paired bootstrap interval, per dataset and
for the mean: test images are matched by file, good and defective images are resampled separately
(2,000 times, numpy seed 0), and the synthetic set's AUROC is the mean of its categories'.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RUNS = Path(__file__).resolve().parent.parent / "runs"
ORDER = ("bottle", "capsule", "magnetic_tile", "synthetic")
RESAMPLES = 2000


def load(label: str) -> dict[str, list[dict]]:
    """runs/LABEL -> {dataset: [benchmark rows]} (the synthetic set has one row per category)."""
    found = {}
    for name in ORDER:
        path = RUNS / label / name / "results.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())["results"]
    return found


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def summary(rows: list[dict]) -> dict[str, float]:
    pick = lambda key, part: float(np.mean([(r[part] or {}).get(key, np.nan) for r in rows]))  # noqa: E731
    return {
        "image": pick("image_auroc", "image"),
        "pixel": pick("pixel_auroc", "pixel"),
        "aupro": pick("aupro", "pixel"),
        "ms": float(np.mean([r["score_ms_per_image"] for r in rows])),
        "fit": float(np.sum([sum(r["fit_seconds"].values()) for r in rows])),
    }


def _key(file: str) -> str:
    """A test image by its last four path parts (category/test/kind/name), so that runs made from
    different checkouts or dataset folders still match image for image."""
    return "/".join(Path(file).parts[-4:])


def paired(base: list[dict], other: list[dict], rng: np.random.Generator) -> np.ndarray:
    """RESAMPLES bootstrap draws of (other - base) image AUROC for one dataset (mean over its rows)."""
    draws = np.zeros(RESAMPLES)
    for b_row, o_row in zip(base, other, strict=True):
        b = {_key(i["file"]): i for i in b_row["images"]}
        o = {_key(i["file"]): i for i in o_row["images"]}
        files = sorted(set(b) & set(o))
        labels = np.array([b[f]["label"] for f in files])
        sb = np.array([b[f]["score"] for f in files])
        so = np.array([o[f]["score"] for f in files])
        good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
        for k in range(RESAMPLES):
            idx = np.r_[rng.choice(good, len(good)), rng.choice(bad, len(bad))]
            draws[k] += (auroc(labels[idx], so[idx]) - auroc(labels[idx], sb[idx])) / len(base)
    return draws


def main(labels: list[str]) -> int:
    if not labels:
        print(__doc__)
        return 2
    runs = {label: load(label) for label in labels}
    print(
        "| run | "
        + " | ".join(f"{d} img / pix / AUPRO" for d in ORDER)
        + " | mean img / pix / AUPRO | ms/img | fit s |"
    )
    print("|---" * (len(ORDER) + 4) + "|")
    for label, data in runs.items():
        cells, means = [], []
        for name in ORDER:
            if name in data:
                s = summary(data[name])
                cells.append(f"{s['image']:.3f} / {s['pixel']:.3f} / {s['aupro']:.3f}")
                means.append(s)
            else:
                cells.append("n/a")
        mean = {k: float(np.mean([m[k] for m in means])) for k in ("image", "pixel", "aupro", "ms")}
        fit = sum(m["fit"] for m in means)
        means_cell = f"{mean['image']:.4f} / {mean['pixel']:.4f} / {mean['aupro']:.4f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {means_cell} | {mean['ms']:.0f} | {fit:.0f} |")
    base_label = labels[0]
    for label in labels[1:]:
        shared = [d for d in ORDER if d in runs[base_label] and d in runs[label]]
        rng = np.random.default_rng(0)
        per = {d: paired(runs[base_label][d], runs[label][d], rng) for d in shared}
        parts = []
        for d in shared:
            point = summary(runs[label][d])["image"] - summary(runs[base_label][d])["image"]
            lo, hi = np.percentile(per[d], [2.5, 97.5])
            parts.append(f"{d} {point:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        mean_draws = np.mean([per[d] for d in shared], axis=0)
        point = np.mean(
            [summary(runs[label][d])["image"] - summary(runs[base_label][d])["image"] for d in shared]
        )
        lo, hi = np.percentile(mean_draws, [2.5, 97.5])
        print(
            f"{label} - {base_label}: image AUROC "
            + "; ".join(parts)
            + f"; mean {point:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
