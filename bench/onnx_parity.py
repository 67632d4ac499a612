"""The exported ONNX model against `patchcore score` on real images: parity, throughput and memory.

    python bench/onnx_parity.py BANK IMAGES... [--threads 2] [--batch-size 8] [--repeat 2]

- Parity: the bank is exported (as `patchcore export` does), every image is scored by the engine (with
  maps) and by onnxruntime on the CPU, and the largest score, normalised-score and map differences and
  the number of differing verdicts are printed (see `export.Parity` for what is relative to what).
- Throughput: images/s of the engine (`Scorer.score_paths`, as `patchcore score` runs it, without maps
  and with maps as `--heatmaps` needs) and of onnxruntime (decode + preprocess + run, and run alone), on
  the same images with the same thread count, alternating, best of `--repeat`. Ratios come from one run.
  CPU ms per image (all threads of the process) is printed too: on a busy machine it says more than the
  wall clock, at one thread especially.
- Memory: a fresh process imports onnxruntime, loads the model and runs one batch; its peak RSS above the
  import is compared with the bank's and the backbone's size (the issue's bound: 2x their sum).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_MEMORY_PROBE = """
import sys, numpy as np, onnxruntime as ort
def peak():  # VmHWM: this process's peak resident set so far, in MB
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
path, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
imported = peak()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
loaded = peak()
shape = [batch, *sess.get_inputs()[0].shape[1:]]
sess.run(None, {"image": np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)})
print(imported, loaded, peak())
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bank", type=Path)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()

    from patchcore_cli import bank as bank_io
    from patchcore_cli import export
    from patchcore_cli.data import list_images
    from patchcore_cli.engine import Scorer

    paths = list_images(args.images)
    bank = bank_io.load(args.bank)
    scorer = Scorer(bank, batch_size=args.batch_size, threads=args.threads, weights=args.weights)
    began = time.perf_counter()
    model = export.to_onnx(scorer)
    export_s = time.perf_counter() - began
    sess = export.session(model, args.threads)

    results = scorer.score_paths(paths, keep_maps=True)
    images = np.stack([export.preprocess_image(path, scorer.config) for path in paths])
    parity = export.compare(results, export.run(sess, images, args.batch_size), scorer.threshold)

    def engine(maps: bool) -> None:
        scorer.score_paths(paths, keep_maps=maps)

    def onnx(decode: bool) -> None:
        batch = np.stack([export.preprocess_image(p, scorer.config) for p in paths]) if decode else images
        export.run(sess, batch, args.batch_size)

    runs = {
        "score": lambda: engine(False),
        "score --heatmaps": lambda: engine(True),
        "onnx": lambda: onnx(True),
        "onnx run": lambda: onnx(False),
    }
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):  # alternating, best of `repeat`: a busy machine slows some runs
        for name, work in runs.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            work()
            wall[name] = min(wall[name], time.perf_counter() - began)
            cpu[name] = min(cpu[name], time.process_time() - began_cpu)
    rates = {name: len(paths) / seconds for name, seconds in wall.items()}

    backbone_mb = (
        sum(
            p.numel() * p.element_size()
            for part in scorer.parts
            for m in part.extractor.trunk.modules
            for p in m.parameters()
        )
        / 2**20
    )
    bank_mb = bank.nbytes / 2**20
    memory = {}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        path.write_bytes(model)
        for batch in (1, args.batch_size):
            probe = [sys.executable, "-c", _MEMORY_PROBE, str(path), str(batch), str(args.threads)]
            imported, loaded, peak = map(
                float, subprocess.run(probe, check=True, capture_output=True, text=True).stdout.split()
            )
            memory[batch] = {
                "load_mb": loaded - imported,
                "load_and_run_mb": peak - imported,
                "process_peak_mb": peak,
            }

    report = {
        "bank": str(args.bank),
        "images": len(paths),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "export_s": round(export_s, 1),
        "model_mb": round(len(model) / 2**20, 2),
        "bank_mb": round(bank_mb, 2),
        "backbone_mb": round(backbone_mb, 2),
        "parity": parity.as_dict(),
        "images_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "onnx_vs_score": round(rates["onnx"] / rates["score"], 2),
        "onnx_vs_score_heatmaps": round(rates["onnx"] / rates["score --heatmaps"], 2),
        "cpu_ms_per_image": {name: round(1000 * seconds / len(paths), 1) for name, seconds in cpu.items()},
        "memory_above_import": {
            str(batch): {key: round(value, 1) for key, value in numbers.items()}
            for batch, numbers in memory.items()
        },
        "memory_bound_mb": round(2 * (bank_mb + backbone_mb), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
