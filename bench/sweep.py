"""Run `patchcore benchmark` for one configuration on the four datasets that choose the defaults.

    python bench/sweep.py LABEL [patchcore fit options...]
    python bench/sweep.py whole320 --crop 320
    python bench/sweep.py lite2 --backbone efficientnet_lite2 --datasets bottle,capsule

Each dataset's results go to runs/LABEL/DATASET/ (results.json, .csv, .md, and the console tables in
log.txt). The datasets, with paths relative to the repository root:

- bottle: MVTec AD bottle (../shared/datasets/mvtec_ad);
- capsule: MVTec AD capsule reduced to 512 px (../shared/datasets/capsule_512);
- magnetic_tile: the Magnetic Tile set, MT_Free split in half by seed 42 (../shared/datasets/magnetic_tile);
- synthetic: the `patchcore demo` data (seed 0: fabric, washer, ridged), generated once into runs/demo.

Set PATCHCORE_DATASETS to read the datasets from elsewhere.

Every number comes from the CLI itself. `bench/compare.py` turns the runs into tables and bootstrap
intervals.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PATCHCORE_DATASETS", ROOT.parent / "shared" / "datasets"))
RUNS = ROOT / "runs"
MT = DATA / "magnetic_tile"
MT_DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
SYNTHETIC = ("fabric", "washer", "ridged")
DATASETS = {
    "bottle": ["mvtec", "--root", str(DATA / "mvtec_ad"), "--categories", "bottle"],
    "capsule": ["mvtec", "--root", str(DATA / "capsule_512"), "--categories", "capsule"],
    "magnetic_tile": [
        "folder",
        "--good",
        str(MT / "MT_Free" / "Imgs"),
        *(arg for name in MT_DEFECTS for arg in ("--defect", str(MT / f"MT_{name}" / "Imgs"))),
        "--name",
        "magnetic_tile",
    ],
    "synthetic": ["mvtec", "--root", str(RUNS / "demo" / "data"), "--categories", ",".join(SYNTHETIC)],
}


def synthetic_data() -> None:
    """Generate the demo's data once (the same generator and seed as `patchcore demo`)."""
    if (RUNS / "demo" / "data" / SYNTHETIC[-1]).is_dir():
        return
    from patchcore_cli.synthetic import generate_dataset

    generate_dataset(RUNS / "demo" / "data", seed=0)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    label, options = argv[0], argv[1:]
    wanted = list(DATASETS)
    if "--datasets" in options:
        at = options.index("--datasets")
        wanted = options[at + 1].split(",")
        options = options[:at] + options[at + 2 :]
    synthetic_data()
    patchcore = [sys.executable, "-m", "patchcore_cli"]
    for name in wanted:
        out = RUNS / label / name
        out.mkdir(parents=True, exist_ok=True)
        command = [*patchcore, "benchmark", *DATASETS[name], *options, "--out", str(out)]
        began = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            env = {**os.environ, "COLUMNS": "200"}
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        seconds = time.perf_counter() - began
        print(f"{label} / {name}: exit {done.returncode}, {seconds:.0f} s", flush=True)
        if done.returncode != 0:
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
