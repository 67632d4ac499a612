"""Collect what threshold calibration rules are compared on: one fit + evaluate per dataset.

For each dataset this fits `efficientnet_lite0` at default settings, leaving out EVERY training image for
calibration, and scores the test split (image scores only). It writes DATASET.json into OUT with the
leave-one-out scores of all training images, the test scores with their labels, and the fit's stage
times. `bench/calibration_rules.py` reads these files and compares rules offline.

    PYTHONPATH=. python bench/calibration_collect.py OUT [bottle capsule_512 magnetic_tile synthetic]

Datasets are read from $DATASETS (default /work/shared/datasets); the synthetic set is generated as
`patchcore demo` makes it (seed 0) into OUT/synthetic-data.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from patchcore_cli import config as config_mod
from patchcore_cli.data import Split, folder_split, mvtec_category
from patchcore_cli.engine import Scorer, ScoreResult, fit
from patchcore_cli.metrics import image_auroc

ALL_IMAGES = 1_000_000  # calibration_images: more than any training set here, so every image is left out


def splits(name: str, datasets: Path, out: Path) -> list[Split]:
    if name == "bottle":
        return [mvtec_category(datasets / "mvtec_ad", "bottle", require_masks=False)]
    if name == "capsule_512":
        return [mvtec_category(datasets / "capsule_512", "capsule", require_masks=False)]
    if name == "magnetic_tile":
        root = datasets / "magnetic_tile"
        defects = [root / f"MT_{kind}" / "Imgs" for kind in ("Blowhole", "Break", "Crack", "Fray", "Uneven")]
        # The split `patchcore benchmark folder` makes by default: half of the good images, seed 42.
        split = folder_split(
            [root / "MT_Free" / "Imgs"], defects, require_masks=False, seed=42, name="magnetic_tile"
        )
        return [split]
    if name == "synthetic":
        from patchcore_cli.synthetic import CATEGORIES, generate_dataset

        data = out / "synthetic-data"
        if not data.exists():
            generate_dataset(data, seed=0)
        return [mvtec_category(data, category, require_masks=False) for category in CATEGORIES]
    raise SystemExit(f"unknown dataset {name!r}")


def collect(split: Split, out: Path) -> None:
    config = config_mod.build(backbone="efficientnet_lite0", calibration_images=ALL_IMAGES)
    began = time.perf_counter()
    fitted = fit(split.train, config)
    fit_seconds = time.perf_counter() - began
    scorer = Scorer(fitted.bank, extractors=fitted.extractors)
    began = time.perf_counter()
    map_max: dict[Path, float] = {}  # a good image's --masks mask is empty iff its map max is below threshold

    def keep_maximum(result: ScoreResult) -> None:
        map_max[result.path] = float(result.anomaly_map.max())
        result.anomaly_map = None

    results = scorer.score_paths([s.path for s in split.test], keep_maps=True, on_result=keep_maximum)
    score_seconds = time.perf_counter() - began
    labels = np.array([s.label for s in split.test])
    scores = np.array([r.score for r in results])
    loo, maxima = fitted.calibration_scores, fitted.calibration_map_maxima
    kept = np.isfinite(loo)
    record = {
        "dataset": split.name,
        "config": fitted.bank.config,
        "n_train": fitted.n_images,
        "loo_scores": loo[kept].tolist(),
        "loo_map_maxima": maxima[kept].tolist(),
        "test": [
            {"score": r.score, "map_max": map_max[s.path], "label": s.label, "defect_type": s.defect_type}
            for s, r in zip(split.test, results, strict=True)
        ],
        "fit_stage_seconds": fitted.timings.seconds,
        "fit_seconds": fit_seconds,
        "score_ms_per_image": 1000 * score_seconds / len(results),
        "calibration": fitted.bank.calibration,
    }
    (out / f"{split.name}.json").write_text(json.dumps(record, indent=1))
    seconds = fitted.timings.seconds
    features = sum(seconds.get(k, 0.0) for k in ("backbone", "aggregate + reduce", "decode (waiting)"))
    print(
        f"{split.name}: {fitted.n_images} train, {len(loo)} left out, features {features:.1f} s, "
        f"calibrate {seconds['calibrate']:.1f} s, image AUROC {image_auroc(labels, scores):.3f}",
        flush=True,
    )


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    datasets = Path(os.environ.get("DATASETS", "/work/shared/datasets"))
    for name in sys.argv[2:] or ["bottle", "capsule_512", "magnetic_tile", "synthetic"]:
        for split in splits(name, datasets, out):
            collect(split, out)


if __name__ == "__main__":
    main()
