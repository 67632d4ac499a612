"""Latency to the first result of `patchcore score one.png`, cold and warm (docs/latency.md).

    PYTHONPATH=. python bench/latency.py IMAGE --bank BANK [--runs 5] [--watch] [--baseline DIR]

Every figure is a median over --runs fresh processes, in wall seconds and in CPU seconds (user + system)
of the process. On a shared machine the CPU time is the steadier of the two: imports and compilation run
on one core, so on an idle machine their wall time is about their CPU time.

1. `patchcore --help`.
2. `patchcore score IMAGE --bank BANK --json`: until its result line is on stdout, and until it exits.
3. The same cold start cut into stages, in a fresh process each run: the interpreter, the CLI's imports,
   each heavy library the score path imports (timed alone, in dependency order, so each line is that
   library's own share), the bank load, the backbone build with its weights, the search index, the first
   image. Then the same image 10 times more in that process: what a long-running process pays per image.
4. With --watch: `patchcore score --watch DIR --json` in one process; the image is renamed into DIR 10
   times, and each time the delay until its result line is on stdout is taken (--settle 0 and 0.25).
With --baseline DIR, 1 and 2 run interleaved for the code in DIR and this checkout, and 3 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The libraries whose import can dominate a cold start, in dependency order.
HEAVY = ["numpy", "torch", "torchvision", "timm", "numba", "scipy", "sklearn", "faiss", "matplotlib"]

STAGES = r"""
import importlib, json, sys, time
out = {}
began = (time.perf_counter(), time.process_time())
def lap(name):
    global began
    now = (time.perf_counter(), time.process_time())
    out[name] = (now[0] - began[0], now[1] - began[1])
    began = now
import patchcore_cli.cli
lap("import patchcore_cli.cli (typer, rich)")
for name in sys.argv[3].split(","):
    if name:
        importlib.import_module(name)
        lap("import " + name)
import rich.progress
lap("import rich.progress")
from pathlib import Path
from patchcore_cli import bank as bank_io
from patchcore_cli.engine import Scorer
bank = bank_io.load(sys.argv[2])
lap("bank load")
scorer = Scorer(bank, bank_path=sys.argv[2])
lap("scorer")
out["  of which load backbone"] = (scorer.timings.seconds.get("load backbone", 0.0), None)
out["  of which index"] = (scorer.timings.seconds.get("index", 0.0), None)
before = dict(scorer.timings.seconds)
scorer.score_paths([Path(sys.argv[1])])
lap("first image")
for key, value in scorer.timings.seconds.items():
    if key not in ("load backbone", "index"):
        out["  of which " + key] = (value - before.get(key, 0.0), None)
warm = []
for _ in range(10):
    began = (time.perf_counter(), time.process_time())
    scorer.score_paths([Path(sys.argv[1])])
    warm.append((time.perf_counter() - began[0], time.process_time() - began[1]))
out["warm image (median of 10)"] = (sorted(w[0] for w in warm)[5], sorted(w[1] for w in warm)[5])
print(json.dumps(out))
"""


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(seconds to the first stdout line, seconds to exit, CPU seconds, stdout) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    assert proc.stdout is not None
    first_line = proc.stdout.readline()
    first = time.perf_counter() - began
    rest = proc.stdout.read()
    proc.wait()
    done = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {proc.returncode}")
    return first, done, cpu, first_line + rest


def median(values: list[float]) -> float:
    return statistics.median(values)


def imported_by_score(python: str, image: str, bank: str, env: dict[str, str]) -> list[str]:
    """The heavy libraries a real `patchcore score` process ends up importing."""
    probe = (
        "import sys, runpy; sys.argv = ['patchcore', 'score', sys.argv[1], '--bank', sys.argv[2], '--json']\n"
        "try:\n    runpy.run_module('patchcore_cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run(
        [python, "-c", probe, image, bank], capture_output=True, text=True, env=env, check=True
    )
    return done.stderr.strip().splitlines()[-1].split(",")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch_latency(
    python: str, image: Path, bank: str, env: dict[str, str], count: int, settle: str
) -> list[tuple[float, float]]:
    """(wall seconds from an image's rename into the watched folder to its result line, CPU seconds the
    watcher spent meanwhile), `count` times."""
    folder = Path(tempfile.mkdtemp(prefix="latency-watch-"))
    staging = Path(tempfile.mkdtemp(prefix="latency-staging-", dir=folder.parent))
    command = [python, "-m", "patchcore_cli", "score", "--watch", str(folder), "--bank", bank, "--json"]
    command += ["--settle", settle]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for line in proc.stderr:  # the watcher says when it is ready
            if line.startswith("watching"):
                break
        delays = []
        for number in range(count):
            staged = staging / f"part{number:03d}{image.suffix}"
            shutil.copyfile(image, staged)
            began, cpu = time.perf_counter(), cpu_seconds(proc.pid)
            os.replace(staged, folder / staged.name)
            record = json.loads(proc.stdout.readline())
            delays.append((time.perf_counter() - began, cpu_seconds(proc.pid) - cpu))
            assert record["file"].endswith(staged.name) and record.get("error") is None, record
        return delays
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image")
    parser.add_argument("--bank", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--watch", action="store_true", help="also measure `score --watch`")
    parser.add_argument(
        "--baseline",
        help="a folder holding another patchcore_cli (`git archive REV patchcore_cli | tar -x -C DIR`); "
        "its cold starts run interleaved with this one's, so both see the same machine load",
    )
    args = parser.parse_args()
    python = sys.executable
    image, bank = str(Path(args.image).resolve()), str(Path(args.bank).resolve())
    # Every process runs in a neutral folder: `python -m` puts the working folder first on sys.path, and a
    # checkout there would shadow the code under test.
    os.chdir(tempfile.gettempdir())
    variants = {"this": {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}}
    if args.baseline:
        variants["baseline"] = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}
    for name, env in variants.items():
        where = subprocess.run(
            [python, "-c", "import patchcore_cli; print(patchcore_cli.__file__)"],
            capture_output=True, text=True, env=env, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"{name}: {where}")
    cli = [python, "-m", "patchcore_cli"]
    one = [*cli, "score", image, "--bank", bank, "--json"]

    interpreter = [run_timed([python, "-c", "print()"], variants["this"]) for _ in range(args.runs)]
    helps: dict[str, list] = {name: [] for name in variants}
    scores: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, env in variants.items():
            helps[name].append(run_timed([*cli, "--help"], env))
            scores[name].append(run_timed(one, env))
    rows = [("python -c 'print()'", {"this": interpreter})]
    rows += [("patchcore --help", helps), ("score one image: process exit", scores)]
    print(f"median of {args.runs} cold processes; wall and CPU seconds")
    print(f"{'':36s}" + "".join(f"{name + ' wall':>16s}{name + ' CPU':>15s}" for name in variants))
    for label, runs in rows:
        cells = "".join(
            f"{median([r[1] for r in runs[name]]):16.2f}{median([r[2] for r in runs[name]]):15.2f}"
            if name in runs
            else " " * 31
            for name in variants
        )
        print(f"{label:36s}{cells}")
    firsts = "".join(f"{median([r[0] for r in scores[name]]):16.2f}{'':15s}" for name in variants)
    print(f"{'score one image: result on stdout':36s}{firsts}")

    for name, env in variants.items():
        heavy = imported_by_score(python, image, bank, env)
        stages: list[dict[str, float]] = []
        cpus = []
        for _ in range(args.runs):
            _, _, cpu, text = run_timed([python, "-c", STAGES, image, bank, ",".join(heavy)], env)
            stages.append(json.loads(text.strip().splitlines()[-1]))
            cpus.append(cpu)
        print(f"\n{name}: stages of a cold score process, median of {args.runs}: wall s, CPU s")
        print(f"  (heavy libraries it imports: {', '.join(heavy)})")
        for key in stages[0]:
            wall = median([s[key][0] for s in stages])
            cpu = "" if stages[0][key][1] is None else f"{median([s[key][1] for s in stages]):8.3f}"
            print(f"  {key:46s} {wall:8.3f} {cpu}")
        print(f"  {'(process CPU s, incl. 10 warm images)':46s} {'':8s} {median(cpus):8.2f}")

    if args.watch:
        for settle in ("0", "0.25"):
            delays = watch_latency(python, Path(image), bank, variants["this"], 10, settle)
            walls = [d[0] for d in delays]
            print(
                f"\nscore --watch --settle {settle}: rename into the folder -> result line, median of 10: "
                f"{median(walls):.3f} s wall (min {min(walls):.3f}, max {max(walls):.3f}), "
                f"{median([d[1] for d in delays]):.3f} s CPU"
            )


if __name__ == "__main__":
    main()
