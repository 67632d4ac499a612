"""Calibration cost on Magnetic Tile: leave-one-out time against feature time, per image, interleaved.

    PYTHONPATH=. python bench/calibration_cost.py CACHE.npz [IMAGES]

Fits the seeded Magnetic Tile split once (features of its 476 training images, then the coreset) and
caches the features and the bank in CACHE.npz. Then, twice: extracts the features of IMAGES (default 75)
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

import numpy as np

from patchcore_cli import config as config_mod
from patchcore_cli.coreset import greedy_coreset
from patchcore_cli.data import folder_split
from patchcore_cli.engine import Extractor, Timings, _Silent, embed_paths, leave_one_out
from patchcore_cli.scoring import NearestNeighbours

MAX_PIXELS = 10**9


def main() -> None:
    cache, images = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 75
    root = Path(os.environ.get("DATASETS", "/work/shared/datasets")) / "magnetic_tile"
    defects = [root / f"MT_{kind}" / "Imgs" for kind in ("Blowhole", "Break", "Crack", "Fray", "Uneven")]
    split = folder_split([root / "MT_Free" / "Imgs"], defects, require_masks=False, seed=42)
    config = config_mod.build(backbone="efficientnet_lite0")
    extractor = Extractor(config)
    if cache.exists():
        stored = np.load(cache)
        per_image, bank, source = stored["per_image"], stored["bank"], stored["source"]
    else:
        began = time.perf_counter()
        batches = embed_paths(split.train, [extractor], Timings(), _Silent(), MAX_PIXELS)
        per_image = np.concatenate([embeddings[0] for _, embeddings in batches])  # n x P x D
        print(f"features of {len(split.train)} images: {time.perf_counter() - began:.1f} s", flush=True)
        flat = per_image.reshape(-1, per_image.shape[-1])
        count = round(config.coreset * len(flat))
        selected = greedy_coreset(flat, count, projection_dim=config.projection_dim, seed=config.seed)
        bank, source = flat[selected], (selected // per_image.shape[1]).astype(np.int64)
        np.savez(cache, per_image=per_image, bank=bank, source=source)
    print(f"bank {bank.shape[0]} x {bank.shape[1]}", flush=True)
    patches = per_image.shape[1]
    for repeat in range(2):
        began = time.perf_counter()
        for _ in embed_paths(split.train[:images], [extractor], Timings(), _Silent(), MAX_PIXELS):
            pass
        features = time.perf_counter() - began
        sample = dataclasses.replace(config, calibration_images=images, seed=config.seed + repeat)
        began = time.perf_counter()
        leave_one_out(per_image, bank, source, extractor.grid, sample, _Silent())
        calibration = time.perf_counter() - began
        search = NearestNeighbours(bank, "exact", source)
        queries = per_image[:images].reshape(-1, per_image.shape[-1])
        began = time.perf_counter()
        search.search(queries, 1)
        plain = time.perf_counter() - began
        began = time.perf_counter()
        search.search(queries, 1, np.repeat(np.arange(images), patches))
        skipping = time.perf_counter() - began
        print(
            f"repeat {repeat}: {images} images, features {features:.1f} s, leave-one-out {calibration:.1f} s "
            f"(per image {calibration / features:.2f}); search plain {plain:.1f} s, skipping own rows "
            f"{skipping:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
