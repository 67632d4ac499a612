"""The covering radius of the greedy coreset at several projection widths, on one dataset's real patches.

An approximate coreset may become a default only if its covering radius, taken on the features themselves,
is within 2 % of the exact greedy's (the fast-search issue). This embeds the training images of DATASET
(as in bench/speed.py: an MVTec-layout category folder, or `magnetic_tile`) once, with `efficientnet_lite0`
at --crop, and sizes the bank as `fit` does. Then, for each width in --dims, it runs `greedy_coreset` with
that `projection_dim` and the config's seed, and prints one JSON line: the seconds, the covering radius on
the unprojected features, and its ratio to the first width's.

    PATCHCORE_DATASETS=../shared/datasets PYTHONPATH=.:bench python bench/coreset_radius.py magnetic_tile \\
        --crop 224 --dims 128,96,64
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import numpy as np
    from speed import training_rows

    from patchcore_cli import config as config_mod
    from patchcore_cli import coreset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--dims", default="128,96,64", help="projection widths, the reference first")
    args = parser.parse_args()

    config = config_mod.resolve_rows(config_mod.build(backbone="efficientnet_lite0", crop=args.crop))
    rows = np.asarray(training_rows(args.dataset, config), dtype=np.float32)
    n_select = coreset.bank_size(len(rows), config.coreset, config.coreset_max_rows)
    print(json.dumps({"dataset": args.dataset, "crop": args.crop, "rows": rows.shape, "picks": n_select}))
    reference = None
    for dim in (int(part) for part in args.dims.split(",")):
        began = time.perf_counter()
        selected = coreset.greedy_coreset(rows, n_select, projection_dim=dim, seed=config.seed)
        seconds = time.perf_counter() - began
        radius = coreset.covering_radius(rows, selected)
        reference = radius if reference is None else reference
        line = {"dim": dim, "seconds": round(seconds, 2), "radius": round(radius, 4)}
        print(json.dumps({**line, "radius_ratio": round(radius / reference, 4)}), flush=True)


if __name__ == "__main__":
    main()
