"""Reading images robustly and finding the images of a dataset.

Everything here is numpy + Pillow (no torch), so the CLI can list and check inputs before it pays for
importing the model.

Image loading (`load_image`) turns any supported file into an upright 8-bit RGB image, and every way a
file can be unusable into one `ImageError` that names the file. How unusual pixel formats become 8-bit RGB:

- RGB, L, 1, CMYK, YCbCr, LAB: Pillow's own conversion to RGB (grey is copied to all three channels).
- RGBA, LA, PA, and P with transparency: composited on black, so a transparent pixel is black whatever
  colour it happens to store (two renderings of one part differing only under the alpha look the same).
- I;16, I;16B, I;16L (16-bit grey): the 16-bit range scaled linearly to 8 bit (65535 -> 255,
  32768 -> 128), not clipped at 255.
- I (32-bit integer): as 16-bit when all values lie in 0..65535 (how 16-bit files used to decode),
  otherwise stretched from the image's own min..max to 0..255.
- F (32-bit float): values all within 0..1 are multiplied by 255 (the usual convention for normalised
  float images, and the same mapping for every such image); any other range is stretched from the image's
  min..max to 0..255; NaN and infinities become 0.

16-bit RGB PNGs are reduced to 8 bit by Pillow itself (high byte). EXIF orientation is applied, so a
portrait photo stored sideways comes back upright.

Decompression-bomb guard: `max_pixels` (default `DEFAULT_MAX_PIXELS`, 64 million pixels, i.e. 8000 x 8000;
the CLI's `--max-pixels`) is checked against the size in the file header before any pixel is decoded. Pillow
keeps its own global ceiling (`PIL.Image.MAX_IMAGE_PIXELS`, by default about 89 million pixels, refusing
outright above twice that); we silence its warning, since our limit decides, and report its refusal as an
`ImageError` too. A `max_pixels` above Pillow's refusal threshold (about 179 million) therefore cannot take
effect. We never change Pillow's global settings: truncated files (`ImageFile.LOAD_TRUNCATED_IMAGES` is
False by default) are errors, not grey-padded images.

Dataset discovery: `list_images` expands files, folders and glob patterns; `mvtec_category` reads the MVTec AD
layout; `folder_split` builds a split from plain folders of good and defective images (e.g. Magnetic Tile).
"""

from __future__ import annotations

import glob
import io
import math
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from patchcore_cli.errors import ConfigError, ImageError, InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# 8000 x 8000: well above any industrial camera frame we expect, well below what exhausts a laptop's memory
# once decoded (64 M pixels x 3 bytes = 192 MB as 8-bit RGB, several times that as float features).
DEFAULT_MAX_PIXELS = 64_000_000

# Pillow format names matching IMAGE_EXTENSIONS (multi-picture camera JPEGs open as "MPO" through the JPEG
# plugin). Restricting Image.open to these keeps exotic plugins (EPS runs Ghostscript) away from user files.
_DECODERS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")

_MASK_SUFFIX = "_mask"

# Folder names that say nothing about the defect; the defect type is then taken from the parent folder
# (Magnetic Tile keeps its images in `MT_Blowhole/Imgs/`).
GENERIC_FOLDER_NAMES = frozenset({"imgs", "images", "img", "image", "test", "data"})

# The order of the MVTec AD paper's tables (Bergmann et al., CVPR 2019), textures first, then objects;
# results tables list categories in this order.
MVTEC_CATEGORIES = (
    "carpet",
    "grid",
    "leather",
    "tile",
    "wood",
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
)


# --------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageBytes:
    """An image file's bytes, already read (by Ray Data, from `s3://...` and the like), and the name that
    messages and results use for it: its URI. `load_image` treats it exactly like a file with that name."""

    name: str
    data: bytes = field(repr=False)

    def __str__(self) -> str:
        return self.name


def _check_regular_file(path: Path) -> int:
    """Size in bytes of `path`; ImageError if it is missing, a folder, unreadable or not a plain file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as exc:
        raise ImageError(path, f"cannot access file ({exc.strerror or exc})") from None
    except ValueError:  # a NUL byte in the name
        raise ImageError(path, "invalid file name") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(path, "is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device would block or stream forever when read.
        raise ImageError(path, "not a regular file")
    return info.st_size


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _identify_unsupported(fh: BinaryIO) -> str | None:
    """Pillow's name for a format we do not decode, or None when no plugin recognises the bytes at all."""
    fh.seek(0)
    try:
        with Image.open(fh) as img:
            return img.format
    except Exception:
        # Any failure here only means "unrecognised"; the caller reports that.
        return None


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as exc:
        raise ImageError(path, f"cannot open file ({exc.strerror or exc})") from None


def _open_decoded(path: str | Path, max_pixels: int) -> Image.Image:
    """Decode `path` fully and return an upright copy in its native Pillow mode, detached from the file."""
    path = Path(path)
    if _check_regular_file(path) == 0:
        raise ImageError(path, "empty file (0 bytes)")
    with _open_binary(path) as fh:
        return _decode(fh, path, max_pixels)


def _decode_bytes(source: ImageBytes, max_pixels: int) -> Image.Image:
    """`_open_decoded` for bytes already in memory: the same checks and messages, naming `source.name`."""
    if not source.data:
        raise ImageError(source.name, "empty file (0 bytes)")
    return _decode(io.BytesIO(source.data), source.name, max_pixels)


def _decode(fh: BinaryIO, name: Path | str, max_pixels: int) -> Image.Image:
    """Decode the open file `fh` (messages call it `name`) into an upright, detached Pillow image."""
    with warnings.catch_warnings():
        # Our own max_pixels check below decides what is too big, so Pillow's bomb warning is only noise;
        # so are its UserWarnings about damaged metadata ("Corrupt EXIF data"): the file either decodes
        # (then it is usable) or fails (then the ImageError says so).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            img = Image.open(fh, formats=_DECODERS)
        except Image.DecompressionBombError:
            raise ImageError(name, _pillow_bomb_problem(max_pixels)) from None
        except UnidentifiedImageError:
            fmt = _identify_unsupported(fh)
            if fmt is None:
                raise ImageError(name, "not an image file (unrecognised format)") from None
            supported = ", ".join(_DECODERS)
            raise ImageError(name, f"unsupported image format {fmt} (supported: {supported})") from None
        except Exception as exc:
            # Pillow's plugins raise a wide, version-dependent mix (SyntaxError, struct.error,
            # ValueError, IndexError, ...) on malformed headers; all of them mean "cannot read".
            raise ImageError(name, f"corrupt image header: {_short(exc)}") from None
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    name,
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} pixels (raise it with --max-pixels)",
                )
            try:
                img.load()
            except Image.DecompressionBombError:
                raise ImageError(name, _pillow_bomb_problem(max_pixels)) from None
            except Exception as exc:
                raise ImageError(name, f"corrupt or truncated image data: {_short(exc)}") from None
            return _upright(img)


def _upright(img: Image.Image) -> Image.Image:
    """A copy of a loaded image with its EXIF orientation applied."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # Broken EXIF is common in camera files and says nothing about the pixels, which decoded fine:
        # keep the image as stored rather than reject it.
        return img.copy()


def _pillow_bomb_problem(max_pixels: int) -> str:
    ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if max_pixels < ceiling:
        # Pillow only refuses images above its ceiling, so this one is over our (lower) limit too.
        return f"image is over the limit of {max_pixels:,} pixels (raise it with --max-pixels)"
    return f"image is over Pillow's decompression-bomb ceiling of {ceiling:,} pixels"


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded: the exact linear map, so full white stays full white."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Finite min..max -> 0..255; non-finite values and constant images give 0."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if not finite.any():
        return out
    low, high = values[finite].min(), values[finite].max()
    if high > low:
        out[finite] = np.rint((values[finite] - low) * (255.0 / (high - low))).astype(np.uint8)
    return out


def _high_depth_to_gray8(img: Image.Image) -> np.ndarray:
    """Modes I;16*, I and F -> H x W uint8, as the module docstring describes."""
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        return _scale_16bit(values)
    if img.mode == "I":
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _scale_16bit(values)
        return _stretch(values)
    finite = np.isfinite(values)
    if finite.all() and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return _stretch(values)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def _to_rgb8(img: Image.Image, path: Path | str) -> Image.Image:
    """Any decoded image -> 8-bit RGB of the same size."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_gray8(img), mode="L").convert("RGB")
    try:
        if _has_alpha(img):
            rgba = img.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(black, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(path, f"unsupported colour mode {img.mode} ({_short(exc)})") from None


def load_image(path: str | Path | ImageBytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read one image file as an upright 8-bit RGB PIL image (W x H x 3 once converted to an array).

    `max_pixels` caps width x height, checked before decoding (see the module docstring). Raises
    `ImageError(path, problem)` for anything that cannot be read; no other exception escapes for any file
    content. The file is closed before returning. `ImageBytes` are decoded with the same checks and the
    same messages, naming their URI.
    """
    if isinstance(path, ImageBytes):
        return _to_rgb8(_decode_bytes(path, max_pixels), path.name)
    path = Path(path)
    return _to_rgb8(_open_decoded(path, max_pixels), path)


def load_mask(
    path: str | Path, size: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a ground-truth mask: file -> H x W bool array, True where the pixel is defective.

    Any non-zero pixel value counts as defective, in any mode: grey, RGB (any channel), 16-bit (raw value,
    so a 16-bit mask holding 1 still counts), palette (by the colour shown). Pixels with alpha are
    composited on black first, so fully transparent pixels are good. `size` is the (W, H) of the image the
    mask belongs to; a mask of another size is an `ImageError` naming both sizes.
    """
    path = Path(path)
    img = _open_decoded(path, max_pixels)
    if size is not None and tuple(img.size) != tuple(size):
        raise ImageError(
            path, f"mask is {img.width}x{img.height} but its image is {size[0]}x{size[1]} (W x H)"
        )
    if img.mode == "F":
        values = np.asarray(img)
        return np.isfinite(values) & (values != 0)
    if img.mode.startswith("I;16") or img.mode in ("I", "1", "L"):
        return np.asarray(img) != 0
    return np.asarray(_to_rgb8(img, path)).any(axis=2)


# --------------------------------------------------------------------------------------- listing files


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_mask_file(path: Path, siblings: set[str]) -> bool:
    """Whether `path` looks like a mask rather than an image, given the file names in its folder.

    Two layouts are recognised: `<stem>_mask.<ext>` (MVTec AD), and a `.png` sharing its stem with a
    non-PNG image in the same folder (Magnetic Tile keeps `x.jpg` and its mask `x.png` side by side).
    """
    return _is_mask_name(path.name, _non_png_image_stems(siblings))


def _non_png_image_stems(names: set[str]) -> set[str]:
    stems = set()
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and ext.lower() != ".png":
            stems.add(stem)
    return stems


def _is_mask_name(name: str, non_png_stems: set[str]) -> bool:
    stem, ext = os.path.splitext(name)
    return stem.lower().endswith(_MASK_SUFFIX) or (ext.lower() == ".png" and stem in non_png_stems)


def _looked_for() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _scan(folder: Path) -> list[os.DirEntry]:
    """Entries of one folder, sorted by name; InputError if it cannot be read."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda entry: entry.name)
    except PermissionError:
        raise InputError(f"{folder}: cannot read folder (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{folder}: cannot read folder ({exc.strerror or exc})") from None


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)  # follows symlinks: the identity of the folder actually reached
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _walk(folder: Path, visited: set[tuple[int, int]]) -> Iterator[Path]:
    """Image files under `folder`, depth first in name order; symlinks followed, each real folder once."""
    key = _dir_key(folder)
    if key is not None:
        if key in visited:
            return  # a symlink loop, or a folder reached twice through links
        visited.add(key)
    entries = _scan(folder)
    non_png_stems = _non_png_image_stems({entry.name for entry in entries})
    for entry in entries:
        if entry.name.startswith("."):
            continue
        kind = _entry_kind(entry)
        if kind == "dir":
            yield from _walk(folder / entry.name, visited)
        elif kind == "file" and _is_image_name(entry.name) and not _is_mask_name(entry.name, non_png_stems):
            yield folder / entry.name


def _entry_kind(entry: os.DirEntry) -> str | None:
    """ "dir" or "file" after following symlinks; None for broken or looping links and special files."""
    try:
        if entry.is_dir():
            return "dir"
        return "file" if entry.is_file() else None
    except OSError:  # a link chain that loops on itself (ELOOP)
        return None


def image_files(names: Sequence[str]) -> list[str]:
    """The images a folder walk (`list_images`) keeps from a recursive listing of the folder's files,
    in the walk's order. `names` are '/'-separated paths relative to the folder, as an object store lists
    them. Hidden files and folders, other extensions and mask files (`is_mask_file`) are left out."""
    siblings: dict[str, set[str]] = {}
    for name in names:
        folder, _, base = name.rpartition("/")
        siblings.setdefault(folder, set()).add(base)
    stems = {folder: _non_png_image_stems(files) for folder, files in siblings.items()}
    kept = []
    for name in names:
        parts = name.split("/")
        folder, base = "/".join(parts[:-1]), parts[-1]
        if any(part.startswith(".") for part in parts) or not _is_image_name(base):
            continue
        if not _is_mask_name(base, stems[folder]):
            kept.append(name)
    return sorted(set(kept), key=lambda name: name.split("/"))


def _glob_images(pattern: str) -> Iterator[Path]:
    """Images matched by a glob pattern (`**` recurses); matched folders are walked like named ones."""
    sibling_names: dict[Path, set[str]] = {}
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            yield from _walk(path, set())
            continue
        if not path.is_file() or not _is_image_name(path.name):
            continue
        if path.parent not in sibling_names:
            sibling_names[path.parent] = {entry.name for entry in _scan(path.parent)}
        if not is_mask_file(path, sibling_names[path.parent]):
            yield path


def _has_glob_magic(text: str) -> bool:
    return any(char in text for char in "*?[")


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders and glob patterns into a list of image files.

    - A file is taken as given, whatever its name (so a mask or a `.gif` named explicitly is kept and
      `load_image` judges it).
    - A folder is walked recursively in name order, following symlinks but visiting each real folder once
      (symlink loops end). Hidden files and folders (name starts with '.') are skipped, only files with an
      extension in IMAGE_EXTENSIONS (any case) count, and mask files (see `is_mask_file`) are left out.
    - A pattern (`imgs/*.png`, `data/**/*.jpg`) is expanded with `glob`; its matches are filtered like a
      folder's files, and matched folders are walked.

    The result keeps the order of `inputs`, with each real file once (the first path that reached it).
    Raises InputError (one line naming the path) for a missing path, a pattern matching nothing, an
    unreadable folder, a folder or pattern without images, or an empty `inputs`; so the result is never
    empty.
    """
    if not inputs:
        raise InputError("no input images given")
    seen: set[str] = set()
    result: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(item)
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError as exc:  # e.g. a name longer than the filesystem allows
            raise InputError(f"{path}: cannot access ({exc.strerror or exc})") from None
        if is_file:
            found = [path]
        elif is_dir:
            found = list(_walk(path, set()))
            if not found:
                raise InputError(f"{path}: no images found in folder (looked for {_looked_for()})")
        elif _has_glob_magic(text):
            if not glob.glob(text, recursive=True):
                raise InputError(f"{text}: pattern matched no files")
            found = list(_glob_images(text))
            if not found:
                raise InputError(f"{text}: pattern matched no images (looked for {_looked_for()})")
        elif os.path.lexists(path):
            raise InputError(f"{path}: not a file or folder (broken link or special file)")
        else:
            raise InputError(f"{path}: no such file or folder")
        for image in found:
            real = os.path.realpath(image)
            if real not in seen:
                seen.add(real)
                result.append(image)
    return result


# ------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Sample:
    """One test image: label 0 good / 1 defective, its defect type ("good" for good), its mask if any."""

    path: Path
    label: int
    defect_type: str
    mask: Path | None = None


@dataclass(frozen=True)
class Split:
    """A dataset ready to use: training images (all good) and labelled test samples."""

    name: str
    train: list[Path]
    test: list[Sample]


def find_mask(image: Path, mask_dirs: Sequence[Path]) -> Path | None:
    """The mask of `image`, or None: in each of `mask_dirs` in order, `<stem>_mask.<ext>` then `<stem>.<ext>`.

    `<ext>` is any image extension (`.png` first, any case). Include the image's own folder in `mask_dirs`
    to find masks stored beside images; the image itself is never returned.
    """
    stem = image.stem
    extensions = [".png", *sorted(IMAGE_EXTENSIONS - {".png"})]
    for folder in mask_dirs:
        for base in (stem + _MASK_SUFFIX, stem):
            for ext in extensions:
                for name in dict.fromkeys((base + ext, base + ext.upper())):
                    candidate = Path(folder) / name
                    if candidate.is_file() and not _same_file(candidate, image):
                        return candidate
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _require_mask(image: Path, mask_dirs: Sequence[Path], require_masks: bool) -> Path | None:
    mask = find_mask(image, mask_dirs)
    if mask is None and require_masks:
        where = ", ".join(str(folder) for folder in mask_dirs)
        raise InputError(
            f"{image}: no mask found (looked for {image.stem}_mask.<ext> or {image.stem}.<ext> in {where})"
        )
    return mask


def mvtec_category(root: Path, category: str, require_masks: bool = True) -> Split:
    """One MVTec AD category: `root/category/{train/good, test/<type>, ground_truth/<type>/NNN_mask.png}`.

    Train is `train/good`; test is `test/good` (label 0) then each other `test/<defect>` folder in name
    order (label 1, mask from `ground_truth/<defect>/`). A defect image without a mask is an InputError
    unless `require_masks` is False (its mask is then None).
    """
    folder = Path(root) / category
    train_dir, test_dir, truth_dir = folder / "train" / "good", folder / "test", folder / "ground_truth"
    for needed in (train_dir, test_dir):
        if not needed.is_dir():
            raise InputError(f"{needed}: folder not found (expected the MVTec AD layout under {folder})")
    train = list_images([train_dir])
    test: list[Sample] = []
    type_dirs = sorted(
        (entry for entry in _scan(test_dir) if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: (entry.name != "good", entry.name),
    )
    for entry in type_dirs:
        images = list_images([test_dir / entry.name])
        if entry.name == "good":
            test.extend(Sample(image, 0, "good") for image in images)
            continue
        mask_dirs = [truth_dir / entry.name]
        test.extend(
            Sample(image, 1, entry.name, _require_mask(image, mask_dirs, require_masks)) for image in images
        )
    if not test:
        raise InputError(f"{test_dir}: no test images (expected folders such as test/good, test/<defect>)")
    return Split(category, train, test)


def mvtec_available(root: Path) -> tuple[list[str], list[str]]:
    """(present, missing) MVTec AD categories under `root`, each in MVTEC_CATEGORIES order.

    A category is present when `root/<category>/train/good` and `root/<category>/test` are folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: MVTec AD root folder not found")
    present, missing = [], []
    for category in MVTEC_CATEGORIES:
        (present if mvtec_layout(root / category) else missing).append(category)
    return present, missing


def mvtec_layout(folder: Path) -> bool:
    """Whether `folder` is a category in the MVTec AD layout: `train/good` and `test` folders."""
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def seeded_split(paths: Sequence[Path], train_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split good images into (train, test) reproducibly.

    The paths are sorted (so the split depends on the set, not the order given), permuted with
    `numpy.random.default_rng(seed)`, and the first round(N * train_fraction) go to train, clamped so both
    parts keep at least one image. Each part is returned in sorted order.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train fraction must be between 0 and 1 (exclusive), got {train_fraction}")
    ordered = sorted((Path(p) for p in paths), key=str)
    if len(ordered) < 2:
        raise InputError(f"need at least 2 good images to split into train and test, found {len(ordered)}")
    n_train = min(max(math.floor(len(ordered) * train_fraction + 0.5), 1), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    train_idx, test_idx = sorted(order[:n_train]), sorted(order[n_train:])
    return [ordered[i] for i in train_idx], [ordered[i] for i in test_idx]


def defect_type_name(folder: Path) -> str:
    """The defect type a folder of defective images stands for: its name, or its parent's when the name is
    generic (one of GENERIC_FOLDER_NAMES, any case), so `MT_Blowhole/Imgs` -> "MT_Blowhole"."""
    folder = Path(os.path.abspath(folder))
    if folder.name.lower() in GENERIC_FOLDER_NAMES and folder.parent.name:
        return folder.parent.name
    return folder.name


def _real_paths(paths: Sequence[Path]) -> set[str]:
    return {os.path.realpath(path) for path in paths}


def _generic_mask(
    image: Path, mask_dirs: Sequence[Path], defect_type: str, require_masks: bool
) -> Path | None:
    """A defect image's mask in the generic layout: in `mask_dirs`, then beside the image.

    Mask folders named like the defect type come first: with `--masks gt/crack --masks gt/hole`, the crack
    image `000.png` must get `gt/crack/000_mask.png`, not the hole's mask of the same name."""
    same_type_first = sorted(mask_dirs, key=lambda folder: Path(folder).name != defect_type)
    return _require_mask(image, [*same_type_first, image.parent], require_masks)


def folder_split(
    good: Sequence[Path],
    defect: Sequence[Path],
    train: Sequence[Path] | None = None,
    masks: Sequence[Path] = (),
    require_masks: bool = True,
    train_fraction: float = 0.5,
    seed: int = 42,
    name: str = "folder",
) -> Split:
    """A split from plain folders (files and patterns work too, as in `list_images`).

    - `good`: defect-free images. With `train` given they are all test-good; without it they are divided
      by `seeded_split(good, train_fraction, seed)` into train and test-good.
    - `defect`: defective images; the defect type is `defect_type_name` of the folder given (for a file or
      pattern, of each image's own folder).
    - Masks are looked up with `find_mask` in `masks`, then in the defect image's own folder. A defect image
      without one is an InputError unless `require_masks` is False.

    Test order: good images first, then defect images in the order of `defect`. An image listed both as
    training and test data, or as good and defective, is an InputError.
    """
    good_images = list_images(good)
    if train is None:
        train_images, test_good = seeded_split(good_images, train_fraction, seed)
    else:
        train_images, test_good = list_images(train), good_images
        if overlap := _real_paths(train_images) & _real_paths(test_good):
            raise InputError(
                f"{len(overlap)} images are both training and good test images, e.g. {sorted(overlap)[0]}"
            )
    test = [Sample(image, 0, "good") for image in test_good]
    mask_dirs = [Path(folder) for folder in masks]
    seen: set[str] = set()
    for item in defect:
        given_folder = Path(item).is_dir()
        for image in list_images([item]):
            if (real := os.path.realpath(image)) in seen:
                continue
            seen.add(real)
            defect_type = defect_type_name(Path(item) if given_folder else image.parent)
            mask = _generic_mask(image, mask_dirs, defect_type, require_masks)
            test.append(Sample(image, 1, defect_type, mask))
    defect_real = _real_paths([sample.path for sample in test if sample.label == 1])
    if overlap := defect_real & _real_paths([*good_images, *train_images]):
        raise InputError(f"{len(overlap)} images are both good and defective, e.g. {sorted(overlap)[0]}")
    return Split(name, train_images, test)


def test_split(
    good: Sequence[Path], defect: Sequence[Path], masks: Sequence[Path] = (), require_masks: bool = True
) -> Split:
    """A test-only split for `evaluate`: every `good` image is a good test image (nothing is held back for
    training), defect images and masks are found as in `folder_split`."""
    test = [Sample(image, 0, "good") for image in list_images(good)]
    mask_dirs = [Path(folder) for folder in masks]
    for item in defect:
        given_folder = Path(item).is_dir()
        for image in list_images([item]):
            defect_type = defect_type_name(Path(item) if given_folder else image.parent)
            test.append(
                Sample(image, 1, defect_type, _generic_mask(image, mask_dirs, defect_type, require_masks))
            )
    overlap = _real_paths([s.path for s in test if s.label == 0]) & _real_paths(
        [s.path for s in test if s.label == 1]
    )
    if overlap:
        raise InputError(f"{len(overlap)} images are both good and defective, e.g. {sorted(overlap)[0]}")
    return Split("folder", [], test)
