"""Every registered backbone builds untrained and reports the channels and strides it claims;
weights resolve in the documented order and fail loudly, never silently random."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from patchcore_cli import backbones
from patchcore_cli.errors import ConfigError, WeightsError
from patchcore_cli.features import Trunk


@pytest.mark.parametrize("name", backbones.names())
def test_every_backbone_reports_its_stage_shapes(name):
    loaded = backbones.load_backbone(name, weights="random")
    spec = loaded.spec
    trunk = Trunk(loaded, list(spec.stages))
    maps = trunk(torch.rand(1, 3, 64, 64))
    for stage, fmap in maps.items():
        assert fmap.shape[1] == spec.channels[stage], stage
        assert fmap.shape[-1] == 64 // spec.strides[stage], stage


def test_trunk_stops_after_the_deepest_requested_stage():
    loaded = backbones.load_backbone("resnet18", weights="random")
    assert len(Trunk(loaded, ["layer2"]).modules) == 6  # conv1, bn1, relu, maxpool, layer1, layer2


def test_alias_and_unknown_names():
    assert backbones.canonical_name("wide_resnet50") == "wide_resnet50_2"
    with pytest.raises(ConfigError, match="choose one of"):
        backbones.get("resnet1000")


def test_random_weights_are_reported_as_random():
    loaded = backbones.load_backbone("resnet18", weights="random")
    assert loaded.weights_source == loaded.weights_sha256 == "random"


def test_weights_file_is_loaded_and_hashed(tmp_path):
    reference = backbones.load_backbone("resnet18", weights="random", seed=3).model
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    loaded = backbones.load_backbone("resnet18", weights=str(path))
    assert loaded.weights_sha256 == backbones.sha256_file(path)
    torch.testing.assert_close(loaded.model.conv1.weight, reference.conv1.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        backbones.load_backbone("resnet18", weights=str(path))


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a whole module: needs pickle to load
    with pytest.raises(WeightsError, match="not a readable weights file"):
        backbones.load_backbone("resnet18", weights=str(path))


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        backbones.load_backbone("resnet18", weights=str(tmp_path / "none.pth"))


def test_hub_cache_is_used_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    cached = backbones.get("resnet18").weights()
    cached.parent.mkdir(parents=True)
    torch.save(backbones.load_backbone("resnet18", weights="random").model.state_dict(), cached)

    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the cache has the file")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    loaded = backbones.load_backbone("resnet18")
    assert loaded.weights_source == str(cached)


def test_offline_without_weights_fails_with_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        backbones.load_backbone("wide_resnet50_2")
    message = str(info.value)
    assert "--weights" in message and "efficientnet_lite0" in message and "checkpoints" in message


def test_packaged_lite_weights_load_by_position():
    loaded = backbones.load_backbone("efficientnet_lite0")
    assert loaded.weights_source.endswith(".pth") and len(loaded.weights_sha256) == 64
    packaged = list(torch.load(loaded.weights_source, map_location="cpu", weights_only=True).values())
    assert torch.equal(loaded.model.conv_stem.weight, packaged[0])  # the file's first tensor is the stem


def test_generic_timm_model_with_a_weights_file(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm_r18.pth"
    torch.save(reference.state_dict(), path)
    loaded = backbones.load_backbone("timm:resnet18", weights=str(path))
    torch.testing.assert_close(loaded.model.conv1.weight, reference.conv1.weight)
    maps = Trunk(loaded, ["layer2", "layer3"])(torch.rand(1, 3, 64, 64))
    assert maps["layer2"].shape == (1, 128, 8, 8) and maps["layer3"].shape == (1, 256, 4, 4)


def test_generic_timm_model_refuses_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"something": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        backbones.load_backbone("timm:resnet18", weights=str(path))
    with pytest.raises(WeightsError, match="--weights FILE"):
        backbones.load_backbone("timm:resnet18")


def test_generic_torchvision_resnet_family():
    loaded = backbones.load_backbone("torchvision:resnet34", weights="random")
    maps = Trunk(loaded, ["layer2"])(torch.rand(1, 3, 64, 64))
    assert maps["layer2"].shape == (1, 128, 8, 8)


@pytest.mark.parametrize("name", ["timm:no_such_model", "torchvision:no_such_model", "torchvision:vit_b_16"])
def test_generic_names_that_cannot_work(name):
    with pytest.raises(ConfigError):
        backbones.get(name)
