"""Image batch -> patch embeddings (paper §3.1): backbone trunk, local aggregation, resize, reduction."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from patchcore_cli.backbones import LoadedBackbone
from patchcore_cli.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


class Trunk:
    """Runs a backbone's modules in order, stopping after the deepest requested stage.

    `__call__`: B x 3 x H x W float -> {stage: B x C_stage x H/s x W/s} on `device` ("cpu" or "cuda";
    the pixels may be anywhere). Later stages are never computed.
    """

    def __init__(self, loaded: LoadedBackbone, layers: Sequence[str], device: str = "cpu") -> None:
        import torch

        spec = loaded.spec
        unknown = [layer for layer in layers if layer not in spec.stages]
        if unknown or not layers:
            raise ConfigError(
                f"backbone {spec.name} has no stage {unknown or '(none given)'}; "
                f"choose from {', '.join(spec.stages)}"
            )
        self.layers = tuple(sorted(layers, key=lambda name: spec.stages[name]))
        self.taps = {spec.stages[name]: name for name in self.layers}
        self.features_only = spec.features_only
        if self.features_only:  # one module whose forward returns every stage's map
            self.modules: list[nn.Module] = [loaded.model]
        else:
            depth = max(self.taps) + 1
            self.modules = [loaded.model.get_submodule(path) for path in spec.trunk[:depth]]
        self.channels = [spec.channels[name] for name in self.layers]
        self.device = device
        for module in self.modules:
            module.to(device)
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.channels_last = False
        self.autocast = False

    def set_precision(self, precision: str) -> None:
        """'fp32' (IEEE float32 on a GPU too, see `device.full_fp32`), or 'bf16': channels-last layout and
        bfloat16 autocast on the trunk's device."""
        import torch

        self.autocast = precision == "bf16"
        self.channels_last = self.autocast
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for module in self.modules:
            module.to(memory_format=fmt)

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        from patchcore_cli.device import full_fp32

        autocast = (
            torch.autocast(self.device, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        )
        with torch.inference_mode(), full_fp32(self.device), autocast:
            return self.maps(pixels.to(self.device))

    def maps(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """What `__call__` computes, without its inference mode, precision and autocast contexts, so that
        an exporter can trace it (export.py). B x 3 x H x W float in [0, 1], on the trunk's device ->
        {stage: B x C_stage x H/s x W/s}."""
        import torch

        x = (pixels - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.features_only:
            maps = self.modules[0](x)
            return {name: maps[index].float() for index, name in self.taps.items()}
        out: dict[str, torch.Tensor] = {}
        for index, module in enumerate(self.modules):
            x = module(x)
            if index in self.taps:
                out[self.taps[index]] = x.float()
        return out


def to_tensor(batch: Sequence[np.ndarray]) -> torch.Tensor:
    """N arrays of H x W x 3 uint8 -> N x 3 x H x W float32 in [0, 1]."""
    import torch

    return to_float(torch.from_numpy(np.stack(batch)))


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 tensor -> N x 3 x H x W float32 in [0, 1] (also traced by export.py)."""
    return pixels.permute(0, 3, 1, 2).float() / 255.0


def embed(
    feature_maps: Sequence[torch.Tensor],
    dim: int,
    reduction: str = "avgpool",
    seed: int = 0,
    weighting: str = "none",
    patch_size: int = 3,
) -> torch.Tensor:
    """Stage feature maps -> patch embeddings (paper §3.1), on the maps' device.

    Each map (B x C_l x H_l x W_l) is averaged over a p x p neighbourhood (eq. 1-2, p = `patch_size`,
    odd, so the grid keeps its size) and bilinearly
    resized to the finest stage's grid. If the stages together have more than `dim` channels, they are
    reduced to `dim`:

    - "avgpool" (the reference implementation's way): each stage is pooled over channels to an equal
      share of `dim`, so a deep stage with many channels cannot drown a shallow one;
    - "random": the concatenation is multiplied by a seeded Gaussian matrix (Johnson-Lindenstrauss), which
      keeps Euclidean distances in expectation.

    `weighting` "equal" scales each stage by sqrt(mean width / its width), where a stage's width is its
    channel count after any pooling. Then each stage weighs in the squared distance as if it had the same
    number of channels, as equal-share pooling arranges, but no channel is averaged away. "none" leaves
    the stages as they are, so a stage with more channels weighs more. With equal-share pooling the
    widths already match and the two agree.

    Returns B x H_0*W_0 x D with D = min(dim, sum C_l).
    """
    import torch
    import torch.nn.functional as F

    height, width = feature_maps[0].shape[-2:]
    total = sum(fmap.shape[1] for fmap in feature_maps)
    shares = _channel_shares(dim, len(feature_maps)) if total > dim and reduction == "avgpool" else None
    widths = shares if shares is not None else [fmap.shape[1] for fmap in feature_maps]
    parts = []
    for index, fmap in enumerate(feature_maps):
        # Zero padding counts at the border, as the reference's unfold-and-average does; this measured
        # better than excluding it (bottle pixel AUROC 0.979 vs 0.977 with efficientnet_lite0).
        fmap = F.avg_pool2d(fmap, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        if fmap.shape[-2:] != (height, width):
            fmap = F.interpolate(fmap, size=(height, width), mode="bilinear", align_corners=False)
        batch, channels = fmap.shape[:2]
        flat = fmap.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # B*H*W x C_l
        if shares is not None and channels != shares[index]:
            flat = F.adaptive_avg_pool1d(flat.unsqueeze(1), shares[index]).squeeze(1)
        if weighting == "equal" and widths[index] * len(widths) != sum(widths):
            flat = flat * float(np.sqrt(sum(widths) / len(widths) / widths[index]))
        parts.append(flat)
    out = torch.cat(parts, dim=1)
    if total > dim and reduction == "random":
        from patchcore_cli.device import full_fp32

        with full_fp32(out.device.type):
            out = out @ random_matrix(total, dim, seed).to(out.device)
    return out.reshape(feature_maps[0].shape[0], height * width, -1)


@functools.lru_cache(maxsize=4)
def random_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A seeded rows x cols Gaussian projection scaled by 1/sqrt(cols); rebuilt identically at score time."""
    import torch

    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))


def _channel_shares(dim: int, count: int) -> list[int]:
    base, rest = divmod(dim, count)
    return [base + (1 if i < rest else 0) for i in range(count)]


def embedding_dim(channels: Sequence[int], dim: int) -> int:
    return min(dim, sum(channels))
