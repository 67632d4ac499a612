"""`patchcore export`: the ONNX model against `patchcore score` (onnxruntime on the CPU), for a single and an
ensemble bank; what it refuses; how its file is written."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore_cli import bank as bank_io
from patchcore_cli import config as config_mod
from patchcore_cli.cli import app
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit
from patchcore_cli.errors import ConfigError
from tests.conftest import TINY_CONFIG

onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
export = pytest.importorskip("patchcore_cli.export")

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def fitted_bank(washer: Path, folder: Path, **options: object) -> Path:
    path = folder / "bank.st"
    config = config_mod.build(**{**TINY_CONFIG, **options})
    bank_io.save(fit(list_images([washer / "train" / "good"]), config).bank, path)
    return path


@pytest.fixture(scope="module")
def tiny_bank(washer, tmp_path_factory) -> Path:
    """A tiny random-weight ResNet-18 bank: 51 rows."""
    return fitted_bank(washer, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def single(tiny_bank, washer, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny bank exported in blocks of 16 rows, so that the search's running minimum and the eq. 7
    gathers cross block boundaries."""
    bank = tiny_bank
    model = tmp_path_factory.mktemp("single") / "model.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "BLOCK_ROWS", 16)
        result = invoke("export", bank, "--onnx", model, "--check", washer / "test" / "good", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parity"]["ok"] and report["checked_on"] == "4 given images"
    return bank, model


@pytest.fixture(scope="module")
def ensemble(washer, tmp_path_factory) -> tuple[Path, Path]:
    """Two different random-weight backbones, one bank each, standardised and averaged."""
    folder = tmp_path_factory.mktemp("ensemble")
    bank = fitted_bank(washer, folder, backbone="resnet18+efficientnet_lite0")
    model = folder / "model.onnx"
    result = invoke("export", bank, "--onnx", model)
    assert result.exit_code == 0, result.output
    return bank, model


def assert_matches_score(bank: Path, model: Path, paths: list[Path], ensemble: bool) -> None:
    """onnxruntime on the model file against `patchcore score`'s engine on the same images."""
    scorer = Scorer(bank_io.load(bank))
    expected = scorer.score_paths(paths, keep_maps=True)
    images = np.stack([export.preprocess_image(path, scorer.config) for path in paths])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outputs = dict(zip(export.OUTPUTS, sess.run(None, {"image": images}), strict=True))

    score = np.array([r.score for r in expected])
    # A single bank's scores are distances, far from 0: plainly relative. An ensemble's are in good-score
    # std units and cross 0, so there the threshold is the scale where it is larger (export.Parity).
    scale = np.maximum(np.abs(score), abs(scorer.threshold)) if ensemble else np.abs(score)
    assert (np.abs(outputs["score"] - score) / scale).max() <= export.SCORE_RTOL
    np.testing.assert_allclose(outputs["normalized"], [r.normalized for r in expected], rtol=0, atol=1e-5)
    assert outputs["anomalous"].tolist() == [r.anomalous for r in expected]
    assert any(r.anomalous for r in expected) and not all(r.anomalous for r in expected)
    maps = np.stack([r.anomaly_map for r in expected])
    assert outputs["anomaly_map"].shape == maps.shape == (len(paths), scorer.config.crop, scorer.config.crop)
    assert np.abs(outputs["anomaly_map"] - maps).max() <= export.MAP_ATOL  # absolute, in the map's units


@pytest.fixture(scope="module")
def test_images(washer, tmp_path_factory) -> list[Path]:
    """The washer test images, which the tiny banks call good, and a blank white one, which they flag."""
    from PIL import Image

    blank = tmp_path_factory.mktemp("blank") / "white.png"
    Image.fromarray(np.full((96, 96, 3), 255, dtype=np.uint8)).save(blank)
    return [*list_images([washer / "test"]), blank]


@pytest.mark.slow
def test_single_bank_matches_score(single, test_images):
    assert_matches_score(*single, test_images, ensemble=False)


@pytest.mark.slow
def test_ensemble_bank_matches_score(ensemble, test_images):
    assert_matches_score(*ensemble, test_images, ensemble=True)


@pytest.mark.slow
def test_batch_dimension_is_dynamic(single, test_images):
    bank, model = single
    scorer = Scorer(bank_io.load(bank))
    images = np.stack([export.preprocess_image(p, scorer.config) for p in test_images])
    sess = export.session(model)
    together = export.run(sess, images, batch_size=len(images))
    one_by_one = export.run(sess, images, batch_size=1)
    # onnxruntime's convolutions round differently by batch size; each is within parity of the engine.
    np.testing.assert_allclose(one_by_one["score"], together["score"], rtol=export.SCORE_RTOL)
    np.testing.assert_allclose(one_by_one["anomaly_map"], together["anomaly_map"], atol=export.MAP_ATOL)
    assert one_by_one["anomalous"].tolist() == together["anomalous"].tolist()


@pytest.mark.slow
def test_model_is_one_plain_onnx_file_without_pickle(single):
    _, model = single
    proto = onnx.load(str(model))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == list(export.OUTPUTS)
    assert proto.opset_import[0].version == export.OPSET
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in proto.graph.initializer)
    assert [p.name for p in model.parent.iterdir()] == ["model.onnx"]  # no external data file beside it
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    assert meta["patchcore.format"] == export.FORMAT_ID
    assert json.loads(meta["patchcore.config"])["crop"] == 64
    assert float(json.loads(meta["patchcore.calibration"])["pixel_threshold"]) > 0
    raw = model.read_bytes()
    for marker in (b"_rebuild_tensor", b"torch._utils", b"numpy.core.multiarray", b"cnumpy\n"):
        assert marker not in raw


@pytest.mark.slow
def test_failed_write_keeps_the_old_file(single, tmp_path, monkeypatch):
    bank, model = single
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")
    monkeypatch.setattr(export, "to_onnx", lambda scorer: model.read_bytes())

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    result = invoke("export", bank, "--onnx", target)
    assert result.exit_code == 6
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{target}: cannot write ONNX model" in errors[0]
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


@pytest.mark.slow
def test_disagreeing_model_is_not_written(single, tmp_path, monkeypatch):
    bank, model = single
    target = tmp_path / "model.onnx"
    monkeypatch.setattr(export, "to_onnx", lambda scorer: model.read_bytes())
    real_compare = export.compare

    def off_by_one(results, outputs, threshold):
        return real_compare(results, {**outputs, "score": outputs["score"] + 1.0}, threshold)

    monkeypatch.setattr(export, "compare", off_by_one)
    result = invoke("export", bank, "--onnx", target)
    assert result.exit_code == 6
    assert "not written: the ONNX model disagrees with `patchcore score`" in result.stderr
    assert not target.exists()


def test_interrupted_export_keeps_the_old_file(tiny_bank, tmp_path, monkeypatch):
    bank = tiny_bank
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")

    def interrupt(scorer: Scorer) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "to_onnx", interrupt)
    result = invoke("export", bank, "--onnx", target)
    assert result.exit_code == 130
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize(
    ("destination", "problem"),
    [("missing/model.onnx", "does not exist"), (".", "is a folder; give a file name for the ONNX model")],
)
def test_bad_destination_fails_before_any_work(tmp_path, destination, problem):
    result = invoke("export", tmp_path / "no-bank.st", "--onnx", tmp_path / destination)
    assert result.exit_code == 6
    assert result.stderr.count("\n") == 1 and problem in result.stderr


def test_missing_extra_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    result = invoke("export", tmp_path / "bank.st", "--onnx", tmp_path / "model.onnx")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "needs the optional package onnxruntime: pip install 'patchcore-cli[export]'" in result.stderr


def test_refuses_what_it_cannot_reproduce(tiny_bank):
    scorer = Scorer(bank_io.load(tiny_bank))
    export.check_exportable(scorer)
    scorer.config = dataclasses.replace(scorer.config, framing="keep-aspect")
    with pytest.raises(ConfigError, match="framing 'keep-aspect' cannot be exported yet"):
        export.check_exportable(scorer)
    scorer.config = dataclasses.replace(scorer.config, framing="whole")
    scorer.parts[0].config = dataclasses.replace(scorer.parts[0].config, precision="bf16")
    with pytest.raises(ConfigError, match="precision bf16; only fp32 banks export"):
        export.check_exportable(scorer)


@pytest.fixture(scope="module")
def patch_bank(washer, tmp_path_factory) -> Path:
    """The tiny bank with the paper's s*, the largest patch score, in place of the map's peak."""
    return fitted_bank(washer, tmp_path_factory.mktemp("patch"), image_score="patch")


@pytest.mark.parametrize("bank_name", ["tiny_bank", "patch_bank"])
def test_graph_module_matches_the_engine_in_torch(bank_name, test_images, monkeypatch, request):
    """The module that is traced, run eagerly in torch (blocks of 16 rows): the engine's numbers to float
    rounding, for either image score."""
    import torch

    monkeypatch.setattr(export, "BLOCK_ROWS", 16)
    scorer = Scorer(bank_io.load(request.getfixturevalue(bank_name)))
    paths = test_images
    expected = scorer.score_paths(paths, keep_maps=True)
    images = torch.from_numpy(np.stack([export.preprocess_image(p, scorer.config) for p in paths]))
    with torch.inference_mode():
        score, normalized, anomalous, amap = export.ScoreGraph(scorer)(images)
    np.testing.assert_allclose(score.numpy(), [r.score for r in expected], rtol=1e-5)
    np.testing.assert_allclose(normalized.numpy(), [r.normalized for r in expected], atol=1e-6)
    assert anomalous.tolist() == [r.anomalous for r in expected]
    np.testing.assert_allclose(amap.numpy(), np.stack([r.anomaly_map for r in expected]), atol=1e-4)
