"""Reliability and safety through the real CLI: bad input, faults, and files we don't trust.

Every case drives `patchcore` through Typer's runner and checks what a user sees: the documented exit code
(README, "Errors and exit codes"), exactly one `error:` line on stderr that names the file and the problem,
and never a traceback. Fault cases also check that an existing bank survives byte for byte and that no
temporary file is left behind.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import patchcore_cli
from patchcore_cli import bank as bank_io
from patchcore_cli.cli import app
from patchcore_cli.engine import MIN_FIT_IMAGES, Scorer
from patchcore_cli.errors import BankError
from tests.conftest import TINY_OPTIONS

runner = CliRunner()


# Fits that only have to reach the bank write: the tiny config at the smallest crop, on two images.
FAST_FIT = [*TINY_OPTIONS, "--image-size", "40", "--crop", "32", "--coreset", "0.5"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_no_traceback(result) -> None:
    # The runner swallows an uncaught exception (it would be a traceback for a real user), so look at it.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def assert_refused(result, code: int, *fragments: str) -> str:
    """Exit `code`, one `error:` line on stderr holding every fragment, nothing on stdout."""
    assert_no_traceback(result)
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert result.stdout.strip() == ""
    return errors[0]


def records(result) -> dict[str, dict]:
    """The JSON results of `score --json`, by file name."""
    return {Path(record["file"]).name: record for record in json.loads(result.stdout)["results"]}


def scores(result) -> dict[str, dict]:
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    return records(result)


@pytest.fixture(scope="module")
def bank(washer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.st"
    result = invoke("fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS, "--json")
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def good_image(washer: Path) -> Path:
    return sorted((washer / "test" / "good").glob("*.png"))[0]


@pytest.fixture(scope="module")
def picture(good_image: Path) -> Image.Image:
    """A real washer picture (96 x 96 RGB), so converted formats carry meaningful content."""
    with Image.open(good_image) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def good_score(bank: Path, good_image: Path) -> dict:
    """The JSON record of `good_image` scored against the untouched bank."""
    return scores(invoke("score", good_image, "--bank", bank, "--json"))[good_image.name]


@pytest.fixture(scope="module")
def few_good(washer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fewest good images that fit and calibrate, for the fault cases."""
    folder = tmp_path_factory.mktemp("few")
    for source in sorted((washer / "train" / "good").glob("*.png"))[:MIN_FIT_IMAGES]:
        shutil.copy(source, folder / source.name)
    return folder


def encoded(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# --- images given to `score` -------------------------------------------------------------------------

BAD_IMAGES: list[tuple[str, str, Callable[[Image.Image], bytes], list[str], list[str]]] = [
    # (id, file name, content, extra options, fragments of the error line)
    ("zero-byte", "zero.png", lambda pic: b"", [], ["empty file (0 bytes)"]),
    ("truncated-png", "cut.png", lambda pic: first_half(encoded(pic)), [], ["truncated"]),
    ("truncated-jpeg", "cut.jpg", lambda pic: first_half(encoded(pic, "JPEG")), [], ["truncated"]),
    ("text-named-png", "notes.png", lambda pic: b"just some notes\n" * 20, [], ["not an image file"]),
    ("gif", "anim.gif", lambda pic: encoded(pic, "GIF"), [], ["unsupported image format GIF"]),
    ("ico-renamed-png", "icon.png", lambda pic: encoded(pic, "ICO"), [], ["unsupported image format ICO"]),
    (
        "over-max-pixels",
        "big.png",
        lambda pic: encoded(pic.resize((64, 64))),
        ["--max-pixels", "1000"],
        ["64x64 = 4,096 pixels", "over the limit of 1,000 pixels", "--max-pixels"],
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "options", "fragments"),
    [row[1:] for row in BAD_IMAGES],
    ids=[row[0] for row in BAD_IMAGES],
)
def test_bad_image_is_refused_with_exit_3(bank, picture, tmp_path, name, content, options, fragments):
    path = tmp_path / name
    path.write_bytes(content(picture))
    assert_refused(invoke("score", path, "--bank", bank, *options), 3, str(path), *fragments)


def _exif_rotated(pic: Image.Image) -> tuple[bytes, Image.Image, Image.Image]:
    """A landscape picture stored turned a quarter to the left, with EXIF orientation 6 ("turn it right").

    The reference is the stored pixels turned right by numpy, independent of Pillow's EXIF handling.
    """
    upright = pic.crop((0, 16, 96, 80))  # 96 x 64: turning changes the shape too
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    with Image.open(io.BytesIO(data)) as stored:
        as_stored = np.asarray(stored.convert("RGB"))
    turned = np.ascontiguousarray(np.rot90(as_stored, k=-1))
    return data, Image.fromarray(turned), Image.fromarray(as_stored)


def _with_hole(pic: Image.Image) -> tuple[bytes, Image.Image, Image.Image]:
    rgba = pic.convert("RGBA")
    alpha = np.full((pic.height, pic.width), 255, np.uint8)
    alpha[30:60, 30:60] = 0
    rgba.putalpha(Image.fromarray(alpha))
    black = np.asarray(pic).copy()
    black[30:60, 30:60] = 0  # a transparent pixel is black, whatever colour it stores
    return encoded(rgba), Image.fromarray(black), pic


def _sixteen_bit(pic: Image.Image) -> tuple[bytes, Image.Image, Image.Image]:
    grey = np.asarray(pic.convert("L")).astype(np.int64)
    wobble = np.random.default_rng(0).integers(-128, 128, grey.shape)
    deep = np.clip(grey * 257 + wobble, 0, 65535).astype(np.uint16)
    wide = Image.fromarray(deep)
    assert wide.mode.startswith("I;16")
    scaled = np.rint(deep / 257.0).astype(np.uint8)  # the linear map 65535 -> 255
    high_byte = (deep >> 8).astype(np.uint8)  # what truncating to 8 bits would give
    assert (scaled != high_byte).mean() > 0.1
    return encoded(wide), Image.fromarray(scaled).convert("RGB"), Image.fromarray(high_byte).convert("RGB")


def _palette(pic: Image.Image) -> tuple[bytes, Image.Image, None]:
    indexed = pic.quantize(colors=48)
    return encoded(indexed), indexed.convert("RGB"), None


def _cmyk_jpeg(pic: Image.Image) -> tuple[bytes, Image.Image, None]:
    data = encoded(pic.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode == "CMYK"
        return data, stored.convert("RGB"), None


def _grey(pic: Image.Image) -> tuple[bytes, Image.Image, None]:
    return encoded(pic.convert("L")), pic.convert("L").convert("RGB"), None


SUPPORTED: list[tuple[str, str, Callable[[Image.Image], tuple[bytes, Image.Image, Image.Image | None]]]] = [
    # (id, file name, maker -> (file bytes, the 8-bit RGB picture it must score like, a wrong reading))
    ("png-16bit", "deep.png", _sixteen_bit),
    ("grayscale", "grey.png", _grey),
    ("rgba", "alpha.png", _with_hole),
    ("palette", "indexed.png", _palette),
    ("cmyk-jpeg", "cmyk.jpg", _cmyk_jpeg),
    ("exif-rotated-jpeg", "turned.jpg", _exif_rotated),
]


@pytest.fixture(scope="module")
def supported_scores(bank, picture, tmp_path_factory) -> dict[str, dict]:
    """Every supported kind, its plain-RGB reference and a wrong reading of it, scored in one run."""
    folder = tmp_path_factory.mktemp("supported")
    for _, name, make in SUPPORTED:
        data, reference, wrong = make(picture)
        (folder / name).write_bytes(data)
        reference.save(folder / f"reference-{Path(name).stem}.png")
        if wrong is not None:
            wrong.save(folder / f"wrong-{Path(name).stem}.png")
    return scores(invoke("score", folder, "--bank", bank, "--json"))


@pytest.mark.parametrize("name", [row[1] for row in SUPPORTED], ids=[row[0] for row in SUPPORTED])
def test_supported_kind_scores_like_its_rgb_reference(supported_scores, name):
    record = supported_scores[name]
    reference = supported_scores[f"reference-{Path(name).stem}.png"]
    assert not record.get("skipped") and np.isfinite(record["score"])
    assert record["score"] == pytest.approx(reference["score"], rel=1e-5, abs=1e-6)
    wrong = supported_scores.get(f"wrong-{Path(name).stem}.png")
    if wrong is not None:  # the wrong reading scores differently, so this test can fail
        assert wrong["score"] != pytest.approx(reference["score"], rel=1e-5, abs=1e-6)


def test_skip_bad_scores_the_rest_and_lists_the_skipped(bank, picture, good_image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative names keep the table's file column unwrapped
    shutil.copy(good_image, "ok.png")
    bad = {}
    for _, name, content, options, fragments in BAD_IMAGES:
        if not options:
            Path(name).write_bytes(content(picture))
            bad[name] = fragments[0]
    names = ["ok.png", *bad]

    listed = scores(invoke("score", *names, "--bank", bank, "--skip-bad", "--json"))
    assert not listed["ok.png"].get("skipped") and np.isfinite(listed["ok.png"]["score"])
    for name, problem in bad.items():
        assert listed[name]["skipped"] is True and problem in listed[name]["error"]

    table = invoke("score", *names, "--bank", bank, "--skip-bad")
    assert_no_traceback(table)
    assert table.exit_code == 0
    skipped_rows = [line for line in table.stdout.splitlines() if "skipped" in line]
    for name in bad:
        assert any(name in line for line in skipped_rows), table.stdout
    assert f"skipped {len(bad)} unreadable file(s)" in table.stderr

    strict = invoke("score", *names, "--bank", bank, "--skip-bad", "--fail-on-skip", "--json")
    assert_no_traceback(strict)
    assert strict.exit_code == 1 and records(strict) == listed
    clean = invoke("score", "ok.png", "--bank", bank, "--skip-bad", "--fail-on-skip", "--json")
    assert clean.exit_code == 0


@pytest.mark.parametrize(
    ("name", "readable"),
    [("x[bold]y.png", True), ("lot[/7].png", False)],  # the second is folder `lot[`, file `7].png`
    ids=["markup-in-scored-name", "closing-tag-in-refused-path"],
)
def test_file_names_are_printed_verbatim(bank, good_image, tmp_path, monkeypatch, name, readable):
    monkeypatch.chdir(tmp_path)  # a short relative name stays on one line of the table
    Path(name).parent.mkdir(exist_ok=True)
    if readable:
        shutil.copy(good_image, name)
        result = invoke("score", name, "--bank", bank)
        assert_no_traceback(result)
        assert result.exit_code == 0 and name in result.stdout
    else:
        Path(name).write_bytes(b"")
        assert_refused(invoke("score", name, "--bank", bank), 3, name, "empty file")


# --- folders and paths -------------------------------------------------------------------------------


def _empty(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _no_images(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "sub" / "readme.md").write_text("x")
    return folder


def _loop_without_images(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp / "loop"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "back").symlink_to(folder, target_is_directory=True)
    return folder


def _link_to_itself(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp / "self").symlink_to(tmp / "self")
    return tmp / "self"


def _unreadable(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Tests run as root, where chmod 000 does not stop reading: refuse the listing instead.
    folder = tmp / "locked"
    folder.mkdir()
    real_scandir = os.scandir

    def refusing_scandir(path=".", *args):
        if Path(path) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    return folder


def _name_too_long(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return tmp / ("a" * 300 + ".png")


FOLDERS = [
    ("empty-folder", _empty, ["no images found in folder"]),
    ("folder-without-images", _no_images, ["no images found in folder", ".png"]),
    ("symlink-loop-without-images", _loop_without_images, ["no images found in folder"]),
    ("link-to-itself", _link_to_itself, ["not a file or folder"]),
    ("unreadable-folder", _unreadable, ["cannot read folder (permission denied)"]),
    ("name-too-long", _name_too_long, ["cannot access (File name too long)"]),
    ("missing-path", lambda tmp, mp: tmp / "nowhere", ["no such file or folder"]),
]


@pytest.mark.parametrize(("make", "fragments"), [r[1:] for r in FOLDERS], ids=[r[0] for r in FOLDERS])
def test_unusable_folder_is_refused_with_exit_3(bank, tmp_path, monkeypatch, make, fragments):
    path = make(tmp_path, monkeypatch)
    assert_refused(invoke("score", path, "--bank", bank), 3, str(path), *fragments)


def test_symlink_loop_is_followed_once(bank, good_image, tmp_path):
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(good_image, folder / "a.png")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "again").symlink_to(folder / "sub", target_is_directory=True)
    assert list(scores(invoke("score", folder, "--bank", bank, "--json"))) == ["a.png"]


# --- fit inputs ----------------------------------------------------------------------------------------


def test_fit_refuses_fewer_than_the_minimum_images(good_image, tmp_path):
    assert MIN_FIT_IMAGES == 2  # the README promises calibration by leaving one image out
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(good_image, folder / "only.png")
    out = tmp_path / "bank.st"
    result = invoke("fit", folder, "--out", out, *TINY_OPTIONS)
    assert_refused(result, 3, str(folder / "only.png"), f"at least {MIN_FIT_IMAGES} good images", "got 1")
    assert not out.exists()


def test_fit_stops_at_an_unreadable_image(few_good, tmp_path):
    folder = tmp_path / "good"
    shutil.copytree(few_good, folder)
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    result = invoke("fit", folder, "--out", tmp_path / "bank.st", *FAST_FIT)
    assert_refused(result, 3, str(folder / "zz-broken.png"))
    assert not (tmp_path / "bank.st").exists()


# --- banks given to `score` ------------------------------------------------------------------------


def _rewrite_header(source: Path, target: Path, mutate: Callable[[dict], object]) -> None:
    data = source.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _meta(key: str, value: object) -> Callable[[Path, Path], None]:
    return lambda src, dst: _rewrite_header(src, dst, lambda h: h["__metadata__"].update({key: value}))


def _resaved(change: Callable[[bank_io.Bank], None]) -> Callable[[Path, Path], None]:
    """A bank saved by our own writer, so only the changed part is wrong."""

    def make(src: Path, dst: Path) -> None:
        loaded = bank_io.load(src)
        copy = bank_io.Bank(
            memory_bank=np.array(loaded.memory_bank),
            config=dict(loaded.config),
            calibration=dict(loaded.calibration),
            weights_sha256=loaded.weights_sha256,
            n_train_images=loaded.n_train_images,
        )
        change(copy)
        bank_io.save(copy, dst)

    return make


def _poison(value: float) -> Callable[[bank_io.Bank], None]:
    def change(bank: bank_io.Bank) -> None:
        bank.memory_bank[3, 5] = value

    return change


def _narrower(bank: bank_io.Bank) -> None:
    bank.memory_bank = np.ascontiguousarray(bank.memory_bank[:, :-8])


def _config(**values: object) -> Callable[[bank_io.Bank], None]:
    return lambda bank: bank.config.update(values)


def _drop_threshold(bank: bank_io.Bank) -> None:
    del bank.calibration["image_threshold"]


def _prefix(length: int) -> Callable[[Path, Path], None]:
    return lambda src, dst: dst.write_bytes(struct.pack("<Q", length) + src.read_bytes()[8:])


BANKS = [
    # (id, damage(real bank, target), extra options, fragments)
    ("png-magic", lambda s, d: d.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), [], ["not a bank file"]),
    ("empty-file", lambda s, d: d.write_bytes(b""), [], ["not a bank file (only 0 bytes)"]),
    ("bank-is-a-folder", lambda s, d: d.mkdir(), [], ["is a folder"]),
    ("wrong-format-id", _meta("format", "other-tool"), [], ["not a patchcore bank"]),
    ("newer-format-version", _meta("format_version", "2"), [], ["newer than this patchcore", "upgrade"]),
    ("truncated-file", lambda s, d: d.write_bytes(s.read_bytes()[:-100]), [], ["truncated"]),
    ("header-claims-more-than-file", _prefix(10**6), [], ["truncated: header claims 1000000 bytes"]),
    ("oversized-header", _prefix(2**40), [], ["header claims", "limit is"]),
    (
        "deeply-nested-header",
        lambda s, d: d.write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000),
        [],
        ["not valid safetensors JSON"],
    ),
    ("metadata-not-strings", _meta("format_version", [1]), [], ["every value must be a string"]),
    ("nan-in-bank", _resaved(_poison(float("nan"))), [], ["NaN or Inf"]),
    ("inf-in-bank", _resaved(_poison(float("inf"))), [], ["NaN or Inf"]),
    ("wrong-feature-dimension", _resaved(_narrower), [], ["feature dimension 376", "resnet18", "dim 384"]),
    ("missing-threshold", _resaved(_drop_threshold), [], ["calibration value 'image_threshold'"]),
    (
        "nan-threshold",
        _resaved(lambda b: b.calibration.update(pixel_threshold=float("nan"))),
        [],
        ["calibration value 'pixel_threshold'"],
    ),
    ("config-wrong-type", _resaved(_config(crop="big")), [], ["config stored in the bank", "'crop'"]),
    (
        "config-invalid-value",
        _resaved(_config(crop=5000)),
        [],
        ["config stored in the bank", "between 32 and 4096, got 5000"],
    ),
    ("config-unknown-backbone", _resaved(_config(backbone="resnet9000")), [], ["unknown backbone"]),
    (
        "weights-hash-mismatch",
        _resaved(lambda b: setattr(b, "weights_sha256", "0" * 64)),
        ["--weights", "random"],
        ["weights sha256 000000000000"],
    ),
]


@pytest.mark.parametrize(
    ("damage", "options", "fragments"), [r[1:] for r in BANKS], ids=[r[0] for r in BANKS]
)
def test_bad_bank_is_refused_with_exit_4(bank, good_image, tmp_path, damage, options, fragments):
    target = tmp_path / "damaged.st"
    damage(bank, target)
    result = invoke("score", good_image, "--bank", target, *options)
    assert_refused(result, 4, str(target), *fragments)


def test_bank_runtime_keys_are_ignored(bank, good_image, good_score, tmp_path):
    # threads/batch size/device are this run's business; a file must not pick, say, a million threads
    target = tmp_path / "runtime.st"
    _resaved(_config(threads=1_000_000, batch_size=0, device="cuda"))(bank, target)
    assert scores(invoke("score", good_image, "--bank", target, "--json")) == {good_image.name: good_score}


# --- config ----------------------------------------------------------------------------------------

CONFIGS = [
    # YAML text, fragments of the error line
    pytest.param(
        "bakbone: resnet18\n", ["unknown key 'bakbone'", "did you mean 'backbone'"], id="unknown-key"
    ),
    pytest.param("dim: lots\n", ["'dim' must be an integer, got 'lots'"], id="wrong-type-int"),
    pytest.param("crop: 64.5\n", ["'crop' must be an integer"], id="float-for-int"),
    pytest.param("layers: 3\n", ["'layers' must be a list"], id="wrong-type-layers"),
    pytest.param("coreset: -0.1\n", ["coreset must be in (0, 1], got -0.1"], id="negative-coreset"),
    pytest.param(
        "framing: crop\nimage_size: 64\ncrop: 128\n",
        ["crop must be between 32 and image_size"],
        id="crop-larger-than-resize",
    ),
    pytest.param("- resnet18\n", ["must be a mapping"], id="not-a-mapping"),
    pytest.param(b"\xff\xfe\x00crop", ["not UTF-8"], id="not-utf8"),
    pytest.param("crop: [64\n", ["invalid YAML"], id="invalid-yaml"),
    pytest.param(
        "backbone: resnet9000\n",
        ["unknown backbone 'resnet9000'"],
        id="unknown-backbone",
    ),
]


@pytest.mark.parametrize(("text", "fragments"), CONFIGS)
def test_bad_config_file_is_exit_2(few_good, tmp_path, text, fragments):
    config = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    result = invoke("fit", few_good, "--config", config, "--weights", "random", "--out", tmp_path / "b.st")
    assert_refused(result, 2, str(config), *fragments)
    assert not (tmp_path / "b.st").exists()


def test_missing_config_file_is_exit_2(few_good, tmp_path):
    config = tmp_path / "absent.yaml"
    result = invoke("fit", few_good, "--config", config, "--out", tmp_path / "b.st")
    assert_refused(result, 2, str(config), "cannot read config")


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--framing", "crop", "--crop", "512"], ["crop must be between 32 and image_size (40), got 512"]),
        (["--coreset", "0"], ["coreset must be in (0, 1], got 0.0"]),
        (["--layers", "layer9"], ["backbone resnet18 has no stage layer9"]),
    ],
    ids=["crop-larger-than-resize", "zero-coreset", "unknown-layer"],
)
def test_bad_option_value_is_exit_2(few_good, tmp_path, options, fragments):
    result = invoke("fit", few_good, "--out", tmp_path / "b.st", *FAST_FIT, *options)
    assert_refused(result, 2, *fragments)


@pytest.mark.parametrize(
    "options", [["--coreset", "lots"], ["--no-such-option"]], ids=["not-a-number", "unknown-option"]
)
def test_usage_errors_are_exit_2(few_good, tmp_path, options):
    result = invoke("fit", few_good, "--out", tmp_path / "b.st", *options)
    assert_no_traceback(result)
    assert result.exit_code == 2 and options[0] in result.stderr and result.stdout == ""


# --- faults: Ctrl-C, full disk, read-only folder ---------------------------------------------------


def _raiser(exc: BaseException) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise exc

    return fail


INTERRUPTS = [
    ("in-features", "patchcore_cli.features.embed"),
    ("in-coreset", "patchcore_cli.coreset.greedy_coreset"),
    ("in-calibration", "patchcore_cli.engine.leave_one_out"),
    ("in-bank-write", "os.replace"),
]


@pytest.mark.parametrize("target", [r[1] for r in INTERRUPTS], ids=[r[0] for r in INTERRUPTS])
def test_ctrl_c_during_fit_keeps_the_old_bank(bank, few_good, tmp_path, monkeypatch, target):
    out = tmp_path / "bank.st"
    shutil.copy(bank, out)
    before = out.read_bytes()
    monkeypatch.setattr(target, _raiser(KeyboardInterrupt()))
    result = invoke("fit", few_good, "--out", out, *FAST_FIT)
    assert_no_traceback(result)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.st"]


class _FullDisk:
    """A file object whose writes fail the way a full disk does."""

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)


def _disk_full_on_write(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> Path:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))
    return tmp / "bank.st"


def _disk_full_on_fsync(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> Path:
    monkeypatch.setattr(os, "fsync", _raiser(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    return tmp / "bank.st"


def _read_only(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> Path:
    # As root a chmod 555 folder is still writable, so refuse the temporary file the way EACCES would.
    monkeypatch.setattr(tempfile, "mkstemp", _raiser(PermissionError(errno.EACCES, "Permission denied")))
    return tmp / "bank.st"


WRITE_FAULTS = [
    ("disk-full-on-write", _disk_full_on_write, True, ["cannot write bank (No space left on device)"]),
    ("disk-full-on-fsync", _disk_full_on_fsync, True, ["No space left on device"]),
    ("read-only-folder", _read_only, True, ["cannot write bank (Permission denied)"]),
    ("missing-folder", lambda mp, tmp: tmp / "missing" / "bank.st", False, ["does not exist"]),
    (
        "out-is-a-folder",
        lambda mp, tmp: (tmp / "dir.st").mkdir() or tmp / "dir.st",
        False,
        ["is a folder"],
    ),
]


@pytest.mark.parametrize(
    ("setup", "old_bank", "fragments"), [r[1:] for r in WRITE_FAULTS], ids=[r[0] for r in WRITE_FAULTS]
)
def test_failed_bank_write_is_exit_6_and_leaves_no_trace(
    bank, few_good, tmp_path, monkeypatch, setup, old_bank, fragments
):
    out = setup(monkeypatch, tmp_path)
    if old_bank:
        shutil.copy(bank, out)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}
    result = invoke("fit", few_good, "--out", out, *FAST_FIT)
    assert_refused(result, 6, str(out), *fragments)
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()} == before


# --- concurrent readers ----------------------------------------------------------------------------


def _in_threads(work: Callable[[int], object], count: int) -> list[object]:
    """Run work(0..count-1) in parallel threads; re-raise the first failure here."""
    results: list[object] = [None] * count
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as exc:  # reported in the calling thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if failures:
        raise failures[0]
    return results


def test_concurrent_scorers_in_threads_agree(bank, washer):
    images = sorted((washer / "test" / "hole").glob("*.png"))
    expected = {
        name: r["score"] for name, r in scores(invoke("score", *images, "--bank", bank, "--json")).items()
    }
    scorers = [Scorer(bank_io.load(bank), bank_path=str(bank)) for _ in range(3)]  # one mmap each

    def work(index: int) -> dict[str, float]:
        results = scorers[index].score_paths(images)
        return {p.name: round(r.score, 6) for p, r in zip(images, results, strict=True)}

    assert _in_threads(work, 3) == [expected] * 3


def test_random_backbones_built_in_threads_are_identical(monkeypatch):
    import torch

    from patchcore_cli import backbones

    reference = backbones.load_backbone("resnet18", "random", seed=42).model.state_dict()
    meeting = threading.Barrier(2)
    real_get = backbones.get

    def get_and_meet(name: str) -> backbones.BackboneSpec:
        spec = real_get(name)

        def build() -> torch.nn.Module:
            with contextlib.suppress(threading.BrokenBarrierError):
                meeting.wait(timeout=1)  # both threads build at once, unless builds are serialised
            return spec.build()

        return dataclasses.replace(spec, build=build)

    monkeypatch.setattr(backbones, "get", get_and_meet)
    built = _in_threads(lambda _: backbones.load_backbone("resnet18", "random", seed=42).model, 2)
    for model in built:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


@pytest.mark.slow
def test_concurrent_score_processes_agree(bank, washer, good_score):
    image = sorted((washer / "test" / "good").glob("*.png"))[0]
    script = Path(sys.executable).with_name("patchcore")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "patchcore_cli"]
    runs = [
        subprocess.Popen(
            [*command, "score", str(image), "--bank", str(bank), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [json.loads(stdout)["results"] for stdout, _ in outputs] == [[good_score]] * 2


def test_bank_replaced_while_being_read_keeps_the_old_data(bank, tmp_path):
    path = tmp_path / "bank.st"
    shutil.copy(bank, path)
    reading = bank_io.load(path)
    old = np.array(reading.memory_bank)
    replacement = bank_io.load(bank)
    replacement.memory_bank = np.array(replacement.memory_bank) + 1.0
    bank_io.save(replacement, path)  # what a second `fit --out` does while a scorer is running
    np.testing.assert_array_equal(np.asarray(reading.memory_bank), old)
    np.testing.assert_array_equal(np.asarray(bank_io.load(path).memory_bank), old + 1.0)


# --- safety: nothing from a file is executed or used as an output path ------------------------------

PACKAGE = Path(patchcore_cli.__file__).parent
FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "pickle.load",
    "pickle.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "torch.jit.load",
    "marshal.loads",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_package_source_only_loads_torch_files_weights_only():
    torch_loads = []
    for source in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "yaml"):
                assert not {a.name for a in node.names} & {"load", "loads"}, f"{source}: aliased loader"
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{source.name}:{node.lineno}"
            assert name not in FORBIDDEN_CALLS, f"{where}: {name}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                flag = keywords.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: weights_only=True"
                torch_loads.append(where)
            allow = keywords.get("allow_pickle")
            assert not (isinstance(allow, ast.Constant) and allow.value is True), f"{where}: allow_pickle"
    assert torch_loads, "expected the weights loader to call torch.load"


class _Payload:
    """Pickles to a call of Path.touch: loading it without weights_only would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickled_payload_in_weights_file_never_runs(few_good, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    torch.load(weights, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    result = invoke(
        "fit", few_good, "--out", tmp_path / "b.st", "--backbone", "resnet18", "--weights", weights
    )
    assert_refused(result, 5, str(weights), "not a readable weights file")
    assert not marker.exists() and not (tmp_path / "b.st").exists()


def _evil_strings(marker: Path) -> list[str]:
    return [
        f"__import__('os').system('touch {marker}')",
        f"{{0.__class__.__init__.__globals__}} $(touch {marker}) `touch {marker}`",
        f"!!python/object/apply:os.system ['touch {marker}']",
    ]


def test_bank_metadata_is_only_data(bank, good_image, good_score, tmp_path):
    marker = tmp_path / "pwned"
    target = tmp_path / "strings.st"
    evil = _evil_strings(marker)

    def plant(copy: bank_io.Bank) -> None:
        copy.config.update({"note": evil[0], evil[1]: evil[2]})
        copy.calibration["rule"] = evil[1]
        copy.created = evil[2]

    _resaved(plant)(bank, target)
    _rewrite_header(target, target, lambda h: h["__metadata__"].update(tool_version=evil[0]))
    loaded = bank_io.load(target)
    assert loaded.config["note"] == evil[0] and loaded.tool_version == evil[0]
    assert scores(invoke("score", good_image, "--bank", target, "--json")) == {good_image.name: good_score}
    hostile = tmp_path / "hostile.st"
    _resaved(_config(backbone=evil[0]))(bank, hostile)
    assert_refused(invoke("score", good_image, "--bank", hostile), 4, str(hostile), "unknown backbone")
    assert not marker.exists()


def test_paths_in_a_bank_never_receive_output(bank, good_image, good_score, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    target = tmp_path / "paths.st"
    planted = {
        key: str(elsewhere / key) for key in ("out", "heatmaps", "masks", "out_dir", "output", "cache")
    }
    _resaved(_config(**planted, weights_file=str(elsewhere / "w.pth")))(bank, target)
    heat, masks = tmp_path / "heat", tmp_path / "masks"
    result = invoke("score", good_image, "--bank", target, "--heatmaps", heat, "--masks", masks, "--json")
    assert scores(result) == {good_image.name: good_score}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat", "masks", "paths.st"]
    assert len(list(heat.iterdir())) == len(list(masks.iterdir())) == 1


# --- property: any bytes are a Bank or a BankError --------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def small_bank(fuzz_dir: Path) -> bytes:
    """A valid bank small enough (3 x 4) that most of its bytes are header."""
    path = fuzz_dir / "seed.st"
    bank_io.save(
        bank_io.Bank(
            memory_bank=np.arange(12, dtype=np.float32).reshape(3, 4),
            config={"backbone": "resnet18", "layers": ["layer2", "layer3"], "crop": 64, "image_size": 72},
            calibration={"image_threshold": 1.5, "image_std": 0.25, "pixel_threshold": 2.0},
            weights_sha256="random",
            n_train_images=3,
        ),
        path,
    )
    return path.read_bytes()


def _load_is_bank_or_bank_error(folder: Path, data: bytes) -> None:
    path = folder / "case.st"
    path.unlink(missing_ok=True)  # a new file, so no earlier memory map sees it change
    path.write_bytes(data)
    began = time.perf_counter()
    try:
        loaded = bank_io.load(path)
    except BankError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert loaded.memory_bank.ndim == 2 and loaded.memory_bank.dtype == np.float32
        assert np.isfinite(loaded.memory_bank).all()
        assert np.isfinite(loaded.calibration["image_threshold"])
    assert time.perf_counter() - began < 2.0


FUZZ = settings(max_examples=50, deadline=None)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=300)
        ),
    )
)
def test_random_bytes_are_a_bank_error(fuzz_dir, data):
    _load_is_bank_or_bank_error(fuzz_dir, data)


_EDIT = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 16)),
)


def _apply(data: bytes, edits: list[tuple]) -> bytes:
    buffer = bytearray(data)
    for kind, where, what in edits:
        at = where % (len(buffer) + 1)
        if kind == "flip" and at < len(buffer):
            buffer[at] ^= what
        elif kind == "insert":
            buffer[at:at] = what
        elif kind == "delete":
            del buffer[at : at + what]
    return bytes(buffer)


@FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_mutated_bank_bytes_load_or_raise_bank_error(fuzz_dir, small_bank, edits):
    _load_is_bank_or_bank_error(fuzz_dir, _apply(small_bank, edits))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_HEADER_SLOTS = [
    (), ("__metadata__",), ("memory_bank",),
    ("memory_bank", "shape"), ("memory_bank", "dtype"), ("memory_bank", "data_offsets"),
    ("__metadata__", "format"), ("__metadata__", "format_version"), ("__metadata__", "config"),
    ("__metadata__", "calibration"), ("__metadata__", "n_train_images"), ("__metadata__", "weights_sha256"),
]  # fmt: skip


@FUZZ
@given(
    slot=st.sampled_from(_HEADER_SLOTS),
    value=st.one_of(_JSON, _JSON.map(json.dumps), st.just(...)),
)
def test_mutated_bank_header_loads_or_raises_bank_error(fuzz_dir, small_bank, slot, value):
    (length,) = struct.unpack("<Q", small_bank[:8])
    header = json.loads(small_bank[8 : 8 + length])
    if not slot:
        header = value if value is not ... else {}
    else:
        parent = header
        for key in slot[:-1]:
            parent = parent[key]
        if value is ...:
            del parent[slot[-1]]
        else:
            parent[slot[-1]] = value
    raw = json.dumps(header).encode()
    _load_is_bank_or_bank_error(fuzz_dir, struct.pack("<Q", len(raw)) + raw + small_bank[8 + length :])
