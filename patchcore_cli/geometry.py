"""How an image is framed for the backbone, and how its anomaly map lands back on the original image.

A framing turns an original image (W x H pixels) into one or more views, each a box of the original resized
to the size the backbone sees, and defines the frame of the anomaly map: a `map_size` raster covering
`box` of the original.

- "whole": the whole image resized to crop x crop. The map is crop x crop over the whole image.
- "crop" (paper §4.1): the shorter side resized to `image_size`, then the centre crop x crop. The map
  covers only that centre box; the rest of the image is not inspected.
- "aspect": the whole image with its aspect ratio kept: the shorter side at `crop`, the longer side in
  proportion (rounded to a multiple of 16, at most `MAX_ASPECT` times the shorter). The map has that size.
- "tile": overlapping square tiles of `tile_size` original pixels (the last ones flush with the far edges,
  so every pixel is covered, whatever the image's size and aspect), each resized to crop x crop. The map
  covers the whole image at crop / tile_size map pixels per original pixel; where tiles overlap, their
  maps are averaged. An image smaller than a tile in one direction gets one tile spanning that direction.

Pure geometry: numbers in, numbers out. Pillow resizes images and masks; torch is only used to blur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

FRAMINGS = ("whole", "crop", "aspect", "tile")
MAX_ASPECT = 4.0  # "aspect": a longer side beyond 4x the shorter is squeezed to 4x, bounding the work
SIDE_MULTIPLE = 16  # "aspect": the longer side is a multiple of the coarsest usual stride (layer3)

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in original pixels


@dataclass(frozen=True)
class View:
    """One input to the backbone: `box` of the original, resized to `size` (width, height); its map lands
    on `place` (left, top, right, bottom) of the map frame, in map pixels."""

    box: Box
    size: tuple[int, int]
    place: tuple[int, int, int, int]


@dataclass(frozen=True)
class Geometry:
    """How one original image is inspected: its views, and the map frame (`map_size` over `box`)."""

    original_size: tuple[int, int]  # (width, height)
    box: Box  # the part of the original the anomaly map covers
    map_size: tuple[int, int]  # (width, height) of the anomaly map
    views: tuple[View, ...]


@dataclass(frozen=True)
class Framing:
    """The framing options of a bank (see the module docstring)."""

    framing: str = "whole"
    crop: int = 224
    image_size: int = 256
    tile_size: int = 0
    tile_overlap: float = 0.25

    def frame(self, size: tuple[int, int]) -> Geometry:
        """Original (width, height) -> its Geometry."""
        width, height = size
        if self.framing == "tile":
            return self._tiles(width, height)
        if self.framing == "aspect":
            out = aspect_size(width, height, self.crop)
            return Geometry(
                size, (0.0, 0.0, float(width), float(height)), out, (View(_full(size), out, _at(out)),)
            )
        if self.framing == "whole":
            out = (self.crop, self.crop)
            return Geometry(size, _full(size), out, (View(_full(size), out, _at(out)),))
        scale = self.image_size / min(width, height)
        new_w, new_h = round(width * scale), round(height * scale)
        left, top = (new_w - self.crop) / 2, (new_h - self.crop) / 2
        box = (left / scale, top / scale, (left + self.crop) / scale, (top + self.crop) / scale)
        out = (self.crop, self.crop)
        return Geometry(size, box, out, (View(box, out, _at(out)),))

    def render(self, image: Image.Image, geometry: Geometry) -> list[np.ndarray]:
        """RGB PIL image -> one H x W x 3 uint8 array per view: its box resized to its size (bilinear)."""
        if self.framing == "crop":
            return [preprocess(image, self.image_size, self.crop, "crop")]
        from PIL import Image as PILImage

        views = []
        for view in geometry.views:
            region = image if view.box == _full(geometry.original_size) else image.crop(_pixels(view.box))
            views.append(
                np.asarray(region.resize(view.size, PILImage.Resampling.BILINEAR, reducing_gap=3.0), np.uint8)
            )
        return views

    def mask(self, mask: np.ndarray, geometry: Geometry) -> np.ndarray:
        """H x W bool mask in original pixels -> (map height x map width) bool mask, transformed like the
        image: resized bilinearly, then thresholded at half height, so thin defects survive downscaling."""
        from PIL import Image as PILImage

        picture = PILImage.fromarray(mask.astype(np.uint8) * 255)
        if self.framing == "crop":
            return preprocess(picture.convert("RGB"), self.image_size, self.crop, "crop")[..., 0] >= 128
        resized = picture.resize(geometry.map_size, PILImage.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(resized) >= 128

    def _tiles(self, width: int, height: int) -> Geometry:
        scale = self.crop / self.tile_size  # map pixels per original pixel
        map_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        views = []
        for top, bottom in tile_spans(height, self.tile_size, self.tile_overlap):
            for left, right in tile_spans(width, self.tile_size, self.tile_overlap):
                place = (round(left * scale), round(top * scale), round(right * scale), round(bottom * scale))
                place = (place[0], place[1], max(place[2], place[0] + 1), max(place[3], place[1] + 1))
                views.append(
                    View(
                        (float(left), float(top), float(right), float(bottom)), (self.crop, self.crop), place
                    )
                )
        return Geometry((width, height), _full((width, height)), map_size, tuple(views))


def tile_spans(length: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """Intervals [start, end) of tiles of `tile` pixels along `length` pixels, overlapping by at least
    `overlap` of a tile, evenly spaced with the first at 0 and the last ending at `length`. Their union is
    [0, length). A length up to one tile gets the single interval [0, length)."""
    if length <= tile:
        return [(0, length)]
    stride = tile * (1.0 - overlap)
    count = math.ceil((length - tile) / stride) + 1
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def aspect_size(width: int, height: int, crop: int) -> tuple[int, int]:
    """(width, height) of the "aspect" framing: the shorter side at `crop`, the longer in proportion."""
    ratio = min(max(width, height) / min(width, height), MAX_ASPECT)
    longer = max(crop, SIDE_MULTIPLE * round(crop * ratio / SIDE_MULTIPLE))
    return (longer, crop) if width >= height else (crop, longer)


def _full(size: tuple[int, int]) -> Box:
    return (0.0, 0.0, float(size[0]), float(size[1]))


def _at(size: tuple[int, int]) -> tuple[int, int, int, int]:
    return (0, 0, size[0], size[1])


def _pixels(box: Box) -> tuple[int, int, int, int]:
    return (round(box[0]), round(box[1]), round(box[2]), round(box[3]))


def preprocess(image: Image.Image, resize: int, crop: int, framing: str = "crop") -> np.ndarray:
    """RGB PIL image -> crop x crop x 3 uint8 array, for the two square framings:

    - "crop" (paper §4.1): shorter side to `resize`, then the centre `crop` x `crop`. Whatever lies
      outside the crop is not inspected.
    - "whole": the whole image resized to `crop` x `crop` (`resize` is not used). Nothing is cut off; a
      non-square image is stretched, the same way at fit and at score time.
    """
    from PIL import Image as PILImage

    if framing == "whole":
        whole = image.resize((crop, crop), PILImage.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(whole, dtype=np.uint8)
    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(crop, round(width * scale)), max(crop, round(height * scale))
    resized = image.resize((new_w, new_h), PILImage.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    return np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def stitch(view_maps: list[torch.Tensor], geometry: Geometry, sigma: float) -> torch.Tensor:
    """Per-view patch-score grids (h_v x w_v each) -> the map (map_size, as H x W): each grid upsampled
    bilinearly onto its place, overlaps averaged, then the Gaussian blur of paper §3.3 over the whole map."""
    import torch
    import torch.nn.functional as F

    from patchcore_cli.scoring import gaussian_blur

    width, height = geometry.map_size
    if len(view_maps) == 1 and geometry.views[0].place == (0, 0, width, height):
        canvas = F.interpolate(
            view_maps[0][None, None], size=(height, width), mode="bilinear", align_corners=False
        )
    else:
        total = torch.zeros(height, width)
        weight = torch.zeros(height, width)
        for grid, view in zip(view_maps, geometry.views, strict=True):
            left, top, right, bottom = view.place
            up = F.interpolate(
                grid[None, None], size=(bottom - top, right - left), mode="bilinear", align_corners=False
            )
            total[top:bottom, left:right] += up[0, 0]
            weight[top:bottom, left:right] += 1.0
        canvas = (total / weight.clamp(min=1.0))[None, None]
    if sigma > 0:
        canvas = gaussian_blur(canvas, sigma)
    return canvas[0, 0]
