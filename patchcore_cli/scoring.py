"""Nearest-neighbour search against the memory bank, image scores (paper eq. 6-7) and anomaly maps."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from patchcore_cli.geometry import Geometry

SIGMA = 4.0  # paper §3.3: Gaussian smoothing of the upsampled map, sigma = 4
NUM_NEIGHBORS = 9  # paper eq. 7: b = 9 bank neighbours of m* for the reweighting


class NearestNeighbours:
    """Nearest-neighbour search over a bank; every distance returned is Euclidean (paper eq. 6).

    - "exact" (default): on the CPU, `search.ClusterIndex`, which prunes the bank by its own cluster
      structure and a principal-axes bound and returns exactly the brute-force answer (ties to the lowest
      row) with a few percent of the work. k > 1 (paper eq. 7 asks for b neighbours of one row per image)
      is brute force. With device "cuda", `gpu_search.MatmulIndex`: brute force by matrix products on
      the GPU, with the same exact distances and tie rule (see its docstring for the one caveat).
    - "faiss": faiss IndexFlatL2, exact brute force, on the CPU whatever the device.
    - "hnsw": faiss IndexHNSWFlat (M = 32, efSearch = 64), approximate, on the CPU; its recall against the
      exact search is reported by `patchcore benchmark --profile`.

    sources: optional M ids (the training image each row came from). With the exact method, `search(...,
    skip=ids)` then leaves out, for each query, the rows of its id: calibration scores a training image
    against the bank without its own patches without building a second index.
    """

    def __init__(
        self, bank: np.ndarray, method: str = "exact", sources: np.ndarray | None = None, device: str = "cpu"
    ) -> None:
        from patchcore_cli.gpu_search import MatmulIndex
        from patchcore_cli.search import ClusterIndex

        self.bank = np.ascontiguousarray(bank, dtype=np.float32)  # M x D
        self.method = method
        if method == "exact" and device != "cpu":
            self.index = MatmulIndex(self.bank, sources, device)
        elif method == "exact":
            self.index = ClusterIndex(self.bank, sources)
        else:
            import faiss

            if method == "hnsw":
                self.index = faiss.IndexHNSWFlat(self.bank.shape[1], 32)
                self.index.hnsw.efConstruction = 80
                self.index.hnsw.efSearch = 64
            else:
                self.index = faiss.IndexFlatL2(self.bank.shape[1])
            self.index.add(self.bank)

    def search(
        self, queries: np.ndarray, k: int = 1, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Q x D queries -> (Q x k Euclidean distances, Q x k bank indices), nearest first.

        skip: Q source ids whose rows each query ignores (exact method only); a negative id skips
        nothing. Where fewer than k rows remain, the missing entries are inf and -1.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.bank.shape[0])
        if self.method != "exact":
            if skip is not None:
                raise ValueError(f"the {self.method} index cannot leave rows out; use the exact index")
            squared, indices = self.index.search(queries, k)
        elif k == 1:
            squared, nearest = self.index.nearest(queries, skip)
            squared, indices = squared[:, None], nearest[:, None]
        else:
            squared, indices = self.index.neighbours(queries, k, skip)
        return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32), indices


def image_score(
    patches: np.ndarray,
    distances: np.ndarray,
    nearest: np.ndarray,
    search: NearestNeighbours,
    num_neighbors: int = NUM_NEIGHBORS,
    skip: int | None = None,
    peak: float | None = None,
) -> float:
    """Image anomaly score from one image's patch scores (paper eq. 6-7).

    patches: P x D embeddings; distances: P patch scores (distance to the nearest bank entry); nearest:
    P bank indices. s* is the largest patch score, or `peak` when given (image_score "map": the largest
    value of the image's blurred anomaly map). With `num_neighbors` b > 1 it is reweighted by eq. 7:
    w = 1 - exp(|m_test* - m*|) / sum over the b nearest bank neighbours m of m* of exp(|m_test* - m|),
    where m_test* is the patch with the largest score, so an outlier patch whose bank match sits in a
    sparse region of the bank counts for more.
    skip: a source id whose bank rows are left out (calibration; see NearestNeighbours).
    """
    worst = int(np.argmax(distances))
    score = float(distances[worst])
    scale = score if peak is None else float(peak)
    if num_neighbors <= 1:
        return scale
    m_star = search.bank[nearest[worst]]
    skips = None if skip is None else np.array([skip])
    _, neighbours = search.search(m_star[None, :], num_neighbors, skips)  # N_b(m*), m* itself first
    found = neighbours[0][neighbours[0] >= 0]
    gaps = np.linalg.norm(search.bank[found] - patches[worst][None, :], axis=1).astype(np.float64)
    gaps[0] = score  # |m_test* - m*| exactly as eq. 6 measured it
    softmax = np.exp(gaps - gaps.max())
    softmax /= softmax.sum()
    return float((1.0 - softmax[0]) * scale)


def image_map(
    distances: np.ndarray, grids: list[tuple[int, int]], geometry: Geometry, sigma: float = SIGMA
) -> np.ndarray:
    """One image's patch scores (P, its views' grids one after another) -> its anomaly map, float32 H x W
    in the geometry's map frame: each view's grid upsampled onto its place, then blurred (§3.3)."""
    import torch

    from patchcore_cli.geometry import stitch

    views, start = [], 0
    for height, width in grids:
        views.append(
            torch.from_numpy(
                np.ascontiguousarray(distances[start : start + height * width], np.float32)
            ).reshape(height, width)
        )
        start += height * width
    return stitch(views, geometry, sigma).numpy()


def anomaly_map(patch_scores: torch.Tensor, size: int, sigma: float = SIGMA) -> torch.Tensor:
    """B x h x w patch scores -> B x size x size map on the same device: bilinear upsampling, then Gaussian
    blur (§3.3)."""
    import torch.nn.functional as F

    maps = F.interpolate(patch_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        maps = gaussian_blur(maps, sigma)
    return maps.squeeze(1)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """B x 1 x H x W -> same shape, blurred by a Gaussian truncated at 4 sigma with mirrored borders
    (scipy.ndimage.gaussian_filter's mode="mirror"). Applied as two small matrix products, K_h X K_w^T:
    far cheaper on a CPU than a 33 x 33 convolution. Runs on the maps' device."""
    from patchcore_cli.device import full_fp32

    rows = _blur_matrix(maps.shape[-2], sigma).to(maps.device)
    cols = _blur_matrix(maps.shape[-1], sigma).to(maps.device)
    with full_fp32(maps.device.type):
        return rows @ maps @ cols.T


@functools.lru_cache(maxsize=8)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """size x size matrix applying a 1-D Gaussian (radius 4 sigma) with mirrored borders."""
    import torch

    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    matrix = np.zeros((size, size), dtype=np.float64)
    period = 2 * (size - 1) if size > 1 else 1
    for out_index in range(size):
        source = np.abs((out_index + offsets) % period)
        source = np.where(
            source >= size, period - source, source
        )  # mirror: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        np.add.at(matrix[out_index], source, weights)
    return torch.from_numpy(matrix.astype(np.float32))
