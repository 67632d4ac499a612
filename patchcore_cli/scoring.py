"""Nearest-neighbour search against the memory bank, image scores (paper eq. 6-7) and anomaly maps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SIGMA = 4.0  # paper §3.3: Gaussian smoothing of the upsampled map, sigma = 4
NUM_NEIGHBORS = 9  # paper eq. 7: b = 9 bank neighbours of m* for the reweighting


class NearestNeighbours:
    """Exact Euclidean nearest-neighbour search over a bank (faiss IndexFlatL2).

    faiss reports squared L2; every distance returned here is the Euclidean distance (paper eq. 6).
    """

    def __init__(self, bank: np.ndarray) -> None:
        import faiss

        self.bank = np.ascontiguousarray(bank, dtype=np.float32)  # M x D
        self.index = faiss.IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Q x D queries -> (Q x k Euclidean distances, Q x k bank indices), nearest first."""
        squared, indices = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(squared, 0.0)), indices


def image_score(
    patches: np.ndarray,
    distances: np.ndarray,
    nearest: np.ndarray,
    search: NearestNeighbours,
    num_neighbors: int = NUM_NEIGHBORS,
) -> float:
    """Image anomaly score from one image's patch scores (paper eq. 6-7).

    patches: P x D embeddings; distances: P patch scores (distance to the nearest bank entry); nearest:
    P bank indices. s* is the largest patch score. With `num_neighbors` b > 1 it is reweighted by eq. 7:
    w = 1 - exp(|m_test* - m*|) / sum over the b nearest bank neighbours m of m* of exp(|m_test* - m|),
    so an outlier patch whose bank match sits in a sparse region of the bank counts for more.
    """
    worst = int(np.argmax(distances))
    score = float(distances[worst])
    if num_neighbors <= 1:
        return score
    m_star = search.bank[nearest[worst]]
    _, neighbours = search.search(m_star[None, :], num_neighbors)  # N_b(m*), m* itself first
    gaps = np.linalg.norm(search.bank[neighbours[0]] - patches[worst][None, :], axis=1).astype(np.float64)
    gaps[0] = score  # |m_test* - m*| exactly as eq. 6 measured it
    softmax = np.exp(gaps - gaps.max())
    softmax /= softmax.sum()
    return float((1.0 - softmax[0]) * score)


def anomaly_map(patch_scores: torch.Tensor, size: int, sigma: float = SIGMA) -> torch.Tensor:
    """B x h x w patch scores -> B x size x size map: bilinear upsampling, then Gaussian blur (§3.3)."""
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur

    maps = F.interpolate(patch_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)  # truncate at 4 sigma, as scipy.ndimage.gaussian_filter does
        maps = gaussian_blur(maps, kernel_size=2 * radius + 1, sigma=sigma)
    return maps.squeeze(1)
