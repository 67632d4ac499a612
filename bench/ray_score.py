"""Ray on this machine against the local path: `score` throughput, measured in one run.

    PYTHONPATH=. python bench/ray_score.py BANK IMAGES... [--small 16] [--large 83] [--rounds 2] [--maps]

Scores the first `--small` and then the first `--large` images with the local Scorer (the path
`patchcore score` takes) and with `distributed.score` on a Ray started here, for several pool shapes
(actors x CPUs each). Throughput is the marginal rate, (large - small) / (time large - time small): the
fixed costs (loading the model, starting the actors) cancel, and so does Ray Data's habit of handing rows
over in bursts, so neither flatters nor penalises either side. Times run from the call to the last result;
Ray's own start is printed once, apart. With `--rounds` above 1 the median time of each size is used.

Scores of the large run are compared with the local ones: identical, or the largest difference.

The Ray started here runs its workers at niceness 0, like the local run (`distributed.session`). Each
local run is made in a child process in a session of its own. Run it on a quiet machine: under heavy
load from other programs, torch called from a process's main thread (the local path) spends about twice
the CPU per image that it spends called from another thread (Ray Data runs the actor's code in one), so
Ray then looks several times faster than it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from patchcore_cli import bank as bank_io
from patchcore_cli import distributed
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer


def local_scores(bank_path: Path, paths: list[Path], maps: bool) -> tuple[float, list[float]]:
    """(seconds from loading the bank to the last result, scores): one local `score` run."""
    began = time.perf_counter()
    results = Scorer(bank_io.load(bank_path)).score_paths(paths, keep_maps=maps)
    return time.perf_counter() - began, [r.score for r in results]


def local_run(bank_path: Path, images: list[str], count: int, maps: bool) -> tuple[float, list[float]]:
    """`local_scores` in a child process in a session of its own (see the module docstring)."""
    command = [sys.executable, __file__, str(bank_path), *images, "--local", str(count)]
    done = subprocess.run(
        command + (["--maps"] if maps else []),
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    seconds, scores = json.loads(done.stdout)
    return seconds, scores


def ray_run(
    bank_path: Path, paths: list[Path], maps: bool, actors: int, cpus: int
) -> tuple[float, list[float]]:
    """(seconds from loading the bank to the last result, scores) of `score --ray` on this machine."""
    began = time.perf_counter()
    options = distributed.RayOptions(cpus=cpus, actors=actors)
    inputs = distributed.Inputs(list(paths), [])
    bank = bank_io.load(bank_path)
    results = distributed.score(inputs, bank, str(bank_path), {}, options, heatmaps=maps, masks=maps)
    return time.perf_counter() - began, [r.score for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("bank", type=Path)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--small", type=int, default=16, help="images in the short run")
    parser.add_argument("--large", type=int, default=83, help="images in the long run")
    parser.add_argument("--rounds", type=int, default=2, help="run every configuration this many times")
    parser.add_argument("--maps", action="store_true", help="also draw heatmaps and masks (not written)")
    parser.add_argument("--local", type=int, help=argparse.SUPPRESS)  # one local run of N images, as JSON
    args = parser.parse_args()

    paths = list_images(args.images)
    if args.local:
        print(json.dumps(local_scores(args.bank, paths[: args.local], args.maps)))
        return
    if len(paths) < args.large:
        parser.error(f"--large {args.large}: only {len(paths)} images given")
    cores = os.cpu_count() or 1
    print(f"{args.small} then {args.large} images, {cores} cores, {args.rounds} round(s), maps: {args.maps}")

    shapes = [(1, cores), (cores, 1), (1, 1)]
    labels = ["local", *(f"ray {actors} actor(s) x {cpus} CPU" for actors, cpus in shapes)]
    seconds: dict[tuple[str, int], list[float]] = {}
    scores: dict[str, list[float]] = {}

    def record(label: str, count: int, run: tuple[float, list[float]]) -> None:
        seconds.setdefault((label, count), []).append(run[0])
        if count == args.large:
            scores[label] = run[1]

    began = time.perf_counter()
    with distributed.session(distributed.RayOptions()):
        print(f"Ray start: {time.perf_counter() - began:.1f} s")
        for _ in range(args.rounds):
            for count in (args.small, args.large):
                record("local", count, local_run(args.bank, args.images, count, args.maps))
                for label, (actors, cpus) in zip(labels[1:], shapes, strict=True):
                    record(label, count, ray_run(args.bank, paths[:count], args.maps, actors, cpus))

    def rate(label: str) -> float:
        small = statistics.median(seconds[(label, args.small)])
        large = statistics.median(seconds[(label, args.large)])
        return (args.large - args.small) / (large - small)

    local = rate("local")
    reference = np.array(scores["local"])
    print(f"{'run':<24} {'s small':>8} {'s large':>8} {'img/s':>7} {'vs local':>9}  scores vs local")
    for label in labels:
        small = statistics.median(seconds[(label, args.small)])
        large = statistics.median(seconds[(label, args.large)])
        worst = float(np.abs(np.array(scores[label]) - reference).max())
        same = "identical" if worst == 0.0 else f"differ by up to {worst:.2e}"
        print(
            f"{label:<24} {small:>8.1f} {large:>8.1f} {rate(label):>7.2f} {rate(label) / local:>9.2f}  {same}"
        )
    one, two = rate("ray 1 actor(s) x 1 CPU"), rate(f"ray {cores} actor(s) x 1 CPU")
    print(f"each 1-CPU actor beyond the first adds {(two - one) / max(cores - 1, 1):.2f} img/s here")


if __name__ == "__main__":
    main()
