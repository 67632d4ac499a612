"""Per-stage seconds of one `fit` on a dataset's training split, with the greedy coreset's phases.

Fits `efficientnet_lite0` at --crop (or `auto`) on the training images of DATASET (as in bench/speed.py:
an MVTec-layout category folder, or `magnetic_tile`) and prints one JSON line: `result.timings`, the
coreset and calibration as ratios of the backbone's time, and the seconds of the coreset's phases (the
projection, the sketch, the pruned search where it ran, the batched loop). Run it with a checkout on
PYTHONPATH, alternating checkouts, to compare them:

    PYTHONPATH=.:bench python bench/fit_stages.py magnetic_tile --crop 224
"""

from __future__ import annotations

import argparse
import json
import time

from speed import training_paths

from patchcore_cli import config as config_mod
from patchcore_cli import coreset, engine

PHASES = ("random_projection", "_sketch", "_greedy_kcenter", "_batched_greedy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--crop", default="224", help="a side in pixels, or auto")
    args = parser.parse_args()

    phases: dict[str, float] = {}

    def timed(name: str):
        function = getattr(coreset, name)

        def run(*a, **k):
            began = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - began

        return run

    for name in PHASES:
        if hasattr(coreset, name):  # older checkouts may lack a phase
            setattr(coreset, name, timed(name))
    crop = args.crop if args.crop == "auto" else int(args.crop)
    config = config_mod.build(backbone="efficientnet_lite0", crop=crop)
    result = engine.fit(training_paths(args.dataset), config)
    seconds = result.timings.seconds
    line = {stage: round(value, 2) for stage, value in seconds.items()}
    line["rows"] = int(result.bank.memory_bank.shape[0])
    for stage in ("coreset", "calibrate"):
        line[f"{stage} / backbone"] = round(seconds.get(stage, 0.0) / seconds["backbone"], 2)
    line["phases"] = {name: round(value, 2) for name, value in phases.items()}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
