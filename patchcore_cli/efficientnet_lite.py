"""EfficientNet-Lite0/1/2 in plain torch, module for module as timm builds `tf_efficientnet_liteN`.

timm cannot be imported without torchvision (its layers import `torchvision.ops`), and importing
torchvision imports `torch._dynamo`, sympy and most of torch's compiler: several seconds before the first
image of every `patchcore score` (docs/latency.md). The network itself is small, so it is written out
here, with the same module names and the same parameter order as timm's model. The packaged weights load
into it exactly as they load into timm's, and `tests/test_backbones.py` checks that both give the same
feature maps, bit for bit.

The architecture (Tan & Le 2019, the Lite variants of the TensorFlow reference): a stride-2 stem, seven
stages of depthwise-separable (stage 1) and inverted-residual blocks (stages 2-7, expansion 6, no
squeeze-excite), ReLU6 everywhere, BatchNorm with epsilon 1e-3, and TensorFlow's "SAME" padding: a
strided convolution pads (total - total // 2) on the bottom and right, as TensorFlow does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Stages of EfficientNet-Lite: (block, repeats, kernel, stride, expansion, output channels).
_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
# variant -> (channel multiplier, depth multiplier), as in the TensorFlow reference.
VARIANTS = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}
_STEM = 32  # not scaled in the Lite variants
_HEAD = 1280  # not scaled in the Lite variants
_BN_EPS = 1e-3  # TensorFlow's default


def _divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of 8, never below 90 % of `value` (timm's `make_divisible`)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm followed by ReLU6 (or by nothing): timm's BatchNormAct2d, with the same state."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SameConv(nn.Conv2d):
    """A strided convolution with TensorFlow's "SAME" padding, worked out from each input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Stride 1 with an odd kernel pads the same on every side, so the padding can be fixed in advance.
    if stride == 1:
        return nn.Conv2d(in_chs, out_chs, kernel, 1, kernel // 2, groups=groups, bias=False)
    return SameConv(in_chs, out_chs, kernel, stride, 0, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """Depthwise k x k convolution, then pointwise 1 x 1; a shortcut when the shape is unchanged."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _conv(in_chs, in_chs, kernel, stride, groups=in_chs)
        self.bn1 = BatchNormAct(in_chs)
        self.conv_pw = _conv(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct(out_chs, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise k x k, pointwise projection; a shortcut when the shape is unchanged."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid_chs = _divisible(in_chs * expansion)
        self.conv_pw = _conv(in_chs, mid_chs, 1)
        self.bn1 = BatchNormAct(mid_chs)
        self.conv_dw = _conv(mid_chs, mid_chs, kernel, stride, groups=mid_chs)
        self.bn2 = BatchNormAct(mid_chs)
        self.conv_pwl = _conv(mid_chs, out_chs, 1)
        self.bn3 = BatchNormAct(out_chs, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return out + x if self.has_skip else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite `variant` (0, 1 or 2): B x 3 x H x W -> B x 1000 ImageNet logits.

    PatchCore runs only `conv_stem`, `bn1` and the first `blocks` (see backbones.py); the head and the
    classifier are here so that a full weights file loads with every tensor accounted for.
    """

    def __init__(self, variant: int) -> None:
        super().__init__()
        width, depth = VARIANTS[variant]
        self.conv_stem = _conv(3, _STEM, 3, stride=2)
        self.bn1 = BatchNormAct(_STEM)
        stages: list[nn.Module] = []
        in_chs = _STEM
        for number, (kind, repeats, kernel, stride, expansion, channels) in enumerate(_STAGES):
            # The first and last stages keep their depth; the others grow by `depth`, rounded up.
            count = repeats if number in (0, len(_STAGES) - 1) else math.ceil(repeats * depth)
            out_chs = _divisible(channels * width)
            blocks: list[nn.Module] = []
            for index in range(count):
                step = stride if index == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(in_chs, out_chs, kernel, step))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, kernel, step, expansion))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(in_chs, _HEAD, 1)
        self.bn2 = BatchNormAct(_HEAD)
        self.classifier = nn.Linear(_HEAD, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
