"""The greedy coreset alone, checkout against checkout, on one dataset's real projected patches.

Embeds the training images of DATASET (as in bench/speed.py: an MVTec-layout category folder, or
`magnetic_tile`) once, with `efficientnet_lite0` at --crop, projects them as `fit` does
(`coreset.random_projection`, the config's dimension and seed) and saves the projection to --work. Then,
for --rounds rounds, runs each checkout's `greedy_coreset` on it in a fresh process (that checkout on
PYTHONPATH; the first call compiles or loads its kernels, so a warm-up call on a small slice comes first)
and prints one JSON line per run: seconds, the batched fallback's counts where the checkout reports them
(passes, pairs, frozen and thawed rows), and whether its selection is the first checkout's, index for
index. Runs are interleaved, so a noisy machine slows every checkout alike.

    PYTHONPATH=. python bench/coreset_speed.py magnetic_tile --crop 224 --checkout /tmp/before --checkout .

A checkout folder only needs `patchcore_cli/`: `git archive COMMIT patchcore_cli | tar -x -C /tmp/before`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Run in each checkout's process: time greedy_coreset on the saved projection.
CHILD = """
import json, sys, time
import numpy as np
from patchcore_cli import coreset
points = np.load(sys.argv[1])
n_select, start, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
counts = {}
fallback = coreset._batched_greedy
def counted(*args):
    result = fallback(*args)
    if isinstance(result, dict):
        counts.update(result)
        counts["pair_share"] = round(result["pairs"] / (args[0].shape[0] * (args[6].shape[0] - args[8])), 4)
    return result
coreset._batched_greedy = counted
coreset.greedy_coreset(points[:20000], 2000, projection_dim=None, start=0)
counts.clear()
began = time.perf_counter()
order = coreset.greedy_coreset(points, n_select, projection_dim=None, start=start)
seconds = time.perf_counter() - began
np.save(out, order)
print(json.dumps({"seconds": round(seconds, 2), **counts}))
"""


def main() -> None:
    import numpy as np
    from speed import training_rows

    from patchcore_cli import config as config_mod
    from patchcore_cli import coreset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--checkout", action="append", required=True, help="a folder holding patchcore_cli/")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="/tmp/coreset-speed")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = config_mod.resolve_rows(config_mod.build(backbone="efficientnet_lite0", crop=args.crop))
    rows = training_rows(args.dataset, config)
    projected = work / "projected.npy"
    np.save(projected, coreset.random_projection(rows, config.projection_dim, config.seed))
    n_select = coreset.bank_size(len(rows), config.coreset, config.coreset_max_rows)
    start = int(np.random.default_rng(config.seed).integers(len(rows)))
    print(json.dumps({"dataset": args.dataset, "crop": args.crop, "rows": len(rows), "picks": n_select}))

    for round_ in range(args.rounds):
        for k, checkout in enumerate(args.checkout):
            out = work / f"order-{k}.npy"
            folder = Path(checkout).resolve()
            env = dict(os.environ, PYTHONPATH=str(folder))
            command = [sys.executable, "-c", CHILD, str(projected), str(n_select), str(start), str(out)]
            # In the checkout's folder: `python -c` puts the working folder first on the import path.
            run = subprocess.run(command, env=env, cwd=folder, check=True, capture_output=True, text=True)
            same = bool(np.array_equal(np.load(out), np.load(work / "order-0.npy")))
            line = {"round": round_, "checkout": checkout, **json.loads(run.stdout), "same_selection": same}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
