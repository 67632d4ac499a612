"""Scoring a labelled test split and turning the scores into metrics; the benchmark loop over datasets."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from patchcore_cli import metrics
from patchcore_cli.config import FitConfig
from patchcore_cli.data import DEFAULT_MAX_PIXELS, Split
from patchcore_cli.engine import Progress, Scorer, _Silent, fit


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
            "score_ms_per_image": round(self.ms_per_image, 2),
            "images": self.images,
        }


def evaluate(
    scorer: Scorer,
    split: Split,
    pixel_metrics: bool = True,
    progress: Progress | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Evaluation:
    """Score `split.test` and compute image metrics (and pixel AUROC + AUPRO when masks are wanted).

    Masks are resized and cropped exactly like their images, so pixel metrics are computed at the
    evaluation resolution (crop x crop), over every test pixel.
    """
    from patchcore_cli.data import load_mask
    from patchcore_cli.features import preprocess_mask

    samples = split.test
    began = time.perf_counter()
    results = scorer.score_paths(
        [s.path for s in samples], progress=progress, keep_maps=pixel_metrics, max_pixels=max_pixels
    )
    seconds = time.perf_counter() - began
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in results], dtype=np.float64)
    types = [s.defect_type for s in samples]
    image = metrics.image_metrics(labels, scores, types, scorer.threshold)
    pixel = None
    if pixel_metrics:
        config = scorer.config
        masks = np.zeros((len(samples), config.crop, config.crop), dtype=bool)
        for index, (sample, result) in enumerate(zip(samples, results, strict=True)):
            if sample.mask is not None:
                raw = load_mask(sample.mask, size=result.geometry.original_size, max_pixels=max_pixels)
                masks[index] = preprocess_mask(raw, config.image_size, config.crop, config.framing)
        maps = np.stack([r.anomaly_map for r in results]).astype(np.float32)
        pixel = metrics.pixel_metrics(masks, maps)
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
    return Evaluation(
        name=split.name,
        n_good=int((labels == 0).sum()),
        n_defect=int((labels == 1).sum()),
        image=image,
        pixel=pixel,
        score_seconds=seconds,
        images=records,
    )


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
        values = {
            "image_auroc": image["image_auroc"],
            "pixel_auroc": pixel.get("pixel_auroc", math.nan),
            "aupro": pixel.get("aupro", math.nan),
            "balanced_accuracy": (image["calibrated"] or {}).get("balanced_accuracy", math.nan),
            "f1": (image["calibrated"] or {}).get("f1", math.nan),
            "oracle_balanced_accuracy": (image["oracle"] or {}).get("balanced_accuracy", math.nan),
            "oracle_f1": (image["oracle"] or {}).get("f1", math.nan),
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


def benchmark(
    splits: Sequence[Split],
    configs: Sequence[tuple[str, FitConfig]],
    pixel_metrics: bool = True,
    progress: Progress | None = None,
    on_row: Any = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    profile: bool = False,
) -> list[BenchmarkRow]:
    """For each configuration and split: fit on `split.train`, evaluate on `split.test`."""
    progress = progress or _Silent()
    rows = []
    for label, config in configs:
        for split in splits:
            row = benchmark_cell(split, label, config, pixel_metrics, progress, max_pixels, profile)
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
) -> BenchmarkRow:
    """One cell of the benchmark: fit `config` on `split.train`, evaluate on `split.test`. A Ray worker
    runs exactly this for `benchmark --ray`."""
    progress = progress or _Silent()
    fitted = fit(split.train, config, progress=progress, max_pixels=max_pixels)
    bank = fitted.bank
    if profile:  # time the bank's round trip through a file, as fit and score would do it
        bank = bank_round_trip(bank, fitted.timings)
    scorer = Scorer(bank, batch_size=config.batch_size, index=config.index, extractors=fitted.extractors)
    evaluation = evaluate(scorer, split, pixel_metrics, progress, max_pixels)
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

    config = extractor.config
    pixels = torch.rand(config.batch_size, 3, config.crop, config.crop)
    extractor.trunk(pixels)
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        extractor.trunk(pixels)
        best = min(best, time.perf_counter() - began)
    return config.batch_size / best
