"""The coreset of a fit's stream of patch rows within a memory budget: shards on disk, one greedy pass each.

A fit (or `fit --update`) feeds its rows in order, one image's rows at a time. They go to a shard store in
the work folder (`store.py`). When the next image would take the shard past `max_rows`, the most rows one
greedy pass may hold within the budget (`coreset.max_rows_for`), the shard is closed: its greedy coreset
(paper Alg. 1) picks `coreset.provisional_keep` rows, which are appended to a picks store, and the shard's
file is deleted. So the disk holds one shard and the picks, and memory one greedy pass, whatever the number
of images.

At the end the bank's size is known: by default the one-pass size max(1, round(ratio * N)), at most
`coreset_max_rows` (`coreset.bank_size`). It is shared
among the shards in proportion to their rows (`coreset.apportion`), and each shard's picks are cut to its
part: the first k picks of a greedy coreset are the greedy coreset of k. When every row fits one shard, the
coreset is that one pass, exactly `greedy_coreset` of all the rows with its default start: a fit within its
budget is the fit without one, bit for bit.

Shards are runs of whole images, cut where the next image would not fit; each is seeded by its index
(`coreset.shard_start`), so its picks depend on nothing but its rows and its place. The budget covers the
greedy pass only: the bank, the backbone and the calibration come on top.

When every image's patch count is known before any image is read, `plan` cuts the same shards and sizes
their picks up front, so that the shards can run anywhere, in any order (`fit --ray`, distributed.py);
`picks` is the greedy pass both ways take.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchcore_cli import coreset
from patchcore_cli.errors import ConfigError, OutputError
from patchcore_cli.store import StoreWriter

if TYPE_CHECKING:
    from patchcore_cli.coreset import RowSource
    from patchcore_cli.engine import Timings

MEMORY_FRACTION = 16
MAX_MEMORY = 2**30
"""The default budget: 1/MEMORY_FRACTION of physical memory, at most MAX_MEMORY. 1 GB holds a greedy pass
over 411,000 patches with the 128-d projection: 524 EfficientNet-Lite0 images at 224, or 257 at 320 (what
`crop: auto` picks for MVTec AD's parts), so a typical training set gets the exact one-pass coreset. Shards
are faster (a pass costs more per row the more rows it has: 19, 20, 33 and 56 us of CPU per row at 50k,
100k, 200k and 400k rows, docs/scale.md), but they are an approximation: their covering radius was 5 to
14 % larger on bottle and capsule, beyond the 2 % an approximate coreset must meet to be a default. So
the cap is set by memory, not by speed; `--max-memory` lower trades exactness for time."""


def default_max_memory() -> int:
    """The coreset budget when `--max-memory` is not given: 1/16 of physical memory, at most 1 GB."""
    import os

    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GB
        physical = 8 * 2**30
    return int(min(MAX_MEMORY, physical // MEMORY_FRACTION))


def format_bytes(size: int) -> str:
    """1536 -> '1.5 KB', in powers of 1024 (as --max-memory reads them)."""
    for power, unit in ((3, "GB"), (2, "MB"), (1, "KB")):
        if size >= 1024**power:
            return f"{size / 1024**power:.1f} {unit}"
    return f"{size} B"


@contextlib.contextmanager
def work_folder(parent: Path | None) -> Iterator[Path]:
    """A private folder for a fit's work files under `parent` (default: the system's temporary folder),
    removed with everything in it however the block ends: success, error or Ctrl-C."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=".patchcore-work-", dir=parent))
    except OSError as exc:
        where = parent if parent is not None else tempfile.gettempdir()
        raise OutputError(f"{where}: cannot create a work folder ({exc.strerror or exc})") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Coreset:
    """The bank a `ShardedCoreset` chose."""

    rows: np.ndarray  # M x D float32, in bank order: shard after shard, greedy order within each
    source: np.ndarray  # M int64: each row's index in the stream (0 = the first row added)
    passes: int  # greedy passes: 1 for a one-pass coreset, else the number of shards


def picks(
    source: np.ndarray | RowSource,
    keep: int,
    index: int | None,
    share: float,
    projection_dim: int | None,
    seed: int,
) -> np.ndarray:
    """The first `keep` greedy picks (row indices, int64) of a shard's rows: of shard `index` of a
    hierarchical coreset, started at `coreset.shard_start`, or with `index` None of the only pass, started
    where `greedy_coreset` starts by default. A pass that keeps every row keeps them in order."""
    rows = source.shape[0]
    if keep >= rows and (index is None or share >= 1.0):
        return np.arange(rows, dtype=np.int64)
    if keep <= 0:
        return np.empty(0, dtype=np.int64)
    start = None if index is None else coreset.shard_start(seed, index, rows)
    return coreset.greedy_coreset(source, keep, projection_dim, seed, start=start).astype(np.int64)


@dataclass(frozen=True)
class Shard:
    """One greedy pass of a planned coreset (`plan`): images lo .. hi - 1, holding `rows` patches. The pass
    picks `keep` rows (`picks`), of which the bank takes the first `part`. `index` is None for the only
    pass of a coreset that fits one."""

    index: int | None
    lo: int
    hi: int
    rows: int
    keep: int
    part: int


def plan(
    counts: Sequence[int],
    names: Sequence[str],
    share: float,
    dim: int,
    projection_dim: int | None,
    budget: int,
    cap: int = 0,
) -> list[Shard]:
    """The shards a `ShardedCoreset` cuts from images of `counts` patches (`names` name them in errors) and
    the picks it takes from each: the same boundaries, the same provisional and final picks, the same
    ConfigError for an image larger than one pass. The bank is the first `part` picks of each shard, shard
    after shard. `cap` > 0 caps the bank's rows (`coreset.bank_size`); the total is known here, so each
    shard picks no more than its part of the capped bank (plus one)."""
    width = dim if projection_dim is None else min(dim, projection_dim)
    max_rows = coreset.max_rows_for(budget, width)
    runs: list[tuple[int, int, int]] = []
    first, rows = 0, 0
    for image, count in enumerate(counts):
        if count > max_rows:
            raise too_small(budget, width, count, f"one image's {count} patches ({names[image]})")
        if rows + count > max_rows:
            runs.append((first, image, rows))
            first, rows = image, 0
        rows += count
    runs.append((first, len(counts), rows))
    total = sum(rows for _, _, rows in runs)
    target = coreset.bank_size(total, share, cap)
    if len(runs) == 1:
        return [Shard(None, 0, len(counts), total, target, target)]
    sizes = np.array([rows for _, _, rows in runs])
    parts = coreset.apportion(target, sizes)
    keeps = [coreset.provisional_keep(int(size), share, cap, total) for size in sizes[:-1]] + [int(parts[-1])]
    if (parts > np.array(keeps)).any():
        raise ValueError(f"a bank of {target} rows needs more than the shards picked; share is too small")
    return [
        Shard(index, lo, hi, rows, keep, int(part))
        for index, ((lo, hi, rows), keep, part) in enumerate(zip(runs, keeps, parts, strict=True))
    ]


def too_small(budget: int, width: int, rows: int, what: str) -> ConfigError:
    """The error for a budget below one greedy pass over `rows` rows (`what` says which)."""
    return ConfigError(
        f"--max-memory {format_bytes(budget)} is too small for the coreset of {what}; give at least "
        f"{format_bytes(coreset.budget_for(rows, width))}"
    )


class ShardedCoreset:
    """The greedy coreset of rows added in order, in shards that each fit `budget` bytes (see the module
    docstring). `share` is the bank's share of the rows, the fit's coreset ratio; an update, whose bank
    size is not a share of its rows, gives its exact share. `cap` > 0 caps the bank's rows
    (`coreset.bank_size`). `expected`, the total rows when known before they arrive (a fit whose framing
    fixes every image's patch count), lets each shard pick only its part of a capped bank; without it a
    shard picks for the rows seen so far, more than it needs, and the bank is the same. It must not exceed
    the rows added. Work files go to `folder`."""

    def __init__(
        self,
        folder: Path,
        dim: int,
        share: float,
        projection_dim: int | None,
        seed: int,
        budget: int,
        timings: Timings,
        cap: int = 0,
        expected: int = 0,
    ) -> None:
        self.folder, self.dim, self.share, self.cap, self.expected = folder, dim, share, cap, expected
        self.projection_dim, self.seed, self.budget, self.timings = projection_dim, seed, budget, timings
        self.width = dim if projection_dim is None else min(dim, projection_dim)
        self.max_rows = coreset.max_rows_for(budget, self.width)
        self.sizes: list[int] = []  # rows of each closed shard
        self.kept: list[int] = []  # picks of each closed shard, in the picks store shard after shard
        self.sources: list[np.ndarray] = []
        self.picks = StoreWriter(folder / "picks.npy", dim)
        self.shard = StoreWriter(folder / "shard-0.npy", dim)
        self.total = 0

    def add(self, rows: np.ndarray, image: str | None = None) -> None:
        """Append k x D rows: one image's patches, kept in one shard (`image` names it in errors), or with
        `image` None, rows that may be split between shards (the rows of a bank being updated)."""
        if image is not None:
            if len(rows) > self.max_rows:
                raise self._too_small(len(rows), f"one image's {len(rows)} patches ({image})")
            if self.shard.rows + len(rows) > self.max_rows:
                self._close()
            self._write(rows)
            return
        if self.max_rows < 1:
            raise self._too_small(1, "one patch")
        at = 0
        while at < len(rows):
            if self.shard.rows == self.max_rows:
                self._close()
            take = min(len(rows) - at, self.max_rows - self.shard.rows)
            self._write(rows[at : at + take])
            at += take

    def finish(self, target: int | None = None) -> Coreset:
        """The bank of `target` rows (default: the one-pass size, `coreset.bank_size`), at most N."""
        if self.total == 0:
            raise ValueError("no rows to take a coreset of")
        if self.expected > self.total:
            raise ValueError(f"{self.total} rows arrived, fewer than the {self.expected} expected")
        if target is None:
            target = coreset.bank_size(self.total, self.share, self.cap)
        target = min(self.total, target)
        if not self.sizes:
            return self._one_pass(target)
        parts = coreset.apportion(target, np.array([*self.sizes, self.shard.rows]))
        if (parts[:-1] > np.array(self.kept)).any():
            raise ValueError(f"a bank of {target} rows needs more than the shards picked; share is too small")
        self._close(int(parts[-1]), last=True)
        with self.timings.stage("store"):
            picked = self.picks.close()
        rows = np.empty((target, self.dim), dtype=np.float32)
        sources, at, first = [], 0, 0
        for part, kept, source in zip(parts, self.kept, self.sources, strict=True):
            picked.read(first, first + part, out=rows[at : at + part])
            sources.append(source[:part])
            at, first = at + part, first + kept
        picked.path.unlink()
        return Coreset(rows, np.concatenate(sources), len(self.sizes))

    def _write(self, rows: np.ndarray) -> None:
        with self.timings.stage("store"):
            self.shard.append(rows)
        self.total += len(rows)

    def _one_pass(self, target: int) -> Coreset:
        with self.timings.stage("store"):
            store = self.shard.close()
        with self.timings.stage("coreset"):
            selected = picks(store, target, None, self.share, self.projection_dim, self.seed)
            rows = store.take(selected)
        store.path.unlink()
        self.picks.discard()
        return Coreset(rows, selected, 1)

    def _close(self, keep: int | None = None, last: bool = False) -> None:
        """Take the current shard's coreset: `keep` picks, or provisionally as many as its share may need;
        then, unless it is the `last`, start the next shard."""
        index, first = len(self.sizes), self.total - self.shard.rows
        with self.timings.stage("store"):
            store = self.shard.close()
        size = store.rows
        if keep is None:
            keep = coreset.provisional_keep(size, self.share, self.cap, max(self.total, self.expected))
        with self.timings.stage("coreset"):
            local = picks(store, keep, index, self.share, self.projection_dim, self.seed)
            rows = store.take(local)
        with self.timings.stage("store"):
            self.picks.append(rows)
        store.path.unlink()
        self.sizes.append(size)
        self.kept.append(keep)
        self.sources.append(local + first)
        if not last:
            self.shard = StoreWriter(self.folder / f"shard-{index + 1}.npy", self.dim)

    def _too_small(self, rows: int, what: str) -> ConfigError:
        return too_small(self.budget, self.width, rows, what)
