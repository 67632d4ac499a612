"""`fit --ray` against a local fit on this machine: seconds, and whether the banks are identical.

    PYTHONPATH=. python bench/fit_ray.py [--images 200] [--max-memory 140MB] [--ray-cpus 2] [--data DIR]

Generates `--images` synthetic washer training images (256 x 256, the demo generator, seed 0) unless
`--data` already holds them, then runs `patchcore fit` on them twice, each in a fresh process: locally
and with `--ray` (a Ray started on this machine, tasks of `--ray-cpus` CPUs), both with the same
`--max-memory`, so both cut the same shards (`--ray-first` swaps the order). Prints the wall seconds of
each command (Ray's start included), the stage seconds each reports, and whether the two banks hold the
same rows and the same calibration, bit for bit. Extra arguments go to both fits (say `--backbone
resnet18 --weights random`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from patchcore_cli import bank as bank_io
from patchcore_cli.synthetic import SyntheticSpec, generate_dataset


def fit(images: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    """(wall seconds, `fit --json` record) of one `patchcore fit` in a fresh process."""
    command = [sys.executable, "-m", "patchcore_cli", "fit", str(images), "--out", str(out), "--json", *extra]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    seconds = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--max-memory", default="140MB")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--data", type=Path, help="keep the generated images here (reused when present)")
    parser.add_argument("--ray-first", action="store_true", help="run the Ray fit before the local one")
    args, extra = parser.parse_known_args()
    extra = ["--backbone", "efficientnet_lite0", *extra] if "--backbone" not in extra else extra
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch) / "data"
        images = root / "washer" / "train" / "good"
        if not images.is_dir():
            spec = SyntheticSpec(n_train=args.images, n_test_good=1, n_test_defect_per_type=1)
            generate_dataset(root, categories=["washer"], spec=spec, seed=0)
        count = len(list(images.iterdir()))
        common = [*extra, "--max-memory", args.max_memory]
        print(f"{count} images, fit {' '.join(common)}; {os.cpu_count()} cores")
        ray_args = [*common, "--ray", "--ray-cpus", str(args.ray_cpus)]
        if args.ray_first:
            ray_s, on_ray = fit(images, Path(scratch) / "ray.st", ray_args)
        local_s, local = fit(images, Path(scratch) / "local.st", common)
        if not args.ray_first:
            ray_s, on_ray = fit(images, Path(scratch) / "ray.st", ray_args)
        print(f"{'run':<8} {'wall s':>7} {'passes':>7}  stages (s)")
        for label, seconds, record in (("local", local_s, local), ("ray", ray_s, on_ray)):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in record["timings_s"].items())
            print(f"{label:<8} {seconds:>7.1f} {record['coreset_passes']!s:>7}  {stages}")
        print(f"ray / local wall time: {ray_s / local_s:.2f}")
        a, b = bank_io.load(Path(scratch) / "local.st"), bank_io.load(Path(scratch) / "ray.st")
        rows = a.memory_bank.shape == b.memory_bank.shape and np.array_equal(a.memory_bank, b.memory_bank)
        same = rows and a.calibration == b.calibration and a.calibration_sample == b.calibration_sample
        print(f"banks identical (rows, calibration, sample): {same} ({a.memory_bank.shape[0]} rows)")


if __name__ == "__main__":
    main()
