"""Calibration cost on Magnetic Tile: leave-one-out time against feature time, per image, interleaved.

    PYTHONPATH=. python bench/calibration_cost.py [IMAGES]

Fits the seeded Magnetic Tile split once (features of its 476 training images, then the coreset).
Then, twice: extracts the features of IMAGES (default 75)
training images, leaves IMAGES images out against the bank (engine.leave_one_out, seeded samples), and
times the plain and the own-rows-skipping search of the same patches. Each line prints the per-image
ratio of calibration to features; times the ratio by IMAGES / 476 for calibration against the whole
fit's feature time. Datasets are read from $DATASETS (default /work/shared/datasets).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from patchcore_cli import config as config_mod
from patchcore_cli.coreset import greedy_coreset
from patchcore_cli.data import folder_split
from patchcore_cli.engine import Extractor, Timings, TrainingPatches, _Silent, embed_paths, leave_one_out
from patchcore_cli.scoring import NearestNeighbours

MAX_PIXELS = 10**9


def main() -> None:
    images = int(sys.argv[1]) if len(sys.argv) > 1 else 75
    root = Path(os.environ.get("DATASETS", "/work/shared/datasets")) / "magnetic_tile"
    defects = [root / f"MT_{kind}" / "Imgs" for kind in ("Blowhole", "Break", "Crack", "Fray", "Uneven")]
    split = folder_split([root / "MT_Free" / "Imgs"], defects, require_masks=False, seed=42)
    config = config_mod.build(backbone="efficientnet_lite0")
    extractor = Extractor(config)
    began = time.perf_counter()
    training = TrainingPatches.collect(
        embed_paths(split.train, [extractor], Timings(), _Silent(), MAX_PIXELS)
    )
    print(f"features of {len(split.train)} images: {time.perf_counter() - began:.1f} s", flush=True)
    count = round(config.coreset * len(training.rows))
    selected = greedy_coreset(training.rows, count, projection_dim=config.projection_dim, seed=config.seed)
    bank, source = training.rows[selected], training.image_of_row[selected]
    print(f"bank {bank.shape[0]} x {bank.shape[1]}", flush=True)
    for repeat in range(2):
        began = time.perf_counter()
        for _ in embed_paths(split.train[:images], [extractor], Timings(), _Silent(), MAX_PIXELS):
            pass
        features = time.perf_counter() - began
        sample = dataclasses.replace(config, calibration_images=images, seed=config.seed + repeat)
        began = time.perf_counter()
        leave_one_out(training, bank, source, sample, _Silent())
        calibration = time.perf_counter() - began
        search = NearestNeighbours(bank, "exact", source)
        queries = training.rows[: training.offsets[images]]
        began = time.perf_counter()
        search.search(queries, 1)
        plain = time.perf_counter() - began
        began = time.perf_counter()
        search.search(queries, 1, training.image_of_row[: training.offsets[images]])
        skipping = time.perf_counter() - began
        print(
            f"repeat {repeat}: {images} images, features {features:.1f} s, leave-one-out {calibration:.1f} s "
            f"(per image {calibration / features:.2f}); search plain {plain:.1f} s, skipping own rows "
            f"{skipping:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
