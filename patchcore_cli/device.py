"""Which torch device a run computes on, and full float32 arithmetic there.

`--device` is a runtime option, like `--threads`: it never changes what a bank contains, and a bank fitted
on one device scores on the other. On a GPU the backbone, the patch embedding, the nearest-neighbour
search and the anomaly maps run on the device; the coreset (numba kernels) always runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from patchcore_cli.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve(name: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cpu' and 'cuda' as given.

    Asking for 'cuda' where torch sees no GPU is a ConfigError (exit code 2) that says why.
    """
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "auto":
        return "cpu"
    why = (
        "this torch is a CPU-only build"
        if torch.version.cuda is None
        else "torch sees no CUDA GPU (no driver, or none visible in CUDA_VISIBLE_DEVICES)"
    )
    raise ConfigError(f"--device cuda: {why}; use --device cpu or auto")


@contextmanager
def full_fp32(device: str) -> Iterator[None]:
    """Float32 matrix products and convolutions in IEEE float32 on a GPU, not TF32, while inside.

    cuDNN convolutions default to TF32 (10-bit mantissa), which moves features by about 1e-3 relative:
    more than the CPU-parity tolerances allow. The previous settings come back on exit. On the CPU this
    changes nothing.
    """
    if device != "cuda":
        yield
        return
    import torch

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a stage's timing holds its own work (a no-op on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
