"""ONNX export: a bank and its backbone -> one ONNX graph from preprocessed pixels to scores and maps.

The graph is the engine's scoring, traced from the engine's own pieces: `features.to_float` and
`Trunk.maps` (pixel scaling, the backbone's mean and std, the trunk), `features.embed` (patch
embeddings), `engine.Standardisation` (ensemble members) and `scoring.anomaly_map` (bilinear upsampling
and the Gaussian blur as two matrix products). The nearest-neighbour search and the eq. 7 reweighting run
in numpy and faiss in the engine, so they are written here in torch from the same formulas as
`scoring.NearestNeighbours` and `scoring.image_score`. Every export is checked against the engine in
onnxruntime before it is written (`export`, `parity`), and the parity tests hold the two together.

Input contract (`INPUT`): uint8, N x crop x crop x 3, RGB, exactly what `preprocess_image` returns
(`data.load_image` + `geometry.preprocess`); N is dynamic. Outputs (`OUTPUTS`), all float32 but the
verdict: the image score (N), the normalised score (N, the calibrated threshold at 0.5), the verdict
(N, bool, score >= threshold) and the anomaly map (N x crop x crop) in the crop's pixel frame.

The exporter is torch.export (dynamo=True) with onnxscript's translation, not the TorchScript tracer:
the tracer is deprecated in torch 2.9+, and it turns shapes into tensors, so engine code that computes
with a shape (the blur matrix's size) would need rewriting, and a batch size read into Python could be
baked in silently. torch.export proves the batch dimension symbolic or refuses.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchcore_cli import __version__
from patchcore_cli.bank import write_atomic
from patchcore_cli.config import FitConfig
from patchcore_cli.engine import Scorer
from patchcore_cli.errors import ConfigError, OutputError
from patchcore_cli.features import embed, to_float
from patchcore_cli.scoring import NearestNeighbours, anomaly_map

OPSET = 18
"""ONNX opset of the graph: the one onnxscript's torch library is written in (no version conversion),
run by onnxruntime 1.14 and newer."""
FORMAT_ID = "patchcore-onnx"
FORMAT_VERSION = 1
INPUT = "image"
OUTPUTS = ("score", "normalized", "anomalous", "anomaly_map")
EXPORTABLE_FRAMINGS = ("whole", "crop")  # both give a square crop x crop input of fixed size
BLOCK_ROWS = 1024
"""Bank rows per distance block: a batch's B x Q squared distances exist at once, never M x Q (784 queries
per 224-pixel image: 3.2 MB per image). Measured on a 16k-row bank, batch 8: 135 MB peak above the import
against 224 MB with 4096 rows, and no slower."""
MAX_MODEL_BYTES = 2_000_000_000  # protobuf's 2 GiB limit on one ONNX file, with room for the graph
SCORE_RTOL = 1e-4  # parity: image scores, relative (see `Parity`)
MAP_ATOL = 1e-3  # parity: anomaly maps, absolute, in the map's own units
PROBE_IMAGES = 4  # seeded random images every export is checked on
EXTRA_HINT = "pip install 'patchcore-cli[export]'"


def require_runtime() -> None:
    """ConfigError (one line) unless the `export` extra is installed: onnx, onnxruntime, onnxscript."""
    import importlib

    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"export needs the optional package {module}: {EXTRA_HINT}") from None


def check_exportable(scorer: Scorer) -> None:
    """ConfigError for a bank whose scoring the graph cannot reproduce exactly."""
    framing = scorer.config.framing
    if framing not in EXPORTABLE_FRAMINGS:
        raise ConfigError(
            f"export: framing {framing!r} cannot be exported yet (only "
            f"{' and '.join(EXPORTABLE_FRAMINGS)}, which give a fixed crop x crop input)"
        )
    for part in scorer.parts:
        if part.config.precision != "fp32":
            raise ConfigError(
                f"export: the bank was fitted with --precision {part.config.precision}; only fp32 banks "
                "export, since bfloat16 autocast has no exact ONNX counterpart"
            )
    size = scorer.bank.nbytes + sum(
        p.numel() * p.element_size()
        for part in scorer.parts
        for m in part.extractor.trunk.modules
        for p in m.parameters()
    )
    if size > MAX_MODEL_BYTES:
        raise ConfigError(
            f"export: bank and backbone take {size / 1e9:.1f} GB, more than one ONNX file can hold (2 GB); "
            "fit a smaller bank (--coreset) or a smaller backbone"
        )


def preprocess_image(path: str | Path, config: FitConfig) -> np.ndarray:
    """An image file -> crop x crop x 3 uint8 RGB, exactly as `patchcore score` prepares it: the graph's
    input. `config` is the bank's (`Scorer.config`)."""
    from patchcore_cli.data import load_image
    from patchcore_cli.geometry import preprocess

    return preprocess(load_image(path), config.image_size, config.crop, config.framing)


class MemberGraph(nn.Module):
    """One backbone and its bank: N x 3 x crop x crop pixels in [0, 1] -> (N eq. 7 weights, N largest
    patch scores s*, N x h x w patch scores).

    The bank is one constant per block of BLOCK_ROWS rows (B x D), used as the left operand of the
    distance product. onnxruntime copies a constant right operand into a packed layout at load time and
    keeps the original too when a Gather reads it (measured: 8 MB more for a 10 MB bank); a left operand
    is used as it is, so the bank is held once.
    """

    def __init__(self, part: Any, bank: np.ndarray) -> None:
        super().__init__()
        self.trunk = part.extractor.trunk
        self.trunk_modules = nn.ModuleList(self.trunk.modules)  # registers the trunk's weights
        self.config: FitConfig = part.config
        self.standard = part.standard
        self.starts = list(range(0, bank.shape[0], BLOCK_ROWS))
        for number, start in enumerate(self.starts):
            block = torch.from_numpy(np.array(bank[start : start + BLOCK_ROWS], dtype=np.float32))
            self.register_buffer(f"bank{number}", block)  # B x D
            self.register_buffer(f"norms{number}", (block * block).sum(1, keepdim=True))  # B x 1: |m|^2
        self.register_buffer("neighbours", neighbour_table(bank, self.config.num_neighbors))

    def _block(self, number: int) -> torch.Tensor:
        return getattr(self, f"bank{number}")

    def _bank_rows(self, index: torch.Tensor) -> torch.Tensor:
        """K bank indices -> K x D bank rows, each gathered from the block it lies in."""
        rows = torch.empty(0)
        for number, start in enumerate(self.starts):
            block = self._block(number)
            picked = block.index_select(0, (index - start).clamp(0, block.shape[0] - 1))  # K x D
            rows = picked if number == 0 else torch.where((index >= start)[:, None], picked, rows)
        return rows

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.trunk.maps(pixels)
        config = self.config
        patches = embed(
            [maps[name] for name in self.trunk.layers],
            config.dim,
            config.reduction,
            config.seed,
            config.stage_weighting,
            config.patch_size,
        )  # N x P x D
        batch, count, dim = patches.shape
        queries = patches.reshape(-1, dim)  # N*P x D
        # scoring.NearestNeighbours: the nearest bank row by |m|^2 - 2 m.q per block and a running minimum.
        best = nearest = torch.empty(0)
        for number, start in enumerate(self.starts):
            # A block's minimum is read at its argmin, and each block's product waits for the running
            # minimum (+ 0 * best adds exactly nothing: best is finite). So one B x Q block is alive at a
            # time in any execution order; when the minimum and argmin were read separately,
            # onnxruntime's order kept every block alive (16k-row bank, batch 8: 467 MB against 143 MB).
            block_queries = queries if number == 0 else queries + 0.0 * best[:, None]
            partial = torch.addmm(
                getattr(self, f"norms{number}"), self._block(number), block_queries.T, alpha=-2.0
            )
            index = partial.argmin(0)  # Q: the first minimum, as a stable sorted search gives it
            value = partial.gather(0, index[None, :])[0]
            index = index + start
            if number == 0:
                best, nearest = value, index
            else:
                closer = value < best  # a tie keeps the lower bank index, as a sorted search does
                best, nearest = torch.where(closer, value, best), torch.where(closer, index, nearest)
        # The nearest row is found through |m|^2 - 2 m.q, but its distance is measured again from direct
        # differences, as the engine's search measures it: |q|^2 + |m|^2 - 2 q.m loses digits to
        # cancellation when the rows are far from the origin compared to their distances (WRN-50).
        distances = (queries - self._bank_rows(nearest)).square().sum(1).sqrt().reshape(batch, count)
        weight, score = self._weight(patches, distances, nearest.reshape(batch, count))
        return weight, score, distances.reshape(batch, *maps[self.trunk.layers[0]].shape[-2:])

    def _weight(
        self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """scoring.image_score for a batch, in two factors: eq. 7's weight over the b nearest bank
        neighbours of m*, and s* (eq. 6). patches N x P x D, distances and nearest N x P -> N, N."""
        worst = distances.argmax(1, keepdim=True)  # N x 1: the first maximum, as numpy's argmax
        score = distances.gather(1, worst)[:, 0]  # N: s*
        if self.neighbours.shape[1] <= 1:
            return torch.ones_like(score), score
        hood = self.neighbours.index_select(0, nearest.gather(1, worst)[:, 0])  # N x b: m* first
        batch, b = hood.shape
        rows = self._bank_rows(hood.reshape(-1)).reshape(batch, b, -1)  # N x b x D
        worst_patch = patches.gather(1, worst[:, :, None].expand(-1, -1, patches.shape[2]))  # N x 1 x D
        gaps = (rows - worst_patch).square().sum(2).sqrt()  # N x b: |m_test* - m|
        gaps = torch.cat([score[:, None], gaps[:, 1:]], 1)  # |m_test* - m*| exactly as eq. 6 measured it
        return 1.0 - torch.softmax(gaps, 1)[:, 0], score


def neighbour_table(bank: np.ndarray, num_neighbors: int, chunk: int = 1024) -> torch.Tensor:
    """M x b int64: each bank row's b nearest bank rows, itself first: eq. 7's N_b(m*) for every m*.

    m* is always a bank row, so the engine's own search answers every question the graph will ask, once,
    here; the graph looks the answer up. `chunk` rows are searched at a time.
    """
    b = min(num_neighbors, bank.shape[0])
    if b <= 1:
        return torch.zeros((bank.shape[0], 1), dtype=torch.int64)
    search = NearestNeighbours(bank, "exact")
    found = [search.search(bank[start : start + chunk], b)[1] for start in range(0, len(bank), chunk)]
    return torch.from_numpy(np.concatenate(found).astype(np.int64))


class ScoreGraph(nn.Module):
    """The engine's scoring of a bank as one module: N x crop x crop x 3 uint8 -> (score N, normalised N,
    anomalous N bool, anomaly map N x crop x crop), as `Scorer._score_one` combines ensemble members."""

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        check_exportable(scorer)
        self.members = nn.ModuleList(
            MemberGraph(part, member.memory_bank)
            for part, member in zip(scorer.parts, scorer.bank.parts, strict=True)
        )
        self.crop, self.sigma = scorer.config.crop, scorer.config.sigma
        self.threshold, self.scale = scorer.threshold, scorer.scale

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixels = to_float(image)
        count = len(self.members)
        score = amap = torch.empty(0)
        for number, member in enumerate(self.members):
            weight, largest, patch_map = member(pixels)
            raw_map = anomaly_map(patch_map, self.crop, self.sigma)
            # scoring.image_score: s* is the map's peak (image_score "map") or the largest patch score.
            peak = raw_map.amax((1, 2)) if member.config.image_score == "map" else largest
            part_score = member.standard.image(weight * peak) / count
            part_map = member.standard.pixel(raw_map) / count
            score = part_score if number == 0 else score + part_score
            amap = part_map if number == 0 else amap + part_map
        # Scorer.normalize: a logistic in good-score std units, the calibrated threshold at 0.5.
        z = ((score - self.threshold) / self.scale).clamp(-500.0, 500.0)
        return score, torch.sigmoid(z), score >= self.threshold, amap


def to_onnx(scorer: Scorer) -> bytes:
    """The serialised ONNX model (opset OPSET, one file, dynamic batch) of `scorer`'s bank, with the
    bank's config and calibration in its metadata."""
    graph = ScoreGraph(scorer).eval()
    crop = scorer.config.crop
    example = torch.zeros((2, crop, crop, 3), dtype=torch.uint8)  # 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    # One eager pass first: the engine caches its constant matrices (blur, random projection) on first
    # use, and a first use under the exporter's fake tensors would cache a fake tensor for the engine.
    with torch.no_grad():  # not inference mode: the exporter refuses inference tensors as constants
        graph(example)
    # The exporter prints progress; stdout carries the command's result.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            opset_version=OPSET,
            dynamic_shapes={"image": {0: batch}},
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    model.producer_name, model.producer_version = "patchcore", __version__
    model.doc_string = contract(scorer.config)
    bank = scorer.bank
    meta = {
        "format": FORMAT_ID,
        "format_version": str(FORMAT_VERSION),
        "tool_version": __version__,
        "config": json.dumps(bank.config, sort_keys=True),
        "calibration": json.dumps(bank.calibration, sort_keys=True),
        "weights_sha256": bank.weights_sha256,
        "bank_created": bank.created,
        "bank_rows": str(bank.rows),
        "input": contract(scorer.config),
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"patchcore.{key}", value
    return model.SerializeToString()


def contract(config: FitConfig) -> str:
    """The input contract in one sentence, stored in the model."""
    crop = config.crop
    framing = (
        f"the whole image resized to {crop} x {crop}"
        if config.framing == "whole"
        else f"shorter side resized to {config.image_size}, then the centre {crop} x {crop}"
    )
    return (
        f"input '{INPUT}': uint8 [N, {crop}, {crop}, 3], RGB, channels last: {framing} by Pillow's bilinear "
        f"resize (reducing_gap=3.0), as patchcore_cli.data.load_image + geometry.preprocess do; scaling "
        "to [0, 1], the backbone's mean and std and everything after are in the graph"
    )


# --- running the model and checking it against the engine ----------------------------------------------


def session(model: bytes | str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for a model file or its bytes; `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess: Any, images: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """N x crop x crop x 3 uint8 -> {output name: N-row array}, in batches of `batch_size`."""
    parts = [
        sess.run(list(OUTPUTS), {INPUT: images[i : i + batch_size]})
        for i in range(0, len(images), batch_size)
    ]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUTS)}


@dataclass
class Parity:
    """The largest differences between onnxruntime's outputs and the engine's over a set of images.

    `score_rel` divides each score difference by the score's magnitude, or by the threshold's where that
    is larger: an ensemble's scores are in good-score std units and cross 0, where a plain relative
    difference means nothing. Map differences are absolute, in the map's units, and in `map_rel`
    relative to the largest map value.
    """

    images: int
    score_abs: float
    score_rel: float
    normalized_abs: float
    map_abs: float
    map_rel: float
    verdicts_differ: int

    @property
    def ok(self) -> bool:
        return self.score_rel <= SCORE_RTOL and self.map_abs <= MAP_ATOL and self.verdicts_differ == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def compare(results: Sequence[Any], outputs: dict[str, np.ndarray], threshold: float) -> Parity:
    """Engine ScoreResults (with maps) against the model's outputs for the same images, in order."""
    score = np.array([r.score for r in results], dtype=np.float64)
    normalized = np.array([r.normalized for r in results], dtype=np.float64)
    verdict = np.array([r.anomalous for r in results], dtype=bool)
    maps = np.stack([r.anomaly_map for r in results]).astype(np.float64)
    score_diff = np.abs(outputs["score"].astype(np.float64) - score)
    map_diff = np.abs(outputs["anomaly_map"].astype(np.float64) - maps)
    return Parity(
        images=len(results),
        score_abs=float(score_diff.max()),
        score_rel=float((score_diff / np.maximum(np.abs(score), max(abs(threshold), 1e-12))).max()),
        normalized_abs=float(np.abs(outputs["normalized"] - normalized).max()),
        map_abs=float(map_diff.max()),
        map_rel=float(map_diff.max() / max(float(np.abs(maps).max()), 1e-12)),
        verdicts_differ=int((outputs["anomalous"].astype(bool) != verdict).sum()),
    )


def parity(scorer: Scorer, sess: Any, paths: Sequence[Path], batch_size: int = 8) -> Parity:
    """Score `paths` with the engine and with the model, and compare (see `compare`)."""
    results = scorer.score_paths(paths, keep_maps=True)
    images = np.stack([preprocess_image(path, scorer.config) for path in paths])
    return compare(results, run(sess, images, batch_size), scorer.threshold)


def probe_paths(folder: Path, crop: int, count: int = PROBE_IMAGES, seed: int = 0) -> list[Path]:
    """Write `count` seeded random PNG images (smooth shading plus noise) to `folder`; return their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, crop)
    paths = []
    for number in range(count):
        base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * ramp[:, None, None]
        pixels = base + rng.normal(0, 4 + 8 * number, (crop, crop, 3))
        path = folder / f"probe{number}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@dataclass
class ExportResult:
    path: Path
    nbytes: int
    input: str  # the input tensor, e.g. "uint8 [N, 224, 224, 3] RGB"
    parity: Parity
    checked_on: str  # which images the parity was measured on
    seconds: float
    opset: int = OPSET
    outputs: tuple[str, ...] = OUTPUTS


def export(
    scorer: Scorer, destination: Path, check: Sequence[Path] = (), threads: int | None = None
) -> ExportResult:
    """Export `scorer`'s bank to `destination` (written atomically) after checking the model against the
    engine on `check` images, or on PROBE_IMAGES seeded random ones. ConfigError, and nothing written,
    if they disagree beyond SCORE_RTOL / MAP_ATOL or in a verdict."""
    began = time.perf_counter()
    require_runtime()
    model = to_onnx(scorer)
    with tempfile.TemporaryDirectory(prefix="patchcore-export-") as scratch:
        paths = list(check) or probe_paths(Path(scratch), scorer.config.crop)
        checked = parity(scorer, session(model, threads), paths, scorer.config.batch_size)
    what = f"{len(paths)} given images" if check else f"{len(paths)} seeded random images"
    if not checked.ok:
        raise OutputError(
            f"{destination}: not written: the ONNX model disagrees with `patchcore score` on {what} "
            f"(score rel. diff {checked.score_rel:.2e}, map abs. diff {checked.map_abs:.2e}, "
            f"{checked.verdicts_differ} verdicts differ)"
        )
    write_atomic(destination, model, "ONNX model")
    crop = scorer.config.crop
    shape = f"uint8 [N, {crop}, {crop}, 3] RGB"
    return ExportResult(destination, len(model), shape, checked, what, time.perf_counter() - began)
