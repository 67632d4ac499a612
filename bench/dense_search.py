"""The dense search path alone: its time per image, by stage, for several shares of principal axes.

    python bench/dense_search.py BANK DATASET [--images 16] [--kept 0.9,0.93,1.0] [--repeat 3]

DATASET is as in bench/speed.py (an MVTec-layout category folder, or `magnetic_tile`). The script embeds
the first --images test images with the bank's own configuration, then, for each share of the bank's
variance kept by the product's principal axes (`search._DENSE_KEPT`), builds the index afresh and times
`ClusterIndex.nearest_dense` on all their patches (best of --repeat). Per setting it prints one JSON line:
the product's columns, ms per image in all, and the part spent in the matrix product, in the chunk scan
and in measuring the rows left (the search threads' time in each, summed, over the number of threads).
It checks that every setting returns the same rows and distances.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import torch
    from speed import split_of

    from patchcore_cli import bank as bank_io
    from patchcore_cli import search
    from patchcore_cli.data import DEFAULT_MAX_PIXELS
    from patchcore_cli.engine import Scorer, Timings, _Silent, embed_paths

    parser = argparse.ArgumentParser()
    parser.add_argument("bank")
    parser.add_argument("dataset")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--kept", default="0.9,0.93,0.95,1.0")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    loaded = bank_io.load(args.bank)
    scorer = Scorer(loaded)
    paths = [sample.path for sample in split_of(args.dataset).test][: args.images]
    rows = [
        patches.rows
        for _, per_backbone in embed_paths(
            paths, [scorer.extractor], Timings(), _Silent(), DEFAULT_MAX_PIXELS
        )
        for patches in per_backbone[0]
    ]
    queries = np.ascontiguousarray(np.concatenate(rows), np.float32)
    skips = np.full(len(queries), -1, np.int64)
    memory = np.ascontiguousarray(loaded.memory_bank, np.float32)

    # Each search thread runs the three stages of its blocks itself, so a stage's figure is the time the
    # threads spent in it, summed, divided by the number of threads.
    spent = {"product": 0.0, "scan": 0.0, "measure": 0.0}
    real = {"product": torch.mm, "scan": search._dense_chunk_min, "measure": search._dense_pick}
    threads = max(1, torch.get_num_threads())

    def timed(stage):
        def run(*a, **k):
            began = time.perf_counter()
            out = real[stage](*a, **k)
            spent[stage] += (time.perf_counter() - began) / threads  # += under the GIL
            return out

        return run

    def install(functions):
        torch.mm, search._dense_chunk_min, search._dense_pick = functions

    reference = None
    for kept in (float(value) for value in args.kept.split(",")):
        search._DENSE_KEPT = kept
        index = search.ClusterIndex(memory)
        columns = int(index._dense_tables()[0].shape[1])
        index.nearest_dense(queries[:16], skips[:16])  # compile or load the kernels
        install([timed(stage) for stage in real])
        best = None
        try:
            for _ in range(args.repeat):
                spent.update(product=0.0, scan=0.0, measure=0.0)
                began = time.perf_counter()
                found = index.nearest_dense(queries, skips)
                total = time.perf_counter() - began
                if best is None or total < best[0]:
                    best = (total, dict(spent))
        finally:
            install(list(real.values()))
        if reference is None:
            reference = found
        same = all(np.array_equal(a, b) for a, b in zip(found, reference, strict=True))
        per_image = 1000.0 / len(paths)
        print(
            json.dumps(
                {
                    "kept": kept,
                    "columns": columns,
                    "ms_per_image": round(best[0] * per_image, 1),
                    **{name: round(value * per_image, 1) for name, value in best[1].items()},
                    "same_answers": same,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
