"""Seeded procedural generator of a small industrial-inspection dataset in the MVTec AD layout.

It is the embedded default data of `patchcore demo` and the source of the test suite's fixtures, so the
product can be tried and tested without downloading anything. Three categories:

- `fabric`: a plain-weave textile (texture category). Defects: scratch, hole, stain, thread.
- `washer`: a metal washer on a plain background (object category). Defects: missing_piece, scratch,
  color_shift, hole.
- `ridged`: a threaded shank with fine periodic ridges (fine-defect category). Defects: hairline, chip, dent.

Good images vary in illumination gain and gradient, colour balance, sensor noise, position, rotation and
pattern phase, so that no global statistic (mean intensity, maximum deviation from the median image) tells
good from defective; the defects are local and must be found by looking at local structure.

Masks are exact: a mask pixel is 255 exactly where the defective image differs from the good image it was
made from, and 0 everywhere else (no dilation). Inside a defect's region, a pixel that the defect would
leave unchanged after rounding is moved by one grey level, so every mask is a solid region rather than a
speckle.

Only numpy and Pillow are used, so importing this module is cheap.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from patchcore_cli.errors import ConfigError, OutputError

CATEGORIES: tuple[str, ...] = ("fabric", "washer", "ridged")

DEFECT_TYPES: Mapping[str, tuple[str, ...]] = {
    "fabric": ("scratch", "hole", "stain", "thread"),
    "washer": ("missing_piece", "scratch", "color_shift", "hole"),
    "ridged": ("hairline", "chip", "dent"),
}

MIN_IMAGE_SIZE = 32

# Luminance weights of ITU-R BT.601, the ones Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSpec:
    """How many images of which size to generate per category."""

    image_size: int = 256
    n_train: int = 40
    n_test_good: int = 10
    n_test_defect_per_type: int = 6

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"synthetic image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}"
            )
        for name in ("n_train", "n_test_good", "n_test_defect_per_type"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthetic {name} must be at least 1, got {getattr(self, name)}")


def generate_dataset(
    root: Path,
    categories: Sequence[str] = CATEGORIES,
    spec: SyntheticSpec = SyntheticSpec(),
    seed: int = 0,
) -> Path:
    """Write `root/<category>/{train,test,ground_truth}/...` PNGs and `root/README.txt`; return `root`.

    Each image has its own random stream derived from (seed, category, split, index), so the same seed gives
    byte-identical files whatever other categories are generated alongside. Refuses to write into a category
    folder that already holds files, so a stale image from another spec can never end up in a dataset.
    """
    root = Path(root)
    categories = tuple(dict.fromkeys(categories))
    for category in categories:
        _check_category(category)
    if seed < 0:
        raise ConfigError(f"synthetic seed must be a non-negative integer, got {seed}")
    for category in categories:
        folder = root / category
        if folder.is_dir() and any(folder.iterdir()):
            raise OutputError(f"{folder}: already exists and is not empty; choose an empty folder")

    size = spec.image_size
    target = root
    try:
        for category in categories:
            folder = root / category
            for split, subdir, count in (
                ("train", folder / "train" / "good", spec.n_train),
                ("test_good", folder / "test" / "good", spec.n_test_good),
            ):
                subdir.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    target = subdir / f"{i:03d}.png"
                    _save(generate_image(category, _image_rng(seed, category, split, i), size), target)
            for defect_type in DEFECT_TYPES[category]:
                image_dir = folder / "test" / defect_type
                mask_dir = folder / "ground_truth" / defect_type
                image_dir.mkdir(parents=True, exist_ok=True)
                mask_dir.mkdir(parents=True, exist_ok=True)
                for i in range(spec.n_test_defect_per_type):
                    rng = _image_rng(seed, category, defect_type, i)
                    image, mask = add_defect(generate_image(category, rng, size), defect_type, rng)
                    target = image_dir / f"{i:03d}.png"
                    _save(image, target)
                    target = mask_dir / f"{i:03d}_mask.png"
                    _save(mask.astype(np.uint8) * 255, target)
        target = root / "README.txt"
        target.write_text(_readme(categories, spec, seed), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    return root


def generate_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one good image of `category`: -> size x size x 3 uint8."""
    _check_category(category)
    if size < MIN_IMAGE_SIZE:
        raise ConfigError(f"synthetic image size must be at least {MIN_IMAGE_SIZE}, got {size}")
    return _RENDERERS[category](rng, size)


def add_defect(
    image: np.ndarray, defect_type: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Put one defect into a copy of a good image: H x W x 3 uint8 -> (H x W x 3 uint8, H x W bool mask).

    The input is not modified. The mask is True exactly on the pixels whose value changed. Defects that
    belong on the part (scratch, hole, missing_piece, ...) find it by fitting the plain background seen at
    the image border; on a texture the whole image is the part.
    """
    if defect_type not in _DEFECTS:
        known = ", ".join(sorted(_DEFECTS))
        raise ConfigError(f"unknown synthetic defect type {defect_type!r}; known: {known}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an H x W x 3 uint8 image, got shape {image.shape} and dtype {image.dtype}"
        )
    scene = _Scene.of(image)
    drawn, region = _DEFECTS[defect_type](image.astype(np.float32), rng, scene)
    out = np.clip(np.rint(drawn), 0, 255).astype(np.uint8)
    # Defect painters work on float images; pinning every pixel outside the region keeps the mask exact.
    out[~region] = image[~region]
    untouched = region & ~(out != image).any(axis=2)
    before = image[untouched]
    out[untouched] = np.where(before < 128, before + 1, before - 1)
    return out, region


# ---------------------------------------------------------------- good images


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain weave: warp and weft threads alternate over/under in a checkerboard of cells."""
    yy, xx = _grid(size, size)
    period = max(4.0, size / 32) * rng.uniform(0.97, 1.03)
    angle = math.radians(rng.uniform(-4.0, 4.0))
    u = math.cos(angle) * xx + math.sin(angle) * yy + rng.uniform(0, 2 * period)
    v = -math.sin(angle) * xx + math.cos(angle) * yy + rng.uniform(0, 2 * period)
    # Real threads wander; without this the weave is a perfect lattice that a model memorises trivially.
    u = (u + 0.2 * period * _smooth_noise(rng, (size, size), 6)) / period
    v = (v + 0.2 * period * _smooth_noise(rng, (size, size), 6)) / period
    fu, fv = u - np.floor(u), v - np.floor(v)
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    across_u, across_v = np.sin(math.pi * fu), np.sin(math.pi * fv)
    weave = np.where(warp_on_top, across_u * (0.6 + 0.4 * across_v), across_v * (0.6 + 0.4 * across_u)) ** 0.7
    fibres = 0.06 * rng.standard_normal((size, size), dtype=np.float32)
    mottle = 0.04 * _smooth_noise(rng, (size, size), 4)
    shade = 0.35 + 0.65 * weave + fibres + mottle
    linen = np.array([156.0, 146.0, 128.0], dtype=np.float32)
    return _camera(rng, shade[..., None] * linen, slope=0.2)


def _washer(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed metal washer with a laser-etched mark, on a matte background."""
    yy, xx = _grid(size, size)
    cy = size / 2 + rng.uniform(-0.03, 0.03) * size
    cx = size / 2 + rng.uniform(-0.03, 0.03) * size
    outer = 0.36 * size * rng.uniform(0.98, 1.02)
    inner = outer * rng.uniform(0.45, 0.49)
    rotation = rng.uniform(-math.pi, math.pi)
    dy, dx = yy - cy, xx - cx
    radius = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    # Anti-aliased annulus: partial coverage on the one-pixel rim, as a camera would record it.
    cover = np.clip(outer - radius + 0.5, 0, 1) * np.clip(radius - inner + 0.5, 0, 1)

    across = np.clip((radius - inner) / (outer - inner), 0, 1)
    light = rng.uniform(-math.pi, math.pi)
    # Chamfered edges catch less light than the flat face; a side light brightens one half of the ring.
    chamfer = np.sqrt(np.clip(np.sin(math.pi * across), 0, 1))
    metal = (0.78 + 0.22 * chamfer) * (1 + 0.12 * np.cos(theta - light))
    # Circular brushing: fine concentric streaks, a function of radius, modulated slowly along the ring.
    streaks = np.interp(radius * 1.5, np.arange(2 * size), rng.standard_normal(2 * size)).astype(np.float32)
    metal += 0.03 * streaks * (1 + 0.5 * np.cos(theta * 3 + rotation)) + 0.02 * _smooth_noise(
        rng, (size, size), 8
    )
    # The mark's angle follows the part's rotation; it breaks the ring's symmetry like a real part number.
    offset = (theta - rotation + math.pi) % (2 * math.pi) - math.pi
    mark_band = np.abs(across - 0.5) < 0.12
    dashes = (np.abs(offset) < 0.45) & (np.sin(offset * 60) > 0.2) & mark_band
    metal = np.where(dashes, metal * 0.72, metal)
    ring = metal[..., None] * np.array([168.0, 168.0, 174.0], dtype=np.float32)

    background = _plain_background(rng, size, np.array([72.0, 76.0, 82.0], dtype=np.float32))
    shadow = 1 - 0.25 * _shift_blur(cover, size / 80)
    return _camera(rng, background * shadow[..., None] * (1 - cover[..., None]) + ring * cover[..., None])


def _ridged(rng: np.random.Generator, size: int) -> np.ndarray:
    """A threaded shank across the image: cylinder shading times a slanted sawtooth of thread flanks."""
    yy, xx = _grid(size, size)
    tilt = math.radians(rng.uniform(-2.0, 2.0))
    centre = size / 2 + rng.uniform(-0.04, 0.04) * size
    half = 0.26 * size * rng.uniform(0.97, 1.03)
    period = max(4.0, size / 18) * rng.uniform(0.98, 1.02)
    along = math.cos(tilt) * xx + math.sin(tilt) * yy
    across = -math.sin(tilt) * xx + math.cos(tilt) * yy - centre
    # The helix makes the thread crests slant across the shank; the phase stands for the screw's rotation.
    phase = (along + across * math.tan(math.radians(6.0))) / period + rng.uniform(0, 1)
    f = phase - np.floor(phase)
    # Sawtooth: a long lit flank rising to a sharp crest, then a short steep flank in shadow.
    crest = 0.65
    flank = np.where(f < crest, 0.55 + 0.45 * f / crest, 1.0 - 0.7 * (f - crest) / (1 - crest))
    height = np.where(f < crest, f / crest, (1 - f) / (1 - crest))
    # Thread profile shows at the silhouette: the outline is serrated, not straight.
    edge = half - 0.04 * size * (1 - height)
    cover = np.clip(edge - np.abs(across) + 0.5, 0, 1)
    rel = np.clip(across / half, -1, 1)
    highlight = rng.uniform(-0.45, -0.15)
    cylinder = 0.55 + 0.45 * np.sqrt(1 - rel**2) + 0.25 * np.exp(-(((rel - highlight) / 0.15) ** 2))
    metal = cylinder * flank + 0.03 * _smooth_noise(rng, (size, size), 10)
    part = metal[..., None] * np.array([150.0, 156.0, 166.0], dtype=np.float32)
    background = _plain_background(rng, size, np.array([44.0, 46.0, 50.0], dtype=np.float32))
    return _camera(rng, background * (1 - cover[..., None]) + part * cover[..., None])


_RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "fabric": _fabric,
    "washer": _washer,
    "ridged": _ridged,
}


# ---------------------------------------------------------------- defects


@dataclass(frozen=True)
class _Scene:
    """What the defect painters need to know about a good image they were not told the category of."""

    plain: bool  # a part on a plain background (True) or a texture filling the frame (False)
    background: np.ndarray  # H x W x 3 float32 plane fitted to the border: what a hole through the part shows
    noise: float  # standard deviation of the background around that plane, in grey levels
    part: np.ndarray  # H x W bool: where the part is

    @classmethod
    def of(cls, image: np.ndarray) -> _Scene:
        h, w, _ = image.shape
        frame = np.zeros((h, w), dtype=bool)
        frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = True, True, True, True
        ys, xs = np.nonzero(frame)
        colours = image[frame].astype(np.float32)
        luma = colours @ _LUMA
        # Robust to the part touching the border (the ridged shank does, left and right).
        median = np.median(luma)
        spread = max(4.0, 3 * 1.4826 * float(np.median(np.abs(luma - median))))
        keep = np.abs(luma - median) < spread
        design = np.stack([np.ones(keep.sum()), xs[keep] / w, ys[keep] / h], axis=1)
        coef, *_ = np.linalg.lstsq(design, colours[keep], rcond=None)
        residual = (colours[keep] - design @ coef) @ _LUMA
        noise = float(residual.std())
        yy, xx = _grid(h, w)
        plane = coef[0] + (xx / w)[..., None] * coef[1] + (yy / h)[..., None] * coef[2]
        background = plane.astype(np.float32)
        # A texture leaves a large residual at the border; a plain background only sensor noise.
        plain = noise < 8.0 and keep.mean() > 0.6
        if not plain:
            return cls(False, background, noise, np.ones((h, w), dtype=bool))
        difference = np.abs((image.astype(np.float32) - background) @ _LUMA)
        raw = difference > max(18.0, 6 * noise)
        # Opening drops noise specks; closing bridges the shadowed thread flanks, as dark as the background.
        part = _dilate(_erode(raw, 1), 1)
        gap = max(1, round(min(h, w) / 64))
        part = _erode(_dilate(part, gap), gap)
        return cls(True, background, noise, part)

    def inside(self, margin: float) -> np.ndarray:
        """Part pixels at least `margin` px from its outline and from the image border; H x W bool."""
        return _erode(self.part, max(0, round(margin)))


Painter = Callable[[np.ndarray, np.random.Generator, _Scene], tuple[np.ndarray, np.ndarray]]


def _scratch(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """One or two thin curved strokes, 2-4 px wide at 256 px, brighter or darker than the surface."""
    size = min(image.shape[:2])
    width = max(1, round(rng.uniform(2, 4) * size / 256))
    region = np.zeros(image.shape[:2], dtype=bool)
    cy, cx = _pick(rng, scene.inside(0.06 * size))
    for _ in range(rng.integers(1, 3)):
        length = rng.uniform(0.2, 0.4) * size
        angle, bend = rng.uniform(0, math.pi), rng.uniform(-0.6, 0.6)
        region |= _stroke(image.shape[:2], (cy, cx), length, angle, bend, width)
    region &= scene.part
    sign = _sign(rng)
    strength = rng.uniform(28, 45) * (0.75 + 0.25 * _smooth_noise(rng, image.shape[:2], 6))
    return image + (sign * strength * region)[..., None], region


def _hole(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Through a part: a round drilled hole showing the background. In a texture: a frayed dark gap."""
    h, w, _ = image.shape
    size = min(h, w)
    if scene.plain:
        radius = max(1.5, rng.uniform(0.025, 0.04) * size)
        cy, cx = _pick(rng, scene.inside(radius + 2))
        region = _blob(rng, (h, w), cy, cx, radius, 0.03)
        fill = scene.background * 0.85 + scene.noise * rng.standard_normal((h, w, 1), dtype=np.float32)
        return np.where(region[..., None], fill, image), region
    radius = max(1.5, rng.uniform(0.03, 0.055) * size)
    cy, cx = _pick(rng, scene.inside(radius + 2))
    reach = _blob_reach(rng, (h, w), cy, cx, radius, 0.25, harmonics=9)
    region = reach > 0
    # Broken fibres still cross the gap, so the weave shows faintly; loose ends soften the rim over ~1.5 px.
    alpha = np.clip(reach / 1.5 + 0.3, 0, 1)[..., None]
    remaining = rng.uniform(0.2, 0.4)
    return image * (1 - alpha * (1 - remaining)), region


def _stain(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged blob where the colour shifts modestly towards brown or yellow."""
    h, w, _ = image.shape
    radius = rng.uniform(0.06, 0.11) * min(h, w)
    cy, cx = _pick(rng, scene.inside(radius * 0.5))
    reach = _blob_reach(rng, (h, w), cy, cx, radius, 0.2)
    region = (reach > 0) & scene.part
    strength = rng.uniform(0.4, 0.6)
    alpha = strength * np.clip(reach / (0.4 * radius), 0, 1)
    tints = np.array([[0.82, 0.74, 0.58], [1.04, 0.98, 0.72], [0.78, 0.8, 0.86]], dtype=np.float32)
    tint = tints[rng.integers(len(tints))]
    return image * (1 + alpha[..., None] * (tint - 1)), region


def _thread(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A pulled thread: a narrow band along the weave whose pattern slides out of phase; colours unchanged."""
    h, w, _ = image.shape
    size = min(h, w)
    half_length = rng.uniform(0.12, 0.22) * size
    half_width = max(1.5, rng.uniform(0.015, 0.03) * size)
    cy, cx = _pick(rng, scene.inside(half_length * 0.6))
    # The weave is near axis-aligned, and so are its threads.
    angle = (math.pi / 2 if rng.random() < 0.5 else 0.0) + math.radians(rng.uniform(-5, 5))
    yy, xx = _grid(h, w)
    s = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    t = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    weight = np.clip((half_length - np.abs(s)) / (0.3 * half_length), 0, 1) * np.clip(
        (half_width - np.abs(t)) / (0.5 * half_width), 0, 1
    )
    shift = _sign(rng) * rng.uniform(0.5, 0.8) * max(4.0, size / 32) * weight
    region = np.abs(shift) >= 0.15
    return _resample(image, region, shift * math.sin(angle), shift * math.cos(angle)), region


def _missing_piece(
    image: np.ndarray, rng: np.random.Generator, scene: _Scene
) -> tuple[np.ndarray, np.ndarray]:
    """A notch broken out of the part's outline; the background shows through."""
    h, w, _ = image.shape
    size = min(h, w)
    outline = scene.part & ~_erode(scene.part, 1) & _erode(np.ones((h, w), dtype=bool), 2)
    cy, cx = _pick(rng, outline)
    radius = max(2.0, rng.uniform(0.04, 0.07) * size)
    # Dilating the part by one pixel takes the anti-aliased rim with the notch, leaving no ghost outline.
    region = _blob(rng, (h, w), cy, cx, radius, 0.15) & _dilate(scene.part, 1)
    if scene.plain:
        fill = scene.background + scene.noise * rng.standard_normal((h, w, 1), dtype=np.float32)
    else:
        fill = rng.uniform(15, 45) + 3 * rng.standard_normal((h, w, 1), dtype=np.float32)
    return np.where(region[..., None], fill, image), region


def _color_shift(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A discoloured patch (heat tint, residue): hue changes a little, luminance stays the same."""
    h, w, _ = image.shape
    radius = rng.uniform(0.07, 0.11) * min(h, w)
    cy, cx = _pick(rng, scene.inside(radius * 0.4))
    reach = _blob_reach(rng, (h, w), cy, cx, radius, 0.15)
    region = (reach > 0) & scene.part
    alpha = rng.uniform(0.7, 1.0) * np.clip(reach / (0.3 * radius), 0, 1)
    tints = np.array([[1.08, 0.99, 0.9], [0.92, 0.99, 1.09], [1.06, 0.94, 1.04]], dtype=np.float32)
    tint = tints[rng.integers(len(tints))]
    tint = tint / float(tint @ _LUMA)
    return image * (1 + alpha[..., None] * (tint - 1)), region


def _hairline(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A faint hairline scratch: 1-2 px wide, a few dozen px long at 256 px, low contrast, mostly bright."""
    size = min(image.shape[:2])
    width = 1 if size < 192 else int(rng.integers(1, 3))
    length = max(8.0, rng.uniform(24, 60) * size / 256)
    cy, cx = _pick(rng, scene.inside(0.04 * size))
    angle, bend = rng.uniform(0, math.pi), rng.uniform(-0.3, 0.3)
    region = _stroke(image.shape[:2], (cy, cx), length, angle, bend, width)
    region &= scene.part
    sign = -1.0 if rng.random() < 0.25 else 1.0
    return image + sign * rng.uniform(14, 24) * region[..., None], region


def _chip(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A few-pixel chip broken off a ridge crest: a bright fracture face or a dark pit on an edge."""
    h, w, _ = image.shape
    size = min(h, w)
    radius = max(1.5, rng.uniform(1.8, 3.5) * size / 256)
    inside = scene.inside(radius + 3)
    luma = image @ _LUMA
    gy, gx = np.gradient(luma)
    gradient = np.hypot(gy, gx)
    # Ridge edges are where the brightness changes fastest.
    edges = inside & (gradient >= np.percentile(gradient[inside], 90)) if inside.any() else inside
    cy, cx = _pick(rng, edges)
    region = _blob(rng, (h, w), cy, cx, radius, 0.25) & scene.part
    sign = _sign(rng)
    texture = 4 * rng.standard_normal((h, w, 1), dtype=np.float32)
    return image + region[..., None] * (sign * rng.uniform(35, 60) + texture), region


def _dent(image: np.ndarray, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A small dent: the ridges bend around a point and the pressed-in side falls into shade."""
    h, w, _ = image.shape
    size = min(h, w)
    radius = max(3.0, rng.uniform(0.045, 0.07) * size)
    cy, cx = _pick(rng, scene.inside(radius))
    yy, xx = _grid(h, w)
    dy, dx = yy - cy, xx - cx
    rho = np.hypot(dy, dx) / radius
    inside = rho < 1
    bump = np.where(inside, (1 - rho**2) ** 2, 0)
    # Radial displacement rho * (1 - rho^2)^2: zero at the centre and the rim, peaking (0.29) at rho = 0.45,
    # where it moves the ridges by a third of a period or so.
    amount = _sign(rng) * rng.uniform(1.0, 1.6) * max(4.0, size / 18) * bump
    region = inside & scene.part
    warped = _resample(image, region, amount * dy / radius, amount * dx / radius)
    light = rng.uniform(-math.pi, math.pi)
    shade = 1 + rng.uniform(0.06, 0.12) * bump * (dx * math.cos(light) + dy * math.sin(light)) / radius
    return warped * shade[..., None], region


_DEFECTS: dict[str, Painter] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "thread": _thread,
    "missing_piece": _missing_piece,
    "color_shift": _color_shift,
    "hairline": _hairline,
    "chip": _chip,
    "dent": _dent,
}


# ---------------------------------------------------------------- helpers


def _check_category(category: str) -> None:
    if category not in _RENDERERS:
        raise ConfigError(f"unknown synthetic category {category!r}; known: {', '.join(CATEGORIES)}")


def _image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    # crc32 rather than hash(): str hashes are salted per process, and files must be identical across runs.
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def _save(array: np.ndarray, path: Path) -> None:
    # Level 1: noisy images barely compress better at higher levels, and generation time matters for the demo.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _readme(categories: Sequence[str], spec: SyntheticSpec, seed: int) -> str:
    lines = [
        "Synthetic industrial-inspection data in the MVTec AD folder layout.",
        "",
        f"Generated by patchcore's procedural generator (patchcore_cli.synthetic) with seed {seed}.",
        "No image in this folder shows a real object; every pixel was computed.",
        "",
        f"image size: {spec.image_size} x {spec.image_size} px, RGB PNG",
        f"per category: {spec.n_train} train/good, {spec.n_test_good} test/good, "
        f"{spec.n_test_defect_per_type} test images per defect type",
    ]
    lines += [f"{category}: defect types {', '.join(DEFECT_TYPES[category])}" for category in categories]
    lines += [
        "",
        "ground_truth/<defect_type>/NNN_mask.png is an 8-bit greyscale PNG, 255 exactly on the pixels where",
        "test/<defect_type>/NNN.png differs from the good image it was made from, 0 elsewhere (no dilation).",
        "",
    ]
    return "\n".join(lines)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (H x W row coordinates, H x W column coordinates), float32."""
    yy, xx = np.indices((h, w), dtype=np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise with about `cells` blobs across: -> H x W float32, zero mean, unit std."""
    h, w = shape
    coarse = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    field = field - field.mean()
    return field / max(float(field.std()), 1e-6)


def _camera(rng: np.random.Generator, scene: np.ndarray, slope: float = 0.15) -> np.ndarray:
    """Photograph a size x size x 3 float radiance map: -> size x size x 3 uint8.

    Colour balance (+-4 % per channel), exposure gain (+-15 %), a linear illumination gradient of up to
    +-slope/2 across the frame, and sensor noise: the variation that makes global statistics useless.
    """
    size = scene.shape[0]
    yy, xx = _grid(size, size)
    direction = rng.uniform(-math.pi, math.pi)
    ramp = ((xx - size / 2) * math.cos(direction) + (yy - size / 2) * math.sin(direction)) / size
    lighting = rng.uniform(0.85, 1.15) * (1 + rng.uniform(0, slope) * ramp)
    balance = rng.uniform(0.96, 1.04, 3).astype(np.float32)
    image = scene * balance * lighting[..., None] + _sensor_noise(rng, size)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _plain_background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """A matte surface: colour with slow +-4 % mottling -> size x size x 3 float32."""
    mottle = 1 + 0.04 * _smooth_noise(rng, (size, size), 3)
    return mottle[..., None] * colour * rng.uniform(0.9, 1.1)


def _sensor_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey noise common to all channels plus weaker per-channel noise -> size x size x 3 float32."""
    grey = rng.uniform(1.5, 3.5) * rng.standard_normal((size, size, 1), dtype=np.float32)
    return grey + rng.standard_normal((size, size, 3), dtype=np.float32)


def _sign(rng: np.random.Generator) -> float:
    return -1.0 if rng.random() < 0.5 else 1.0


def _shift_blur(cover: np.ndarray, offset: float) -> np.ndarray:
    """A soft drop shadow of a coverage map: shifted down-right by `offset` px and blurred."""
    shifted = Image.fromarray((cover * 255).astype(np.uint8)).transform(
        (cover.shape[1], cover.shape[0]),
        Image.Transform.AFFINE,
        (1, 0, -offset, 0, 1, -offset),
        resample=Image.Resampling.BILINEAR,
    )
    return np.asarray(shifted.filter(ImageFilter.GaussianBlur(2 * offset)), dtype=np.float32) / 255


def _box_count(mask: np.ndarray, r: int, outside: bool) -> np.ndarray:
    """How many True cells each (2r+1)^2 window holds; cells beyond the border count as `outside`."""
    padded = np.pad(mask, r, constant_values=outside).astype(np.int32)
    table = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    table[1:, 1:] = padded.cumsum(0).cumsum(1)
    k = 2 * r + 1
    return table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Square erosion by r px, treating everything beyond the image as outside the mask."""
    return mask.copy() if r <= 0 else _box_count(~mask, r, True) == 0


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return mask.copy() if r <= 0 else _box_count(mask, r, False) > 0


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> tuple[int, int]:
    """A random (row, column) among the True cells; the image centre when there are none."""
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        return candidates.shape[0] // 2, candidates.shape[1] // 2
    row, col = divmod(int(flat[rng.integers(flat.size)]), candidates.shape[1])
    return row, col


def _blob_reach(
    rng: np.random.Generator,
    shape: tuple[int, int],
    cy: float,
    cx: float,
    radius: float,
    roughness: float,
    harmonics: int = 5,
) -> np.ndarray:
    """Irregular star-shaped blob: how far (px) each pixel lies inside its outline; H x W float32.

    The outline is radius * (1 + sum_k a_k cos(k theta + phi_k)) with a_k ~ roughness / k, so low
    harmonics bend it and high ones fray it. The centre pixel is always inside.
    """
    yy, xx = _grid(*shape)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in range(2, harmonics + 2):
        outline += roughness * rng.standard_normal() / k * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    reach = radius * np.clip(outline, 0.4, None) - np.hypot(dy, dx)
    centre = round(cy), round(cx)
    reach[centre] = max(float(reach[centre]), 0.5)
    return reach


def _blob(
    rng: np.random.Generator, shape: tuple[int, int], cy: float, cx: float, radius: float, roughness: float
) -> np.ndarray:
    return _blob_reach(rng, shape, cy, cx, radius, roughness) > 0


def _stroke(
    shape: tuple[int, int],
    centre: tuple[float, float],
    length: float,
    angle: float,
    bend: float,
    width: int,
) -> np.ndarray:
    """A curved line through `centre`, drawn with Pillow: -> H x W bool.

    The curve is centre + s * direction + bend * s^2 / length * normal for s in [-length/2, length/2].
    """
    s = np.linspace(-length / 2, length / 2, 16)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    points = np.asarray(centre) + s[:, None] * direction + (bend * s**2 / length)[:, None] * normal
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).line([(p[1], p[0]) for p in points], fill=255, width=width, joint="curve")
    return np.asarray(canvas) > 0


def _resample(image: np.ndarray, region: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Inside `region`, read each pixel from (y + dy, x + dx), bilinearly: -> H x W x 3 float32."""
    h, w, _ = image.shape
    ys, xs = np.nonzero(region)
    sy = np.clip(ys + dy[region], 0, h - 1)
    sx = np.clip(xs + dx[region], 0, w - 1)
    y0 = np.minimum(np.floor(sy).astype(np.int64), h - 2)
    x0 = np.minimum(np.floor(sx).astype(np.int64), w - 2)
    fy, fx = (sy - y0)[:, None], (sx - x0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    out = image.copy()
    out[ys, xs] = top * (1 - fy) + bottom * fy
    return out
