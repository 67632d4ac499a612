"""Fit configuration: defaults from the paper, a YAML file, and command-line overrides, validated once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from patchcore_cli.device import DEVICES
from patchcore_cli.errors import ConfigError
from patchcore_cli.geometry import FRAMINGS

PRECISIONS = ("fp32", "bf16")
INDEXES = ("exact", "faiss", "hnsw")  # see scoring.NearestNeighbours
AUTO_CROP = 0  # `crop: auto`: chosen at fit time from the training images' size (`resolve_crop`)
CROP_STEPS = (224, 320, 448)  # the sides `crop: auto` chooses from (each measured, docs/benchmarks.md)
# `coreset_max_rows: auto`: chosen at fit time (`resolve_rows`) as AUTO_ROWS_VIEWS views' worth of patches at
# the crop, so the cap grows with the resolution: 19,600 rows at 224, 40,000 at 320, 78,400 at 448.
AUTO_ROWS = -1
AUTO_ROWS_VIEWS = 25
_ROWS_RULE = "coreset_max_rows must be auto, 0 (no cap) or a positive row count"
# Bundles of options chosen from measurements (README, "Benchmark results"). CLI and YAML override them.
# Each pins what was measured, so a later change of defaults does not change a preset.
_MEASURED = {
    "backbone": "efficientnet_lite0",
    "framing": "whole",
    "stage_weighting": "none",
    "image_score": "map",
    "coreset_max_rows": 100_000,
}
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {**_MEASURED, "crop": 224, "coreset": 0.01},
    "accurate": {
        **_MEASURED,
        "backbone": "efficientnet_lite0+efficientnet_lite2",
        "crop": AUTO_CROP,
        "max_crop": 448,
    },
}
MAX_IMAGE_SIZE = 4096  # a bank or config asking for more is refused before any image is resized
MAX_TILE_SIZE = 65536
REDUCTIONS = ("avgpool", "random")  # see features.embed
IMAGE_SCORES = ("map", "patch")  # see scoring.image_score
STAGE_WEIGHTINGS = ("equal", "none")  # see features.embed


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides what a bank contains. Stored in the bank; `score` reuses it."""

    backbone: str = "wide_resnet50_2"
    weights: str | None = None
    layers: tuple[str, ...] = ("layer2", "layer3")
    framing: str = "whole"  # the whole image resized to crop x crop; "crop": paper §4.1
    image_size: int = 256  # framing "crop" (paper §4.1): resize the shorter side to 256 ...
    # ... and centre-crop to 224. The side (shorter side, "aspect") the backbone sees. AUTO_CROP (the
    # default): with framing whole or aspect, the largest of CROP_STEPS up to `max_crop` that the training
    # images' median shorter side reaches, so small images are never enlarged; else 224. Banks store the side.
    crop: int = AUTO_CROP
    max_crop: int = 320
    tile_size: int = 0  # framing "tile": the side of a tile in original pixels (required there)
    tile_overlap: float = 0.25  # framing "tile": the least overlap of neighbouring tiles, as a fraction
    dim: int = 1024  # reference implementation's target embedding dimension
    reduction: str = "avgpool"  # how to reach `dim` when the stages have more channels
    stage_weighting: str = "none"  # "equal": each stage weighs the same in the distance, whatever its width
    coreset: float = 0.1  # paper §4.2: PatchCore-10%
    # The most rows a bank keeps, 0 for no cap: past coreset_max_rows / coreset patches the share falls,
    # so the bank (its memory, its search time) and the coreset's picks stop growing with the images.
    # AUTO_ROWS (the default): 25 views' worth of patches at the crop (`resolve_rows`), which on the four
    # datasets lost no AUROC where it bound (Magnetic Tile at 224) and took 40 % off its search time.
    coreset_max_rows: int = AUTO_ROWS
    projection_dim: int = 128  # paper §3.2: random projection for coreset distances
    seed: int = 42
    num_neighbors: int = 9  # paper eq. 7: b = 9; 1 turns the reweighting off
    patch_size: int = 3  # paper §3.1: each feature is averaged over a p x p neighbourhood, p = 3
    sigma: float = 4.0  # paper §3.3
    # s* of eq. 7: "map", the largest value of the blurred anomaly map; "patch", the largest patch score
    # (paper eq. 6). The map's peak gained Magnetic Tile 0.0025 image AUROC (docs/benchmarks.md).
    image_score: str = "map"
    precision: str = "fp32"
    # Calibration (docs/calibration.md): the false-alarm rate on good parts the threshold aims at, from
    # a seeded sample of good images left out one at a time; target_fpr None: mean + threshold_sigma std.
    target_fpr: float | None = 0.02
    threshold_sigma: float = 3.0
    calibration_images: int = 75
    batch_size: int = 8
    threads: int | None = None
    index: str = "exact"
    device: str = "auto"  # see device.resolve

    # Options that change how fast a bank is made, not what it contains.
    RUNTIME = ("weights", "batch_size", "threads", "index", "device")
    # Options that only decide how a stored field is chosen at fit time (the bank holds the crop chosen).
    FIT_ONLY = ("max_crop",)

    def model_dict(self) -> dict[str, Any]:
        """The fields stored in a bank's `config` metadata."""
        data = dataclasses.asdict(self)
        for key in self.RUNTIME + self.FIT_ONLY:
            data.pop(key)
        data["layers"] = list(self.layers)
        return data


_FIELDS = {f.name: f for f in fields(FitConfig)}
_INT_FIELDS = {
    "image_size",
    "crop",
    "dim",
    "projection_dim",
    "seed",
    "num_neighbors",
    "patch_size",
    "tile_size",
    "calibration_images",
    "batch_size",
    "threads",
    "max_crop",
    "coreset_max_rows",
}
_FLOAT_FIELDS = {"coreset", "sigma", "threshold_sigma", "tile_overlap", "target_fpr"}
_STR_FIELDS = {
    "backbone",
    "weights",
    "precision",
    "reduction",
    "index",
    "framing",
    "stage_weighting",
    "image_score",
    "device",
}


def _coerce(key: str, value: Any, source: str) -> Any:
    if value is None and key in ("weights", "threads", "target_fpr"):
        return None
    if key == "crop" and isinstance(value, str):  # `--crop auto`, `--crop 320`, `crop: auto`
        text = value.strip().lower()
        if text == "auto":
            return AUTO_CROP
        if not text.isdigit():
            raise ConfigError(f"{source}: 'crop' must be auto or a side in pixels, got {value!r}")
        return int(text)
    if key == "coreset_max_rows" and isinstance(value, str):  # `--coreset-max-rows auto`, `... 20000`
        text = value.strip().lower().replace(",", "").replace("_", "")
        if text == "auto":
            return AUTO_ROWS
        if not text.isdigit():
            raise ConfigError(f"{source}: {_ROWS_RULE}, got {value!r}")
        return int(text)
    if key == "layers":
        if isinstance(value, str):
            value = [part.strip() for part in value.replace("+", ",").split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: 'layers' must be a list of stage names such as [layer2, layer3]")
        return tuple(value)
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key!r} must be an integer, got {value!r}")
        if key == "coreset_max_rows" and value < 0:  # AUTO_ROWS is spelled `auto`, never -1
            raise ConfigError(f"{source}: {_ROWS_RULE}, got {value}")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
    return value


def resolve_crop(config: FitConfig, shorter_sides: Sequence[int]) -> FitConfig:
    """`crop: auto` -> the side for these training images (their shorter sides, in pixels); a config with a
    crop already set comes back unchanged.

    More pixels per defect is what finds small defects (docs/benchmarks.md), but enlarging an image adds
    none: it only shows the backbone its texture at another scale, which cost Magnetic Tile and the
    synthetic textures image AUROC at 320. So auto takes the largest of CROP_STEPS, up to `max_crop`, that
    the median shorter side reaches, and 224 when none does. Framings crop and tile keep 224: there the
    side is the paper's centre crop or a tile's resize target.
    """
    if config.crop != AUTO_CROP:
        return config
    side = CROP_STEPS[0]
    if config.framing in ("whole", "aspect") and len(shorter_sides):
        median = sorted(shorter_sides)[len(shorter_sides) // 2]
        side = max(
            step for step in CROP_STEPS if step <= max(median, CROP_STEPS[0]) and step <= config.max_crop
        )
    return dataclasses.replace(config, crop=side)


def patches_per_view(config: FitConfig) -> int:
    """Patches of one crop x crop view: the grid of the finest of the config's stages."""
    from patchcore_cli import backbones

    side = config.crop or CROP_STEPS[0]
    stride = min(backbones.get(config.backbone.split("+")[0].strip()).strides[name] for name in config.layers)
    return math.ceil(side / stride) ** 2


def resolve_rows(config: FitConfig) -> FitConfig:
    """`coreset_max_rows: auto` -> AUTO_ROWS_VIEWS views' worth of patches at the config's crop (resolve the
    crop first); any other value comes back unchanged.

    On Magnetic Tile the bank of 37,318 rows at 224 scored the same as its first 16,000-25,000 picks (image
    AUROC within 0.002, pixel AUROC within 0.002), while at 320 pixel AUROC fell from 0.877 to 0.864 with
    20,000 rows and was 0.874 with 40,000: the rows a bank needs grow with the patches per image, not with
    the number of images (docs/benchmarks.md). A fixed row count would be too many at 224 or too few at 448.
    """
    if config.coreset_max_rows != AUTO_ROWS:
        return config
    return dataclasses.replace(config, coreset_max_rows=AUTO_ROWS_VIEWS * patches_per_view(config))


def validate(config: FitConfig, source: str = "config") -> FitConfig:
    """Check values that each field alone can't express; returns the config unchanged."""
    from patchcore_cli import backbones

    centre_crop = config.crop or CROP_STEPS[0]  # what `crop: auto` becomes with framing crop
    checks = [
        (0.0 < config.coreset <= 1.0, f"coreset must be in (0, 1], got {config.coreset}"),
        (
            config.coreset_max_rows >= 0 or config.coreset_max_rows == AUTO_ROWS,
            f"{_ROWS_RULE}, got {config.coreset_max_rows}",
        ),
        (
            32 <= config.image_size <= MAX_IMAGE_SIZE,
            f"image_size must be between 32 and {MAX_IMAGE_SIZE}, got {config.image_size}",
        ),
        (
            config.crop == AUTO_CROP or 32 <= config.crop <= MAX_IMAGE_SIZE,
            f"crop must be auto or between 32 and {MAX_IMAGE_SIZE}, got {config.crop}",
        ),
        (
            CROP_STEPS[0] <= config.max_crop <= MAX_IMAGE_SIZE,
            f"max_crop must be between {CROP_STEPS[0]} and {MAX_IMAGE_SIZE}, got {config.max_crop}",
        ),
        (
            config.framing != "crop" or centre_crop <= config.image_size,
            f"crop must be between 32 and image_size ({config.image_size}), got {centre_crop}",
        ),
        (config.dim >= 1, f"dim must be positive, got {config.dim}"),
        (config.projection_dim >= 1, f"projection_dim must be positive, got {config.projection_dim}"),
        (config.num_neighbors >= 1, f"num_neighbors must be at least 1, got {config.num_neighbors}"),
        (
            config.patch_size >= 1 and config.patch_size % 2 == 1,
            f"patch_size must be a positive odd number, got {config.patch_size}",
        ),
        (config.sigma >= 0, f"sigma must be >= 0, got {config.sigma}"),
        (
            config.image_score in IMAGE_SCORES,
            f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {config.image_score!r}",
        ),
        (
            config.reduction in REDUCTIONS,
            f"reduction must be one of {', '.join(REDUCTIONS)}, got {config.reduction!r}",
        ),
        (
            config.stage_weighting in STAGE_WEIGHTINGS,
            f"stage_weighting must be one of {', '.join(STAGE_WEIGHTINGS)}, got {config.stage_weighting!r}",
        ),
        (
            config.framing in FRAMINGS,
            f"framing must be one of {', '.join(FRAMINGS)}, got {config.framing!r}",
        ),
        (
            config.framing != "tile" or 32 <= config.tile_size <= MAX_TILE_SIZE,
            f"framing tile needs --tile-size between 32 and {MAX_TILE_SIZE} pixels, got {config.tile_size}",
        ),
        (
            0.0 <= config.tile_overlap < 1.0,
            f"tile_overlap must be in [0, 1), got {config.tile_overlap}",
        ),
        (config.index in INDEXES, f"index must be one of {', '.join(INDEXES)}, got {config.index!r}"),
        (config.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {config.device!r}"),
        (
            config.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}",
        ),
        (
            config.target_fpr is None or 0 < config.target_fpr < 1,
            f"target_fpr must be between 0 and 1 (exclusive), got {config.target_fpr}",
        ),
        (config.threshold_sigma > 0, f"threshold_sigma must be positive, got {config.threshold_sigma}"),
        (
            config.calibration_images >= 2,
            f"calibration_images must be at least 2, got {config.calibration_images}",
        ),
        (config.batch_size >= 1, f"batch_size must be positive, got {config.batch_size}"),
        (config.threads is None or config.threads >= 1, f"threads must be positive, got {config.threads}"),
        (len(config.layers) >= 1, "layers must name at least one stage"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    names = [part.strip() for part in config.backbone.split("+")]
    try:
        specs = [backbones.get(name) for name in names]
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    for spec in specs:
        unknown = [layer for layer in config.layers if layer not in spec.stages]
        if unknown:
            raise ConfigError(
                f"{source}: backbone {spec.name} has no stage {', '.join(unknown)}; "
                f"choose from {', '.join(spec.stages)}"
            )
    if len(specs) > 1 and config.weights not in (None, "random"):
        raise ConfigError(
            f"{source}: --weights FILE fits one backbone, not the ensemble {config.backbone}; "
            "ensembles use each backbone's packaged or cached weights"
        )
    canonical = "+".join(spec.name for spec in specs)
    return dataclasses.replace(config, backbone=canonical, layers=tuple(dict.fromkeys(config.layers)))


def members(config: FitConfig) -> list[FitConfig]:
    """An ensemble config (`backbone: a+b`) -> one config per backbone (paper §4.4); a plain one -> itself."""
    return [dataclasses.replace(config, backbone=name) for name in config.backbone.split("+")]


def from_mapping(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check a mapping of option names (dashes or underscores) and return typed overrides."""
    result: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"{source}: unknown key {raw_key!r}{hint}; valid keys: {valid}")
        result[key] = _coerce(key, value, source)
    return result


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into typed overrides. Unknown keys and wrong types are errors."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a mapping of option names to values")
    preset = data.pop("preset", None)
    values = from_mapping(data, str(path))
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{path}: 'preset' must be a string, got {preset!r}")
        values["preset"] = preset
    return values


def given(config_file: Path | None = None, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The settings a command names: preset <- YAML file <- command-line overrides (None means "not
    given"), each typed and checked, without the defaults. `fit --update` compares them with a bank's.

    A preset named on the command line wins over one named in the YAML file (`preset: fast`).
    """
    file_values = load_yaml(config_file) if config_file is not None else {}
    file_preset = file_values.pop("preset", None)
    chosen = preset or file_preset
    values: dict[str, Any] = {}
    if chosen is not None:
        if chosen not in PRESETS:
            raise ConfigError(f"unknown preset {chosen!r}; choose one of: {', '.join(PRESETS)}")
        values.update(PRESETS[chosen])
    values.update(file_values)
    values.update(from_mapping({k: v for k, v in overrides.items() if v is not None}, "command line"))
    return values


def build(config_file: Path | None = None, preset: str | None = None, **overrides: Any) -> FitConfig:
    """Defaults <- preset <- YAML file <- command-line overrides (see `given`), validated as a whole."""
    values = given(config_file, preset, **overrides)
    source = str(config_file) if config_file is not None else "options"
    return validate(FitConfig(**values), source)


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, option: str = "--max-memory") -> int:
    """'2GB', '500MB', '1.5G', '800MiB', '65536' -> bytes, in powers of 1024; ConfigError otherwise."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ConfigError(f"{option}: cannot read {text!r} as a size; give one such as 2GB or 500MB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise ConfigError(f"{option}: the size must be positive, got {text!r}")
    return size


# Fields added after format v1 shipped, with the value every older bank was fitted with.
_BEFORE_FIELD: dict[str, Any] = {
    "framing": "crop",
    "stage_weighting": "none",
    "patch_size": 3,
    "tile_size": 0,
    "tile_overlap": 0.25,
    "target_fpr": None,
    "coreset_max_rows": 0,
    "image_score": "patch",
}


def from_bank(stored: Mapping[str, Any], **runtime: Any) -> FitConfig:
    """Rebuild the config a bank was fitted with, plus runtime options for this run."""
    # Banks written before a field existed were made with the behaviour it now names.
    known = {**_BEFORE_FIELD, **{k: v for k, v in stored.items() if k in _FIELDS}}
    values = from_mapping(known, "bank config")
    if values.get("crop", AUTO_CROP) == AUTO_CROP:  # fit stores the side it chose; a bank never says auto
        raise ConfigError("bank config: 'crop' must be the side the bank was fitted at, got none or auto")
    values.update({k: v for k, v in runtime.items() if v is not None})
    return FitConfig(**values)
