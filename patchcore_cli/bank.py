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
| n_patches | optional: the patch embeddings the coreset chose from, over every fit and update |
| calibration_sample | optional: JSON {"scores": [...], "map_maxima": [...]}, the leave-one-out scores |
|   | and map maxima the threshold came from; `fit --update` pools them with new images' |
| calibration | JSON: threshold and good-image statistics (see calibration.py) |
| created | UTC creation time, ISO 8601 |
| members | only in ensemble banks: JSON list, per backbone {config, calibration, weights_sha256} |

An ensemble bank holds one tensor per backbone: `memory_bank` for the first, `memory_bank.1`,
`memory_bank.2`, ... for the others; `config` and `calibration` then describe the combined model.

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
from dataclasses import dataclass, field
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
    members: list[Bank] = field(default_factory=list)
    """Ensemble banks only: one single-backbone bank per member; `memory_bank` is the first one's."""
    n_patches: int | None = None
    """Patch embeddings the coreset chose from; None in ensembles and in banks older than the key."""
    calibration_sample: dict[str, list[float]] | None = None
    """{"scores", "map_maxima"}: the calibration sample, which `fit --update` needs; None where absent."""

    @property
    def nbytes(self) -> int:
        return sum(int(part.memory_bank.nbytes) for part in self.parts)

    @property
    def rows(self) -> int:
        return sum(int(part.memory_bank.shape[0]) for part in self.parts)

    @property
    def parts(self) -> list[Bank]:
        """The single-backbone banks this bank is made of (itself, unless it is an ensemble)."""
        return self.members or [self]


def save(bank: Bank, path: str | Path) -> None:
    """Write `bank` to `path` atomically (see `write_atomic`)."""
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
    if bank.n_patches is not None:
        metadata["n_patches"] = str(bank.n_patches)
    if bank.calibration_sample is not None:
        metadata["calibration_sample"] = json.dumps(bank.calibration_sample, sort_keys=True)
    tensors = {TENSOR_NAME: np.ascontiguousarray(bank.memory_bank, dtype=np.float32)}
    if bank.members:
        metadata["members"] = json.dumps(
            [
                {"config": m.config, "calibration": m.calibration, "weights_sha256": m.weights_sha256}
                for m in bank.members
            ],
            sort_keys=True,
        )
        for index, member in enumerate(bank.members[1:], start=1):
            tensors[f"{TENSOR_NAME}.{index}"] = np.ascontiguousarray(member.memory_bank, dtype=np.float32)
    write_atomic(path, to_bytes(tensors, metadata), "bank")


def write_atomic(path: Path, payload: bytes, what: str) -> None:
    """Write `payload` to `path` atomically: a temporary file in the same folder, fsync, then rename.

    An interrupted or failed write leaves the previous file (or none) and no temporary file behind.
    `what` names the file's kind in errors ("bank", "ONNX model").
    """
    check_destination(path, what)
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
        raise OutputError(f"{path}: cannot write {what} ({exc.strerror or exc})") from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def check_destination(path: str | Path, what: str = "bank") -> None:
    """OutputError unless `path` can become a file of kind `what`: its folder exists and it is not a folder.

    `save` checks this, and `fit` can check it before the fit, so a mistyped --out fails at once.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")


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
    return _check_thresholds(path, _json_field(path, meta, "calibration"))


def _check_thresholds(path: Path, calibration: dict[str, Any]) -> dict[str, Any]:
    for key in ("image_threshold", "pixel_threshold", "image_std"):
        value = calibration.get(key)
        if key == "image_std" and value is None:  # optional: scoring then normalises with a tiny scale
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BankError(f"{path}: calibration value {key!r} is missing or not a finite number")
    return calibration


def _tensor(path: Path, header: dict[str, Any], name: str, length: int, size: int) -> np.ndarray:
    """Memory-map tensor `name` after checking its header entry against the file."""
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise BankError(f"{path}: no '{name}' tensor")
    shape, dtype, offsets = entry.get("shape"), entry.get("dtype"), entry.get("data_offsets")
    if dtype != "F32":
        raise BankError(f"{path}: '{name}' has dtype {dtype}, expected F32")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)):
        raise BankError(f"{path}: '{name}' has shape {shape}, expected [rows, dim]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise BankError(f"{path}: '{name}' has bad data offsets {offsets}")
    begin, end = offsets
    if end - begin != shape[0] * shape[1] * 4 or begin < 0:
        raise BankError(f"{path}: '{name}' offsets do not match its shape {shape}")
    if 8 + length + end > size:
        raise BankError(f"{path}: truncated: data needs {8 + length + end} bytes but the file has {size}")
    memory_bank = np.memmap(path, dtype="<f4", mode="r", offset=8 + length + begin, shape=tuple(shape))
    if not np.isfinite(memory_bank).all():
        raise BankError(f"{path}: the memory bank contains NaN or Inf values")
    return memory_bank


def _members(
    path: Path, meta: dict[str, str], header: dict[str, Any], length: int, size: int, n_train: int
) -> list[Bank]:
    """The per-backbone banks of an ensemble file (empty for a single-backbone bank)."""
    if "members" not in meta:
        return []
    try:
        records = json.loads(meta["members"])
    except (json.JSONDecodeError, RecursionError):
        raise BankError(f"{path}: metadata field 'members' is not valid JSON") from None
    if not isinstance(records, list) or len(records) < 2 or not all(isinstance(r, dict) for r in records):
        raise BankError(f"{path}: metadata field 'members' must list at least two backbones")
    members = []
    for index, record in enumerate(records):
        name = TENSOR_NAME if index == 0 else f"{TENSOR_NAME}.{index}"
        config, calibration = record.get("config"), record.get("calibration")
        sha = record.get("weights_sha256")
        if not (isinstance(config, dict) and isinstance(calibration, dict) and isinstance(sha, str)):
            raise BankError(f"{path}: ensemble member {index} lacks config, calibration or weights_sha256")
        _check_thresholds(path, calibration)
        members.append(Bank(_tensor(path, header, name, length, size), config, calibration, sha, n_train))
    return members


def load(path: str | Path) -> Bank:
    """Load and validate a bank. The tensor is memory-mapped, not read into a second copy.

    Raises BankError naming the file and the problem: not a bank, newer version, truncated, bad shapes,
    non-finite values, missing thresholds. No other exception escapes for any file content.
    """
    path = Path(path)
    header, length, size = read_header(path)
    meta = _metadata(path, header)
    memory_bank = _tensor(path, header, TENSOR_NAME, length, size)
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
        members=_members(path, meta, header, length, size, n_train),
        n_patches=_n_patches(path, meta),
        calibration_sample=_calibration_sample(path, meta),
    )


def _n_patches(path: Path, meta: dict[str, str]) -> int | None:
    if "n_patches" not in meta:
        return None
    text = meta["n_patches"]
    if not (text.isascii() and text.isdigit()):
        raise BankError(f"{path}: bad n_patches {text!r}")
    return int(text)


def _calibration_sample(path: Path, meta: dict[str, str]) -> dict[str, list[float]] | None:
    """The stored calibration sample: two equally long lists of at least 2 finite numbers."""
    if "calibration_sample" not in meta:
        return None
    sample = _json_field(path, meta, "calibration_sample")
    scores, maxima = sample.get("scores"), sample.get("map_maxima")
    if not (_finite_list(scores) and _finite_list(maxima) and len(scores) == len(maxima)):
        raise BankError(f"{path}: bad calibration_sample (needs two equally long lists of finite numbers)")
    return {"scores": [float(v) for v in scores], "map_maxima": [float(v) for v in maxima]}


def _finite_list(values: Any) -> bool:
    return isinstance(values, list) and len(values) >= 2 and all(_finite(v) for v in values)


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False
