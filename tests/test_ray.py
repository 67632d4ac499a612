"""`score --ray` and `benchmark --ray` give what a local run gives, on a local Ray and on a simulated
cluster of a head node and two worker nodes (see the `ray_cluster` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchcore_cli import bank as bank_io
from patchcore_cli.cli import app
from patchcore_cli.coreset import budget_for
from tests.conftest import TINY_OPTIONS

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray
runner = CliRunner()
ROOT = Path(__file__).parents[1]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bank(washer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-bank") / "bank.st"
    result = invoke("fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def inputs(washer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good test images plus one unreadable file, in their own folder."""
    folder = tmp_path_factory.mktemp("ray-inputs")
    for image in sorted((washer / "test" / "good").iterdir()):
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "001b.png").write_bytes(b"not a png")
    return folder


def test_local_ray_gives_the_local_json(bank: Path, washer: Path) -> None:
    """`--ray` with no address in a fresh process: it starts a Ray on this machine and stops it again."""
    images = washer / "test" / "hole"
    local = invoke("score", images, "--bank", bank, "--json")
    assert local.exit_code == 0, local.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "patchcore_cli", "score", str(images), "--bank", str(bank), "--json"]
    on_ray = subprocess.run(
        [*command, "--ray"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stdout == local.stdout


def test_the_cluster_has_two_worker_nodes(ray_cluster) -> None:
    from patchcore_cli.distributed import RayOptions, worker_shape

    assert len([node for node in ray.nodes() if node["Alive"]]) == 3
    # One CPU per worker node: each of the two actors or tasks runs on its own node.
    assert worker_shape(RayOptions()) == (1, 2)


def test_workers_run_the_drivers_package(ray_cluster) -> None:
    import patchcore_cli

    @ray.remote(num_cpus=1)
    def where() -> str:
        import patchcore_cli

        return patchcore_cli.__file__

    assert set(ray.get([where.remote() for _ in range(4)])) == {patchcore_cli.__file__}


def test_score_matches_local_for_paths_uris_heatmaps_and_masks(
    ray_cluster, bank: Path, washer: Path, inputs: Path, tmp_path: Path
) -> None:
    """Local paths and file:// URIs (read by Ray Data) together, a bad file skipped, pictures written:
    the same JSON and byte-identical pictures, in input order, names deduplicated the same way."""
    holes = washer / "test" / "hole"
    common = ["--bank", bank, "--json", "--skip-bad"]
    local = invoke("score", inputs, holes, *common, "--heatmaps", tmp_path / "lh", "--masks", tmp_path / "lm")
    on_ray = invoke(
        "score", inputs, holes.as_uri(), *common, "--heatmaps", tmp_path / "rh", "--masks", tmp_path / "rm",
        "--ray",
    )  # fmt: skip
    assert local.exit_code == 0 and on_ray.exit_code == 0, on_ray.output
    expected, got = json.loads(local.stdout), json.loads(on_ray.stdout)
    assert got["threshold"] == expected["threshold"]
    # The URI images are named by their URIs; everything else is the same, record for record.
    for record in expected["results"]:
        if record["file"].startswith(str(holes)):
            record["file"] = Path(record["file"]).as_uri()
    assert got["results"] == expected["results"]
    assert [r.get("skipped") for r in got["results"]].count(True) == 1
    for ours, theirs in (("lh", "rh"), ("lm", "rm")):
        names = sorted(p.name for p in (tmp_path / ours).iterdir())
        assert names == sorted(p.name for p in (tmp_path / theirs).iterdir())
        # hole/000 beside another folder's 000: both named by their folders, locally and on Ray alike.
        assert "hole__000_heatmap.png" in names or "hole__000_mask.png" in names
        for name in names:
            assert (tmp_path / theirs / name).read_bytes() == (tmp_path / ours / name).read_bytes()


def test_score_worker_rows_are_the_local_results(ray_cluster, bank: Path, inputs: Path) -> None:
    """The actor's code, run in this process: rows in (a path, bytes from a URI, a bad file), scores and
    PNGs out exactly as a local Scorer and `report` make them; a worker that cannot start answers every
    row with its error instead of dying."""
    import numpy as np
    import pyarrow as pa

    from patchcore_cli import __version__, distributed, report
    from patchcore_cli import bank as bank_io
    from patchcore_cli.data import DEFAULT_MAX_PIXELS, load_image
    from patchcore_cli.engine import Scorer
    from patchcore_cli.errors import ConfigError

    loaded = bank_io.load(bank)
    files = sorted(inputs.iterdir())  # 000, 001, 001b (unreadable), 002, 003
    data = [None, files[1].read_bytes(), None, None, None]
    names = [str(f) if d is None else f.as_uri() for f, d in zip(files, data, strict=True)]
    batch = pa.table(
        {
            "index": pa.array([10, 11, 12, 13, 14], pa.int64()),
            "source": pa.array(names),
            "bytes": pa.array(data, pa.binary()),
        }
    )
    ref = ray.put(distributed.bank_payload(loaded))
    runtime = {"threads": 1}
    worker = distributed.ScoreWorker([ref], __version__, str(bank), runtime, True, True, DEFAULT_MAX_PIXELS)
    rows = worker(batch).to_pylist()
    scorer = Scorer(loaded, threads=1)
    local = scorer.score_paths(files, keep_maps=True, skip_bad=True)
    threshold = float(loaded.calibration["pixel_threshold"])
    assert [row["index"] for row in rows] == [10, 11, 12, 13, 14]
    for row, result, file in zip(rows, local, files, strict=True):
        assert (row["score"], row["normalized"], row["anomalous"], row["error"]) == (
            result.score,
            result.normalized,
            result.anomalous,
            result.error,
        )
        if result.error is None:
            image = np.asarray(load_image(file))
            heat, mask = report.score_pictures(
                result.anomaly_map,
                result.geometry,
                threshold,
                image,
                True,
                result.score,
                scorer.threshold,
                result.anomalous,
            )
            assert (row["heatmap"], row["mask"]) == (report.png_bytes(heat), report.png_bytes(mask))
        assert row["failure"] is None
    assert rows[2]["error"] == "not an image file (unrecognised format)"

    stale = distributed.ScoreWorker([ref], "0.0.1", str(bank), runtime, False, False, DEFAULT_MAX_PIXELS)
    failed = stale(batch).to_pylist()
    assert [row["index"] for row in failed] == [10, 11, 12, 13, 14]
    assert {row["failure_kind"] for row in failed} == {"ConfigError"}
    error = distributed._rebuild(failed[0]["failure_kind"], failed[0]["failure"])
    assert isinstance(error, ConfigError) and error.exit_code == 2
    assert str(error) == (
        f"this Ray worker runs patchcore {__version__}, the driver 0.0.1: "
        "install the same version on every node"
    )


def test_score_errors_are_the_local_errors(
    ray_cluster, bank: Path, inputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable image without --skip-bad, and a bad option: one line, the same exit code. The
    inputs are given relative to the current folder, which the workers do not share: the message still
    names them as given."""
    monkeypatch.chdir(inputs.parent)
    cases = (([], 3, f"{inputs.name}/001b.png: not an image file"), (["--index", "kdtree"], 2, "kdtree"))
    for extra, code, problem in cases:
        local = invoke("score", inputs.name, "--bank", bank, *extra)
        on_ray = invoke("score", inputs.name, "--bank", bank, *extra, "--ray")
        assert on_ray.exit_code == local.exit_code == code, on_ray.output
        assert on_ray.stderr.splitlines()[-1] == local.stderr.splitlines()[-1]
        assert problem in on_ray.stderr.splitlines()[-1]


def test_score_sizing_errors(ray_cluster, bank: Path, inputs: Path) -> None:
    too_wide = invoke("score", inputs, "--bank", bank, "--ray", "--ray-cpus", "2")
    assert too_wide.exit_code == 2
    assert "--ray-cpus 2: no Ray node has that many CPUs (the largest has 1)" in too_wide.stderr
    too_many = invoke("score", inputs, "--bank", bank, "--ray", "--ray-actors", "3")
    assert too_many.exit_code == 2
    assert "--ray-actors 3: the Ray cluster holds 2 workers of 1 CPUs" in too_many.stderr


def _metrics(results_json: Path) -> list[dict]:
    """results.json without what measures this machine (seconds, memory) rather than the model."""
    rows = json.loads(results_json.read_text())["results"]
    timing = {"fit_seconds", "peak_rss_mb", "score_stages_s", "score_ms_per_image"}
    return [{key: value for key, value in row.items() if key not in timing} for row in rows]


def test_benchmark_matches_local(ray_cluster, washer: Path, tmp_path: Path) -> None:
    """One task per (row, dataset) on the two worker nodes; the same numbers, rows in the local order."""
    for name, ratio in (("sparse", 0.1), ("dense", 0.25)):
        (tmp_path / f"{name}.yaml").write_text(f"coreset: {ratio}\n")
    args = [
        "benchmark", "folder", "--good", washer / "train" / "good", "--good", washer / "test" / "good",
        "--defect", washer / "test" / "hole", "--defect", washer / "test" / "scratch",
        "--masks", washer / "ground_truth" / "hole", "--masks", washer / "ground_truth" / "scratch",
        "--config", tmp_path / "sparse.yaml", "--config", tmp_path / "dense.yaml", *TINY_OPTIONS,
    ]  # fmt: skip
    local = invoke(*args, "--out", tmp_path / "local")
    on_ray = invoke(*args, "--out", tmp_path / "ray", "--ray")
    assert local.exit_code == 0 and on_ray.exit_code == 0, on_ray.output
    expected = _metrics(tmp_path / "local" / "results.json")
    assert len(expected) == 2 and expected[0]["row"] != expected[1]["row"]
    assert _metrics(tmp_path / "ray" / "results.json") == expected
    metric_tables = local.stdout.split("Cost per dataset")[0]
    assert on_ray.stdout.split("Cost per dataset")[0] == metric_tables


def test_benchmark_error_is_the_local_error(ray_cluster, washer: Path, tmp_path: Path) -> None:
    train = tmp_path / "train"
    train.mkdir()
    for image in sorted((washer / "train" / "good").iterdir())[:3]:
        (train / image.name).write_bytes(image.read_bytes())
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    args = [
        "benchmark", "folder", "--train", train, "--good", washer / "test" / "good",
        "--defect", washer / "test" / "hole", "--no-pixel-metrics", *TINY_OPTIONS,
    ]  # fmt: skip
    local = invoke(*args)
    on_ray = invoke(*args, "--ray")
    assert on_ray.exit_code == local.exit_code == 3, on_ray.output
    assert on_ray.stderr.splitlines()[-1] == local.stderr.splitlines()[-1]
    assert "broken.png" in on_ray.stderr


# --- fit --------------------------------------------------------------------------------------------

TWO_IMAGES = str(budget_for(2 * 64, 128))  # 64 px crops: 8 x 8 patches, distances on the 128-d projection


def _fit_record(result) -> dict:
    """`fit --json` without what differs between two runs of the same fit: the output path and seconds."""
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    return {key: value for key, value in record.items() if key not in ("bank", "timings_s")}


def _contents(path: Path) -> list:
    """Everything a bank file holds but its creation time, member by member."""
    bank = bank_io.load(path)
    whole = (bank.config, bank.calibration, bank.n_train_images, bank.n_patches, bank.calibration_sample)
    return [
        whole,
        *[(p.memory_bank.tobytes(), p.config, p.calibration, p.weights_sha256) for p in bank.parts],
    ]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images of different shapes: with framing aspect their patch counts differ."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("ray-ragged")
    rng = np.random.default_rng(8)
    for number, size in enumerate([(96, 96), (150, 96), (96, 160), (200, 100), (120, 96), (96, 96)]):
        Image.fromarray(rng.integers(90, 160, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{number}.png"
        )
    return folder


@pytest.mark.parametrize(
    ("case", "passes"),
    [
        (["--max-memory", TWO_IMAGES], [4]),  # four shards on two worker nodes
        (["--framing", "aspect", "--max-memory", str(budget_for(3 * 96, 128))], [2]),  # framing tasks first
        (["--backbone", "resnet18+efficientnet_lite0", "--threads", "1"], [1, 1]),  # one pass per member
    ],
    ids=["shards", "aspect", "ensemble"],
)
def test_fit_matches_the_local_fit(
    ray_cluster, washer: Path, ragged: Path, tmp_path: Path, case: list, passes: list
) -> None:
    """The same bank, bit for bit, and the same report, with the shards' tasks on the worker nodes.
    EfficientNet-Lite rounds differently on one thread, as the workers here run: the ensemble fits on one
    thread both ways (docs/cluster.md)."""
    images = ragged if "aspect" in case else washer / "train" / "good"
    args = [images, *TINY_OPTIONS, *case, "--json"]
    local = invoke("fit", *args, "--out", tmp_path / "local.st")
    on_ray = invoke("fit", *args, "--out", tmp_path / "ray.st", "--ray")
    assert _fit_record(on_ray) == _fit_record(local)
    assert _contents(tmp_path / "ray.st") == _contents(tmp_path / "local.st")
    assert json.loads(on_ray.stdout)["coreset_passes"] == passes


@pytest.mark.parametrize("framing", ["whole", "aspect"])
def test_fit_errors_are_the_local_errors_and_keep_the_old_bank(
    ray_cluster, washer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    """Two bad images in different shards: the first one is reported, named as given (a relative path the
    workers do not share), with the local exit code; the bank already at --out is left as it was."""
    train = tmp_path / "train"
    train.mkdir()
    for image in sorted((washer / "train" / "good").iterdir()):
        (train / image.name).write_bytes(image.read_bytes())
    (train / "003b.png").write_bytes(b"not a png")  # image 4 of 10: the third shard of two images
    (train / "006b.png").write_bytes(b"")  # image 8: the fifth shard, which may well finish first
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bank.st"
    assert invoke("fit", washer / "train" / "good", "--out", out, *TINY_OPTIONS).exit_code == 0
    before = out.read_bytes()
    args = ["fit", "train", "--out", out, "--max-memory", TWO_IMAGES, "--framing", framing, *TINY_OPTIONS]
    local = invoke(*args)
    on_ray = invoke(*args, "--ray")
    assert on_ray.exit_code == local.exit_code == 3, on_ray.output
    assert on_ray.stderr.splitlines()[-1] == local.stderr.splitlines()[-1]
    assert "train/003b.png: not an image file" in on_ray.stderr.splitlines()[-1]
    assert out.read_bytes() == before
    update = invoke("fit", "train", "--update", out, "--ray")
    assert update.exit_code == 2 and "--update runs on this machine; drop --ray" in update.stderr


def test_gather_raises_the_first_error_in_task_order(ray_cluster) -> None:
    """A later task's error that arrives first waits for the earlier tasks, whose own error wins."""
    import time

    from patchcore_cli import distributed
    from patchcore_cli.engine import _Silent
    from patchcore_cli.errors import ConfigError, InputError

    @ray.remote(num_cpus=0)
    def after(seconds: float, value: object) -> object:
        time.sleep(seconds)
        return value

    refs = [
        after.remote(0, "ok"),
        after.remote(3, InputError("first")),
        after.remote(0, ConfigError("later")),
    ]
    with pytest.raises(InputError, match="first"):
        distributed._gather(refs, _Silent(), [1, 1, 1])
    assert distributed._gather([after.remote(0, "a"), after.remote(0, "b")], _Silent(), [1, 1]) == ["a", "b"]
