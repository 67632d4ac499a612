"""The memory-bank file: safetensors with string metadata, written atomically, validated on load.

Layout (safetensors): one tensor `memory_bank` (float32, N x D) and these metadata strings:

| key | value |
| --- | --- |
| format | "patchcore-bank" |
| format_version | integer as text; see FORMAT_VERSION |
| tool_version | the patchcore version that wrote it |
| config | JSON: the model config (backbone, layers, sizes, normalisation, coreset, seed, b, sigma, ...) |
| weights_sha256 | sha256 of the backbone weights file, or "random" |
| n_train_images | number of good images the bank was fitted on |
| calibration | JSON: threshold and good-image statistics (see calibration.py) |
| created | UTC creation time, ISO 8601 |

Versioning rule: FORMAT_VERSION goes up only when a reader of the old version would misread the new file.
New optional metadata keys do not change it. A reader refuses files with a newer version.

The header is parsed as JSON data only; nothing in a bank is ever executed or used as an output path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_cli.errors import BankError, OutputError

FORMAT_ID = "patchcore-bank"
FORMAT_VERSION = 1
TENSOR_NAME = "memory_bank"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors' own limit is 100 MB; our headers are a few kB


@dataclass
class Bank:
    """A fitted model: the memory bank (M x D float32) and everything needed to score with it."""

    memory_bank: np.ndarray
    config: dict[str, Any]
    calibration: dict[str, Any]
    weights_sha256: str
    n_train_images: int
    tool_version: str = ""
    created: str = ""

    @property
    def nbytes(self) -> int:
        return int(self.memory_bank.nbytes)


def save(bank: Bank, path: str | Path) -> None:
    """Write `bank` to `path` atomically: a temporary file in the same folder, fsync, then rename.

    An interrupted or failed write leaves the previous file (or none) and no temporary file behind.
    """
    from safetensors.numpy import save as to_bytes

    from patchcore_cli import __version__

    path = Path(path)
    metadata = {
        "format": FORMAT_ID,
        "format_version": str(FORMAT_VERSION),
        "tool_version": __version__,
        "config": json.dumps(bank.config, sort_keys=True),
        "weights_sha256": bank.weights_sha256,
        "n_train_images": str(bank.n_train_images),
        "calibration": json.dumps(bank.calibration, sort_keys=True),
        "created": bank.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    payload = to_bytes({TENSOR_NAME: np.ascontiguousarray(bank.memory_bank, dtype=np.float32)}, metadata)
    check_destination(path)
    folder = path.parent
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write bank ({exc.strerror or exc})") from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def check_destination(path: str | Path) -> None:
    """OutputError unless `path` can become a bank file: its folder exists and it is not itself a folder.

    `save` checks this, and `fit` can check it before the fit, so a mistyped --out fails at once.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the bank")


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems refuse to open a directory, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Read and check the safetensors header. Returns (header dict, header length, file size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise BankError(f"{path}: not a bank file (only {size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise BankError(
                    f"{path}: not a bank file (header claims {length} bytes, limit is {MAX_HEADER_BYTES})"
                )
            if 8 + length > size:
                raise BankError(f"{path}: truncated: header claims {length} bytes but the file has {size}")
            raw = handle.read(length)
    except FileNotFoundError:
        raise BankError(
            f"{path}: bank file not found (create one with `patchcore fit DIR --out {path}`)"
        ) from None
    except IsADirectoryError:
        raise BankError(f"{path}: is a folder, not a bank file") from None
    except PermissionError:
        raise BankError(f"{path}: permission denied") from None
    except OSError as exc:
        raise BankError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # RecursionError: arrays nested thousands deep, which no safetensors writer produces.
        raise BankError(f"{path}: not a bank file (header is not valid safetensors JSON)") from None
    if not isinstance(header, dict):
        raise BankError(f"{path}: not a bank file (header is not a JSON object)")
    return header, length, size


def _metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_ID:
        raise BankError(f"{path}: not a patchcore bank (no '{FORMAT_ID}' format id)")
    # safetensors metadata maps strings to strings; anything else would reach int() and json.loads below.
    if not all(isinstance(value, str) for value in meta.values()):
        raise BankError(f"{path}: bad metadata (every value must be a string)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise BankError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise BankError(
            f"{path}: bank format version {version} is newer than this patchcore supports "
            f"({FORMAT_VERSION}); upgrade patchcore (pip install -U patchcore-cli)"
        )
    if version < 1:
        raise BankError(f"{path}: bad format_version {version}")
    return meta


def _json_field(path: Path, meta: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise BankError(f"{path}: metadata field {key!r} is missing") from None
    except (json.JSONDecodeError, RecursionError):
        raise BankError(f"{path}: metadata field {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise BankError(f"{path}: metadata field {key!r} is not a JSON object")
    return value


def _calibration(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The calibration record, with the thresholds that scoring needs present and finite."""
    calibration = _json_field(path, meta, "calibration")
    for key in ("image_threshold", "pixel_threshold", "image_std"):
        value = calibration.get(key)
        if key == "image_std" and value is None:  # optional: scoring then normalises with a tiny scale
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BankError(f"{path}: calibration value {key!r} is missing or not a finite number")
    return calibration


def load(path: str | Path) -> Bank:
    """Load and validate a bank. The tensor is memory-mapped, not read into a second copy.

    Raises BankError naming the file and the problem: not a bank, newer version, truncated, bad shapes,
    non-finite values, missing thresholds. No other exception escapes for any file content.
    """
    path = Path(path)
    header, length, size = read_header(path)
    meta = _metadata(path, header)
    entry = header.get(TENSOR_NAME)
    if not isinstance(entry, dict):
        raise BankError(f"{path}: no '{TENSOR_NAME}' tensor")
    shape, dtype, offsets = entry.get("shape"), entry.get("dtype"), entry.get("data_offsets")
    if dtype != "F32":
        raise BankError(f"{path}: '{TENSOR_NAME}' has dtype {dtype}, expected F32")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)):
        raise BankError(f"{path}: '{TENSOR_NAME}' has shape {shape}, expected [rows, dim]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise BankError(f"{path}: '{TENSOR_NAME}' has bad data offsets {offsets}")
    begin, end = offsets
    if end - begin != shape[0] * shape[1] * 4 or begin < 0:
        raise BankError(f"{path}: '{TENSOR_NAME}' offsets do not match its shape {shape}")
    if 8 + length + end > size:
        raise BankError(f"{path}: truncated: data needs {8 + length + end} bytes but the file has {size}")
    memory_bank = np.memmap(path, dtype="<f4", mode="r", offset=8 + length + begin, shape=tuple(shape))
    if not np.isfinite(memory_bank).all():
        raise BankError(f"{path}: the memory bank contains NaN or Inf values")
    try:
        n_train = int(meta.get("n_train_images", "0"))
    except ValueError:
        raise BankError(f"{path}: bad n_train_images {meta.get('n_train_images')!r}") from None
    return Bank(
        memory_bank=memory_bank,
        config=_json_field(path, meta, "config"),
        calibration=_calibration(path, meta),
        weights_sha256=meta.get("weights_sha256", ""),
        n_train_images=n_train,
        tool_version=meta.get("tool_version", ""),
        created=meta.get("created", ""),
    )
