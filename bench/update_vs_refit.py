"""`fit --update` against a full refit, on MVTec AD layout categories (issue 11, "Targets").

Splits train/good by a seeded permutation into old and new images (`--new`: a share, default half, or a
count such as 3 for an operator's few confirmed false alarms), fits a bank on the old images, updates it
with the new ones, and fits a bank on all of train/good. Prints, for the old, updated and full banks: bank
rows, image threshold, the FPR it promises on good images, the FPR measured on the good test images, image
AUROC, pixel AUROC, and the coreset and calibration seconds, all with the same config, each bank scored on
the category's test split.

    PYTHONPATH=. python bench/update_vs_refit.py ../shared/datasets/mvtec_ad/bottle \
        ../shared/datasets/capsule_512/capsule --backbone efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def main() -> None:
    from patchcore_cli import config as config_mod
    from patchcore_cli import engine
    from patchcore_cli.data import mvtec_category
    from patchcore_cli.evaluation import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path, help="category folders (train/, test/, ...)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split into old and new images")
    parser.add_argument("--new", type=float, default=0.5, help="new images: a share (< 1) or a count")
    parser.add_argument("--max-memory", default=None, help="coreset budget of every fit and update")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of text lines")
    args = parser.parse_args()

    config = config_mod.build(backbone=args.backbone)
    budget = config_mod.parse_size(args.max_memory) if args.max_memory else None
    results = []
    for folder in args.categories:
        split = mvtec_category(folder.parent, folder.name)
        train = list(split.train)
        order = np.random.default_rng(args.seed).permutation(len(train))
        n_new = round(args.new * len(train)) if args.new < 1 else int(args.new)
        first = [train[i] for i in sorted(order[: len(train) - n_new])]
        second = [train[i] for i in sorted(order[len(train) - n_new :])]
        old = engine.fit(first, config, max_memory=budget)
        updated = engine.update(old.bank, second, "old", max_memory=budget)
        full = engine.fit(train, config, max_memory=budget)
        for name, result in (("old", old), ("updated", updated), ("full", full)):
            scorer = engine.Scorer(result.bank, extractors=old.extractors)
            evaluation = evaluate(scorer, split)
            calibration = result.bank.calibration
            row = {
                "category": folder.name,
                "bank": name,
                "images": result.bank.n_train_images,
                "bank_rows": result.bank.rows,
                "threshold": calibration["image_threshold"],
                "promised_fpr": calibration.get("predicted_fpr"),
                "measured_fpr": evaluation.promise["measured_fpr"] if evaluation.promise else None,
                "image_auroc": evaluation.image["image_auroc"],
                "pixel_auroc": evaluation.pixel["pixel_auroc"] if evaluation.pixel else None,
                "coreset_s": round(result.timings.seconds.get("coreset", 0.0), 2),
                "calibrate_s": round(result.timings.seconds.get("calibrate", 0.0), 2),
            }
            results.append(row)
            if not args.json:
                print(
                    f"{row['category']:>8} {name:>8}: images {row['images']:>4} rows {row['bank_rows']:>6} "
                    f"threshold {row['threshold']:.4f} promised FPR {rate(row['promised_fpr'])} measured FPR "
                    f"{rate(row['measured_fpr'])} image AUROC {row['image_auroc']:.4f} pixel AUROC "
                    f"{row['pixel_auroc']:.4f} coreset {row['coreset_s']} s calibrate {row['calibrate_s']} s",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"backbone": args.backbone, "seed": args.seed, "new": args.new, "rows": results}))


if __name__ == "__main__":
    main()
