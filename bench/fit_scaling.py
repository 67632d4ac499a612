"""Fit time and peak memory against the number of training images (issue 11, "Targets").

Generates synthetic `washer` images with the demo generator (`patchcore_cli.synthetic`, 256 x 256, seed 0),
then for each N fits `efficientnet_lite0` at default settings on the first N training images, each fit in a
fresh `patchcore fit` process, so that its peak resident memory (read with `os.wait4`: the child's own
rusage) is that fit's alone. The work files go to the scratch folder (or `--work`), and the largest the
work folder grows is sampled while the fit runs. Each bank is then scored on one fixed synthetic test split
(40 good, 40 defective). Prints, per N: fit seconds, feature seconds (decode wait + backbone + aggregation
+ store writes), coreset seconds, calibration seconds, the coreset/feature ratio, peak RSS, peak work-file
disk, bank rows, coreset passes and image AUROC.

    PYTHONPATH=. python bench/fit_scaling.py --sizes 1000,4000,16000 --data /scratch/fit-scaling

`--data` keeps the generated images between runs (generating ran at 10 images/s on a loaded machine, 112 KB
each); the largest N is generated once and smaller N use its first images. Extra arguments after `--` go to
`patchcore fit` (for instance `-- --max-memory 32GB` for a one-pass coreset, or `-- --max-memory 20MB` to
see shards on a small N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CATEGORY = "washer"
TEST = {"n_test_good": 40, "n_test_defect_per_type": 10}  # 40 good, 40 defective test images
FEATURE_STAGES = ("decode (waiting)", "backbone", "aggregate + reduce", "store")


def generate(root: Path, n_train: int) -> Path:
    """The synthetic category with at least `n_train` training images under `root` (made once)."""
    from patchcore_cli.synthetic import SyntheticSpec, generate_dataset

    folder = root / f"n{n_train}"
    if not (folder / CATEGORY / "README.done").exists():
        began = time.perf_counter()
        generate_dataset(folder, categories=[CATEGORY], spec=SyntheticSpec(n_train=n_train, **TEST), seed=0)
        (folder / CATEGORY / "README.done").write_text("complete\n")
        print(f"generated {n_train} training images in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return folder / CATEGORY


def subset(category: Path, n: int, root: Path) -> Path:
    """A folder of symbolic links to the first n training images (by generation index)."""
    folder = root / f"train-{n}"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        link = folder / f"{i:06d}.png"
        if not link.exists():
            link.symlink_to(category / "train" / "good" / f"{i:03d}.png")
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` now (files may vanish while it looks)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def run_fit(images: Path, bank: Path, work: Path, extra: list[str]) -> tuple[dict, float, float, float]:
    """`patchcore fit` in a fresh process: (its --json report, wall seconds, peak RSS MB, peak work MB)."""
    command = [sys.executable, "-m", "patchcore_cli", "fit", str(images), "--out", str(bank)]
    command += ["--backbone", "efficientnet_lite0", "--work-dir", str(work), "--json", *extra]
    peak_disk, done = 0, threading.Event()

    def watch() -> None:
        nonlocal peak_disk
        while not done.wait(1.0):
            peak_disk = max(peak_disk, folder_bytes(work))

    watcher = threading.Thread(target=watch, daemon=True)
    began = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=out, stderr=err)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
        done.set()
        watcher.join()
        seconds = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"fit failed ({status}): {err.read().decode()[-2000:]}")
        report = json.loads(out.read())
    return report, seconds, usage.ru_maxrss / 1024, peak_disk / 2**20  # Linux: ru_maxrss in kilobytes


def image_auroc(bank: Path, category: Path) -> float:
    test = category / "test"
    command = [sys.executable, "-m", "patchcore_cli", "evaluate", "--bank", str(bank)]
    command += ["--good", str(test / "good")]
    for folder in sorted(test.iterdir()):
        if folder.name != "good":
            command += ["--defect", str(folder)]
    done = subprocess.run([*command, "--no-pixel-metrics", "--json"], capture_output=True, check=True)
    return float(json.loads(done.stdout)["image"]["image_auroc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,16000", help="comma-separated N")
    parser.add_argument("--data", type=Path, help="folder that keeps the generated images (default: temp)")
    parser.add_argument("--work", type=Path, help="--work-dir of the fits (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    sizes = [int(n) for n in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="fit-scaling-") as scratch:
        root = args.data or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        work = args.work or Path(scratch) / "work"
        work.mkdir(parents=True, exist_ok=True)
        category = generate(root, max(sizes))
        rows = []
        print(
            f"{'N':>6} {'fit s':>8} {'feature s':>9} {'coreset s':>9} {'calib s':>7} {'core/feat':>9} "
            f"{'peak RSS MB':>11} {'work MB':>8} {'bank rows':>10} {'passes':>6} {'image AUROC':>11}",
            flush=True,
        )
        for n in sizes:
            images = subset(category, n, root)
            bank = Path(scratch) / f"bank-{n}.st"
            report, seconds, peak, disk = run_fit(images, bank, work, extra)
            stages = report["timings_s"]
            feature = sum(stages.get(name, 0.0) for name in FEATURE_STAGES)
            row = {
                "n": n,
                "fit_s": round(seconds, 1),
                "feature_s": round(feature, 1),
                "coreset_s": round(stages.get("coreset", 0.0), 1),
                "calibrate_s": round(stages.get("calibrate", 0.0), 1),
                "peak_rss_mb": round(peak),
                "peak_work_mb": round(disk),
                "bank_rows": report["bank_rows"],
                "coreset_passes": report["coreset_passes"][0],
                "image_auroc": image_auroc(bank, category),
                "stages_s": stages,
            }
            rows.append(row)
            bank.unlink()
            print(
                f"{n:>6} {row['fit_s']:>8.1f} {row['feature_s']:>9.1f} {row['coreset_s']:>9.1f} "
                f"{row['calibrate_s']:>7.1f} {row['coreset_s'] / max(feature, 1e-9):>9.2f} "
                f"{row['peak_rss_mb']:>11} {row['peak_work_mb']:>8} {row['bank_rows']:>10,} "
                f"{row['coreset_passes']:>6} {row['image_auroc']:>11.4f}",
                flush=True,
            )
        if args.json:
            args.json.write_text(json.dumps({"extra_fit_args": extra, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
