"""Framings and tiling: views cover every pixel, and maps land back on the original frame for any size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from patchcore_cli import config as config_mod
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit
from patchcore_cli.geometry import Framing, aspect_size, stitch, tile_spans
from patchcore_cli.report import map_to_original
from tests.conftest import TINY_CONFIG


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 5000),
    tile=st.integers(32, 2000),
    overlap=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]),
)
def test_tile_spans_cover_every_pixel_with_the_stated_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    covered = np.zeros(length, bool)
    for start, end in spans:
        assert 0 <= start < end <= length
        covered[start:end] = True
    assert covered.all()
    assert spans[0][0] == 0 and spans[-1][1] == length
    if length > tile:
        assert all(end - start == tile for start, end in spans)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(spans)]
        assert (
            max(gaps) <= tile * (1 - overlap) + 1
        )  # neighbours overlap by at least `overlap` (rounding: 1 px)


@settings(max_examples=100, deadline=None)
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    tile=st.integers(32, 1000),
    crop=st.sampled_from([32, 64, 224]),
)
def test_tiles_cover_every_pixel_of_any_image_and_of_its_map(width, height, tile, crop):
    framing = Framing("tile", crop=crop, tile_size=tile, tile_overlap=0.25)
    geometry = framing.frame((width, height))
    covered = np.zeros((height, width), bool)
    map_w, map_h = geometry.map_size
    placed = np.zeros((map_h, map_w), bool)
    for view in geometry.views:
        left, top, right, bottom = (int(v) for v in view.box)
        covered[top:bottom, left:right] = True
        assert view.size == (crop, crop)
        pl, pt, pr, pb = view.place
        assert 0 <= pl < pr <= map_w and 0 <= pt < pb <= map_h
        placed[pt:pb, pl:pr] = True
    assert covered.all() and placed.all()
    assert geometry.box == (0.0, 0.0, float(width), float(height))


@pytest.mark.parametrize(
    ("size", "expected"),
    [((200, 100), (128, 64)), ((100, 300), (64, 192)), ((64, 64), (64, 64)), ((1000, 50), (256, 64))],
)
def test_aspect_keeps_the_shorter_side_and_the_ratio_up_to_four(size, expected):
    assert aspect_size(*size, crop=64) == expected
    framing = Framing("aspect", crop=64)
    geometry = framing.frame(size)
    assert geometry.map_size == expected and geometry.views[0].size == expected
    rendered = framing.render(Image.new("RGB", size), geometry)
    assert rendered[0].shape == (expected[1], expected[0], 3)


def test_stitch_averages_overlaps_and_a_single_view_fills_the_frame():
    framing = Framing("tile", crop=32, tile_size=64, tile_overlap=0.5)
    geometry = framing.frame((96, 64))  # two tiles side by side, overlapping by 32 px
    assert [v.box for v in geometry.views] == [(0.0, 0.0, 64.0, 64.0), (32.0, 0.0, 96.0, 64.0)]
    grids = [torch.full((4, 4), 1.0), torch.full((4, 4), 3.0)]
    out = stitch(grids, geometry, sigma=0).numpy()
    assert out.shape == (32, 48)
    np.testing.assert_allclose(out[:, :16], 1.0)
    np.testing.assert_allclose(out[:, 16:32], 2.0)  # the overlap: the mean of both tiles
    np.testing.assert_allclose(out[:, 32:], 3.0)


@settings(max_examples=30, deadline=None)
@given(
    width=st.integers(40, 700),
    height=st.integers(40, 700),
    framing=st.sampled_from(["whole", "aspect", "tile"]),
)
def test_a_map_spot_lands_on_the_same_spot_of_the_original(width, height, framing):
    options = Framing(framing, crop=64, tile_size=max(48, min(width, height) // 2))
    geometry = options.frame((width, height))
    # A mask with one bright square; framed like an image it marks the same place of the map frame.
    mask = np.zeros((height, width), bool)
    x0, y0 = width // 3, height // 3
    mask[y0 : y0 + height // 4 + 1, x0 : x0 + width // 4 + 1] = True
    framed = options.mask(mask, geometry)
    assert framed.shape == (geometry.map_size[1], geometry.map_size[0])
    back, inspected = map_to_original(framed.astype(np.float32), geometry)
    assert back.shape == (height, width) and inspected.all()
    # The map, stretched back, overlaps the original square almost exactly.
    overlap = ((back > 0.5) & mask).sum() / max(1, ((back > 0.5) | mask).sum())
    assert overlap > 0.6


@pytest.mark.parametrize("framing", ["aspect", "tile"])
def test_fit_and_score_with_non_square_framings(tmp_path, framing):
    rng = np.random.default_rng(3)
    good = tmp_path / "good"
    good.mkdir()
    sizes = [(150, 60), (90, 60), (60, 140), (120, 120), (200, 70)]  # mixed aspects: mixed view sizes
    for i, (w, h) in enumerate(sizes):
        base = np.full((h, w, 3), 120.0) + rng.normal(0, 3, (h, w, 3))
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(good / f"{i}.png")
    defect = np.full((60, 180, 3), 120.0) + rng.normal(0, 3, (60, 180, 3))
    defect[20:40, 150:170] = (np.indices((20, 20)).sum(0) % 2 * 255)[..., None]
    Image.fromarray(defect.clip(0, 255).astype(np.uint8)).save(tmp_path / "defect.png")
    options = {**TINY_CONFIG, "crop": 64, "framing": framing, "tile_size": 60, "batch_size": 3}
    config = config_mod.build(**options)
    fitted = fit(list_images([good]), config)
    assert fitted.bank.config["framing"] == framing
    scorer = Scorer(fitted.bank)
    results = scorer.score_paths([*list_images([good]), tmp_path / "defect.png"], keep_maps=True)
    for result in results:
        height, width = result.anomaly_map.shape
        assert (width, height) == result.geometry.map_size
        full, inspected = map_to_original(result.anomaly_map, result.geometry)
        assert inspected.all() and full.shape == tuple(reversed(result.geometry.original_size))
    defect_result = results[-1]
    assert defect_result.score > max(r.score for r in results[:-1])
    full, _ = map_to_original(defect_result.anomaly_map, defect_result.geometry)
    row, col = np.unravel_index(np.argmax(full), full.shape)
    assert col >= 110 and 5 <= row <= 55  # the peak is in the right third, where the defect is
    # Batch size does not change a score, though views of different sizes are batched separately.
    one = Scorer(fitted.bank, batch_size=1).score_paths([*list_images([good]), tmp_path / "defect.png"])
    np.testing.assert_allclose([r.score for r in one], [r.score for r in results], rtol=1e-5)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_faint_colour_spot_survives_decoding_framing_and_normalisation(tmp_path, suffix):
    # pill's defects are faint colour spots: equal brightness, a few levels more red than green.
    from patchcore_cli.backbones import get
    from patchcore_cli.data import load_image
    from patchcore_cli.features import to_tensor

    pixels = np.full((256, 256, 3), 150, np.uint8)
    pixels[96:160, 96:160] = (156, 147, 147)  # +6 red, -3 green and blue: the same luma (about 150)
    path = tmp_path / f"spot{suffix}"
    Image.fromarray(pixels).save(path, quality=95)
    framing = Framing("whole", crop=64)
    image = load_image(path)
    view = framing.render(image, framing.frame(image.size))[0].astype(int)
    inside, outside = view[28:36, 28:36], view[:8, :8]
    assert (inside[..., 0] - inside[..., 1]).mean() >= 6  # the red-green contrast is kept ...
    assert abs((outside[..., 0] - outside[..., 1]).mean()) <= 1  # ... and only where the spot is
    spec = get("efficientnet_lite0")
    tensor = to_tensor([view.astype(np.uint8)])
    normalised = (tensor - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    difference = (normalised[0, 0] - normalised[0, 1])[28:36, 28:36].mean()
    assert float(difference) > 0.04  # per-channel scaling keeps it: no grey conversion anywhere
