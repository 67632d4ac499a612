"""Scoring speed and the metrics it must not change, for one bank, under whichever patchcore is imported.

    python bench/speed.py BANK DATASET [--repeat N] [--threads T] [--every K]

DATASET is an MVTec-layout category folder, or `magnetic_tile` (the seeded split of
../shared/datasets/magnetic_tile that `benchmark folder` makes). The bank must have been fitted on that
dataset's training images. The script loads the bank once, scores the test set N times (default 2, the
best run counts; a warm-up batch first, so compiling and caching are not timed), and prints one JSON line:
images/s, ms per image per stage (decode wait, backbone, search, maps), the backbone's bare forward pass
on the same batch shape in the same process, and image AUROC, pixel AUROC and AUPRO. `--every K` scores
every K-th test image only (the brute force at 448 takes minutes per hundred images); the metrics are then
those of that subset.

To compare two versions of the code in one sitting, run it under each with PYTHONPATH pointing at its
checkout, alternating, e.g. `git worktree add /tmp/before 07686a2` and then
`PYTHONPATH=/tmp/before python bench/speed.py ...` against `PYTHONPATH=. python bench/speed.py ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


def split_of(dataset: str):
    from patchcore_cli.data import folder_split, mvtec_category

    if dataset == "magnetic_tile":
        mt = DATA / "magnetic_tile"
        defects = [mt / f"MT_{name}" / "Imgs" for name in ("Blowhole", "Break", "Crack", "Fray", "Uneven")]
        return folder_split([mt / "MT_Free" / "Imgs"], defects, seed=42, name="magnetic_tile")
    folder = Path(dataset)
    return mvtec_category(folder.parent, folder.name)


def training_paths(dataset: str) -> list:
    """The paths of DATASET's training images (`split_of`), as `fit` takes them."""
    return [getattr(sample, "path", sample) for sample in split_of(dataset).train]


def training_rows(dataset: str, config):
    """The patch rows of DATASET's training images, embedded as `fit` embeds them, N x D."""
    from patchcore_cli import engine
    from patchcore_cli.data import DEFAULT_MAX_PIXELS

    paths = training_paths(dataset)
    batches = engine.embed_paths(
        paths, [engine.Extractor(config)], engine.Timings(), engine._Silent(), DEFAULT_MAX_PIXELS
    )
    return engine.TrainingPatches.collect(batches).rows


def search_path(scorer) -> dict | None:
    """Which exact search path the index chose, and the trial seconds (checkouts before the dense path:
    None)."""
    index = (
        getattr(getattr(scorer.parts[0], "search", None), "index", None) if hasattr(scorer, "parts") else None
    )
    if index is None or not hasattr(index, "trial"):
        return None
    return {"path": index.path, "trial_s": {k: round(v, 4) for k, v in index.trial.items()}}


def main() -> None:
    from patchcore_cli import bank as bank_io
    from patchcore_cli.engine import Scorer, set_threads
    from patchcore_cli.evaluation import bare_forward_throughput, evaluate

    parser = argparse.ArgumentParser()
    parser.add_argument("bank")
    parser.add_argument("dataset")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    try:
        set_threads(args.threads, "exact")
    except TypeError:  # checkouts before faiss became optional for the exact index
        set_threads(args.threads)
    split = split_of(args.dataset)
    if args.every > 1:
        split = dataclasses.replace(split, test=split.test[:: args.every])
    scorer = Scorer(bank_io.load(args.bank), bank_path=args.bank)
    scorer.score_paths([s.path for s in split.test[:8]], keep_maps=True)  # warm-up: compile, caches
    best = None
    for _ in range(args.repeat):
        scorer.timings.seconds.clear()
        began = time.perf_counter()
        evaluation = evaluate(scorer, split, pixel_metrics=True)
        seconds = time.perf_counter() - began
        if best is None or seconds < best[0]:
            best = (seconds, dict(scorer.timings.seconds), evaluation)
    seconds, stages, evaluation = best
    count = len(split.test)
    print(
        json.dumps(
            {
                "bank": args.bank,
                "dataset": args.dataset,
                "images": count,
                "images_per_s": round(count / seconds, 2),
                "ms_per_image": {k: round(1000 * v / count, 2) for k, v in stages.items()},
                "bare_forward_images_per_s": round(bare_forward_throughput(scorer.extractor), 1),
                "search_path": search_path(scorer),
                "image_auroc": round(evaluation.image["image_auroc"], 4),
                "pixel_auroc": round(evaluation.pixel["pixel_auroc"], 4),
                "aupro": round(evaluation.pixel["aupro"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
