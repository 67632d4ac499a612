"""`patchcore benchmark` on synthetic data: tables, skipped categories, written results, reproducibility."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from patchcore_cli.cli import app
from patchcore_cli.report import benchmark_tables, metric_grid
from tests.conftest import TINY_OPTIONS

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def mvtec_like(synthetic_root, tmp_path_factory):
    """The synthetic 'washer' category placed under an MVTec category name, beside nothing else."""
    root = tmp_path_factory.mktemp("mvtec")
    (root / "bottle").symlink_to(synthetic_root / "washer", target_is_directory=True)
    return root


def test_mvtec_runs_present_categories_and_skips_the_rest(mvtec_like, tmp_path):
    result = run("benchmark", "mvtec", "--root", mvtec_like, *TINY_OPTIONS, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "skipping 14 categories not found" in result.stderr
    for title in (
        "Image AUROC",
        "Pixel AUROC",
        "AUPRO",
        "Balanced accuracy at the calibrated",
        "oracle F1-max",
    ):
        assert title in result.stdout
    header = next(line for line in result.stdout.splitlines() if "Avg" in line)
    assert header.index("Avg") < header.index("Carpet") < header.index("Bottle") < header.index("Zipper")
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.csv", "results.md"}
    data = json.loads((tmp_path / "results.json").read_text())
    (row,) = data["results"]
    assert row["dataset"] == "bottle" and row["bank_rows"] > 0 and row["peak_rss_mb"] > 0
    assert set(row["fit_seconds"]) >= {"backbone", "coreset", "calibrate"}
    assert "| Avg | Carpet |" in (tmp_path / "results.md").read_text()


def test_other_categories_in_the_mvtec_layout_run_after_the_official_ones(synthetic_root):
    result = run(
        "benchmark", "mvtec", "--root", synthetic_root, "--categories", "washer", *TINY_OPTIONS, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["columns"][-1] == "washer" and [r["dataset"] for r in data["results"]] == ["washer"]
    typo = run("benchmark", "mvtec", "--root", synthetic_root, "--categories", "washr", *TINY_OPTIONS)
    assert typo.exit_code == 2 and "unknown categories: washr" in typo.stderr


def test_same_seed_gives_identical_numbers(mvtec_like):
    outputs = []
    for _ in range(2):
        result = run("benchmark", "mvtec", "--root", mvtec_like, *TINY_OPTIONS, "--json", "--seed", "3")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)["results"]
        outputs.append([(r["image"], r["pixel"], [i["score"] for i in r["images"]]) for r in rows])
    assert outputs[0] == outputs[1]


def test_folder_benchmark_with_several_rows(synthetic_root, tmp_path):
    washer = synthetic_root / "washer"
    config = tmp_path / "coarse.yaml"
    config.write_text("coreset: 0.3\n")
    result = run(
        "benchmark",
        "folder",
        "--good",
        washer / "train" / "good",
        "--defect",
        washer / "test" / "hole",
        "--masks",
        washer / "ground_truth" / "hole",
        "--name",
        "washer",
        *TINY_OPTIONS,
        "--config",
        config,
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["row"] for r in rows] == ["resnet18 [coarse]"]
    assert rows[0]["n_good"] == 4 and rows[0]["n_defect"] == 2  # 8 good split in half; 2 holes


def test_missing_root_is_a_clear_error(tmp_path):
    result = run("benchmark", "mvtec", "--root", tmp_path / "nowhere", *TINY_OPTIONS)
    assert result.exit_code == 3 and "nowhere" in result.stderr


class Row:
    def __init__(self, row, dataset, value):
        self.row, self.dataset, self.value = row, dataset, value

    def metric(self, name):
        return self.value


def test_avg_column_averages_only_the_categories_that_ran():
    rows = [Row("a", "bottle", 1.0), Row("a", "screw", 0.5), Row("b", "bottle", 0.9)]
    grid = dict(metric_grid(rows, "image_auroc", ["carpet", "bottle", "screw"]))
    assert grid["a"][0] == pytest.approx(0.75) and grid["b"][0] == pytest.approx(0.9)
    assert grid["a"][1] != grid["a"][1]  # carpet did not run: NaN, shown as n/a


def _rendered(table, width):
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_narrow_terminal_drops_empty_columns_instead_of_cutting_numbers():
    rows = [Row("efficientnet_lite0 [lite0-whole288-equal]", "bottle", 0.98765)]
    columns = ["carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut"]
    columns += ["metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"]
    wide = benchmark_tables(rows, columns, width=300)
    assert len(wide[0].columns) == 17 and "0.988" in _rendered(wide[0], 300)
    narrow = benchmark_tables(rows, columns, width=80)
    text = _rendered(narrow[0], 80)
    assert [c.header for c in narrow[0].columns] == ["backbone / config", "Avg", "Bottle"]
    assert text.count("0.988") == 2 and "14 columns without results left out" in text
    # The full table squeezed into 80 columns would have cut the numbers short.
    assert "0.988" not in _rendered(wide[0], 80)


def test_profile_prints_stages_against_the_bare_forward_pass(mvtec_like):
    result = run("benchmark", "mvtec", "--root", mvtec_like, *TINY_OPTIONS, "--profile")
    assert result.exit_code == 0, result.output
    for phase in ("/ fit (8 images)", "/ score (12 images)"):
        assert phase in result.stdout
    for stage in ("backbone", "coreset", "calibrate", "bank write", "bank load", "nearest-neighbour search"):
        assert stage in result.stdout
    assert "bare forward (same batch shape)" in result.stdout and "total / bare forward" in result.stdout
