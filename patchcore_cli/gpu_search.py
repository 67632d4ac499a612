"""Brute-force nearest-neighbour search by matrix products in torch: the exact search a GPU runs.

`search.ClusterIndex` saves work with per-query branching through the bank's clusters, which suits a
CPU. A GPU does better with the regular brute force: every query against every bank row, as matrix
products. `MatmulIndex` does that on any torch device (tests run it on the CPU; `--device cuda` runs it on
the GPU) and returns what `ClusterIndex` returns:

1. Candidates. For a block of queries, blocked float32 products give |m - mu|^2 - 2 (q - mu).(m - mu) for
   every bank row m (about the bank mean mu, scaled by a power of two; the query's own |q - mu|^2 does
   not change its ranking), and a running top-(k + SPARE) per query keeps the candidates. Rows of a
   query's skipped source are masked to +inf first. TF32 is off for these products (`device.full_fp32`).
2. Exact distances. The candidates are measured again from float64 differences of the float32
   coordinates, as `ClusterIndex` measures them, and ranked by (distance, bank row): the same distances
   and the same tie rule.

The one way the result can differ from brute force: when more than SPARE other rows lie within float32
rounding of the k-th nearest distance, the k-th may be one of those rows, at most that rounding farther.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_BANK_BLOCK = 16384  # bank rows per product: a 2048 x 16384 float32 block is 128 MiB
_QUERY_BLOCK = 2048  # queries per product; their candidates' float64 differences stay below 100 MiB
SPARE = 4  # candidates kept beyond k, for rows that float32 rounding ranks out of order


class MatmulIndex:
    """Nearest bank rows for each query by brute force on a torch device (see the module docstring).

    bank: M x D float32 rows, copied to `device`. sources: optional M int64 ids (e.g. the training image a
    row came from) that `nearest(..., skip=...)` can leave out. Same interface as `search.ClusterIndex`.
    """

    def __init__(self, bank: np.ndarray, sources: np.ndarray | None = None, device: str = "cpu") -> None:
        import torch

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty M x D array, got shape {bank.shape}")
        self.rows, self.dim = bank.shape
        self.device = torch.device(device)
        with torch.inference_mode():
            self.bank = torch.tensor(bank, device=self.device)  # M x D; a copy: a loaded bank is read-only
            self.mean = self.bank.mean(0)
            centered = self.bank - self.mean
            # A power of two (exact) that brings every coordinate to at most 1, so float32 squares and
            # products neither overflow nor vanish whatever the bank's scale.
            largest = float(centered.abs().max())
            self.scale = 2.0 ** -math.ceil(math.log2(largest)) if largest > 0 else 1.0
            self.scaled = centered * self.scale  # M x D
            self.scaled_sq = (self.scaled * self.scaled).sum(1)  # M
            ids = np.full(self.rows, -1, np.int64) if sources is None else np.asarray(sources, np.int64)
            if ids.shape != (self.rows,):
                raise ValueError(f"sources must hold one id per bank row ({self.rows}), got {ids.shape}")
            self.sources = torch.tensor(ids, device=self.device)

    def nearest(self, queries: np.ndarray, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Q x D queries -> (Q float64 squared distances, Q int64 bank rows) of each nearest bank row.

        skip: optional Q source ids; query i ignores bank rows whose source is skip[i] (a negative id
        skips nothing). A query that finds no row (all skipped) gets distance inf and row -1.
        """
        d2, rows = self.neighbours(queries, 1, skip)
        return d2[:, 0], rows[:, 0]

    def neighbours(
        self, queries: np.ndarray, k: int, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Q x D queries -> (Q x k float64 squared distances, Q x k int64 bank rows), nearest first by
        (distance, row); missing neighbours (k > rows left) are inf / -1."""
        import torch

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        count = queries.shape[0]
        skips = np.full(count, -1, np.int64) if skip is None else np.ascontiguousarray(skip, np.int64)
        if skips.shape != (count,):
            raise ValueError(f"skip must hold one source id per query ({count}), got shape {skips.shape}")
        out_d2 = np.full((count, k), np.inf)
        out_row = np.full((count, k), -1, np.int64)
        kept = min(k, self.rows)
        with torch.inference_mode():
            for lo in range(0, count, _QUERY_BLOCK):
                hi = min(lo + _QUERY_BLOCK, count)
                q = torch.tensor(queries[lo:hi], device=self.device)
                s = torch.tensor(skips[lo:hi], device=self.device)
                d2, rows = self._search(q, s, kept)
                out_d2[lo:hi, :kept], out_row[lo:hi, :kept] = d2.cpu().numpy(), rows.cpu().numpy()
        return out_d2, out_row

    def _search(self, q: torch.Tensor, skip: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Qb x D float32 queries, Qb skip ids (on the device) -> Qb x k float64 d2 and int64 rows."""
        import torch

        from patchcore_cli.device import full_fp32

        wanted = min(k + SPARE, self.rows)
        scaled = (q - self.mean) * self.scale
        skipping = skip[:, None] >= 0  # Qb x 1
        best_v = best_i = None
        for lo in range(0, self.rows, _BANK_BLOCK):
            hi = min(lo + _BANK_BLOCK, self.rows)
            with full_fp32(self.device.type):
                # Qb x B: |m|^2 - 2 q.m, which ranks rows as |q - m|^2 does
                partial = torch.addmm(self.scaled_sq[None, lo:hi], scaled, self.scaled[lo:hi].T, alpha=-2.0)
            partial.masked_fill_(skipping & (self.sources[None, lo:hi] == skip[:, None]), math.inf)
            values, index = torch.topk(partial, min(wanted, hi - lo), dim=1, largest=False)
            index += lo
            if best_v is not None:
                values, order = torch.topk(torch.cat([best_v, values], 1), wanted, dim=1, largest=False)
                index = torch.gather(torch.cat([best_i, index], 1), 1, order)
            best_v, best_i = values, index
        rows, _ = best_i.sort(dim=1)  # by row first, so the stable sort below breaks ties by row
        diff = q.double()[:, None, :] - self.bank[rows].double()  # Qb x wanted x D
        d2 = (diff * diff).sum(-1)
        d2.masked_fill_(skipping & (self.sources[rows] == skip[:, None]), math.inf)
        d2, order = torch.sort(d2, dim=1, stable=True)
        rows = torch.gather(rows, 1, order)
        d2, rows = d2[:, :k], rows[:, :k]
        return d2, rows.masked_fill(torch.isinf(d2), -1)
