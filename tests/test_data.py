"""Tests for patchcore_cli.data: robust image reading, file listing, dataset layouts.

Every file is built here in tmp_path with numpy/Pillow; no real dataset is touched.
"""

from __future__ import annotations

import builtins
import io
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from patchcore_cli import data
from patchcore_cli.data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    ImageBytes,
    Sample,
    defect_type_name,
    find_mask,
    folder_split,
    image_files,
    is_mask_file,
    list_images,
    load_image,
    load_mask,
    mvtec_available,
    mvtec_category,
    seeded_split,
)
from patchcore_cli.errors import ConfigError, ImageError, InputError

W, H = 6, 4  # deliberately non-square so a swapped width/height shows


# ------------------------------------------------------------------------------------- file builders


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png16_rgb_bytes(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one): H x W x 3 uint16 -> bytes."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def noise_rgb(width: int = W, height: int = H, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def gray16_values() -> np.ndarray:
    # H x W with the values whose 8-bit images the tests know: 65535 -> 255, 32768 -> 128, 257 -> 1.
    row = np.array([0, 257, 32768, 65535, 1000, 60000], dtype=np.uint16)
    return np.tile(row, (H, 1))


GRAY16_EXPECTED = np.tile(np.array([0, 1, 128, 255, 4, 233], dtype=np.uint8), (H, 1))


# ------------------------------------------------------------------------------------ load_image: good


def _rgb(tmp: Path) -> tuple[Path, np.ndarray]:
    pixels = noise_rgb()
    return save(Image.fromarray(pixels), tmp / "rgb.png"), pixels


def _rgba(tmp: Path) -> tuple[Path, np.ndarray]:
    pixels = noise_rgb()
    alpha = np.zeros((H, W), dtype=np.uint8)
    alpha[:, : W // 2] = 255  # left half opaque, right half fully transparent
    rgba = np.dstack([pixels, alpha])
    expected = pixels.copy()
    expected[:, W // 2 :] = 0  # composited on black
    return save(Image.fromarray(rgba, "RGBA"), tmp / "rgba.png"), expected


def _gray(tmp: Path) -> tuple[Path, np.ndarray]:
    gray = noise_rgb()[..., 0]
    return save(Image.fromarray(gray, "L"), tmp / "gray.png"), np.dstack([gray] * 3)


def _gray_alpha(tmp: Path) -> tuple[Path, np.ndarray]:
    gray = np.full((H, W), 200, dtype=np.uint8)
    alpha = np.full((H, W), 255, dtype=np.uint8)
    alpha[0] = 0
    expected = np.dstack([gray] * 3)
    expected[0] = 0
    return save(Image.fromarray(np.dstack([gray, alpha]), "LA"), tmp / "la.png"), expected


def _palette(tmp: Path) -> tuple[Path, np.ndarray]:
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], dtype=np.uint8)
    index = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 3
    img = Image.fromarray(index, "P")
    img.putpalette(colours.flatten().tolist())
    return save(img, tmp / "palette.png"), colours[index]


def _palette_transparent(tmp: Path) -> tuple[Path, np.ndarray]:
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], dtype=np.uint8)
    index = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 3
    img = Image.fromarray(index, "P")
    img.putpalette(colours.flatten().tolist())
    expected = colours[index]
    expected[index == 1] = 0  # index 1 is transparent -> black
    return save(img, tmp / "palette_t.png", transparency=1), expected


def _bilevel(tmp: Path) -> tuple[Path, np.ndarray]:
    bits = np.zeros((H, W), dtype=bool)
    bits[::2, 1::2] = True
    return save(Image.fromarray(bits), tmp / "bits.png"), np.dstack([bits.astype(np.uint8) * 255] * 3)


def _gray16_png(tmp: Path) -> tuple[Path, np.ndarray]:
    img = Image.fromarray(gray16_values())
    assert img.mode == "I;16"
    return save(img, tmp / "gray16.png"), np.dstack([GRAY16_EXPECTED] * 3)


def _gray16_big_endian_tiff(tmp: Path) -> tuple[Path, np.ndarray]:
    img = Image.fromarray(gray16_values().astype(">u2"))
    assert img.mode == "I;16B"
    return save(img, tmp / "gray16b.tif"), np.dstack([GRAY16_EXPECTED] * 3)


def _int32_tiff_16bit_range(tmp: Path) -> tuple[Path, np.ndarray]:
    img = Image.fromarray(gray16_values().astype(np.int32))
    assert img.mode == "I"
    return save(img, tmp / "int32.tif"), np.dstack([GRAY16_EXPECTED] * 3)


def _int32_tiff_wide_range(tmp: Path) -> tuple[Path, np.ndarray]:
    values = np.tile(np.array([-100_000, 0, 100_000, 200_000, 300_000, 300_000], dtype=np.int32), (H, 1))
    expected = np.tile(np.array([0, 64, 128, 191, 255, 255], dtype=np.uint8), (H, 1))
    return save(Image.fromarray(values), tmp / "int32w.tif"), np.dstack([expected] * 3)


def _rgb16_png(tmp: Path) -> tuple[Path, np.ndarray]:
    values = np.zeros((H, W, 3), dtype=np.uint16)
    values[..., 0] = 65535
    values[..., 1] = 32768
    values[..., 2] = 512
    path = tmp / "rgb16.png"
    path.write_bytes(png16_rgb_bytes(values))
    expected = np.zeros((H, W, 3), dtype=np.uint8)
    expected[..., 0], expected[..., 1], expected[..., 2] = 255, 128, 2
    return path, expected


def _float_unit_tiff(tmp: Path) -> tuple[Path, np.ndarray]:
    values = np.tile(np.array([0.0, 0.25, 0.5, 1.0, 0.0, 1.0], dtype=np.float32), (H, 1))
    expected = np.tile(np.array([0, 64, 128, 255, 0, 255], dtype=np.uint8), (H, 1))
    return save(Image.fromarray(values), tmp / "float01.tif"), np.dstack([expected] * 3)


def _float_wide_tiff(tmp: Path) -> tuple[Path, np.ndarray]:
    values = np.tile(np.array([-1.0, 0.0, 1.0, 3.0, np.nan, np.inf], dtype=np.float32), (H, 1))
    expected = np.tile(np.array([0, 64, 128, 255, 0, 0], dtype=np.uint8), (H, 1))
    return save(Image.fromarray(values), tmp / "floatw.tif"), np.dstack([expected] * 3)


def _cmyk_jpeg(tmp: Path) -> tuple[Path, np.ndarray]:
    # CMYK (0, 255, 255, 0) is pure red.
    img = Image.new("CMYK", (W * 4, H * 4), (0, 255, 255, 0))
    return save(img, tmp / "cmyk.jpg", quality=95), np.broadcast_to(
        np.array([255, 0, 0], dtype=np.uint8), (H * 4, W * 4, 3)
    )


def _jpeg(tmp: Path) -> tuple[Path, np.ndarray]:
    img = Image.new("RGB", (W * 4, H * 4), (40, 120, 200))
    return save(img, tmp / "plain.JPG", quality=95), np.asarray(img)


def _bmp(tmp: Path) -> tuple[Path, np.ndarray]:
    pixels = noise_rgb(seed=3)
    return save(Image.fromarray(pixels), tmp / "img.bmp"), pixels


def _webp_lossless(tmp: Path) -> tuple[Path, np.ndarray]:
    pixels = noise_rgb(seed=4)
    return save(Image.fromarray(pixels), tmp / "img.webp", lossless=True), pixels


def _rgb_tiff(tmp: Path) -> tuple[Path, np.ndarray]:
    pixels = noise_rgb(seed=5)
    return save(Image.fromarray(pixels), tmp / "img.tiff"), pixels


# (builder, largest allowed per-pixel difference: 0 for lossless files, a little for JPEG)
GOOD_KINDS: dict[str, tuple[Callable[[Path], tuple[Path, np.ndarray]], int]] = {
    "rgb8 png": (_rgb, 0),
    "rgba png, alpha on black": (_rgba, 0),
    "grayscale L": (_gray, 0),
    "grayscale + alpha LA": (_gray_alpha, 0),
    "palette P": (_palette, 0),
    "palette P with transparency": (_palette_transparent, 0),
    "1-bit": (_bilevel, 0),
    "16-bit gray png (I;16)": (_gray16_png, 0),
    "16-bit gray big-endian tiff (I;16B)": (_gray16_big_endian_tiff, 0),
    "32-bit int tiff within 16-bit range": (_int32_tiff_16bit_range, 0),
    "32-bit int tiff, wide range stretched": (_int32_tiff_wide_range, 0),
    "16-bit rgb png": (_rgb16_png, 0),
    "float tiff within 0..1": (_float_unit_tiff, 0),
    "float tiff, wide range stretched, nan/inf -> 0": (_float_wide_tiff, 0),
    "cmyk jpeg": (_cmyk_jpeg, 3),
    "jpeg, upper-case extension": (_jpeg, 3),
    "bmp": (_bmp, 0),
    "lossless webp": (_webp_lossless, 0),
    "rgb tiff": (_rgb_tiff, 0),
}


@pytest.mark.parametrize("kind", list(GOOD_KINDS))
def test_load_image_gives_rgb8_with_expected_pixels(tmp_path: Path, kind: str) -> None:
    build, tolerance = GOOD_KINDS[kind]
    path, expected = build(tmp_path)
    img = load_image(path)
    assert img.mode == "RGB"
    pixels = np.asarray(img)
    assert pixels.dtype == np.uint8
    assert pixels.shape == expected.shape
    diff = np.abs(pixels.astype(int) - expected.astype(int)).max()
    assert diff <= tolerance, f"{kind}: max difference {diff}"


def test_load_image_accepts_str_path(tmp_path: Path) -> None:
    path, expected = _rgb(tmp_path)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), expected)


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored sideways: display rotated 90 degrees clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, turn: Callable) -> None:
    # Four flat quadrants, big enough that JPEG blocks stay within one colour.
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:16, :24] = (255, 0, 0)
    stored[:16, 24:] = (0, 255, 0)
    stored[16:, :24] = (0, 0, 255)
    stored[16:, 24:] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(stored), tmp_path / "photo.jpg", exif=exif, quality=95)
    pixels = np.asarray(load_image(path)).astype(int)
    expected = turn(stored).astype(int)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).mean() < 4


def test_broken_exif_keeps_the_image(tmp_path: Path) -> None:
    path, expected = _rgb(tmp_path)
    data_bytes = path.read_bytes()
    # An eXIf chunk whose content is garbage: the pixels are fine, so the image must still load.
    iend = data_bytes.rindex(b"IEND") - 4
    path.write_bytes(data_bytes[:iend] + _png_chunk(b"eXIf", b"MM\x00*garbage") + data_bytes[iend:])
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)


def test_load_image_closes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _rgb(tmp_path)
    handles: list[io.BufferedReader] = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if str(file) == str(path):
            handles.append(handle)
        return handle

    monkeypatch.setattr(builtins, "open", recording_open)
    img = load_image(path)
    assert handles
    assert all(handle.closed for handle in handles)
    assert np.asarray(img).shape == (H, W, 3)  # pixels still readable after the file closed


# ------------------------------------------------------------------------------------- load_image: bad


def _truncated(tmp: Path, fmt: str, name: str) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(noise_rgb(64, 64)).save(buffer, fmt)
    path = tmp / name
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    return path


def _bad_crc_png(tmp: Path) -> Path:
    path, _ = _rgb(tmp)
    raw = bytearray(path.read_bytes())
    idat = raw.index(b"IDAT")
    raw[idat + 6] ^= 0xFF  # corrupt compressed data inside IDAT, so its CRC no longer matches
    path.write_bytes(bytes(raw))
    return path


def _folder_named_png(tmp: Path) -> Path:
    (tmp / "folder.png").mkdir()
    return tmp / "folder.png"


def _zero_bytes(tmp: Path) -> Path:
    (tmp / "empty.png").touch()
    return tmp / "empty.png"


def _text_named_png(tmp: Path) -> Path:
    (tmp / "notes.png").write_text("hello, not an image\n")
    return tmp / "notes.png"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.png")  # reading it would block forever
    return tmp / "pipe.png"


def _gif_named_png(tmp: Path) -> Path:
    path = tmp / "animation.png"
    Image.new("P", (W, H)).save(path, "GIF")
    return path


BAD_KINDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda t: t / "nope.png", "file not found"),
    "a folder": (_folder_named_png, "is a folder"),
    "zero-byte file": (_zero_bytes, "empty file"),
    "truncated png": (lambda t: _truncated(t, "PNG", "cut.png"), "truncated"),
    "truncated jpeg": (lambda t: _truncated(t, "JPEG", "cut.jpg"), "truncated"),
    "png with a corrupted chunk": (_bad_crc_png, "corrupt"),
    "text file named .png": (
        _text_named_png,
        "not an image file (unrecognised format)",
    ),
    "gif named .png (unsupported format)": (_gif_named_png, "unsupported image format GIF"),
    "fifo": (_fifo, "not a regular file"),
}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_load_image_bad_files_raise_image_error(tmp_path: Path, kind: str) -> None:
    build, problem = BAD_KINDS[kind]
    path = build(tmp_path)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert path.name in str(caught.value)
    assert problem in caught.value.problem
    assert caught.value.path == str(path)
    assert "\n" not in str(caught.value)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _rgb(tmp_path)
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    # Tests run as root, where chmod 000 does not stop reads; simulate the refusal instead.
    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(ImageError, match="permission denied") as caught:
        load_image(path)
    assert "rgb.png" in str(caught.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    path, _ = _rgb(tmp_path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_truncated_images_stay_errors_and_global_is_untouched(tmp_path: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError):
        load_image(_truncated(tmp_path, "PNG", "cut.png"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("kind", list(GOOD_KINDS))
def test_image_bytes_decode_like_the_file(tmp_path: Path, kind: str) -> None:
    path, _ = GOOD_KINDS[kind][0](tmp_path)
    from_bytes = load_image(ImageBytes("s3://bucket/part.png", path.read_bytes()))
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))


# The kinds that are about the bytes; a missing file, a folder, a FIFO only exist on a filesystem.
CONTENT_KINDS = [kind for kind in BAD_KINDS if kind not in ("missing file", "a folder", "fifo")]


@pytest.mark.parametrize("kind", CONTENT_KINDS)
def test_image_bytes_fail_like_the_file(tmp_path: Path, kind: str) -> None:
    path = BAD_KINDS[kind][0](tmp_path)
    with pytest.raises(ImageError) as from_file:
        load_image(path)
    uri = f"s3://bucket/{path.name}"
    with pytest.raises(ImageError) as from_bytes:
        load_image(ImageBytes(uri, path.read_bytes()))
    assert from_bytes.value.problem == from_file.value.problem
    assert str(from_bytes.value) == f"{uri}: {from_file.value.problem}"


def test_image_bytes_respect_the_pixel_limit(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (100, 50)), tmp_path / "wide.png")
    with pytest.raises(ImageError, match="over the limit of 4,999 pixels"):
        load_image(ImageBytes("gs://b/wide.png", path.read_bytes()), max_pixels=4999)


def test_pixel_guard_checks_the_header_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(Image.new("RGB", (100, 50)), tmp_path / "big.png")
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    with pytest.raises(ImageError) as caught:
        load_image(path, max_pixels=4999)
    assert not loads, "pixels were decoded before the size check"
    message = str(caught.value)
    assert "big.png" in message
    assert "100x50" in message
    assert "4,999" in message
    assert "--max-pixels" in message
    assert load_image(path, max_pixels=5000).size == (100, 50)


def test_default_pixel_limit_rejects_a_huge_header(tmp_path: Path) -> None:
    # Only the header claims 9000 x 8000 (216 MB decoded); the pixel data is a stub that would fail to
    # decode, so the error proves the size was judged from the header alone.
    header = struct.pack(">IIBBBBB", 9000, 8000, 8, 0, 0, 0, 0)
    path = tmp_path / "huge.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + _png_chunk(b"IEND", b"")
    )
    assert DEFAULT_MAX_PIXELS < 9000 * 8000
    with pytest.raises(
        ImageError, match="9000x8000 = 72,000,000 pixels, over the limit of 64,000,000 pixels"
    ):
        load_image(path)


def test_pillow_bomb_warning_does_not_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(Image.new("RGB", (30, 30)), tmp_path / "mid.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 900 pixels: Pillow warns, does not refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping load_image fails the test
        img = load_image(path, max_pixels=10_000)
    assert img.size == (30, 30)


@pytest.mark.parametrize(
    ("max_pixels", "expected"),
    [
        (10_000, "over Pillow's decompression-bomb ceiling of 200 pixels"),
        (150, "over the limit of 150 pixels (raise it with --max-pixels)"),
    ],
)
def test_pillow_bomb_error_becomes_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_pixels: int, expected: str
) -> None:
    path = save(Image.new("RGB", (30, 30)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 2 x 100 pixels
    with pytest.raises(ImageError) as caught:
        load_image(path, max_pixels=max_pixels)
    assert expected in str(caught.value)
    assert "bomb.png" in str(caught.value)


# ------------------------------------------------------------------------------- load_image: property


def _valid_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise_rgb(12, 9, seed=7)).save(buffer, fmt)
    return buffer.getvalue()


_SEEDS = {fmt: _valid_bytes(fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP")}


@st.composite
def mutated_image_bytes(draw: st.DrawFn) -> bytes:
    raw = bytearray(_SEEDS[draw(st.sampled_from(sorted(_SEEDS)))])
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if action == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:]
        elif action == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at : at + draw(st.integers(1, 16))]
    return bytes(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.one_of(
        st.binary(max_size=300), mutated_image_bytes(), mutated_image_bytes(), mutated_image_bytes()
    ),
    suffix=st.sampled_from(sorted(IMAGE_EXTENSIONS)),
)
def test_any_bytes_give_an_rgb_image_or_image_error(payload: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(payload)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Pillow's warnings about damaged files must not leak either
                img = load_image(path, max_pixels=1_000_000)
        except ImageError as exc:
            event(f"ImageError: {exc.problem.split(':')[0].split('(')[0].strip()}")
            assert exc.path == str(path)
            assert exc.problem
            return
        event("loaded")
        assert img.mode == "RGB"
        assert img.width > 0 and img.height > 0
        assert np.asarray(img).shape == (img.height, img.width, 3)


# ------------------------------------------------------------------------------------------ load_mask


def _mask_cases() -> dict[str, tuple[Callable[[Path], Path], np.ndarray]]:
    truth = np.zeros((H, W), dtype=bool)
    truth[1:3, 2:5] = True

    def gray(t: Path) -> Path:
        return save(Image.fromarray(truth.astype(np.uint8) * 255), t / "m_gray.png")

    def gray_low_value(t: Path) -> Path:
        return save(Image.fromarray(truth.astype(np.uint8)), t / "m_one.png")

    def rgb_green_only(t: Path) -> Path:
        pixels = np.zeros((H, W, 3), dtype=np.uint8)
        pixels[truth, 1] = 7
        return save(Image.fromarray(pixels), t / "m_rgb.png")

    def sixteen_bit_ones(t: Path) -> Path:
        return save(Image.fromarray(truth.astype(np.uint16)), t / "m_16.png")  # 1 would scale to 0

    def bilevel(t: Path) -> Path:
        return save(Image.fromarray(truth), t / "m_1.png")

    def palette(t: Path) -> Path:
        img = Image.fromarray(truth.astype(np.uint8), "P")
        img.putpalette([0, 0, 0, 255, 255, 255])
        return save(img, t / "m_p.png")

    def rgba_transparent_elsewhere(t: Path) -> Path:
        rgba = np.full((H, W, 4), 255, dtype=np.uint8)
        rgba[~truth, 3] = 0  # white everywhere, but only the defect is opaque
        return save(Image.fromarray(rgba, "RGBA"), t / "m_rgba.png")

    def float_tiff(t: Path) -> Path:
        values = truth.astype(np.float32) * 0.001
        values[0, 0] = np.nan
        return save(Image.fromarray(values), t / "m_f.tif")

    return {
        "gray 0/255": (gray, truth),
        "gray 0/1": (gray_low_value, truth),
        "rgb, one channel": (rgb_green_only, truth),
        "16-bit 0/1": (sixteen_bit_ones, truth),
        "1-bit": (bilevel, truth),
        "palette": (palette, truth),
        "rgba": (rgba_transparent_elsewhere, truth),
        "float with nan": (float_tiff, truth),
    }


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("kind", list(MASK_CASES))
def test_load_mask_nonzero_is_defect(tmp_path: Path, kind: str) -> None:
    build, truth = MASK_CASES[kind]
    mask = load_mask(build(tmp_path))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, truth)


def test_load_mask_size_check(tmp_path: Path) -> None:
    path = save(Image.new("L", (W, H)), tmp_path / "m.png")
    assert load_mask(path, size=(W, H)).shape == (H, W)
    with pytest.raises(ImageError) as caught:
        load_mask(path, size=(W + 1, H))
    message = str(caught.value)
    assert "m.png" in message
    assert f"{W}x{H}" in message
    assert f"{W + 1}x{H}" in message


def test_load_mask_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_text("nope")
    with pytest.raises(ImageError, match="not an image file"):
        load_mask(path)


# ---------------------------------------------------------------------------------------- list_images


def touch_image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix, suffix[1:].upper())
    Image.new("RGB", (4, 4), (value, value, value)).save(path, fmt)
    return path


def rel(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_folder_walk_sorted_recursive_filtered(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "sub/c.tif", "sub/deeper/d.webp", "z.bmp", "x.jpeg", "y.TIFF"]:
        touch_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    touch_image(tmp_path / ".hidden.png")
    touch_image(tmp_path / ".cache" / "e.png")
    found = list_images([tmp_path])
    assert rel(found, tmp_path) == [
        "a.JPG",
        "b.png",
        "sub/c.tif",
        "sub/deeper/d.webp",
        "x.jpeg",
        "y.TIFF",
        "z.bmp",
    ]
    assert all(p.is_absolute() == tmp_path.is_absolute() for p in found)


def test_glob_patterns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["imgs/a.png", "imgs/b.jpg", "imgs/sub/c.png", "other/d.png"]:
        touch_image(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert [p.as_posix() for p in list_images(["imgs/*.png"])] == ["imgs/a.png"]
    assert [p.as_posix() for p in list_images(["imgs/**/*.png"])] == ["imgs/a.png", "imgs/sub/c.png"]
    assert [p.as_posix() for p in list_images(["*"])] == [
        "imgs/a.png",
        "imgs/b.jpg",
        "imgs/sub/c.png",
        "other/d.png",
    ]


def test_symlink_loop_terminates_and_lists_each_image_once(tmp_path: Path) -> None:
    touch_image(tmp_path / "root" / "a.png")
    touch_image(tmp_path / "root" / "sub" / "b.png")
    os.symlink(tmp_path / "root", tmp_path / "root" / "sub" / "loop")  # sub/loop -> root: a cycle
    os.symlink(tmp_path / "root" / "sub", tmp_path / "root" / "alias")  # a second way into sub
    found = list_images([tmp_path / "root"])
    assert sorted(p.name for p in found) == ["a.png", "b.png"]
    real = [os.path.realpath(p) for p in found]
    assert len(set(real)) == len(real)


def test_recursive_glob_through_symlink_loop_lists_each_once(tmp_path: Path) -> None:
    touch_image(tmp_path / "root" / "a.png")
    os.symlink(tmp_path / "root", tmp_path / "root" / "loop")
    found = list_images([str(tmp_path / "root" / "**" / "*.png")])
    assert [p.name for p in found] == ["a.png"]


def test_symlinked_file_and_folder_are_followed(tmp_path: Path) -> None:
    outside = touch_image(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "data").mkdir()
    os.symlink(outside, tmp_path / "data" / "link.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "data" / "broken.png")  # dangling: skipped
    assert rel(list_images([tmp_path / "data"]), tmp_path) == ["data/link.png"]


def test_looping_and_dangling_file_links_are_skipped(tmp_path: Path) -> None:
    touch_image(tmp_path / "a.png")
    os.symlink("self.png", tmp_path / "self.png")  # points at itself
    os.symlink("y.png", tmp_path / "x.png")
    os.symlink("x.png", tmp_path / "y.png")
    assert rel(list_images([tmp_path]), tmp_path) == ["a.png"]
    with pytest.raises(InputError, match="not a file or folder"):
        list_images([tmp_path / "self.png"])


def test_duplicates_are_listed_once(tmp_path: Path) -> None:
    a = touch_image(tmp_path / "imgs" / "a.png")
    touch_image(tmp_path / "imgs" / "b.png")
    found = list_images([a, tmp_path / "imgs", tmp_path / "imgs", str(tmp_path / "imgs" / "*.png")])
    assert rel(found, tmp_path) == ["imgs/a.png", "imgs/b.png"]


def test_mask_files_are_excluded_from_folders(tmp_path: Path) -> None:
    # Magnetic Tile: x.jpg with its mask x.png beside it; MVTec style: y_mask.png.
    touch_image(tmp_path / "exp1_num_1.jpg")
    touch_image(tmp_path / "exp1_num_1.png")
    touch_image(tmp_path / "exp1_num_2.JPG")
    touch_image(tmp_path / "exp1_num_2.png")
    touch_image(tmp_path / "lonely.png")  # no non-PNG twin: an image
    touch_image(tmp_path / "000.png")
    touch_image(tmp_path / "000_mask.png")
    touch_image(tmp_path / "001_MASK.bmp")
    assert rel(list_images([tmp_path]), tmp_path) == [
        "000.png",
        "exp1_num_1.jpg",
        "exp1_num_2.JPG",
        "lonely.png",
    ]
    assert [p.name for p in list_images([str(tmp_path / "*")])] == [
        "000.png",
        "exp1_num_1.jpg",
        "exp1_num_2.JPG",
        "lonely.png",
    ]


def test_image_files_keeps_what_the_folder_walk_keeps(tmp_path: Path) -> None:
    names = ["b.png", "a.JPG", "sub/c.tif", "sub/deeper/d.webp", "sub.png", "sub-x.png", "Z.bmp"]
    names += ["exp1_num_1.jpg", "exp1_num_1.png", "lonely.png", "000_mask.png", "sub/e_MASK.bmp"]
    names += [".hidden.png", ".cache/e.png", "sub/.git/f.png"]
    for name in names:
        touch_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    listing = [
        (Path(folder) / file).relative_to(tmp_path).as_posix()
        for folder, _, files in os.walk(tmp_path)
        for file in files
    ]
    walked = rel(list_images([tmp_path]), tmp_path)
    assert image_files(listing) == walked
    assert image_files(sorted(listing, reverse=True)) == walked  # an object store lists in any order
    assert "sub.png" in walked and "exp1_num_1.png" not in walked


def test_named_files_are_taken_as_given(tmp_path: Path) -> None:
    mask = touch_image(tmp_path / "000_mask.png")
    other = tmp_path / "odd.gif"
    other.write_bytes(b"GIF89a")
    assert list_images([mask, other]) == [mask, other]


@pytest.mark.parametrize(
    ("name", "siblings", "expected"),
    [
        ("a_mask.png", set(), True),
        ("a_Mask.jpg", set(), True),
        ("a.png", {"a.png", "a.jpg"}, True),
        ("a.png", {"a.png", "a.TIFF"}, True),
        ("a.png", {"a.png", "a.txt"}, False),
        ("a.png", {"a.png", "ab.jpg"}, False),
        ("a.jpg", {"a.png", "a.jpg"}, False),
        ("mask.png", set(), False),
    ],
)
def test_is_mask_file(name: str, siblings: set[str], expected: bool) -> None:
    assert is_mask_file(Path("folder") / name, siblings) is expected


@pytest.mark.parametrize(
    ("folders", "text_files", "inputs", "problem"),
    [
        ([], [], ["missing"], "no such file or folder"),
        ([], [], ["*.png"], "pattern matched no files"),
        (["e"], [], ["e"], "no images found in folder (looked for .bmp, .jpeg, .jpg, .png"),
        (["n"], ["n/a.txt", "n/.hidden.png"], ["n"], "no images found in folder"),
        ([], ["a.txt"], ["*.txt"], "pattern matched no images"),
        ([], [], [], "no input images given"),
    ],
    ids=["missing", "glob-nothing", "empty-folder", "no-images-folder", "glob-no-images", "no-inputs"],
)
def test_list_images_errors(
    tmp_path: Path, folders: list[str], text_files: list[str], inputs: list[str], problem: str
) -> None:
    for folder in folders:
        (tmp_path / folder).mkdir()
    for name in text_files:
        (tmp_path / name).write_text("x")
    paths = [str(tmp_path / item) for item in inputs]
    with pytest.raises(InputError) as caught:
        list_images(paths)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)
    if paths:
        assert paths[0] in str(caught.value)


def test_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_image(tmp_path / "locked" / "a.png")
    real_scandir = os.scandir

    def refusing_scandir(path=".", *args):
        if Path(path) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with pytest.raises(InputError, match="cannot read folder \\(permission denied\\)") as caught:
        list_images([tmp_path])
    assert "locked" in str(caught.value)


# -------------------------------------------------------------------------------------------- datasets


def make_mvtec(root: Path, category: str = "widget", masks: bool = True) -> Path:
    base = root / category
    for i in range(3):
        touch_image(base / "train" / "good" / f"{i:03d}.png")
    touch_image(base / "test" / "good" / "000.png")
    for defect in ("scratch", "crack"):
        for i in range(2):
            touch_image(base / "test" / defect / f"{i:03d}.png", value=200)
            if masks:
                touch_image(base / "ground_truth" / defect / f"{i:03d}_mask.png", value=255)
    return base


def test_mvtec_category_layout(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    split = mvtec_category(tmp_path, "widget")
    assert split.name == "widget"
    assert rel(split.train, base) == ["train/good/000.png", "train/good/001.png", "train/good/002.png"]
    assert [(s.path.relative_to(base).as_posix(), s.label, s.defect_type) for s in split.test] == [
        ("test/good/000.png", 0, "good"),
        ("test/crack/000.png", 1, "crack"),
        ("test/crack/001.png", 1, "crack"),
        ("test/scratch/000.png", 1, "scratch"),
        ("test/scratch/001.png", 1, "scratch"),
    ]
    assert split.test[0].mask is None
    for sample in split.test[1:]:
        assert sample.mask == base / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"


def test_mvtec_missing_mask(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path)
    (base / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(InputError) as caught:
        mvtec_category(tmp_path, "widget")
    message = str(caught.value)
    assert str(base / "test" / "scratch" / "001.png") in message
    assert str(base / "ground_truth" / "scratch") in message
    split = mvtec_category(tmp_path, "widget", require_masks=False)
    masks = {s.path.relative_to(base).as_posix(): s.mask for s in split.test}
    assert masks["test/scratch/001.png"] is None
    assert masks["test/scratch/000.png"] == base / "ground_truth" / "scratch" / "000_mask.png"


def test_mvtec_without_ground_truth_folder(tmp_path: Path) -> None:
    make_mvtec(tmp_path, masks=False)
    with pytest.raises(InputError, match="no mask found"):
        mvtec_category(tmp_path, "widget")
    assert all(s.mask is None for s in mvtec_category(tmp_path, "widget", require_masks=False).test)


def test_mvtec_missing_category(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder not found") as caught:
        mvtec_category(tmp_path, "bottle")
    assert "bottle" in str(caught.value)


def test_mvtec_available(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "grid")
    (tmp_path / "cable" / "test").mkdir(parents=True)  # no train/good: not usable
    present, missing = mvtec_available(tmp_path)
    assert present == ["grid", "bottle"]  # seed order, textures first
    assert missing == [c for c in MVTEC_CATEGORIES if c not in ("grid", "bottle")]
    assert len(MVTEC_CATEGORIES) == 15
    with pytest.raises(InputError, match="root folder not found"):
        mvtec_available(tmp_path / "absent")


def make_magnetic_tile(root: Path, n_free: int = 20) -> Path:
    """MT_<class>/Imgs/<id>.jpg with its mask <id>.png beside it."""
    for i in range(n_free):
        touch_image(root / "MT_Free" / "Imgs" / f"exp0_num_{i}.jpg")
        touch_image(root / "MT_Free" / "Imgs" / f"exp0_num_{i}.png")
    for cls, count in (("MT_Blowhole", 3), ("MT_Crack", 2)):
        for i in range(count):
            touch_image(root / cls / "Imgs" / f"exp1_num_{100 + i}.jpg", value=90)
            touch_image(root / cls / "Imgs" / f"exp1_num_{100 + i}.png", value=255)
    return root


def test_folder_split_magnetic_tile(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path)
    split = folder_split(
        good=[root / "MT_Free" / "Imgs"],
        defect=[root / "MT_Blowhole" / "Imgs", root / "MT_Crack" / "Imgs"],
        name="magnetic_tile",
    )
    assert split.name == "magnetic_tile"
    good_test = [s for s in split.test if s.label == 0]
    defects = [s for s in split.test if s.label == 1]
    assert len(split.train) == 10 and len(good_test) == 10
    all_free = {p.name for p in split.train} | {s.path.name for s in good_test}
    assert all_free == {f"exp0_num_{i}.jpg" for i in range(20)}
    assert [s.defect_type for s in defects] == ["MT_Blowhole"] * 3 + ["MT_Crack"] * 2
    for sample in defects:
        assert sample.mask == sample.path.with_suffix(".png")
    assert split.test[: len(good_test)] == good_test  # good first
    assert all(s.mask is None and s.defect_type == "good" for s in good_test)


def test_folder_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path)
    args = {"good": [root / "MT_Free" / "Imgs"], "defect": [root / "MT_Crack" / "Imgs"]}
    first, again = folder_split(**args), folder_split(**args)
    assert first == again
    other = folder_split(**args, seed=7)
    assert set(other.train) != set(first.train)
    assert len(folder_split(**args, train_fraction=0.8).train) == 16


def test_seeded_split_contract(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i:02d}.png" for i in range(9)]
    train, test = seeded_split(list(reversed(paths)), 0.5, seed=3)
    # Documented: sorted, permuted by default_rng(seed), first round(N * fraction) to train, each sorted.
    order = np.random.default_rng(3).permutation(9)
    assert train == [paths[i] for i in sorted(order[:5])]
    assert test == [paths[i] for i in sorted(order[5:])]
    assert seeded_split(paths, 0.5, seed=3) == (train, test)  # input order does not matter


@pytest.mark.parametrize(
    ("count", "fraction", "n_train"), [(2, 0.5, 1), (2, 0.99, 1), (3, 0.01, 1), (10, 0.25, 3)]
)
def test_seeded_split_keeps_both_parts(tmp_path: Path, count: int, fraction: float, n_train: int) -> None:
    train, test = seeded_split([tmp_path / f"{i}.png" for i in range(count)], fraction, seed=0)
    assert len(train) == n_train and len(test) == count - n_train


def test_seeded_split_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        seeded_split([tmp_path / "a.png", tmp_path / "b.png"], 1.0, seed=0)
    with pytest.raises(InputError, match="at least 2 good images"):
        seeded_split([tmp_path / "a.png"], 0.5, seed=0)


def test_folder_split_with_train_and_mask_folder(tmp_path: Path) -> None:
    for i in range(3):
        touch_image(tmp_path / "train" / f"t{i}.png")
    touch_image(tmp_path / "good" / "g0.png")
    touch_image(tmp_path / "bad" / "dent" / "b0.png")
    touch_image(tmp_path / "masks" / "b0_mask.png", value=255)
    split = folder_split(
        good=[tmp_path / "good"],
        defect=[tmp_path / "bad" / "dent"],
        train=[tmp_path / "train"],
        masks=[tmp_path / "masks"],
    )
    assert [p.name for p in split.train] == ["t0.png", "t1.png", "t2.png"]
    assert split.test == [
        Sample(tmp_path / "good" / "g0.png", 0, "good"),
        Sample(tmp_path / "bad" / "dent" / "b0.png", 1, "dent", tmp_path / "masks" / "b0_mask.png"),
    ]


def test_folder_split_missing_masks(tmp_path: Path) -> None:
    touch_image(tmp_path / "train" / "t.png")
    touch_image(tmp_path / "good" / "g.png")
    touch_image(tmp_path / "bad" / "b.png")
    args = {"good": [tmp_path / "good"], "defect": [tmp_path / "bad"], "train": [tmp_path / "train"]}
    with pytest.raises(InputError) as caught:
        folder_split(**args, masks=[tmp_path / "masks"])
    assert "b.png: no mask found" in str(caught.value)
    assert str(tmp_path / "masks") in str(caught.value)
    split = folder_split(**args, require_masks=False)
    assert split.test[-1] == Sample(tmp_path / "bad" / "b.png", 1, "bad", None)


def test_folder_split_rejects_overlaps(tmp_path: Path) -> None:
    touch_image(tmp_path / "good" / "g.png")
    touch_image(tmp_path / "bad" / "b.png")
    with pytest.raises(InputError, match="both training and good test"):
        folder_split(good=[tmp_path / "good"], defect=[tmp_path / "bad"], train=[tmp_path / "good"])
    with pytest.raises(InputError, match="both good and defective"):
        folder_split(
            good=[tmp_path / "good"],
            defect=[tmp_path / "good"],
            train=[tmp_path / "bad"],
            require_masks=False,
        )


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("MT_Blowhole/Imgs", "MT_Blowhole"),
        ("scratch", "scratch"),
        ("cable/test", "cable"),
        ("parts/IMAGES", "parts"),
        ("parts/data", "parts"),
        ("parts/dents", "dents"),
    ],
)
def test_defect_type_name(tmp_path: Path, folder: str, expected: str) -> None:
    assert defect_type_name(tmp_path / folder) == expected


def test_defect_type_of_relative_generic_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "MT_Fray" / "Imgs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "MT_Fray")
    assert defect_type_name(Path("Imgs")) == "MT_Fray"


@pytest.mark.parametrize(
    ("image", "files", "dirs", "expected"),
    [
        ("imgs/a.jpg", ["imgs/a.png"], ["imgs"], "imgs/a.png"),  # Magnetic Tile: beside, same stem
        ("imgs/a.png", ["gt/a_mask.png"], ["gt", "imgs"], "gt/a_mask.png"),  # MVTec style
        ("imgs/a.png", ["imgs/a_mask.bmp"], ["imgs"], "imgs/a_mask.bmp"),
        ("imgs/a.png", ["gt/a.PNG"], ["gt"], "gt/a.PNG"),  # upper-case extension
        ("imgs/a.png", [], ["imgs"], None),  # never the image itself
        ("imgs/a.png", ["imgs/ab_mask.png"], ["imgs"], None),
        ("imgs/a.jpg", ["m1/a.png", "m2/a_mask.png"], ["m1", "m2"], "m1/a.png"),  # first folder wins
        ("imgs/a.jpg", ["m1/a.png", "m1/a_mask.png"], ["m1"], "m1/a_mask.png"),  # _mask preferred
        ("imgs/a.jpg", ["imgs/a.png"], ["missing", "imgs"], "imgs/a.png"),
    ],
)
def test_find_mask(
    tmp_path: Path, image: str, files: list[str], dirs: list[str], expected: str | None
) -> None:
    touch_image(tmp_path / image)
    for name in files:
        touch_image(tmp_path / name)
    found = find_mask(tmp_path / image, [tmp_path / d for d in dirs])
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.relative_to(tmp_path).as_posix() == expected


def test_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, patchcore_cli.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_data_module_exports() -> None:
    assert frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}) == data.IMAGE_EXTENSIONS
    assert DEFAULT_MAX_PIXELS == 64_000_000
