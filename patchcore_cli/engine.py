"""The engine every command shares: images -> embeddings -> bank (fit) and bank -> scores and maps (score).

Data flows one way: files -> tensors -> embeddings -> bank -> scores. The CLI only formats what this
module returns.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from patchcore_cli import bank as bank_io
from patchcore_cli.calibration import sigma_threshold, stored_promise, target_fpr_threshold
from patchcore_cli.config import AUTO_CROP, FitConfig, resolve_crop, resolve_rows
from patchcore_cli.errors import BankError, ConfigError, ImageError, InputError, WeightsError
from patchcore_cli.features import embedding_dim
from patchcore_cli.geometry import Framing, Geometry
from patchcore_cli.store import ImageRows, StoreWriter

if TYPE_CHECKING:
    from patchcore_cli.data import ImageBytes
    from patchcore_cli.sharding import Shard

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


def set_threads(threads: int | None, index: str) -> None:
    """Set torch's thread count, and faiss's when the index is a faiss one, once per command (never at
    import). The exact search runs in as many threads as torch."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    if index != "exact":  # importing faiss only to set its threads costs a cold start 0.1-0.2 s
        import faiss

        faiss.omp_set_num_threads(threads)


# --- images -> embeddings ----------------------------------------------------------------------------


@dataclass
class Decoded:
    path: Path | str  # the file, or the URI of bytes read elsewhere (`data.ImageBytes`)
    views: list[np.ndarray] | None  # one H x W x 3 uint8 array per view (geometry.py), None if unreadable
    geometry: Geometry | None
    error: ImageError | None


def framing_of(config: FitConfig) -> Framing:
    """The framing options of a config (see geometry.py)."""
    return Framing(config.framing, config.crop, config.image_size, config.tile_size, config.tile_overlap)


def _decode(path: Path | ImageBytes, framing: Framing, max_pixels: int) -> Decoded:
    from patchcore_cli.data import ImageBytes, load_image

    name = path.name if isinstance(path, ImageBytes) else path
    try:
        image = load_image(path, max_pixels=max_pixels)
    except ImageError as exc:
        return Decoded(name, None, None, exc)
    geometry = framing.frame(image.size)
    return Decoded(name, framing.render(image, geometry), geometry, None)


def shorter_sides(paths: Sequence[Path | ImageBytes], sample: int = 256) -> list[int]:
    """The shorter side in pixels of up to `sample` of the images, evenly spaced, read from their headers
    only (`crop: auto`). Files that cannot be opened are left out here; decoding reports them."""
    import io

    from PIL import Image

    step = max(1, len(paths) // sample)
    sides = []
    for item in list(paths)[::step][:sample]:
        try:
            source = item if isinstance(item, Path | str) else io.BytesIO(item.data)
            with Image.open(source) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return sides


def resolve_auto(config: FitConfig, paths: Sequence[Path | ImageBytes]) -> FitConfig:
    """`crop: auto` resolved for these training images (`config.resolve_crop`; their headers are read only
    when the side is auto), then `coreset_max_rows: auto` for that side (`config.resolve_rows`)."""
    if config.crop == AUTO_CROP:
        config = resolve_crop(config, shorter_sides(paths))
    return resolve_rows(config)


def _source(path: Path | str | ImageBytes) -> Path | ImageBytes:
    from patchcore_cli.data import ImageBytes

    return path if isinstance(path, ImageBytes) else Path(path)


def decode_stream(
    paths: Sequence[Path | ImageBytes], config: FitConfig, max_pixels: int, timings: Timings
) -> Iterator[Decoded]:
    """Decode and frame images in a background thread, a few ahead of the consumer.

    Pillow releases the GIL while decoding and resizing, so this overlaps with the backbone. An item may
    be an image already in memory (`data.ImageBytes`); its results are named by its URI.
    """
    lookahead = max(2, 2 * config.batch_size)
    framing = framing_of(config)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: deque[Future[Decoded]] = deque()
        queue = iter(paths)
        for path in queue:
            pending.append(pool.submit(_decode, _source(path), framing, max_pixels))
            if len(pending) >= lookahead:
                break
        while pending:
            with timings.stage("decode (waiting)"):
                item = pending.popleft().result()
            for path in queue:
                pending.append(pool.submit(_decode, _source(path), framing, max_pixels))
                break
            yield item


@dataclass
class Patches:
    """One image's patch embeddings under one backbone: every view's grid, view after view."""

    rows: np.ndarray  # P x D float32, P = sum of h * w over the views
    grids: list[tuple[int, int]]  # (h, w) of each view's patch grid, in view order


class Extractor:
    """A backbone trunk plus the patch-embedding head: images -> B x P x D patch embeddings, computed on
    the config's device and returned on the CPU."""

    def __init__(self, config: FitConfig) -> None:
        from patchcore_cli import device
        from patchcore_cli.backbones import load_backbone
        from patchcore_cli.features import Trunk

        self.config = config
        self.device = device.resolve(config.device)
        self.loaded = load_backbone(config.backbone, config.weights, seed=config.seed)
        self.trunk = Trunk(self.loaded, config.layers, self.device)
        self.trunk.set_precision(config.precision)
        self.dim = embedding_dim(self.trunk.channels, config.dim)
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def random_weights(self) -> bool:
        from patchcore_cli.backbones import RANDOM_WEIGHTS

        return self.loaded.weights_source == RANDOM_WEIGHTS

    def __call__(self, pixels: Sequence[np.ndarray], timings: Timings) -> tuple[np.ndarray, tuple[int, int]]:
        """B same-size views (H x W x 3 uint8) -> (B x P x D float32 embeddings, their (h, w) grid)."""
        from patchcore_cli.device import synchronize
        from patchcore_cli.features import embed, to_tensor

        with timings.stage("backbone"):
            maps = self.trunk(to_tensor(pixels))
            synchronize(self.device)
        grid = tuple(maps[self.trunk.layers[0]].shape[-2:])
        with timings.stage("aggregate + reduce"):
            out = embed(
                [maps[name] for name in self.trunk.layers],
                self.config.dim,
                self.config.reduction,
                self.config.seed,
                self.config.stage_weighting,
                self.config.patch_size,
            )
        return out.cpu().numpy(), (int(grid[0]), int(grid[1]))

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) patch grid of a view of `size` (width, height): the shape of the first stage's map,
        from one forward pass over a blank view of that size (once per size)."""
        if size not in self._grids:
            import torch

            maps = self.trunk(torch.zeros(1, 3, size[1], size[0]))
            h, w = maps[self.trunk.layers[0]].shape[-2:]
            self._grids[size] = (int(h), int(w))
        return self._grids[size]

    def embed_views(self, items: Sequence[Decoded], timings: Timings) -> list[Patches]:
        """The views of readable images -> one Patches per image. Views of the same size share forward
        passes of up to batch_size views."""
        by_size: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, item in enumerate(items):
            for v, view in enumerate(item.views or []):
                by_size.setdefault(view.shape, []).append((i, v))
        found: dict[tuple[int, int], tuple[np.ndarray, tuple[int, int]]] = {}
        for members in by_size.values():
            for lo in range(0, len(members), self.config.batch_size):
                chunk = members[lo : lo + self.config.batch_size]
                rows, grid = self([items[i].views[v] for i, v in chunk], timings)
                for (i, v), image_rows in zip(chunk, rows, strict=True):
                    found[i, v] = (image_rows, grid)
        patches = []
        for i, item in enumerate(items):
            views = [found[i, v] for v in range(len(item.views or []))]
            rows = views[0][0] if len(views) == 1 else np.concatenate([r for r, _ in views])
            patches.append(Patches(rows, [g for _, g in views]))
        return patches


def embed_paths(
    paths: Sequence[Path | ImageBytes],
    extractors: Sequence[Extractor],
    timings: Timings,
    progress: Progress,
    max_pixels: int,
    skip_bad: bool = False,
) -> Iterator[tuple[list[Decoded], list[list[Patches]]]]:
    """Yield (decoded images, [per extractor: one Patches per readable image]) batch by batch, a batch
    holding about batch_size views; each image is decoded once however many backbones look at it.
    Unreadable images raise ImageError, or with `skip_bad` are yielded without patches so the caller can
    list them."""
    batch: list[Decoded] = []
    config = extractors[0].config

    def flush() -> tuple[list[Decoded], list[list[Patches]]]:
        good = [item for item in batch if item.views is not None]
        return batch, [extractor.embed_views(good, timings) for extractor in extractors]

    views = 0
    for item in decode_stream(paths, config, max_pixels, timings):
        if item.error is not None and not skip_bad:
            raise item.error
        batch.append(item)
        views += len(item.views or [])
        if views >= config.batch_size:
            yield flush()
            progress.advance(len(batch))
            batch, views = [], 0
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
    coreset_passes: list[int] = field(default_factory=list)
    """Greedy passes of each backbone's coreset: 1, or the shards of a hierarchical coreset."""

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
    loo_maps: list[np.ndarray]  # the anomaly maps of the same images (each in its image's map frame)
    passes: int  # greedy passes of the coreset


def fit(
    paths: Sequence[Path],
    config: FitConfig,
    progress: Progress | None = None,
    max_pixels: int | None = None,
    max_memory: int | None = None,
    work_dir: Path | None = None,
) -> FitResult:
    """Fit a bank on good images: embed, coreset-subsample (paper Alg. 1), calibrate on good images.

    The patch embeddings stream to work files in a private folder under `work_dir` (default: the system's
    temporary folder), removed on success, error and Ctrl-C; only the calibration sample's patches are read
    back. The coreset's greedy pass stays within `max_memory` bytes (default:
    `sharding.default_max_memory()`); past it the coreset is hierarchical, one pass per shard of images
    (see sharding.py). Within the budget the bank is the one-pass bank, bit for bit.

    An ensemble config (`backbone: a+b`, paper §4.4) fits one bank per backbone. Their scores are
    combined after normalising each by the mean and std of its own leave-one-out scores on good images,
    and the combined score is calibrated like a single one. Test statistics never enter.
    """
    from patchcore_cli import device
    from patchcore_cli.config import members
    from patchcore_cli.data import DEFAULT_MAX_PIXELS
    from patchcore_cli.sharding import default_max_memory

    config = replace(config, device=device.resolve(config.device))  # a missing GPU fails before any work
    progress = progress or _Silent()
    check_fit_images(paths)
    config = resolve_auto(config, paths)
    timings = Timings()
    set_threads(config.threads, config.index)
    limit = max_pixels or DEFAULT_MAX_PIXELS
    budget = default_max_memory() if max_memory is None else max_memory
    parts = [
        _fit_member(paths, member, timings, progress, limit, budget, work_dir) for member in members(config)
    ]
    return combine_members(parts, config, len(paths), timings)


def check_fit_images(paths: Sequence[Path | str]) -> None:
    """InputError unless there are enough good images to fit on."""
    if len(paths) < MIN_FIT_IMAGES:
        given = "".join(f": {path}" for path in paths)
        raise InputError(
            f"fit needs at least {MIN_FIT_IMAGES} good images (calibration leaves one out), "
            f"got {len(paths)}{given}"
        )


def combine_members(
    parts: Sequence[_MemberFit], config: FitConfig, n_images: int, timings: Timings
) -> FitResult:
    """The fit of `config` from its members' fits: the member's own bank, or an ensemble bank whose
    calibration is that of the members' standardised scores, averaged."""
    if len(parts) == 1:
        bank, scores, maps = parts[0].bank, parts[0].loo_scores, parts[0].loo_maps
    else:
        standard = [Standardisation.of(p.bank.calibration) for p in parts]
        scores = np.mean([s.image(p.loo_scores) for s, p in zip(standard, parts, strict=True)], 0)
        maps = [
            np.mean([s.pixel(p.loo_maps[i]) for s, p in zip(standard, parts, strict=True)], 0)
            for i in range(len(scores))
        ]
        bank = bank_io.Bank(
            memory_bank=parts[0].bank.memory_bank,
            config={**config.model_dict(), "weights_file": None},
            calibration=calibrate(scores, maps, config),
            weights_sha256="+".join(p.bank.weights_sha256 for p in parts),
            n_train_images=n_images,
            members=[p.bank for p in parts],
        )
    extractors = [p.extractor for p in parts]
    maxima = np.array([float(amap.max()) for amap in maps])
    n_patches = sum(p.n_patches for p in parts)
    passes = [p.passes for p in parts]
    return FitResult(bank, timings, n_images, n_patches, extractors, scores, maxima, passes)


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


@dataclass
class TrainingPatches:
    """Every patch of the training images under one backbone, image after image."""

    rows: np.ndarray  # N x D float32
    offsets: np.ndarray  # n_images + 1: image i owns rows offsets[i] .. offsets[i + 1] - 1
    grids: list[list[tuple[int, int]]]  # per image, its views' patch grids
    geometries: list[Geometry]

    @classmethod
    def collect(cls, batches: Iterator[tuple[list[Decoded], list[list[Patches]]]]) -> TrainingPatches:
        patches: list[Patches] = []
        geometries: list[Geometry] = []
        for decoded, embedded in batches:
            patches += embedded[0]
            geometries += [item.geometry for item in decoded if item.geometry is not None]
        sizes = [len(p.rows) for p in patches]
        rows = np.concatenate([p.rows for p in patches])
        return cls(rows, np.concatenate([[0], np.cumsum(sizes)]), [p.grids for p in patches], geometries)

    @property
    def image_of_row(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.geometries)), np.diff(self.offsets))

    def image(self, index: int) -> np.ndarray:
        return self.rows[self.offsets[index] : self.offsets[index + 1]]


class TrainingImages(Protocol):
    """What calibration reads of the training images: every image's geometry and view grids, and the
    patches (P_i x D) of the images it leaves out. `TrainingPatches` and `StreamedTraining` are ones."""

    geometries: list[Geometry]
    grids: list[list[tuple[int, int]]]

    def image(self, index: int) -> np.ndarray: ...


@dataclass
class StreamedTraining:
    """The training images of a streamed fit: each image's geometry, view grids and row range (small, kept
    in memory), and the patches of the calibration sample only, read back from a store on disk."""

    offsets: np.ndarray  # n_images + 1: image i owned rows offsets[i] .. offsets[i + 1] - 1 of the stream
    grids: list[list[tuple[int, int]]]
    geometries: list[Geometry]
    sample: ImageRows | Mapping[int, np.ndarray]  # the patches of the images calibration leaves out

    def image(self, index: int) -> np.ndarray:
        return self.sample[index]

    def images_of(self, rows: np.ndarray) -> np.ndarray:
        """Stream row indices -> the index of the image each came from."""
        return np.searchsorted(self.offsets, rows, side="right") - 1


class _Sink(Protocol):
    def add(self, rows: np.ndarray, image: str | None = None) -> None: ...


def stream_images(
    paths: Sequence[Path],
    extractor: Extractor,
    sink: _Sink,
    sample: np.ndarray,
    sample_path: Path,
    timings: Timings,
    progress: Progress,
    max_pixels: int,
    keep: range | None = None,
) -> StreamedTraining:
    """Embed images and hand each image's patches (P_i x D) to `sink`, in order, keeping in memory only
    what calibration needs besides patches: geometries, grids and row ranges. The patches of the images in
    `sample` (sorted indices) also go to a store at `sample_path`, from which calibration reads them.

    With `keep`, only the images at those positions of `paths` are kept (and indexed by `sample`); the
    others are embedded for the forward passes they share with the kept ones, then dropped."""
    wanted = set(sample.tolist())
    grids: list[list[tuple[int, int]]] = []
    geometries: list[Geometry] = []
    counts: list[int] = []
    position = 0
    with StoreWriter(sample_path, extractor.dim) as writer:
        progress.start("features", len(paths))
        for decoded, (patches,) in embed_paths(paths, [extractor], timings, progress, max_pixels):
            for item, image in zip([d for d in decoded if d.geometry is not None], patches, strict=True):
                index, position = position, position + 1
                if keep is not None and index not in keep:
                    continue
                if len(geometries) in wanted:
                    with timings.stage("store"):
                        writer.append(image.rows)
                sink.add(image.rows, str(item.path))
                grids.append(image.grids)
                geometries.append(item.geometry)
                counts.append(len(image.rows))
        with timings.stage("store"):
            store = writer.close()
    rows = ImageRows(store, sample, [counts[i] for i in sample])
    return StreamedTraining(np.concatenate([[0], np.cumsum(counts)]), grids, geometries, rows)


def _fit_member(
    paths: Sequence[Path],
    config: FitConfig,
    timings: Timings,
    progress: Progress,
    max_pixels: int,
    budget: int,
    work_dir: Path | None,
) -> _MemberFit:
    from patchcore_cli.sharding import ShardedCoreset, work_folder

    with timings.stage("load backbone"):
        extractor = Extractor(config)
    sample = calibration_sample(len(paths), config.calibration_images, config.seed)
    fixed = view_sizes(config)  # whole, crop: every image's patch count is known before it is read
    expected = len(paths) * patch_counts(extractor, [fixed])[0] if fixed is not None else 0
    with work_folder(work_dir) as work:
        shards = ShardedCoreset(
            work,
            extractor.dim,
            config.coreset,
            config.projection_dim,
            config.seed,
            budget,
            timings,
            cap=config.coreset_max_rows,
            expected=expected,
        )
        training = stream_images(
            paths, extractor, shards, sample, work / "calibration.npy", timings, progress, max_pixels
        )
        progress.start("coreset", None)
        chosen = shards.finish()
        source_image = training.images_of(chosen.source)
        return _calibrated_member(
            config, extractor, training, chosen.rows, source_image, chosen.passes, timings, progress
        )


def _calibrated_member(
    config: FitConfig,
    extractor: Extractor,
    training: StreamedTraining,
    rows: np.ndarray,
    source_image: np.ndarray,
    passes: int,
    timings: Timings,
    progress: Progress,
) -> _MemberFit:
    """A member's bank from its chosen rows (M x D) and the image each came from (M): calibrated on the
    training images' leave-one-out scores."""
    with timings.stage("calibrate"):
        scores, maps = leave_one_out(training, rows, source_image, config, progress)
        calibration = calibrate(scores, maps, config)
    n_patches = int(training.offsets[-1])
    bank = bank_io.Bank(
        memory_bank=rows,
        config={
            **config.model_dict(),
            "embedding_dim": int(rows.shape[1]),
            "weights_file": extractor.loaded.weights_source if config.weights else None,
        },
        calibration=calibration,
        weights_sha256=extractor.loaded.weights_sha256,
        n_train_images=len(training.geometries),
        n_patches=n_patches,
        calibration_sample=sample_record(scores, maps),
    )
    return _MemberFit(bank, extractor, n_patches, scores, maps, passes)


# --- a fit in planned shards, run elsewhere (`fit --ray`, distributed.py) ------------------------------
#
# When every image's patch count is known before the images are embedded, the shards a streamed fit
# would cut can be planned (`plan_fit`) and fitted apart, anywhere and in any order (`fit_shard`), then
# put together (`fit_from_shards`) into the bank and calibration of the streamed fit, bit for bit: the
# same embeddings, through the same greedy passes, calibrated on the same leave-one-out sample.


def view_sizes(config: FitConfig) -> list[tuple[int, int]] | None:
    """The (width, height) of every image's views when the framing fixes them (whole, crop: one crop x crop
    view), or None when they depend on the image's size (aspect, tile: `frame_images`)."""
    return [(config.crop, config.crop)] if config.framing in ("whole", "crop") else None


def frame_images(
    paths: Sequence[Path], config: FitConfig, max_pixels: int
) -> list[list[tuple[int, int]] | ImageError]:
    """Each image's view sizes (width, height) as a fit frames it, or the ImageError that reading it
    raises. The image is decoded in full, as a fit decodes it, so its size is the one the fit sees."""
    from patchcore_cli.data import load_image

    framing = framing_of(config)
    framed: list[list[tuple[int, int]] | ImageError] = []
    for path in paths:
        try:
            size = load_image(path, max_pixels=max_pixels).size
        except ImageError as exc:
            framed.append(exc)
            continue
        framed.append([view.size for view in framing.frame(size).views])
    return framed


def patch_counts(extractor: Extractor, views: Sequence[Sequence[tuple[int, int]]]) -> list[int]:
    """Each image's patch count from its view sizes: the sum of its views' grids."""
    return [sum(math.prod(extractor.grid(size)) for size in sizes) for sizes in views]


def batch_bounds(views: Sequence[int], batch_size: int) -> list[int]:
    """Where the batches of `embed_paths` over images of views[i] views each begin, and len(views): a
    batch ends once it holds batch_size views. A run over images bounds[j] .. bounds[k] - 1 forms the
    same batches as the run over all images, so its embeddings are the same bit for bit; in a batch of
    another size a convolution may round differently (resnet18 on the CPU does, in a batch of one)."""
    bounds, held = [0], 0
    for image, count in enumerate(views):
        held += count
        if held >= batch_size:
            bounds.append(image + 1)
            held = 0
    if bounds[-1] != len(views):
        bounds.append(len(views))
    return bounds


@dataclass(frozen=True)
class ShardJob:
    """One planned shard as `fit_shard` takes it: the shard, the images to embed for it (first .. last - 1:
    its own, widened to whole batches, `batch_bounds`), and which of its images calibration leaves out."""

    shard: Shard
    first: int
    last: int
    sample: tuple[int, ...]  # indices within the shard (0 = image shard.lo)


def plan_fit(
    names: Sequence[str],
    config: FitConfig,
    extractor: Extractor,
    views: Sequence[Sequence[tuple[int, int]]],
    budget: int,
) -> tuple[list[int], list[ShardJob]]:
    """(each image's patch count, the shards of its coreset) of a fit of `config` on images whose views
    have the sizes `views`, within `budget` bytes: the shards a streamed fit cuts (`sharding.plan`).
    `names` name the images in errors."""
    from patchcore_cli.sharding import plan

    counts = patch_counts(extractor, views)
    shards = plan(
        counts, names, config.coreset, extractor.dim, config.projection_dim, budget, config.coreset_max_rows
    )
    bounds = batch_bounds([len(sizes) for sizes in views], config.batch_size)
    sample = calibration_sample(len(views), config.calibration_images, config.seed).tolist()
    jobs = [
        ShardJob(
            shard,
            bounds[bisect.bisect_right(bounds, shard.lo) - 1],
            bounds[bisect.bisect_left(bounds, shard.hi)],
            tuple(index - shard.lo for index in sample if shard.lo <= index < shard.hi),
        )
        for shard in shards
    ]
    return counts, jobs


@dataclass
class ShardFit:
    """What `fit_shard` sends back: the shard's part of the bank, and what calibration needs of its images."""

    rows: np.ndarray  # part x D float32: the shard's bank rows, in greedy order
    source: np.ndarray  # part int64: each row's index among the shard's patch rows
    counts: list[int]  # each image's patch count
    grids: list[list[tuple[int, int]]]  # each image's views' patch grids
    geometries: list[Geometry]
    sample: list[np.ndarray]  # the patches (P_i x D) of the shard's calibration images, in image order
    weights_sha256: str


def fit_shard(
    paths: Sequence[Path], config: FitConfig, job: ShardJob, max_pixels: int, work_dir: Path | None = None
) -> ShardFit:
    """Fit one planned shard: embed the job's images (`paths`: the fit's images job.first .. job.last - 1)
    and take the shard's greedy picks as the streamed fit does (`sharding.picks`). The patches go to work
    files in a private folder under `work_dir` (default: the system's temporary folder), removed however
    this ends."""
    from patchcore_cli.sharding import picks, work_folder

    shard = job.shard
    timings = Timings()
    with timings.stage("load backbone"):
        extractor = Extractor(config)
    with work_folder(work_dir) as work:
        with StoreWriter(work / "shard.npy", extractor.dim) as writer:
            training = stream_images(
                paths,
                extractor,
                _Appender(writer, timings),
                np.asarray(job.sample, dtype=np.int64),
                work / "calibration.npy",
                timings,
                _Silent(),
                max_pixels,
                keep=range(shard.lo - job.first, shard.hi - job.first),
            )
            with timings.stage("store"):
                store = writer.close()
        with timings.stage("coreset"):
            chosen = picks(store, shard.keep, shard.index, config.coreset, config.projection_dim, config.seed)
            chosen = chosen[: shard.part]
            rows = store.take(chosen)
        with timings.stage("store"):
            patches = [training.sample[index] for index in job.sample]
    return ShardFit(
        rows,
        chosen,
        np.diff(training.offsets).tolist(),
        training.grids,
        training.geometries,
        patches,
        extractor.loaded.weights_sha256,
    )


def fit_from_shards(
    names: Sequence[str],
    config: FitConfig,
    extractor: Extractor,
    jobs: Sequence[ShardJob],
    fits: Sequence[ShardFit],
    counts: Sequence[int],
    timings: Timings,
    progress: Progress,
) -> _MemberFit:
    """A member's fit from its planned shards and their fits, in order: the bank is each shard's part,
    shard after shard, calibrated as the streamed fit calibrates. `counts` are the patch counts the plan
    was made from; `names` name the images in errors; `extractor` is this machine's, whose weights every
    shard must have used."""
    for job, part in zip(jobs, fits, strict=True):
        if part.weights_sha256 != extractor.loaded.weights_sha256:
            raise WeightsError(
                f"{config.backbone}: a worker found weights with sha256 {part.weights_sha256[:12]}, this "
                f"machine {extractor.loaded.weights_sha256[:12]}; give every node the same --weights"
            )
        for image, count in enumerate(part.counts, start=job.shard.lo):
            if count != counts[image]:
                raise InputError(
                    f"{names[image]}: {count} patches when fitted, {counts[image]} when the shards were "
                    "planned (did the file change during the fit?)"
                )
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    sample = calibration_sample(len(counts), config.calibration_images, config.seed).tolist()
    training = StreamedTraining(
        offsets,
        [grids for part in fits for grids in part.grids],
        [geometry for part in fits for geometry in part.geometries],
        dict(zip(sample, [rows for part in fits for rows in part.sample], strict=True)),
    )
    rows = np.concatenate([part.rows for part in fits])
    source = np.concatenate(
        [part.source + offsets[job.shard.lo] for job, part in zip(jobs, fits, strict=True)]
    )
    return _calibrated_member(
        config, extractor, training, rows, training.images_of(source), len(jobs), timings, progress
    )


def calibration_sample(n_images: int, count: int, seed: int) -> np.ndarray:
    """The training images calibration leaves out in turn: a seeded sample of up to `count` of the
    `n_images`, as sorted indices."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_images)[: min(n_images, count)])


def sample_record(scores: np.ndarray, maps: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """The calibration sample a bank keeps for `fit --update`: the leave-one-out scores of the images that
    got one, and their maps' maxima."""
    valid = np.isfinite(scores)
    return {
        "scores": [float(score) for score in scores[valid]],
        "map_maxima": [float(amap.max()) for amap, ok in zip(maps, valid, strict=True) if ok],
    }


def leave_one_out(
    training: TrainingImages,
    memory_bank: np.ndarray,
    source_image: np.ndarray,
    config: FitConfig,
    progress: Progress,
    count: int | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores and maps of good training images, each against the bank with its own patches removed.

    That is how a new good image meets the bank, so these are honest good-image statistics without
    holding images back from the bank. A seeded sample of up to `count` images is used
    (`calibration_sample`; default `calibration_images`); `training` need only hold their patches.
    source_image: M, the image each bank row came from (-1: from none of these images).
    The exact index is built once and each image's queries skip its own rows; the approximate indexes
    cannot skip rows, so they are rebuilt without them per image.
    Returns (C scores, C maps); an image that supplied the whole bank gets NaN and an all-zero map.
    """
    from patchcore_cli.device import resolve
    from patchcore_cli.scoring import NearestNeighbours, image_map, image_score

    device = resolve(config.device)
    n_images = len(training.geometries)
    chosen = calibration_sample(n_images, config.calibration_images if count is None else count, config.seed)
    progress.start("calibration", len(chosen))
    scores = np.full(len(chosen), np.nan)
    maps: list[np.ndarray] = []
    exact = config.index == "exact"
    shared = NearestNeighbours(memory_bank, "exact", source_image, device) if exact else None
    for lo in range(0, len(chosen), config.batch_size):
        batch = chosen[lo : lo + config.batch_size]
        patches = [training.image(int(index)) for index in batch]
        if shared is not None:
            skip = np.concatenate([np.full(len(p), index) for p, index in zip(patches, batch, strict=True)])
            found_d, found_i = shared.search(np.concatenate(patches), 1, skip)
            ends = np.cumsum([len(p) for p in patches])[:-1]
            found = list(zip(np.split(found_d[:, 0], ends), np.split(found_i[:, 0], ends), strict=True))
            searches: list[NearestNeighbours | None] = [shared] * len(batch)
            skips: list[int | None] = [int(index) for index in batch]
        else:
            found, searches, skips = [], [], []
            for index, rows in zip(batch, patches, strict=True):
                keep = source_image != index
                search = NearestNeighbours(memory_bank[keep], config.index) if keep.any() else None
                result = search.search(rows, 1) if search is not None else None
                found.append(
                    (result[0][:, 0], result[1][:, 0])
                    if result is not None
                    else (np.full(len(rows), np.inf, np.float32), np.full(len(rows), -1))
                )
                searches.append(search)
                skips.append(None)
        for row, (index, rows) in enumerate(zip(batch, patches, strict=True)):
            distances, nearest = found[row]
            geometry = training.geometries[index]
            if searches[row] is None or not np.isfinite(distances).all():
                width, height = geometry.map_size
                maps.append(np.zeros((height, width), np.float32))
                continue
            amap = image_map(distances, training.grids[index], geometry, config.sigma)
            peak = float(amap.max()) if config.image_score == "map" else None
            scores[lo + row] = image_score(
                rows, distances, nearest, searches[row], config.num_neighbors, skips[row], peak
            )
            maps.append(amap)
        progress.advance(len(batch))
    return scores, maps


def calibrate(scores: np.ndarray, maps: Sequence[np.ndarray], config: FitConfig) -> dict[str, Any]:
    """Leave-one-out scores (C, NaN where skipped) and their C maps -> the calibration record."""
    valid = np.isfinite(scores)
    if valid.sum() < 2:
        raise InputError("fit: too few distinct good images to calibrate a threshold (need at least 2)")
    maxima = np.array([float(amap.max()) for amap, ok in zip(maps, valid, strict=True) if ok])
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


# --- update: new good images into a fitted bank ----------------------------------------------------


def update(
    bank: bank_io.Bank,
    paths: Sequence[Path],
    bank_path: str = "bank",
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    max_pixels: int | None = None,
    max_memory: int | None = None,
    work_dir: Path | None = None,
    **runtime: Any,
) -> FitResult:
    """Add good images to a fitted bank, without its original images (`fit --update`).

    The new bank is the greedy coreset (paper Alg. 1; hierarchical past `max_memory`, see sharding.py) of
    the bank's rows followed by the new images' patches, with the bank's own config, seed and projection.
    Its size is the fit's rule applied to every patch the bank has now seen:
    max(1, round(coreset * (n_patches + new patches))), at most the rows there are. Rows are copied, so an
    old row that is kept is unchanged, bit for bit, and the result is deterministic.

    The threshold is recalibrated by the bank's own rule (target FPR, or mean + k std) on a sample in which
    old and new images count by their numbers, as they would in a refit's sample: of min(calibration_images,
    all images) scores, the new images' share come from new images left out of the new bank one at a time
    (`leave_one_out`), the rest are a seeded subset of the sample the bank stored. Old images cannot be
    scored again, since their patches are gone; their scores are those measured against the old bank.

    `options`: the model settings a user gave; one that differs from the bank's is a ConfigError, since an
    update keeps the bank's settings. `runtime` (weights, batch_size, threads, index, device) set how it
    runs. Work files go to a private folder under `work_dir`, removed however the update ends. With no
    paths the bank is returned unchanged.
    """
    from patchcore_cli import device
    from patchcore_cli.coreset import bank_size
    from patchcore_cli.data import DEFAULT_MAX_PIXELS
    from patchcore_cli.sharding import ShardedCoreset, default_max_memory, work_folder
    from patchcore_cli.store import CHUNK_ROWS

    progress = progress or _Silent()
    if bank.members:
        raise BankError(
            f"{bank_path}: an ensemble bank ({bank.config.get('backbone')}) cannot be updated; refit it"
        )
    weights = runtime.pop("weights", None) or _stored_weights(bank)
    runtime["device"] = device.resolve(runtime.get("device") or "auto")
    config = _checked_config(bank.config, bank_path, weights=weights, **runtime)
    _refuse_changes(config, options or {}, bank_path)
    old_scores, old_maxima, n_patches = _stored_sample(bank, bank_path)
    timings = Timings()
    if not paths:
        return FitResult(bank, timings, 0, 0, [], old_scores, old_maxima)
    set_threads(config.threads, config.index)
    with timings.stage("load backbone"):
        extractor = Extractor(config)
    _check_extractor(bank, config, extractor, bank_path)
    n_old, n_new, old_rows = bank.n_train_images, len(paths), bank.memory_bank.shape[0]
    k_old, k_new = _update_sample_sizes(len(old_scores), n_old, n_new, config.calibration_images)
    budget = default_max_memory() if max_memory is None else max_memory
    with work_folder(work_dir) as work:
        with StoreWriter(work / "new.npy", extractor.dim) as writer:
            new = stream_images(
                paths,
                extractor,
                _Appender(writer, timings),
                calibration_sample(n_new, k_new, config.seed),
                work / "calibration.npy",
                timings,
                progress,
                max_pixels or DEFAULT_MAX_PIXELS,
            )
            with timings.stage("store"):
                added = writer.close()
        rows = old_rows + added.rows
        target = min(rows, bank_size(n_patches + added.rows, config.coreset, config.coreset_max_rows))
        shards = ShardedCoreset(
            work, extractor.dim, target / rows, config.projection_dim, config.seed, budget, timings
        )
        progress.start("coreset", None)
        for lo in range(0, old_rows, CHUNK_ROWS):
            shards.add(np.asarray(bank.memory_bank[lo : lo + CHUNK_ROWS]))
        for image, (lo, hi) in enumerate(zip(new.offsets[:-1], new.offsets[1:], strict=True)):
            with timings.stage("store"):
                patches = added.read(int(lo), int(hi))
            shards.add(patches, str(paths[image]))
        chosen = shards.finish(target)
        # Rows of the old bank come from none of the new images: -1 is never left out.
        source_image = np.where(
            chosen.source < old_rows, -1, new.images_of(np.maximum(chosen.source - old_rows, 0))
        )
        with timings.stage("calibrate"):
            scores, maps = leave_one_out(new, chosen.rows, source_image, config, progress, count=k_new)
            kept = calibration_sample(len(old_scores), k_old, config.seed)
            fresh = sample_record(scores, maps)
            pooled = np.concatenate([old_scores[kept], fresh["scores"]])
            maxima = np.concatenate([old_maxima[kept], fresh["map_maxima"]])
            if len(pooled) < 2:
                raise InputError("fit --update: too few good images to calibrate a threshold (need 2)")
            calibration = threshold_from_scores(pooled, maxima, config.target_fpr, config.threshold_sigma)
    updated = bank_io.Bank(
        memory_bank=chosen.rows,
        config={**bank.config, "weights_file": extractor.loaded.weights_source if config.weights else None},
        calibration=calibration,
        weights_sha256=bank.weights_sha256,
        n_train_images=n_old + n_new,
        n_patches=n_patches + added.rows,
        calibration_sample={"scores": pooled.tolist(), "map_maxima": maxima.tolist()},
    )
    return FitResult(updated, timings, n_new, added.rows, [extractor], pooled, maxima, [chosen.passes])


class _Appender:
    """A sink for `stream_images` that writes every image's patches to a store, in order."""

    def __init__(self, writer: StoreWriter, timings: Timings) -> None:
        self.writer, self.timings = writer, timings

    def add(self, rows: np.ndarray, image: str | None = None) -> None:
        with self.timings.stage("store"):
            self.writer.append(rows)


def _update_sample_sizes(stored: int, n_old: int, n_new: int, count: int) -> tuple[int, int]:
    """(old scores kept, new images scored) of an update's calibration sample: min(count, n_old + n_new) in
    all, split by the images' numbers, the old part at most the `stored` scores there are."""
    total = min(count, n_old + n_new)
    new = min(n_new, round(total * n_new / (n_old + n_new)))
    return min(stored, total - new), new


def _stored_sample(bank: bank_io.Bank, bank_path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, map maxima, n_patches) a bank stored for updates; BankError if it has none."""
    sample = bank.calibration_sample
    if sample is None or bank.n_patches is None:
        raise BankError(
            f"{bank_path}: this bank has no calibration sample or patch count to update from (fitted before "
            "`fit --update` existed); refit it once with this version"
        )
    scores = np.asarray(sample["scores"], dtype=np.float64)
    return scores, np.asarray(sample["map_maxima"], dtype=np.float64), int(bank.n_patches)


def _refuse_changes(config: FitConfig, options: dict[str, Any], bank_path: str) -> None:
    """ConfigError naming every given model setting that differs from the bank's `config`."""
    from patchcore_cli.config import validate

    given = {key: value for key, value in options.items() if key not in FitConfig.RUNTIME}
    wanted = validate(replace(config, **given), "options").model_dict()
    stored = config.model_dict()
    changed = [
        f"{key} {wanted[key]!r} (bank: {stored[key]!r})" for key in given if wanted[key] != stored[key]
    ]
    if changed:
        raise ConfigError(
            f"{bank_path}: --update keeps the bank's settings; drop the options that change them: "
            + ", ".join(changed)
        )


# --- score -----------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    path: Path | str  # the file, or the URI of an image read into memory elsewhere
    score: float | None = None
    normalized: float | None = None
    anomalous: bool | None = None
    anomaly_map: np.ndarray | None = None  # float32, in the geometry's map frame (map_size over its box)
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
    set how a run goes (threads, batch size, weights, index, device) come from this run, never from the
    file."""
    from patchcore_cli.config import from_bank, validate

    kept = {key: value for key, value in stored.items() if key not in FitConfig.RUNTIME}
    try:
        model = validate(from_bank(kept), "bank config")
    except ConfigError as exc:
        problem = exc.message.removeprefix("bank config: ")
        raise BankError(f"{bank_path}: unusable config stored in the bank: {problem}") from None
    return validate(from_bank(model.model_dict(), **runtime), "options")


def _check_extractor(bank: bank_io.Bank, config: FitConfig, extractor: Extractor, bank_path: str) -> None:
    """BankError unless `extractor` computes the features `bank` was fitted on: same weights, same width."""
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


class _Part:
    """One backbone of a bank, ready to score: its extractor, its search index and its good statistics."""

    def __init__(
        self, bank: bank_io.Bank, config: FitConfig, extractor: Extractor, bank_path: str, ensemble: bool
    ):
        from patchcore_cli.scoring import NearestNeighbours

        _check_extractor(bank, config, extractor, bank_path)
        self.config = config
        self.extractor = extractor
        self.search = NearestNeighbours(bank.memory_bank, config.index, device=config.device)
        self.standard = Standardisation.of(bank.calibration) if ensemble else Standardisation()


# Patches per search in `Scorer.score_paths`: several of the backbone's batches at 224 (784 patches an
# image), one at 448. Measured on Magnetic Tile at 224: 6,272 patches a call took 15.5 ms an image in the
# search, 25,088 took 11.5.
_SEARCH_ROWS = 16384


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
        device: str | None = None,
    ) -> None:
        from patchcore_cli.device import resolve

        self.bank = bank
        runtime = {
            "batch_size": batch_size,
            "threads": threads,
            "index": index,
            "device": resolve(device or "auto"),
        }
        self.config = _checked_config(
            bank.config, bank_path, weights=weights or _stored_weights(bank), **runtime
        )
        set_threads(self.config.threads, self.config.index)
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

    def warm_up(self, keep_maps: bool = False) -> None:
        """Score one blank crop, so that a long-running process's first real image is as fast as the next:
        the first forward pass sets up the backbone's kernels, and the first search loads the search
        kernels. Nothing is kept, and the time is not added to `timings`."""
        from PIL import Image

        framing = framing_of(self.config)
        image = Image.new("RGB", (self.config.crop, self.config.crop))
        geometry = framing.frame(image.size)
        blank = Decoded(Path("warm-up"), framing.render(image, geometry), geometry, None)
        counted, self.timings = self.timings, Timings()
        try:
            embeddings = [part.extractor.embed_views([blank], self.timings) for part in self.parts]
            self._score_batch([blank], embeddings, keep_maps)
        finally:
            self.timings = counted

    def score_paths(
        self,
        paths: Sequence[Path | ImageBytes],
        progress: Progress | None = None,
        keep_maps: bool = False,
        skip_bad: bool = False,
        max_pixels: int | None = None,
        on_result: Callable[[ScoreResult], None] | None = None,
    ) -> list[ScoreResult]:
        """Score images (files, or `data.ImageBytes` read elsewhere) in order. Each result's anomaly map is
        kept only if `keep_maps`."""
        from patchcore_cli.data import DEFAULT_MAX_PIXELS

        progress = progress or _Silent()
        progress.start("scoring", len(paths))
        results: list[ScoreResult] = []
        extractors = [part.extractor for part in self.parts]
        limit = max_pixels or DEFAULT_MAX_PIXELS
        held: list[Decoded] = []
        embedded: list[list[Patches]] = [[] for _ in self.parts]

        def flush() -> None:
            scored = iter(
                self._score_batch([item for item in held if item.error is None], embedded, keep_maps)
            )
            for item in held:
                if item.error is not None:
                    result = ScoreResult(item.path, error=item.error.problem)
                else:
                    result = next(scored)
                results.append(result)
                if on_result is not None:
                    on_result(result)
            held.clear()
            for patches in embedded:
                patches.clear()

        # The backbone's batches are searched together once they hold _SEARCH_ROWS patches: the search
        # costs less per patch on more of them, where the backbone runs best on batch_size views.
        for decoded, embeddings in embed_paths(paths, extractors, self.timings, progress, limit, skip_bad):
            held.extend(decoded)
            for patches, new in zip(embedded, embeddings, strict=True):
                patches.extend(new)
            if sum(len(p.rows) for p in embedded[0]) >= _SEARCH_ROWS:
                flush()
        flush()
        return results

    def _score_batch(
        self, items: list[Decoded], embeddings: list[list[Patches]], keep_maps: bool
    ) -> list[ScoreResult]:
        """Score a batch: per backbone, one search over all the batch's patches."""
        from patchcore_cli.scoring import image_map, image_score

        if not items:
            return []
        scores = np.zeros(len(items))
        maps: list[np.ndarray] | None = None
        for part, patches in zip(self.parts, embeddings, strict=True):
            with self.timings.stage("nearest-neighbour search"):
                distances, nearest = part.search.search(np.concatenate([p.rows for p in patches]), 1)
                ends = np.cumsum([len(p.rows) for p in patches])[:-1]
                distances, nearest = np.split(distances[:, 0], ends), np.split(nearest[:, 0], ends)
            # image_score "map" takes s* from each image's map, so the maps are made even when not kept.
            by_map = part.config.image_score == "map"
            raw_maps: list[np.ndarray] = []
            if keep_maps or by_map:
                with self.timings.stage("map upsample + blur"):
                    raw_maps = [
                        image_map(d, p.grids, item.geometry, self.config.sigma)
                        for p, d, item in zip(patches, distances, items, strict=True)
                    ]
            peaks = [float(m.max()) for m in raw_maps] if by_map else [None] * len(items)
            with self.timings.stage("nearest-neighbour search"):
                raw = np.array(
                    [
                        image_score(p.rows, d, n, part.search, part.config.num_neighbors, peak=peak)
                        for p, d, n, peak in zip(patches, distances, nearest, peaks, strict=True)
                    ]
                )
            scores += part.standard.image(raw) / len(self.parts)
            if keep_maps:
                part_maps = [part.standard.pixel(m) / len(self.parts) for m in raw_maps]
                maps = part_maps if maps is None else [a + b for a, b in zip(maps, part_maps, strict=True)]
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
