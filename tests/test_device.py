"""`--device`: resolution, the GPU's brute-force search run on the CPU against the exact CPU search, and
(only where a CUDA GPU is present) fit and score on CUDA against the CPU within the README's tolerances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from patchcore_cli import bank as bank_io
from patchcore_cli import config as config_mod
from patchcore_cli import device as device_mod
from patchcore_cli import gpu_search
from patchcore_cli.cli import app
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit
from patchcore_cli.errors import ConfigError
from patchcore_cli.gpu_search import MatmulIndex
from patchcore_cli.scoring import NearestNeighbours
from patchcore_cli.search import ClusterIndex
from tests.conftest import TINY_CONFIG, TINY_OPTIONS

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()

# CUDA against CPU (README, "GPU"): the same bank scored on either device, fp32.
SCORE_RTOL = 1e-4  # image scores, relative
MAP_TOL = 1e-3  # anomaly maps, absolute, as a fraction of the largest map value


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# --- resolving --device ----------------------------------------------------------------------------


@pytest.mark.parametrize(("gpu", "expected"), [(False, "cpu"), (True, "cuda")])
def test_auto_follows_what_torch_sees(monkeypatch, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert device_mod.resolve("auto") == expected
    assert device_mod.resolve("cpu") == "cpu"


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda: .*; use --device cpu or auto$"):
        device_mod.resolve("cuda")
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        device_mod.resolve("gpu")


def test_device_is_a_runtime_option_not_stored_in_the_bank():
    config = config_mod.build(**TINY_CONFIG, device="cpu")
    assert config.device == "cpu" and "device" not in config.model_dict()
    assert config_mod.build(**TINY_CONFIG).device == "auto"
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, got 'tpu'"):
        config_mod.build(**TINY_CONFIG, device="tpu")


def test_cli_cuda_without_a_gpu_exits_2_with_one_line(washer, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bank = tmp_path / "b.st"
    args = ["fit", washer / "train" / "good", "--out", bank, *TINY_OPTIONS]
    refused = invoke(*args, "--device", "cuda")
    assert refused.exit_code == 2
    assert refused.stderr.startswith("error: --device cuda:") and len(refused.stderr.splitlines()) == 1
    assert not bank.exists()
    assert invoke(*args, "--device", "cpu").exit_code == 0
    for name, message in [("cuda", "--device cuda: "), ("gpu", "device must be one of auto, cpu, cuda")]:
        result = invoke("score", washer / "test" / "good", "--bank", bank, "--device", name)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.splitlines()) == 1


def test_cli_auto_and_cpu_give_the_same_bank_and_scores_here(washer, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scores = {}
    for name in ("auto", "cpu"):
        bank = tmp_path / f"{name}.st"
        fitted = invoke(
            "fit", washer / "train" / "good", "--out", bank, *TINY_OPTIONS, "--device", name, "--json"
        )
        assert fitted.exit_code == 0, fitted.output
        assert json.loads(fitted.stdout)["device"] == "cpu"
        scored = invoke("score", washer / "test", "--bank", bank, "--device", name, "--json")
        assert scored.exit_code == 0, scored.output
        scores[name] = json.loads(scored.stdout)["results"]
    auto, cpu = bank_io.load(tmp_path / "auto.st"), bank_io.load(tmp_path / "cpu.st")
    np.testing.assert_array_equal(auto.memory_bank, cpu.memory_bank)
    assert auto.config == cpu.config and "device" not in cpu.config
    assert scores["auto"] == scores["cpu"]


def test_full_fp32_turns_tf32_off_on_cuda_and_restores_the_settings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with device_mod.full_fp32("cpu"):
        assert (matmul.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(RuntimeError, match="inside"), device_mod.full_fp32("cuda"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        raise RuntimeError("inside")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


# --- the GPU's search, run on the CPU against ClusterIndex -----------------------------------------


def clustered(rng, rows, dim, centres=20, spread=1.0, scale=5.0, offset=0.0):
    middle = rng.normal(size=(centres, dim)) * scale + offset
    return (middle[rng.integers(0, centres, rows)] + rng.normal(size=(rows, dim)) * spread).astype(np.float32)


def assert_same(expected, found):
    np.testing.assert_array_equal(found[1], expected[1])
    # both are float64 sums of the same float64 squares, in different orders
    np.testing.assert_allclose(found[0], expected[0], rtol=1e-12, atol=0)


SHAPES = [(1, 3, 0, 1), (2, 1, 0, 1), (7, 5, 0, 1), (600, 20, 0, 1), (1500, 152, 1e4, 1)]


@pytest.mark.parametrize(
    ("rows", "dim", "offset", "scale"), [*SHAPES, (400, 300, 3, 1e-30), (500, 24, 0, 1e30)]
)
def test_matmul_index_equals_cluster_index(rows, dim, offset, scale):
    rng = np.random.default_rng(rows + dim)
    bank = (clustered(rng, rows, dim, offset=offset) * np.float32(scale)).astype(np.float32)
    queries = (clustered(rng, 70, dim, offset=offset) * np.float32(scale)).astype(np.float32)
    assert np.isfinite(bank).all()
    cpu, gpu = ClusterIndex(bank), MatmulIndex(bank)
    assert_same(cpu.nearest(queries), gpu.nearest(queries))
    k = min(9, rows + 2)  # more neighbours than rows: the missing ones are inf / -1
    assert_same(cpu.neighbours(queries, k), gpu.neighbours(queries, k))


@pytest.mark.parametrize("k", [1, 9])
def test_matmul_index_skips_each_querys_source(k):
    rng = np.random.default_rng(5)
    bank = clustered(rng, 600, 20)
    sources = rng.integers(0, 6, len(bank))
    queries = bank[::10] + 0.001  # each query's own row is nearest unless skipped
    skip = sources[::10].copy()
    skip[::7] = -1  # a negative id skips nothing
    cpu, gpu = ClusterIndex(bank, sources), MatmulIndex(bank, sources)
    assert_same(cpu.neighbours(queries, k, skip), gpu.neighbours(queries, k, skip))
    d2, rows = gpu.nearest(queries, skip)
    assert (sources[rows][skip >= 0] != skip[skip >= 0]).all()
    assert (d2[skip < 0] < 1e-4).all()


def test_matmul_index_with_every_row_skipped_finds_nothing():
    bank = np.random.default_rng(6).normal(size=(30, 4)).astype(np.float32)
    d2, rows = MatmulIndex(bank, np.zeros(30, np.int64)).nearest(bank[:3], np.array([0, -1, 0]))
    assert rows.tolist() == [-1, 1, -1] and np.isinf(d2[[0, 2]]).all() and d2[1] == 0.0


def test_matmul_index_ties_go_to_the_lowest_row():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 16)).astype(np.float32)
    bank = np.concatenate([base, base[::-1], base])  # every row three times, in two orders
    queries = np.concatenate([base[:10], base[:10] + 0.01])
    assert_same(ClusterIndex(bank).neighbours(queries, 3), MatmulIndex(bank).neighbours(queries, 3))
    eye = np.eye(8, dtype=np.float32)
    ring = np.concatenate([eye * 3, -eye * 3, eye * 7])[rng.permutation(24)]  # equidistant from 0
    _, rows = MatmulIndex(ring).neighbours(np.zeros((1, 8), np.float32), 16)
    assert rows[0].tolist() == np.flatnonzero(np.abs(ring).max(1) == 3).tolist()


def test_matmul_index_blocks_merge_exactly(monkeypatch):
    # Small blocks: many bank blocks merged per query block, and several query blocks.
    monkeypatch.setattr(gpu_search, "_BANK_BLOCK", 37)
    monkeypatch.setattr(gpu_search, "_QUERY_BLOCK", 16)
    rng = np.random.default_rng(8)
    bank, queries = clustered(rng, 1000, 30), clustered(rng, 57, 30)
    sources = rng.integers(0, 4, len(bank))
    skip = rng.integers(-1, 4, len(queries))
    cpu, gpu = ClusterIndex(bank, sources), MatmulIndex(bank, sources)
    assert_same(cpu.nearest(queries, skip), gpu.nearest(queries, skip))
    assert_same(cpu.neighbours(queries, 9, skip), gpu.neighbours(queries, 9, skip))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 120),
    dim=st.integers(1, 40),
    grid=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matmul_index_equals_cluster_index(rows, dim, grid, seed):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(rows, dim))
    queries = rng.normal(size=(17, dim))
    if grid:  # snap to a grid: many exact ties and duplicates
        bank, queries = np.round(bank / grid) * grid, np.round(queries / grid) * grid
    bank, queries = bank.astype(np.float32), queries.astype(np.float32)
    (expected_d2, expected_rows), (d2, rows_found) = (
        ClusterIndex(bank).nearest(queries),
        MatmulIndex(bank).nearest(queries),
    )
    full = ((queries.astype(np.float64)[:, None] - bank.astype(np.float64)[None]) ** 2).sum(-1)
    nearest = full.min(1, keepdims=True)
    tied = (full <= nearest + 1e-12 * nearest).sum(1)
    # The documented caveat: with more than SPARE other rows at the nearest distance, the row returned is
    # one of them, not necessarily the lowest; its distance is the same.
    np.testing.assert_allclose(d2, expected_d2, rtol=1e-12, atol=0)
    few = tied <= gpu_search.SPARE + 1
    np.testing.assert_array_equal(rows_found[few], expected_rows[few])
    np.testing.assert_allclose(full[np.arange(len(queries)), rows_found], expected_d2, rtol=1e-12, atol=0)


def test_nearest_neighbours_picks_the_search_by_device():
    bank = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    assert isinstance(NearestNeighbours(bank, "exact").index, ClusterIndex)
    assert isinstance(NearestNeighbours(bank, "exact", device="cpu").index, ClusterIndex)


def test_engine_with_the_gpu_search_on_the_cpu_gives_the_same_results(washer, monkeypatch):
    # Fit (calibration skips each image's own rows, eq. 7 asks for b = 9 neighbours) and score with the
    # search `--device cuda` uses, here on the CPU; everything else as on the CPU.
    paths = list_images([washer / "train" / "good"])
    tests = list_images([washer / "test"])
    config = config_mod.build(**TINY_CONFIG, device="cpu")
    reference = fit(paths, config)
    expected = Scorer(reference.bank, device="cpu").score_paths(tests, keep_maps=True)
    monkeypatch.setattr(
        "patchcore_cli.search.ClusterIndex", lambda bank, sources=None: MatmulIndex(bank, sources)
    )
    swapped = fit(paths, config)
    assert swapped.bank.calibration == reference.bank.calibration
    found = Scorer(swapped.bank, device="cpu").score_paths(tests, keep_maps=True)
    assert [r.score for r in found] == [r.score for r in expected]
    np.testing.assert_array_equal(
        np.stack([r.anomaly_map for r in found]), np.stack([r.anomaly_map for r in expected])
    )


# --- CUDA against the CPU, where there is a GPU ------------------------------------------------------

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")


def _score(bank, device, paths):
    results = Scorer(bank, device=device).score_paths(paths, keep_maps=True)
    return np.array([r.score for r in results]), np.stack([r.anomaly_map for r in results])


def _assert_close(bank, cpu, cuda):
    (cpu_scores, cpu_maps), (cuda_scores, cuda_maps) = cpu, cuda
    np.testing.assert_allclose(cuda_scores, cpu_scores, rtol=SCORE_RTOL)
    np.testing.assert_allclose(cuda_maps, cpu_maps, rtol=0, atol=MAP_TOL * np.abs(cpu_maps).max())
    threshold = bank.calibration["image_threshold"]
    near = np.abs(cpu_scores - threshold) <= SCORE_RTOL * abs(threshold)
    assert ((cuda_scores >= threshold) == (cpu_scores >= threshold))[~near].all()


@cuda_only
def test_cuda_scores_a_cpu_bank_like_the_cpu(washer):
    paths = list_images([washer / "test"])
    bank = fit(list_images([washer / "train" / "good"]), config_mod.build(**TINY_CONFIG, device="cpu")).bank
    _assert_close(bank, _score(bank, "cpu", paths), _score(bank, "cuda", paths))


@cuda_only
@pytest.mark.parametrize(
    "extra", [{}, {"reduction": "random", "dim": 100}, {"backbone": "resnet18+resnet50"}]
)
def test_cuda_fits_the_bank_the_cpu_fits(washer, extra):
    train, paths = list_images([washer / "train" / "good"]), list_images([washer / "test"])
    banks = {
        name: fit(train, config_mod.build(**{**TINY_CONFIG, **extra, "device": name})).bank
        for name in ("cpu", "cuda")
    }
    cpu, cuda = banks["cpu"], banks["cuda"]
    assert cuda.config == cpu.config  # nothing about the device is stored
    for cpu_part, cuda_part in zip(cpu.parts, cuda.parts, strict=True):
        scale = np.abs(cpu_part.memory_bank).max()
        np.testing.assert_allclose(
            cuda_part.memory_bank, cpu_part.memory_bank, rtol=0, atol=SCORE_RTOL * scale
        )
    for key in ("image_threshold", "pixel_threshold"):
        assert cuda.calibration[key] == pytest.approx(cpu.calibration[key], rel=SCORE_RTOL)
    # A bank fitted on either device scores on the other.
    _assert_close(cpu, _score(cpu, "cpu", paths), _score(cuda, "cpu", paths))
    _assert_close(cpu, _score(cpu, "cpu", paths), _score(cpu, "cuda", paths))


@cuda_only
def test_cuda_bf16_runs_with_bfloat16_autocast(washer):
    paths = list_images([washer / "test"])
    config = config_mod.build(**TINY_CONFIG, precision="bf16", device="cpu")
    bank = fit(list_images([washer / "train" / "good"]), config).bank
    cpu_scores, _ = _score(bank, "cpu", paths)
    cuda_scores, _ = _score(bank, "cuda", paths)
    # bfloat16 keeps 8 bits of mantissa; the two devices round differently, so only a loose bound holds.
    np.testing.assert_allclose(cuda_scores, cpu_scores, rtol=5e-2)


@cuda_only
def test_cli_device_cuda_end_to_end(washer, tmp_path):
    bank = tmp_path / "bank.st"
    fitted = invoke(
        "fit", washer / "train" / "good", "--out", bank, *TINY_OPTIONS, "--device", "cuda", "--json"
    )
    assert fitted.exit_code == 0, fitted.output
    assert json.loads(fitted.stdout)["device"] == "cuda"
    runs = {}
    for name in ("cpu", "cuda"):
        scored = invoke("score", washer / "test", "--bank", bank, "--device", name, "--json")
        assert scored.exit_code == 0, scored.output
        runs[name] = np.array([r["score"] for r in json.loads(scored.stdout)["results"]])
    np.testing.assert_allclose(runs["cuda"], runs["cpu"], rtol=SCORE_RTOL)
