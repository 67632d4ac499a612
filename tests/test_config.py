"""Config precedence: defaults <- preset <- YAML <- command line; ensembles split per backbone."""

from __future__ import annotations

import pytest

from patchcore_cli import config as config_mod
from patchcore_cli.errors import ConfigError


def test_defaults_follow_the_paper_but_inspect_the_whole_image():
    config = config_mod.build()
    # Measured (README, "Framing"): the whole image beats the paper's centre crop on bottle and on
    # Magnetic Tile; equal stage weighting helps bottle but costs Magnetic Tile, so it is opt-in.
    assert (config.framing, config.stage_weighting) == ("whole", "none")
    assert (config.image_size, config.crop, config.coreset, config.num_neighbors, config.sigma) == (
        256,
        config_mod.AUTO_CROP,
        0.1,
        9,
        4.0,
    )
    assert config.layers == ("layer2", "layer3") and config.backbone == "wide_resnet50_2"


def test_preset_then_yaml_then_command_line(tmp_path):
    assert config_mod.build(preset="fast").coreset == 0.01
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: fast\ncoreset: 0.05\n")
    assert config_mod.build(yaml_file).coreset == 0.05
    assert config_mod.build(yaml_file).backbone == "efficientnet_lite0"
    assert config_mod.build(yaml_file, coreset=0.2).coreset == 0.2
    accurate = config_mod.build(yaml_file, preset="accurate")
    assert (accurate.backbone, accurate.framing, accurate.max_crop, accurate.coreset) == (
        "efficientnet_lite0+efficientnet_lite2",
        "whole",
        448,
        0.05,
    )
    assert config_mod.build(preset="accurate", stage_weighting="equal").stage_weighting == "equal"
    assert config_mod.build(preset="fast").crop == 224  # fast keeps the old default's speed
    for preset in ("fast", "accurate"):
        assert config_mod.build(preset=preset).image_score == "map"
        assert config_mod.build(preset=preset).coreset_max_rows == 100_000  # as they were measured


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, 19_600),  # 25 views of layer2's 28 x 28 grid
        ({"crop": 320}, 40_000),
        ({"crop": 448}, 78_400),
        ({"crop": 300}, 25 * 38 * 38),  # a part-covered stride still makes a patch
        ({"layers": "layer1,layer2,layer3"}, 25 * 56 * 56),  # the finest stage sets the grid
        ({"layers": "layer3"}, 25 * 14 * 14),
        ({"backbone": "efficientnet_lite0+efficientnet_lite2"}, 19_600),
        ({"coreset_max_rows": "auto"}, 19_600),
        ({"coreset_max_rows": "20,000"}, 20_000),
        ({"coreset_max_rows": 5000}, 5000),
        ({"coreset_max_rows": 0}, 0),
    ],
)
def test_the_auto_row_cap_is_25_views_of_patches_at_the_crop(options, expected):
    config = config_mod.build(**{"backbone": "efficientnet_lite0", "crop": 224, **options})
    assert config_mod.resolve_rows(config).coreset_max_rows == expected


def test_a_bank_never_says_auto_for_its_row_cap():
    from patchcore_cli.coreset import bank_size

    assert config_mod.build().coreset_max_rows == config_mod.AUTO_ROWS
    with pytest.raises(ValueError, match="resolved before the coreset"):
        bank_size(1000, 0.1, config_mod.AUTO_ROWS)
    stored = config_mod.build(backbone="efficientnet_lite0", crop=224).model_dict()
    with pytest.raises(ConfigError, match="bank config: coreset_max_rows must be auto, 0"):
        config_mod.from_bank(stored)  # fit stores the cap it resolved; -1 is never a stored value
    assert config_mod.from_bank({**stored, "coreset_max_rows": 19_600}).coreset_max_rows == 19_600


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'quick'"):
        config_mod.build(preset="quick")


def test_ensemble_members_share_everything_but_the_backbone():
    config = config_mod.build(backbone="efficientnet_lite0+wide_resnet50", coreset=0.05)
    assert config.backbone == "efficientnet_lite0+wide_resnet50_2"
    first, second = config_mod.members(config)
    assert (first.backbone, second.backbone) == ("efficientnet_lite0", "wide_resnet50_2")
    assert first.coreset == second.coreset == 0.05


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"reduction": "pca"}, "reduction must be one of"),
        ({"index": "annoy"}, "index must be one of"),
        ({"image_size": 10000}, "image_size must be between 32 and 4096"),
        ({"layers": "layer9"}, "has no stage layer9"),
        ({"framing": "letterbox"}, "framing must be one of whole, crop, aspect, tile"),
        ({"stage_weighting": "pca"}, "stage_weighting must be one of equal, none"),
        ({"patch_size": 4}, "patch_size must be a positive odd number, got 4"),
        ({"num_neighbors": 0}, "num_neighbors must be at least 1"),
        ({"image_score": "mean"}, "image_score must be one of map, patch, got 'mean'"),
        ({"framing": "whole", "crop": 5000}, "crop must be auto or between 32 and 4096, got 5000"),
        ({"framing": "crop", "image_size": 200}, r"crop must be between 32 and image_size \(200\)"),
    ],
)
def test_invalid_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.build(**overrides)


def test_whole_framing_needs_no_room_to_crop():
    # The whole image is resized to crop x crop; image_size is only the crop framing's first resize.
    assert config_mod.build(framing="whole", image_size=200, crop=224).crop == 224


def test_every_benchmark_config_is_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "bench" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = config_mod.build(path)
        assert config.backbone.startswith(("efficientnet_lite", "wide_resnet50_2")), path


@pytest.mark.parametrize(
    ("sides", "options", "expected"),
    [
        ([900] * 5, {}, 320),  # MVTec AD's 700-1024 px parts
        ([512, 512, 512], {}, 320),
        ([512, 512, 512], {"max_crop": 448}, 448),
        ([900], {"max_crop": 448}, 448),
        ([319, 400, 100], {}, 224),  # the median, 319, does not reach 320: never enlarged
        ([256] * 4, {"max_crop": 448}, 224),
        ([100, 150], {}, 224),  # smaller than every step: the smallest
        ([], {}, 224),
        ([900], {"framing": "aspect"}, 320),
        ([900], {"framing": "crop"}, 224),  # the paper's centre crop stays 224 of 256
        ([900], {"framing": "tile", "tile_size": 300}, 224),
        ([900], {"crop": 288}, 288),  # a side given is kept
        ([100], {"crop": 448}, 448),
    ],
)
def test_auto_crop_takes_the_largest_step_the_images_reach(sides, options, expected):
    config = config_mod.build(**options)
    assert config_mod.resolve_crop(config, sides).crop == expected


def test_crop_reads_auto_and_sides_from_options_and_yaml(tmp_path):
    assert config_mod.build(crop="auto").crop == config_mod.AUTO_CROP
    assert config_mod.build(crop="320").crop == 320
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("crop: auto\nmax_crop: 448\n")
    assert (config_mod.build(yaml_file).crop, config_mod.build(yaml_file).max_crop) == (0, 448)
    with pytest.raises(ConfigError, match="'crop' must be auto or a side in pixels, got 'big'"):
        config_mod.build(crop="big")
    with pytest.raises(ConfigError, match="max_crop must be between 224"):
        config_mod.build(max_crop=100)


def test_a_bank_holds_the_side_it_was_fitted_at():
    stored = {**config_mod.build().model_dict(), "coreset_max_rows": 19_600}
    assert "max_crop" not in stored  # how the side was chosen is not part of the model
    with pytest.raises(ConfigError, match="'crop' must be the side the bank was fitted at"):
        config_mod.from_bank(stored)
    assert config_mod.from_bank({**stored, "crop": 320}).crop == 320
