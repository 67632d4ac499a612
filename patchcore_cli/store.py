"""Work files of a fit: patch embeddings streamed to disk, read back a bounded range at a time.

A store is one NumPy `.npy` file (format 1.0): a header of HEADER_BYTES, then rows x dim little-endian
float32 in C order, so `np.load(path, allow_pickle=False)` reads it. The header is written first with a
row count of 0 and rewritten when the writer closes, so rows can be appended before anyone knows how many
there will be. Nothing in it is pickled, and the header is parsed as a literal, never executed.

Rows go in through an ordinary file handle and come back with `readinto`, never through a memory map: the
pages of a map count towards the process's resident memory for as long as they stay mapped, so reading a
7 GB store through one would show (and keep) up to 7 GB of RSS, where plain reads go through the kernel's
page cache and the process holds one chunk.

A `Store`, or a `Store.view` of a row range, is a row source for `coreset.greedy_coreset`: it has a
`shape` and a `dtype`, and a slice with step 1 is a fresh float32 array.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from patchcore_cli.errors import OutputError

DTYPE = np.dtype("<f4")
HEADER_BYTES = 128  # magic, version, length and the padded dict: a multiple of 64, as numpy aligns data
CHUNK_ROWS = 16384  # rows per read when a range is streamed (about 10 MB at 152 dims)
_MAGIC = b"\x93NUMPY\x01\x00"


def _header(rows: int, dim: int) -> bytes:
    """The .npy 1.0 header of a rows x dim float32 array, padded with spaces to HEADER_BYTES."""
    text = repr({"descr": DTYPE.str, "fortran_order": False, "shape": (rows, dim)})
    body_length = HEADER_BYTES - len(_MAGIC) - 2
    body = text.ljust(body_length - 1) + "\n"
    return _MAGIC + struct.pack("<H", body_length) + body.encode("latin1")


class StoreWriter:
    """Create a store of `dim`-wide float32 rows at `path` and append rows to it in order.

    As a context manager it deletes the file when the block raises (Ctrl-C included).
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim, self.rows = int(dim), 0
        try:
            self.handle = open(self.path, "wb")  # noqa: SIM115 (closed by close() or discard())
            self.handle.write(_header(0, self.dim))
        except OSError as exc:
            raise self._error(exc) from exc

    def append(self, rows: np.ndarray) -> None:
        """Write k x dim rows after those already written."""
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"store {self.path} takes rows of {self.dim}, got an array of {rows.shape}")
        if not rows.shape[0]:
            return
        try:
            self.handle.write(memoryview(rows).cast("B"))
        except OSError as exc:
            raise self._error(exc) from exc
        self.rows += rows.shape[0]

    def close(self) -> Store:
        """Write the final header and open the file for reading."""
        try:
            self.handle.seek(0)
            self.handle.write(_header(self.rows, self.dim))
            self.handle.close()
        except OSError as exc:
            raise self._error(exc) from exc
        return Store(self.path)

    def discard(self) -> None:
        """Close and delete the file (after an error or an interrupt)."""
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"{self.path}: cannot write embedding store ({exc.strerror or exc})")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            self.discard()


class Store:
    """A store file opened for reading: rows x dim float32, read a range at a time."""

    dtype = DTYPE
    ndim = 2

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                if version != (1, 0):
                    raise ValueError(f"{self.path}: not an embedding store (npy format {version})")
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                self.offset = handle.tell()
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot read embedding store ({exc.strerror or exc})") from exc
        if dtype != DTYPE or fortran or len(shape) != 2:
            raise ValueError(f"{self.path}: not an embedding store ({dtype}, shape {shape})")
        self.rows, self.dim = int(shape[0]), int(shape[1])
        if os.path.getsize(self.path) != self.offset + self.rows * self.dim * DTYPE.itemsize:
            raise ValueError(f"{self.path}: truncated embedding store")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, step = key.indices(self.rows)
        if step != 1:
            raise IndexError("a store is read in contiguous row ranges")
        return self.read(lo, hi)

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows lo .. hi - 1 as a fresh (hi - lo) x dim float32 array, or into `out`."""
        lo, hi = max(0, lo), min(self.rows, hi)
        count = max(0, hi - lo)
        if out is None:
            out = np.empty((count, self.dim), dtype=DTYPE)
        if count:
            with open(self.path, "rb", buffering=0) as handle:
                handle.seek(self.offset + lo * self.dim * DTYPE.itemsize)
                view = memoryview(out).cast("B")
                done = 0
                while done < view.nbytes:  # a raw read may return less than it was asked for
                    got = handle.readinto(view[done:])
                    if not got:
                        raise OSError(f"{self.path}: unexpected end of embedding store")
                    done += got
        return out

    def chunks(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of consecutive chunks of CHUNK_ROWS rows of lo .. hi - 1."""
        hi = self.rows if hi is None else hi
        for start in range(lo, hi, CHUNK_ROWS):
            yield start, self.read(start, min(start + CHUNK_ROWS, hi))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The rows at `indices` (k ints, any order, repeats allowed) as a k x dim array in that order.

        The span the indices cover is read once, a chunk at a time: memory is the result plus one chunk.
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=DTYPE)
        if not len(indices):
            return out
        order = np.argsort(indices, kind="stable")
        ranked = indices[order]
        if ranked[0] < 0 or ranked[-1] >= self.rows:
            raise IndexError(f"row indices must lie in [0, {self.rows})")
        done = 0
        for start, chunk in self.chunks(int(ranked[0]), int(ranked[-1]) + 1):
            end = int(np.searchsorted(ranked, start + len(chunk), side="left"))
            out[order[done:end]] = chunk[ranked[done:end] - start]
            done = end
        return out

    def view(self, lo: int, hi: int) -> StoreView:
        """Rows lo .. hi - 1 as a row source of their own (its row 0 is row lo)."""
        return StoreView(self, lo, hi)


class StoreView:
    """A contiguous row range of a store, read like a store."""

    dtype = DTYPE
    ndim = 2

    def __init__(self, store: Store, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= store.rows:
            raise IndexError(f"rows {lo}..{hi} lie outside the store's {store.rows}")
        self.store, self.lo, self.hi = store, lo, hi

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi - self.lo, self.store.dim)

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, step = key.indices(self.hi - self.lo)
        if step != 1:
            raise IndexError("a store is read in contiguous row ranges")
        return self.store.read(self.lo + lo, self.lo + hi)

    def take(self, indices: np.ndarray) -> np.ndarray:
        return self.store.take(np.asarray(indices, dtype=np.int64) + self.lo)


class ImageRows:
    """Some images' patch rows in a store, image after image: `self[i]` is image i's rows.

    `images` are the images' indices (increasing) and `counts` their rows; the store holds them in that
    order from its first row. Asking for an image the store does not hold is a KeyError.
    """

    def __init__(self, store: Store, images: Sequence[int], counts: Sequence[int]) -> None:
        self.store = store
        self.images = np.asarray(images, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        if len(self.images) != len(self.offsets) - 1 or self.offsets[-1] > store.rows:
            raise ValueError(f"{store.path} does not hold {len(self.images)} images of {list(counts)} rows")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, image: int) -> np.ndarray:
        slot = int(np.searchsorted(self.images, image))
        if slot >= len(self.images) or self.images[slot] != image:
            raise KeyError(f"image {image} is not among the stored images")
        return self.store.read(int(self.offsets[slot]), int(self.offsets[slot + 1]))
