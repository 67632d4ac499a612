"""What a hierarchical coreset costs against the one-pass coreset, on the same embeddings.

Embeds one folder of good images once (default: MVTec AD bottle, train/good), then for each memory budget
runs the coreset a fit would run within it (`sharding.ShardedCoreset`, fed image by image) and prints its
passes, bank rows, coreset seconds, and the covering radius over every patch: the largest and the mean
distance from a patch to its nearest bank row, both in the 128-d projected space the greedy search works in
and in the full embedding space. Distances are exact (faiss IndexFlatL2, float32).

    PYTHONPATH=. python bench/coreset_hierarchy.py --images ../shared/datasets/mvtec_ad/bottle/train/good \
        --budgets default,230MB,110MB

Image and pixel AUROC of the same budgets come from `patchcore benchmark mvtec ... --max-memory BUDGET`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def radius(points: np.ndarray, bank: np.ndarray) -> tuple[float, float]:
    """(largest, mean) distance from each row of `points` to its nearest row of `bank`."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    worst, total = 0.0, 0.0
    for lo in range(0, len(points), 65536):
        d2, _ = index.search(np.ascontiguousarray(points[lo : lo + 65536], dtype=np.float32), 1)
        d = np.sqrt(np.maximum(d2[:, 0], 0.0))
        worst, total = max(worst, float(d.max())), total + float(d.sum())
    return worst, total / len(points)


def main() -> None:
    from patchcore_cli import config as config_mod
    from patchcore_cli import coreset, engine
    from patchcore_cli.data import DEFAULT_MAX_PIXELS, list_images
    from patchcore_cli.sharding import ShardedCoreset, default_max_memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="../shared/datasets/mvtec_ad/bottle/train/good")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--budgets", default="default,230MB,110MB")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of text lines")
    args = parser.parse_args()

    paths = list_images([args.images])
    config = engine.resolve_auto(config_mod.build(backbone=args.backbone), paths)  # `crop: auto`, as fit does
    extractor = engine.Extractor(config)
    batches = engine.embed_paths(paths, [extractor], engine.Timings(), engine._Silent(), DEFAULT_MAX_PIXELS)
    training = engine.TrainingPatches.collect(batches)
    projected = coreset.random_projection(training.rows, config.projection_dim, config.seed)
    rows = []
    for budget_text in args.budgets.split(","):
        budget = default_max_memory() if budget_text == "default" else config_mod.parse_size(budget_text)
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="coreset-hierarchy-") as folder:
            shards = ShardedCoreset(
                Path(folder),
                extractor.dim,
                config.coreset,
                config.projection_dim,
                config.seed,
                budget,
                engine.Timings(),
            )
            for image in range(len(paths)):
                shards.add(training.image(image), str(paths[image]))
            chosen = shards.finish()
        seconds = time.perf_counter() - began
        row = {
            "budget": budget_text,
            "passes": chosen.passes,
            "bank_rows": len(chosen.source),
            "coreset_s": round(seconds, 2),
            "radius_projected": radius(projected, projected[chosen.source]),
            "radius_full": radius(training.rows, chosen.rows),
        }
        rows.append(row)
        if not args.json:
            print(
                f"{budget_text:>8} passes={row['passes']} rows={row['bank_rows']} coreset {seconds:.1f}s  "
                f"projected max/mean {row['radius_projected'][0]:.3f}/{row['radius_projected'][1]:.3f}  "
                f"full max/mean {row['radius_full'][0]:.3f}/{row['radius_full'][1]:.3f}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"images": args.images, "config": dataclasses.asdict(config), "rows": rows}))


if __name__ == "__main__":
    main()
