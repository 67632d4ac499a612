"""The bank file: exact round trip, atomic writes, and a clear error for every kind of damage."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from patchcore_cli import bank as bank_io
from patchcore_cli.errors import BankError, OutputError


def make_bank(rows: int = 20, dim: int = 8) -> bank_io.Bank:
    rng = np.random.default_rng(0)
    return bank_io.Bank(
        memory_bank=rng.normal(size=(rows, dim)).astype(np.float32),
        config={"backbone": "resnet18", "layers": ["layer2", "layer3"], "crop": 64},
        calibration={"image_threshold": 1.5, "image_std": 0.1, "pixel_threshold": 2.0},
        weights_sha256="random",
        n_train_images=5,
    )


def test_round_trip_is_exact(tmp_path):
    original = make_bank()
    path = tmp_path / "bank.st"
    bank_io.save(original, path)
    loaded = bank_io.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.memory_bank), original.memory_bank)
    assert loaded.config == original.config
    assert loaded.calibration == original.calibration
    assert loaded.weights_sha256 == "random"
    assert loaded.n_train_images == 5
    assert loaded.created and loaded.tool_version


def test_header_fields_are_documented_strings(tmp_path):
    path = tmp_path / "bank.st"
    bank_io.save(make_bank(), path)
    header, _, _ = bank_io.read_header(path)
    meta = header["__metadata__"]
    assert meta["format"] == "patchcore-bank"
    assert meta["format_version"] == str(bank_io.FORMAT_VERSION)
    assert set(meta) >= {
        "tool_version",
        "config",
        "weights_sha256",
        "n_train_images",
        "calibration",
        "created",
    }
    assert header["memory_bank"]["dtype"] == "F32"
    assert header["memory_bank"]["shape"] == [20, 8]


def _rewrite_header(path, mutate):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _set_meta(key, value):
    def mutate(header):
        header["__metadata__"][key] = value

    return mutate


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a bank file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "not a bank file"),
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "truncated"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + p.read_bytes()[8:]), "truncated: header claims"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:]), "header claims"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope" + b"\0" * 32), "not valid safetensors JSON"),
        (lambda p: _rewrite_header(p, _set_meta("format", "something-else")), "not a patchcore bank"),
        (lambda p: _rewrite_header(p, _set_meta("format_version", "99")), "upgrade patchcore"),
        (lambda p: _rewrite_header(p, _set_meta("config", "{broken")), "'config' is not valid JSON"),
        (lambda p: _rewrite_header(p, lambda h: h["memory_bank"].update(dtype="F16")), "expected F32"),
        (lambda p: _rewrite_header(p, lambda h: h["memory_bank"].update(shape=[20])), "expected [rows, dim]"),
        (
            lambda p: _rewrite_header(p, lambda h: h["memory_bank"].update(shape=[40, 8])),
            "do not match its shape",
        ),
    ],
    ids=[
        "empty",
        "png-magic",
        "truncated-data",
        "header-longer-than-file",
        "oversized-header",
        "not-json",
        "wrong-format-id",
        "newer-version",
        "bad-config-json",
        "wrong-dtype",
        "wrong-rank",
        "shape-vs-offsets",
    ],
)
def test_damaged_banks_give_clear_errors(tmp_path, damage, message):
    path = tmp_path / "bank.st"
    bank_io.save(make_bank(), path)
    damage(path)
    with pytest.raises(BankError) as info:
        bank_io.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_nan_in_bank_is_refused(tmp_path):
    bad = make_bank()
    bad.memory_bank[3, 2] = np.nan
    path = tmp_path / "bank.st"
    bank_io.save(bad, path)
    with pytest.raises(BankError, match="NaN or Inf"):
        bank_io.load(path)


def test_missing_bank_names_the_fix(tmp_path):
    with pytest.raises(BankError, match="patchcore fit"):
        bank_io.load(tmp_path / "nope.st")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_old_bank_and_leaves_no_temp_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "bank.st"
    bank_io.save(make_bank(rows=5), path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises((OutputError, KeyboardInterrupt)):
        bank_io.save(make_bank(rows=50), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.st"]


def test_write_into_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        bank_io.save(make_bank(), tmp_path / "missing" / "bank.st")
