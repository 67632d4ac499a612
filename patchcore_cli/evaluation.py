"""Scoring a labelled test split and turning the scores into metrics; the benchmark loop over datasets."""

from __future__ import annotations

import heapq
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_cli import metrics
from patchcore_cli.calibration import CONFIDENCE
from patchcore_cli.config import FitConfig
from patchcore_cli.data import DEFAULT_MAX_PIXELS, Sample, Split
from patchcore_cli.engine import Progress, Scorer, ScoreResult, _Silent, fit
from patchcore_cli.geometry import Geometry


@dataclass
class Case:
    """One test image the report shows, with its anomaly map (crop x crop float32, crop frame)."""

    path: Path
    defect_type: str
    label: int
    score: float
    anomalous: bool
    anomaly_map: np.ndarray
    geometry: Geometry


@dataclass
class Visuals:
    """What the HTML report draws besides the metrics: ROC curve points (see `metrics.image_roc_curve`,
    None where undefined), the hardest cases with their maps, and the bank's metadata."""

    image_roc: dict[str, np.ndarray] | None
    pixel_roc: dict[str, np.ndarray] | None
    highest_good: list[Case]
    """The good images with the highest scores, highest first: false positives, or the nearest misses."""
    lowest_defect: list[Case]
    """The defective images with the lowest scores, lowest first: false negatives, or the nearest misses."""
    bank: dict[str, Any]
    """See `bank_metadata`."""


class _Hardest:
    """Keeps, while scores stream in, the `count` highest-scoring good and lowest-scoring defective images.

    Only their maps are held, so the memory stays at 2 x `count` maps whatever the size of the test set.
    Equal scores keep the earlier image.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.good: list[tuple[float, int, Case]] = []  # min-heaps on the key: the weakest kept case on top
        self.defect: list[tuple[float, int, Case]] = []

    def offer(self, index: int, sample: Sample, result: ScoreResult) -> None:
        heap, key = (self.defect, -result.score) if sample.label else (self.good, result.score)
        entry = (key, -index)
        if len(heap) == self.count and entry <= heap[0][:2]:
            return
        case = Case(
            sample.path,
            sample.defect_type,
            sample.label,
            result.score,
            bool(result.anomalous),
            result.anomaly_map,
            result.geometry,
        )
        if len(heap) < self.count:
            heapq.heappush(heap, (*entry, case))
        else:
            heapq.heapreplace(heap, (*entry, case))

    @staticmethod
    def ranked(heap: list[tuple[float, int, Case]]) -> list[Case]:
        return [case for *_, case in sorted(heap, key=lambda entry: entry[:2], reverse=True)]


def bank_metadata(scorer: Scorer) -> dict[str, Any]:
    """The bank a scorer holds, as plain data: {"config", "runtime", "calibration", "bank"}."""
    bank = scorer.bank
    return {
        "config": dict(bank.config),
        "runtime": {key: getattr(scorer.config, key) for key in ("index", "batch_size", "threads", "device")},
        "calibration": dict(bank.calibration),
        "bank": {
            "rows": bank.rows,
            "shape": " + ".join(f"{p.memory_bank.shape[0]} x {p.memory_bank.shape[1]}" for p in bank.parts),
            "size_mb": round(bank.nbytes / 1e6, 3),
            "n_train_images": bank.n_train_images,
            "weights_sha256": bank.weights_sha256,
            "tool_version": bank.tool_version,
            "created": bank.created,
        },
    }


@dataclass
class Evaluation:
    """Metrics of one bank on one labelled split (plain dicts, ready for JSON)."""

    name: str
    n_good: int
    n_defect: int
    image: dict[str, Any]
    pixel: dict[str, Any] | None
    score_seconds: float
    images: list[dict[str, Any]] = field(default_factory=list)
    promise: dict[str, Any] | None = None
    """See `promise_check`."""
    visuals: Visuals | None = None
    """Only when `evaluate` was asked for report cases; never part of `as_dict`."""

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.score_seconds / max(1, self.n_good + self.n_defect)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_good": self.n_good,
            "n_defect": self.n_defect,
            "image": self.image,
            "pixel": self.pixel,
            "promise": self.promise,
            "score_ms_per_image": round(self.ms_per_image, 2),
            "images": self.images,
        }


def evaluate(
    scorer: Scorer,
    split: Split,
    pixel_metrics: bool = True,
    progress: Progress | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    report_cases: int | None = None,
) -> Evaluation:
    """Score `split.test` and compute image metrics (and pixel AUROC + AUPRO when masks are wanted).

    Masks are framed exactly like their images, so pixel metrics are computed in each image's map frame
    (crop x crop for the square framings; see geometry.py), over every test pixel. With `report_cases`,
    the result also holds the `Visuals` of the HTML report, with that many hardest cases per class;
    without pixel metrics, the other images' maps are dropped as soon as they are scored.
    """
    from patchcore_cli.data import load_mask
    from patchcore_cli.engine import framing_of

    samples = split.test
    hardest = _Hardest(report_cases) if report_cases else None
    scored = iter(range(len(samples)))

    def on_scored(result: ScoreResult) -> None:
        index = next(scored)
        if hardest is not None:
            hardest.offer(index, samples[index], result)
        if not pixel_metrics:
            result.anomaly_map = None

    began = time.perf_counter()
    results = scorer.score_paths(
        [s.path for s in samples],
        progress=progress,
        keep_maps=pixel_metrics or hardest is not None,
        max_pixels=max_pixels,
        on_result=on_scored,
    )
    seconds = time.perf_counter() - began
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in results], dtype=np.float64)
    types = [s.defect_type for s in samples]
    image = metrics.image_metrics(labels, scores, types, scorer.threshold)
    pixel = pixel_roc = None
    if pixel_metrics:
        framing = framing_of(scorer.config)
        masks = []
        for sample, result in zip(samples, results, strict=True):
            if sample.mask is None:
                masks.append(np.zeros(result.anomaly_map.shape, dtype=bool))
            else:
                raw = load_mask(sample.mask, size=result.geometry.original_size, max_pixels=max_pixels)
                masks.append(framing.mask(raw, result.geometry))
        maps = [r.anomaly_map.astype(np.float32, copy=False) for r in results]
        pixel = metrics.pixel_metrics(masks, maps)
        if report_cases is not None:
            pixel_roc = metrics.pixel_roc_curve(masks, maps)
    records = [
        {
            "file": str(s.path),
            "label": s.label,
            "defect_type": s.defect_type,
            "score": r.score,
            "anomalous": r.anomalous,
        }
        for s, r in zip(samples, results, strict=True)
    ]
    visuals = None
    if report_cases is not None:
        visuals = Visuals(
            image_roc=metrics.image_roc_curve(labels, scores),
            pixel_roc=pixel_roc,
            highest_good=_Hardest.ranked(hardest.good) if hardest else [],
            lowest_defect=_Hardest.ranked(hardest.defect) if hardest else [],
            bank=bank_metadata(scorer),
        )
    return Evaluation(
        name=split.name,
        n_good=int((labels == 0).sum()),
        n_defect=int((labels == 1).sum()),
        image=image,
        pixel=pixel,
        score_seconds=seconds,
        images=records,
        promise=promise_check(scorer.promise, image["calibrated"]),
        visuals=visuals,
    )


def promise_check(promise: dict[str, Any] | None, calibrated: dict[str, Any]) -> dict[str, Any]:
    """The FPR a bank promises against the FPR measured on the good test images at its threshold.

    `promise` is `Scorer.promise` (None for banks without one), `calibrated` the
    `metrics.thresholded_metrics` at the bank's threshold. -> {"promised": `promise`, "measured_fpr",
    "measured_interval", "false_positives", "n_good", "confidence", "consistent"}. The measured FPR comes
    with its Clopper-Pearson interval, because a few dozen good images cannot pin a 1 % rate (0 of 20
    still allows 16.8 %); `consistent` says whether the promised FPR lies inside it (None without a
    promise or without good test images).
    """
    n_good = calibrated["fp"] + calibrated["tn"]
    interval = list(metrics.binomial_interval(calibrated["fp"], n_good, CONFIDENCE)) if n_good else None
    consistent = None
    if promise is not None and interval is not None:
        consistent = bool(interval[0] <= promise["predicted_fpr"] <= interval[1])
    return {
        "promised": promise,
        "measured_fpr": calibrated["fp"] / n_good if n_good else None,
        "measured_interval": interval,
        "false_positives": calibrated["fp"],
        "n_good": n_good,
        "confidence": CONFIDENCE,
        "consistent": consistent,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class BenchmarkRow:
    """One (configuration, dataset) cell of the benchmark."""

    row: str
    dataset: str
    evaluation: Evaluation
    fit_seconds: dict[str, float]
    bank_rows: int
    bank_mb: float
    peak_rss_mb: float
    n_train: int = 0
    score_stages: dict[str, float] = field(default_factory=dict)
    bare_forward: float | None = None
    """Images/s of the backbone's bare forward pass on the same batch shape, if measured."""

    def metric(self, name: str) -> float:
        image, pixel = self.evaluation.image, self.evaluation.pixel or {}
        promise = self.evaluation.promise or {}
        values = {
            "image_auroc": image["image_auroc"],
            "pixel_auroc": pixel.get("pixel_auroc", math.nan),
            "aupro": pixel.get("aupro", math.nan),
            "balanced_accuracy": (image["calibrated"] or {}).get("balanced_accuracy", math.nan),
            "f1": (image["calibrated"] or {}).get("f1", math.nan),
            "oracle_balanced_accuracy": (image["oracle"] or {}).get("balanced_accuracy", math.nan),
            "oracle_f1": (image["oracle"] or {}).get("f1", math.nan),
            "promised_fpr": _number((promise.get("promised") or {}).get("predicted_fpr")),
            "fpr": _number(promise.get("measured_fpr")),
            "score_ms_per_image": self.evaluation.ms_per_image,
        }
        return float(values[name])

    def as_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "dataset": self.dataset,
            "fit_seconds": {k: round(v, 3) for k, v in self.fit_seconds.items()},
            "bank_rows": self.bank_rows,
            "bank_mb": round(self.bank_mb, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "score_stages_s": {k: round(v, 4) for k, v in self.score_stages.items()},
            "bare_forward_images_per_s": self.bare_forward,
            **self.evaluation.as_dict(),
        }


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def benchmark(
    splits: Sequence[Split],
    configs: Sequence[tuple[str, FitConfig]],
    pixel_metrics: bool = True,
    progress: Progress | None = None,
    on_row: Any = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    profile: bool = False,
    report_cases: int | None = None,
    max_memory: int | None = None,
) -> list[BenchmarkRow]:
    """For each configuration and split: fit on `split.train` (coreset within `max_memory` bytes, see
    engine.fit), evaluate on `split.test` (see `evaluate` for `report_cases`)."""
    progress = progress or _Silent()
    rows = []
    for label, config in configs:
        for split in splits:
            row = benchmark_cell(
                split, label, config, pixel_metrics, progress, max_pixels, profile, report_cases, max_memory
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def benchmark_cell(
    split: Split,
    label: str,
    config: FitConfig,
    pixel_metrics: bool = True,
    progress: Progress | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    profile: bool = False,
    report_cases: int | None = None,
    max_memory: int | None = None,
) -> BenchmarkRow:
    """One cell of the benchmark: fit `config` on `split.train` (coreset within `max_memory` bytes),
    evaluate on `split.test`. A Ray worker runs exactly this for `benchmark --ray`. `report_cases`: see
    `evaluate`."""
    progress = progress or _Silent()
    fitted = fit(split.train, config, progress=progress, max_pixels=max_pixels, max_memory=max_memory)
    bank = fitted.bank
    if profile:  # time the bank's round trip through a file, as fit and score would do it
        bank = bank_round_trip(bank, fitted.timings)
    scorer = Scorer(
        bank,
        batch_size=config.batch_size,
        index=config.index,
        extractors=fitted.extractors,
        device=config.device,
    )
    evaluation = evaluate(scorer, split, pixel_metrics, progress, max_pixels, report_cases)
    return BenchmarkRow(
        row=label,
        dataset=split.name,
        evaluation=evaluation,
        fit_seconds=dict(fitted.timings.seconds),
        bank_rows=fitted.bank.rows,
        bank_mb=fitted.bank.nbytes / 1e6,
        peak_rss_mb=peak_rss_mb(),
        n_train=fitted.n_images,
        score_stages=dict(scorer.timings.seconds),
        bare_forward=bare_forward_throughput(fitted.extractor) if profile else None,
    )


def bank_round_trip(bank: Any, timings: Any) -> Any:
    """Write `bank` to a temporary file and load it back (memory-mapped), timing both."""
    import tempfile
    from pathlib import Path

    from patchcore_cli import bank as bank_io

    with tempfile.TemporaryDirectory(prefix="patchcore-profile-") as folder:
        path = Path(folder) / "bank.st"
        with timings.stage("bank write"):
            bank_io.save(bank, path)
        with timings.stage("bank load"):
            loaded = bank_io.load(path)
        # The memory map stays valid after the file is unlinked, as long as it is open.
        return loaded


def bare_forward_throughput(extractor: Any, repeats: int = 3) -> float:
    """Images/s of the backbone trunk alone on a batch of the configured shape (random pixels).

    This is the floor every stage is compared with: one warm-up pass, then the best of `repeats`.
    """
    import torch

    from patchcore_cli.device import synchronize

    config = extractor.config
    pixels = torch.rand(config.batch_size, 3, config.crop, config.crop, device=extractor.device)
    extractor.trunk(pixels)
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        extractor.trunk(pixels)
        synchronize(extractor.device)
        best = min(best, time.perf_counter() - began)
    return config.batch_size / best
