"""The visual outputs: `--report` HTML pages, heatmap overlays with their legend, output file names."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore_cli import report
from patchcore_cli.cli import app
from tests.conftest import TINY_OPTIONS

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bank(washer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.st"
    result = invoke("fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS)
    assert result.exit_code == 0, result.output
    return path


# --- heatmap overlays with a legend ---------------------------------------------------------------------


def overlay_inputs(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    rows, cols = np.indices((height, width))
    amap = (6.0 * np.exp(-((rows - height / 2) ** 2 + (cols - width / 3) ** 2) / (width**2 / 50))).astype(
        np.float32
    )
    inspected = np.ones((height, width), dtype=bool)
    inspected[:, : width // 10] = False
    return image, amap, inspected


@pytest.mark.parametrize(("width", "height"), [(96, 80), (400, 300), (1280, 200)])
def test_heatmap_picture_is_the_overlay_plus_a_legend_strip(width, height):
    image, amap, inspected = overlay_inputs(width, height)
    picture = report.heatmap_picture(image, amap, inspected, 3.0, 21.5, 19.0, True)
    canvas_width, strip = report.legend_size(width)
    assert canvas_width == max(width, report.LEGEND_MIN_WIDTH)
    assert strip == round(report.LEGEND_HEIGHT * max(1.0, width / report.LEGEND_GROWS_FROM))
    assert picture.shape == (height + strip, canvas_width, 3) and picture.dtype == np.uint8
    bare = report.overlay(image, amap, inspected, scale=6.0)
    np.testing.assert_array_equal(picture[:height, :width], bare)  # the image area is untouched
    assert (picture[:height, width:] == 255).all()  # a narrow picture is widened with white

    # The colour scale is the overlay's own ramp from 0 to 2 x the pixel threshold, marked at the middle.
    unit = strip / report.LEGEND_HEIGHT
    bar_row = picture[height + strip - round(24 * unit)]
    inner = bar_row[round(12 * unit) : canvas_width - round(12 * unit)].astype(int)
    for end in (0.0, 1.0):
        colour = report._colormap(np.array([end]))[0].astype(int)
        assert np.abs(inner - colour).sum(axis=1).min() <= 12, end
    middle = bar_row[canvas_width // 2 - 1 : canvas_width // 2 + 2]
    assert middle.max(axis=1).min() < 60  # the black threshold mark


def test_verdict_and_score_are_written_in_the_legend():
    image, amap, inspected = overlay_inputs(200, 150)
    flagged = report.heatmap_picture(image, amap, inspected, 3.0, 21.5, 19.0, True)
    passed = report.heatmap_picture(image, amap, inspected, 3.0, 12.25, 19.0, False)
    strip = report.legend_size(200)[1]
    label_area = slice(150, 150 + strip // 2)  # the strip's first line: badge and score
    scale_area = slice(150 + strip // 2, None)
    assert (flagged[label_area] != passed[label_area]).any(axis=2).sum() > 500
    np.testing.assert_array_equal(flagged[:150], passed[:150])
    np.testing.assert_array_equal(flagged[scale_area], passed[scale_area])
    red = (flagged[label_area, :, 0] > 150) & (flagged[label_area, :, 1] < 80)
    green = (passed[label_area, :, 1] > 90) & (passed[label_area, :, 0] < 80)
    assert red.sum() > 200 and green.sum() > 200  # the red ANOMALOUS and green GOOD badges


def test_thumbnail_picture_fits_max_side():
    image, amap, inspected = overlay_inputs(900, 600)
    picture = report.heatmap_picture(image, amap, inspected, 3.0, 21.5, 19.0, True, max_side=300)
    assert picture.shape == (200 + report.legend_size(300)[1], report.LEGEND_MIN_WIDTH, 3)


# --- output names ---------------------------------------------------------------------------------------


def names(paths: list[str], suffix: str = "_heatmap") -> list[str]:
    found = report.output_names([Path(p) for p in paths], suffix)
    return [found[Path(p)] for p in paths]


def test_same_name_in_different_folders_says_which_folder():
    assert names(["/d/test/good/000.png", "/d/test/hole/000.png", "/d/test/good/001.png"]) == [
        "good__000_heatmap.png",
        "hole__000_heatmap.png",
        "001_heatmap.png",
    ]
    # Only as many folders as it takes, per file.
    assert names(["/x/a/cam1/000.png", "/x/b/cam1/000.png", "/x/b/cam2/000.png"]) == [
        "a__cam1__000_heatmap.png",
        "b__cam1__000_heatmap.png",
        "cam2__000_heatmap.png",
    ]


def test_names_do_not_depend_on_the_order_of_inputs():
    paths = [f"/data/{line}/{cam}/{stem}.png" for line in "ab" for cam in ("c1", "c2") for stem in "012"]
    paths += ["/data/a/c1/0.jpg", "/data/a/c1/x y.png", "/data/a/c1/x_y.png", "/data/A/c1/X_Y.png"]
    expected = dict(zip(paths, names(paths), strict=True))
    shuffled = paths[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert dict(zip(shuffled, names(shuffled), strict=True)) == expected
    assert len({name.casefold() for name in expected.values()}) == len(paths)


def test_names_are_safe_and_collision_free():
    found = names(
        [
            "/d/x/000.png",
            "/d/x/000.jpg",  # same folder, same stem: the extension tells them apart
            "/d/odd name:1/a.b.png",
            "/d/odd name:2/a.b.png",
            "/d/q/Part.png",
            "/d/q/part.png",  # the same on a case-insensitive file system
            "/d/.hidden/.z.png",
            "/d/.other/.z.png",
            "/d/y/" + "long" * 80 + ".png",
        ]
    )
    assert found[:6] == [
        "000.png_heatmap.png",
        "000.jpg_heatmap.png",
        "odd_name_1__a.b_heatmap.png",
        "odd_name_2__a.b_heatmap.png",
        "Part_heatmap.png",
        "part-2_heatmap.png",
    ]
    assert found[6] == "hidden__.z_heatmap.png" and found[7] == "other__.z_heatmap.png"
    assert len(found[8].encode()) <= 255 and found[8].endswith("_heatmap.png")
    assert len({name.casefold() for name in found}) == len(found)
    for name in found:
        assert "/" not in name and not name.startswith(".")


def test_score_names_outputs_by_their_folders(bank, washer, tmp_path):
    inputs = [washer / "test" / "hole" / "000.png", washer / "test" / "scratch" / "000.png"]
    result = invoke("score", *inputs, "--bank", bank, "--heatmaps", tmp_path / "h", "--masks", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [
        "hole__000_heatmap.png",
        "scratch__000_heatmap.png",
    ]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "hole__000_mask.png",
        "scratch__000_mask.png",
    ]
