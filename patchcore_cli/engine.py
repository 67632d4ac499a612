"""The engine every command shares: images -> embeddings -> bank (fit) and bank -> scores and maps (score).

Data flows one way: files -> tensors -> embeddings -> bank -> scores. The CLI only formats what this
module returns.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from patchcore_cli import bank as bank_io
from patchcore_cli.calibration import sigma_threshold, stored_promise, target_fpr_threshold
from patchcore_cli.config import FitConfig
from patchcore_cli.errors import BankError, ConfigError, ImageError, InputError
from patchcore_cli.features import Geometry, crop_geometry, embedding_dim, preprocess

MIN_FIT_IMAGES = 2
"""`fit` needs at least this many good images: calibration leaves one image out at a time."""


class Progress(Protocol):
    """What the engine reports while it works; the CLI draws it as Rich progress bars."""

    def start(self, stage: str, total: int | None) -> None: ...

    def advance(self, count: int = 1) -> None: ...


class _Silent:
    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


@dataclass
class Timings:
    """Seconds spent per stage, in the order stages first ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def set_threads(threads: int | None) -> None:
    """Set torch's and faiss's thread counts together, once per command (never at import)."""
    if threads is None:
        return
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


# --- images -> embeddings ----------------------------------------------------------------------------


@dataclass
class Decoded:
    path: Path
    pixels: np.ndarray | None  # crop x crop x 3 uint8, or None if unreadable
    geometry: Geometry | None
    error: ImageError | None


def _decode(path: Path, config: FitConfig, max_pixels: int) -> Decoded:
    from patchcore_cli.data import load_image

    try:
        image = load_image(path, max_pixels=max_pixels)
    except ImageError as exc:
        return Decoded(path, None, None, exc)
    size, crop, framing = config.image_size, config.crop, config.framing
    geometry = crop_geometry(image.size, size, crop, framing)
    return Decoded(path, preprocess(image, size, crop, framing), geometry, None)


def decode_stream(
    paths: Sequence[Path], config: FitConfig, max_pixels: int, timings: Timings
) -> Iterator[Decoded]:
    """Decode and preprocess images in a background thread, a few ahead of the consumer.

    Pillow releases the GIL while decoding and resizing, so this overlaps with the backbone.
    """
    lookahead = max(2, 2 * config.batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: deque[Future[Decoded]] = deque()
        queue = iter(paths)
        for path in queue:
            pending.append(pool.submit(_decode, Path(path), config, max_pixels))
            if len(pending) >= lookahead:
                break
        while pending:
            with timings.stage("decode (waiting)"):
                item = pending.popleft().result()
            for path in queue:
                pending.append(pool.submit(_decode, Path(path), config, max_pixels))
                break
            yield item


class Extractor:
    """A backbone trunk plus the patch-embedding head: images -> B x P x D patch embeddings."""

    def __init__(self, config: FitConfig) -> None:
        from patchcore_cli.backbones import load_backbone
        from patchcore_cli.features import Trunk

        self.config = config
        self.loaded = load_backbone(config.backbone, config.weights, seed=config.seed)
        self.trunk = Trunk(self.loaded, config.layers)
        self.trunk.set_precision(config.precision)
        self.dim = embedding_dim(self.trunk.channels, config.dim)
        stride = self.loaded.spec.strides[self.trunk.layers[0]]
        self.grid = math.ceil(config.crop / stride)

    @property
    def random_weights(self) -> bool:
        from patchcore_cli.backbones import RANDOM_WEIGHTS

        return self.loaded.weights_source == RANDOM_WEIGHTS

    def __call__(self, pixels: Sequence[np.ndarray], timings: Timings) -> np.ndarray:
        """B crops (H x W x 3 uint8) -> B x P x D float32 embeddings, P = grid * grid."""
        from patchcore_cli.features import embed, to_tensor

        with timings.stage("backbone"):
            maps = self.trunk(to_tensor(pixels))
        self.grid = maps[self.trunk.layers[0]].shape[-1]
        with timings.stage("aggregate + reduce"):
            out = embed(
                [maps[name] for name in self.trunk.layers],
                self.config.dim,
                self.config.reduction,
                self.config.seed,
                self.config.stage_weighting,
            )
        return out.numpy()


def embed_paths(
    paths: Sequence[Path],
    extractors: Sequence[Extractor],
    timings: Timings,
    progress: Progress,
    max_pixels: int,
    skip_bad: bool = False,
) -> Iterator[tuple[list[Decoded], list[np.ndarray]]]:
    """Yield (decoded images, [B x P x D embeddings per extractor]) batch by batch; each image is decoded
    once however many backbones look at it. Unreadable images raise ImageError, or with `skip_bad` are
    yielded without an embedding row so the caller can list them."""
    batch: list[Decoded] = []
    config = extractors[0].config

    def flush() -> tuple[list[Decoded], list[np.ndarray]]:
        good = [item.pixels for item in batch if item.pixels is not None]
        empty = np.empty((0, 0, 0), np.float32)
        return batch, [extractor(good, timings) if good else empty for extractor in extractors]

    for item in decode_stream(paths, config, max_pixels, timings):
        if item.error is not None and not skip_bad:
            raise item.error
        batch.append(item)
        if sum(entry.pixels is not None for entry in batch) == config.batch_size:
            yield flush()
            progress.advance(len(batch))
            batch = []
    if batch:
        yield flush()
        progress.advance(len(batch))


# --- fit -------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    bank: bank_io.Bank
    timings: Timings
    n_images: int
    n_patches: int
    extractors: list[Extractor]
    calibration_scores: np.ndarray
    """C leave-one-out image scores of good training images (NaN where skipped): the threshold's sample."""
    calibration_map_maxima: np.ndarray
    """C maxima of the same images' anomaly maps: the pixel threshold's sample."""

    @property
    def extractor(self) -> Extractor:
        return self.extractors[0]

    @property
    def random_weights(self) -> bool:
        return any(extractor.random_weights for extractor in self.extractors)


@dataclass
class _MemberFit:
    bank: bank_io.Bank
    extractor: Extractor
    n_patches: int
    loo_scores: np.ndarray  # C image scores of the calibration images, NaN where one was skipped
    loo_maps: np.ndarray  # C x crop x crop anomaly maps of the same images


def fit(
    paths: Sequence[Path],
    config: FitConfig,
    progress: Progress | None = None,
    max_pixels: int | None = None,
) -> FitResult:
    """Fit a bank on good images: embed, coreset-subsample (paper Alg. 1), calibrate on good images.

    An ensemble config (`backbone: a+b`, paper §4.4) fits one bank per backbone. Their scores are
    combined after normalising each by the mean and std of its own leave-one-out scores on good images,
    and the combined score is calibrated like a single one. Test statistics never enter.
    """
    from patchcore_cli.config import members
    from patchcore_cli.data import DEFAULT_MAX_PIXELS

    progress = progress or _Silent()
    if len(paths) < MIN_FIT_IMAGES:
        given = "".join(f": {path}" for path in paths)
        raise InputError(
            f"fit needs at least {MIN_FIT_IMAGES} good images (calibration leaves one out), "
            f"got {len(paths)}{given}"
        )
    timings = Timings()
    set_threads(config.threads)
    limit = max_pixels or DEFAULT_MAX_PIXELS
    parts = [_fit_member(paths, member, timings, progress, limit) for member in members(config)]
    if len(parts) == 1:
        bank, scores, maps = parts[0].bank, parts[0].loo_scores, parts[0].loo_maps
    else:
        standard = [Standardisation.of(p.bank.calibration) for p in parts]
        scores = np.mean([s.image(p.loo_scores) for s, p in zip(standard, parts, strict=True)], 0)
        maps = np.mean([s.pixel(p.loo_maps) for s, p in zip(standard, parts, strict=True)], 0)
        bank = bank_io.Bank(
            memory_bank=parts[0].bank.memory_bank,
            config={**config.model_dict(), "weights_file": None},
            calibration=calibrate(scores, maps, config),
            weights_sha256="+".join(p.bank.weights_sha256 for p in parts),
            n_train_images=len(paths),
            members=[p.bank for p in parts],
        )
    extractors = [p.extractor for p in parts]
    maxima = maps.reshape(len(maps), -1).max(1)
    n_patches = sum(p.n_patches for p in parts)
    return FitResult(bank, timings, len(paths), n_patches, extractors, scores, maxima)


@dataclass(frozen=True)
class Standardisation:
    """How an ensemble member's scores and maps are put in good-std units (paper §4.4): subtract the mean
    of its leave-one-out good scores, divide by their std. The identity for a single-backbone bank."""

    image_shift: float = 0.0
    image_scale: float = 1.0
    pixel_shift: float = 0.0
    pixel_scale: float = 1.0

    @classmethod
    def of(cls, calibration: dict[str, Any]) -> Standardisation:
        # A zero std (identical good scores) would divide by zero.
        return cls(
            float(calibration["image_mean"]),
            max(float(calibration["image_std"]), 1e-12),
            float(calibration["pixel_mean"]),
            max(float(calibration["pixel_std"]), 1e-12),
        )

    def image(self, scores: Any) -> Any:
        return (scores - self.image_shift) / self.image_scale

    def pixel(self, maps: Any) -> Any:
        return (maps - self.pixel_shift) / self.pixel_scale


def _fit_member(
    paths: Sequence[Path], config: FitConfig, timings: Timings, progress: Progress, max_pixels: int
) -> _MemberFit:
    from patchcore_cli.coreset import greedy_coreset

    with timings.stage("load backbone"):
        extractor = Extractor(config)
    progress.start("features", len(paths))
    chunks = [
        embeddings[0] for _, embeddings in embed_paths(paths, [extractor], timings, progress, max_pixels)
    ]
    per_image = np.concatenate(chunks)  # n x P x D
    n_images, n_patches_per_image, dim = per_image.shape
    flat = per_image.reshape(-1, dim)  # n*P x D

    n_select = max(1, round(config.coreset * flat.shape[0]))
    progress.start("coreset", None)
    with timings.stage("coreset"):
        if n_select >= flat.shape[0]:
            selected = np.arange(flat.shape[0])
        else:
            selected = greedy_coreset(flat, n_select, projection_dim=config.projection_dim, seed=config.seed)
    memory_bank = np.ascontiguousarray(flat[selected])
    source_image = (selected // n_patches_per_image).astype(np.int64)

    with timings.stage("calibrate"):
        scores, maps = leave_one_out(per_image, memory_bank, source_image, extractor.grid, config, progress)
        calibration = calibrate(scores, maps, config)
    bank = bank_io.Bank(
        memory_bank=memory_bank,
        config={
            **config.model_dict(),
            "embedding_dim": int(dim),
            "grid": extractor.grid,
            "weights_file": extractor.loaded.weights_source if config.weights else None,
        },
        calibration=calibration,
        weights_sha256=extractor.loaded.weights_sha256,
        n_train_images=n_images,
    )
    return _MemberFit(bank, extractor, int(flat.shape[0]), scores, maps)


def leave_one_out(
    per_image: np.ndarray,
    memory_bank: np.ndarray,
    source_image: np.ndarray,
    grid: int,
    config: FitConfig,
    progress: Progress,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of good training images, each against the bank with its own patches removed.

    That is how a new good image meets the bank, so these are honest good-image statistics without
    holding images back from the bank. A seeded sample of up to `calibration_images` images is used.
    The exact index is built once and each image's queries skip its own rows; the approximate indexes
    cannot skip rows, so they are rebuilt without them per image.
    Returns (C scores, C x crop x crop maps); an image that supplied the whole bank gets NaN.
    """
    import torch

    from patchcore_cli.scoring import NearestNeighbours, anomaly_map, image_score

    n_images, n_patches, dim = per_image.shape
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.permutation(n_images)[: min(n_images, config.calibration_images)])
    progress.start("calibration", len(chosen))
    scores = np.full(len(chosen), np.nan)
    patch_maps = np.zeros((len(chosen), n_patches), dtype=np.float32)
    shared = NearestNeighbours(memory_bank, "exact", source_image) if config.index == "exact" else None
    for lo in range(0, len(chosen), config.batch_size):
        batch = chosen[lo : lo + config.batch_size]
        if shared is not None:
            skip = np.repeat(batch, n_patches)
            found = shared.search(per_image[batch].reshape(-1, dim), 1, skip)
            distances = found[0][:, 0].reshape(len(batch), n_patches)
            nearest = found[1][:, 0].reshape(len(batch), n_patches)
            searches = [shared] * len(batch)
            skips: list[int | None] = [int(index) for index in batch]
        else:
            distances = np.empty((len(batch), n_patches), np.float32)
            nearest = np.empty((len(batch), n_patches), np.int64)
            searches, skips = [], []
            for row, index in enumerate(batch):
                keep = source_image != index
                search = NearestNeighbours(memory_bank[keep], config.index) if keep.any() else None
                if search is not None:
                    found_d, found_i = search.search(per_image[index], 1)
                    distances[row], nearest[row] = found_d[:, 0], found_i[:, 0]
                else:
                    distances[row] = np.inf
                searches.append(search)
                skips.append(None)
        for row, index in enumerate(batch):
            if searches[row] is not None and np.isfinite(distances[row]).all():
                scores[lo + row] = image_score(
                    per_image[index], distances[row], nearest[row], searches[row], config.num_neighbors,
                    skips[row],
                )  # fmt: skip
                patch_maps[lo + row] = distances[row]
        progress.advance(len(batch))
    maps = anomaly_map(torch.from_numpy(patch_maps.reshape(-1, grid, grid)), config.crop, config.sigma)
    return scores, maps.numpy()


def calibrate(scores: np.ndarray, maps: np.ndarray, config: FitConfig) -> dict[str, Any]:
    """Leave-one-out scores (C, NaN where skipped) and maps (C x H x W) -> the calibration record."""
    valid = np.isfinite(scores)
    if valid.sum() < 2:
        raise InputError("fit: too few distinct good images to calibrate a threshold (need at least 2)")
    maxima = maps[valid].reshape(int(valid.sum()), -1).max(1)
    return threshold_from_scores(scores[valid], maxima, config.target_fpr, config.threshold_sigma)


def threshold_from_scores(
    image_scores: np.ndarray, map_maxima: np.ndarray, target_fpr: float | None, k: float = 3.0
) -> dict[str, Any]:
    """The calibration record stored in a bank, from N good images' leave-one-out scores and map maxima.

    With a `target_fpr`, the image threshold is the one a new good image exceeds with that probability,
    and the pixel threshold the one its map's maximum exceeds with that probability (so a good image gets
    a non-empty `--masks` mask that often); without one, both are mean + k std. Either way the record
    holds the promise: the FPR predicted at the image threshold, with its interval (see `calibration`).
    """
    if target_fpr is None:
        image, pixel = sigma_threshold(image_scores, k), sigma_threshold(map_maxima, k)
        rule = f"mean + {k:g} * std of leave-one-image-out scores of good training images"
    else:
        image = target_fpr_threshold(image_scores, target_fpr)
        pixel = target_fpr_threshold(map_maxima, target_fpr)
        rule = f"target FPR {target_fpr:g} on leave-one-image-out scores of good training images"
    return {
        "rule": rule,
        "n_images": len(image_scores),
        "target_fpr": target_fpr,
        "threshold_sigma": None if target_fpr is not None else k,
        **image.record(),
        "image_threshold": image.threshold,
        "image_mean": float(image_scores.mean()),
        "image_std": float(image_scores.std(ddof=1)),
        "image_max": float(image_scores.max()),
        "calibration_fpr": float((image_scores >= image.threshold).mean()),
        "pixel_threshold": pixel.threshold,
        "pixel_mean": float(map_maxima.mean()),
        "pixel_std": float(map_maxima.std(ddof=1)),
    }


# --- score -----------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    path: Path
    score: float | None = None
    normalized: float | None = None
    anomalous: bool | None = None
    anomaly_map: np.ndarray | None = None  # crop x crop float32, in the crop's pixel frame
    geometry: Geometry | None = None
    error: str | None = None


def _stored_weights(bank: bank_io.Bank) -> str | None:
    """The weights a bank was fitted with, when they can be found again without asking.

    A bank fitted with random weights is scored with the same (seeded) random weights. A bank fitted
    with a `--weights` file records its path; it is reused only if the file still hashes the same.
    """
    from patchcore_cli.backbones import RANDOM_WEIGHTS, sha256_file

    if bank.weights_sha256 == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    hint = bank.config.get("weights_file")
    if not isinstance(hint, str):
        return None
    try:
        if Path(hint).is_file() and sha256_file(Path(hint)) == bank.weights_sha256:
            return hint
    except (OSError, ValueError):  # the bank names a path that cannot be read (too long, NUL, no access)
        pass
    return None


def _checked_config(stored: dict[str, Any], bank_path: str, **runtime: Any) -> FitConfig:
    """A bank file is untrusted input: its config is checked like a config file, and options that only
    set how a run goes (threads, batch size, weights, index) come from this run, never from the file."""
    from patchcore_cli.config import from_bank, validate

    kept = {key: value for key, value in stored.items() if key not in FitConfig.RUNTIME}
    try:
        model = validate(from_bank(kept), "bank config")
    except ConfigError as exc:
        problem = exc.message.removeprefix("bank config: ")
        raise BankError(f"{bank_path}: unusable config stored in the bank: {problem}") from None
    return validate(from_bank(model.model_dict(), **runtime), "options")


class _Part:
    """One backbone of a bank, ready to score: its extractor, its search index and its good statistics."""

    def __init__(
        self, bank: bank_io.Bank, config: FitConfig, extractor: Extractor, bank_path: str, ensemble: bool
    ):
        from patchcore_cli.scoring import NearestNeighbours

        if extractor.loaded.weights_sha256 != bank.weights_sha256:
            raise BankError(
                f"{bank_path}: was fitted with {config.backbone} weights sha256 {bank.weights_sha256[:12]}, "
                f"but the weights found now hash to {extractor.loaded.weights_sha256[:12]}; "
                "pass the same --weights"
            )
        if bank.memory_bank.shape[1] != extractor.dim:
            raise BankError(
                f"{bank_path}: feature dimension {bank.memory_bank.shape[1]} does not match backbone "
                f"{config.backbone} with layers {'+'.join(config.layers)} (dim {extractor.dim})"
            )
        self.config = config
        self.extractor = extractor
        self.search = NearestNeighbours(bank.memory_bank, config.index)
        self.standard = Standardisation.of(bank.calibration) if ensemble else Standardisation()


class Scorer:
    """Scores images against a loaded bank with the configuration the bank was fitted with."""

    def __init__(
        self,
        bank: bank_io.Bank,
        batch_size: int | None = None,
        threads: int | None = None,
        weights: str | None = None,
        index: str | None = None,
        bank_path: str = "bank",
        extractors: Sequence[Extractor] | None = None,
    ) -> None:
        self.bank = bank
        runtime = {"batch_size": batch_size, "threads": threads, "index": index}
        self.config = _checked_config(
            bank.config, bank_path, weights=weights or _stored_weights(bank), **runtime
        )
        set_threads(self.config.threads)
        self.timings = Timings()
        ensemble = bool(bank.members)
        self.parts: list[_Part] = []
        for number, member in enumerate(bank.parts):
            config = _checked_config(
                member.config, bank_path, weights=weights or _stored_weights(member), **runtime
            )
            if extractors is not None:
                extractor = extractors[number]
            else:
                with self.timings.stage("load backbone"):
                    extractor = Extractor(config)
            with self.timings.stage("index"):
                self.parts.append(_Part(member, config, extractor, bank_path, ensemble))
        cal = bank.calibration
        self.threshold = float(cal["image_threshold"])
        self.promise = stored_promise(cal)
        """The FPR on good images the threshold promises (`calibration.stored_promise`), None if none."""
        self.scale = max(float(cal.get("image_std", 0.0)), 1e-6 * abs(self.threshold), 1e-12)

    @property
    def extractor(self) -> Extractor:
        return self.parts[0].extractor

    @property
    def random_weights(self) -> bool:
        return any(part.extractor.random_weights for part in self.parts)

    def normalize(self, score: float) -> float:
        """Raw score -> (0, 1): a logistic in good-score std units, the calibrated threshold at 0.5."""
        z = (score - self.threshold) / self.scale
        return float(1.0 / (1.0 + math.exp(-max(min(z, 500.0), -500.0))))

    def score_paths(
        self,
        paths: Sequence[Path],
        progress: Progress | None = None,
        keep_maps: bool = False,
        skip_bad: bool = False,
        max_pixels: int | None = None,
        on_result: Callable[[ScoreResult], None] | None = None,
    ) -> list[ScoreResult]:
        """Score images in order. Each result's anomaly map is kept only if `keep_maps`."""
        from patchcore_cli.data import DEFAULT_MAX_PIXELS

        progress = progress or _Silent()
        progress.start("scoring", len(paths))
        results: list[ScoreResult] = []
        extractors = [part.extractor for part in self.parts]
        limit = max_pixels or DEFAULT_MAX_PIXELS
        for decoded, embeddings in embed_paths(paths, extractors, self.timings, progress, limit, skip_bad):
            scored = iter(
                self._score_batch([item for item in decoded if item.error is None], embeddings, keep_maps)
            )
            for item in decoded:
                if item.error is not None:
                    result = ScoreResult(item.path, error=item.error.problem)
                else:
                    result = next(scored)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        return results

    def _score_batch(
        self, items: list[Decoded], embeddings: list[np.ndarray], keep_maps: bool
    ) -> list[ScoreResult]:
        """Score a batch: per backbone, one search over all the batch's patches (B x P x D each)."""
        import torch

        from patchcore_cli.scoring import anomaly_map, image_score

        if not items:
            return []
        scores = np.zeros(len(items))
        maps = None
        for part, patches in zip(self.parts, embeddings, strict=True):
            count, per_image, dim = patches.shape
            with self.timings.stage("nearest-neighbour search"):
                distances, nearest = part.search.search(patches.reshape(-1, dim), 1)
                distances = distances[:, 0].reshape(count, per_image)
                nearest = nearest[:, 0].reshape(count, per_image)
                raw = np.array(
                    [
                        image_score(
                            patches[i], distances[i], nearest[i], part.search, part.config.num_neighbors
                        )
                        for i in range(count)
                    ]
                )
            scores += part.standard.image(raw) / len(self.parts)
            if keep_maps:
                with self.timings.stage("map upsample + blur"):
                    grid = part.extractor.grid
                    patch_maps = torch.from_numpy(distances.reshape(count, grid, grid))
                    part_maps = anomaly_map(patch_maps, self.config.crop, self.config.sigma).numpy()
                    part_maps = part.standard.pixel(part_maps) / len(self.parts)
                    maps = part_maps if maps is None else maps + part_maps
        return [
            ScoreResult(
                path=item.path,
                score=float(score),
                normalized=self.normalize(float(score)),
                anomalous=bool(score >= self.threshold),
                anomaly_map=None if maps is None else maps[i],
                geometry=item.geometry,
            )
            for i, (item, score) in enumerate(zip(items, scores, strict=True))
        ]
