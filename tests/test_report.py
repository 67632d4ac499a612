"""The visual outputs: `--report` HTML pages, heatmap overlays with their legend, output file names."""

from __future__ import annotations

import base64
import io
import json
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchcore_cli import report
from patchcore_cli.cli import app
from patchcore_cli.report import fmt, measured_text, promise_text
from tests.conftest import TINY_CONFIG, TINY_OPTIONS

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bank(washer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.st"
    result = invoke("fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS)
    assert result.exit_code == 0, result.output
    return path


# --- reading a report back --------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Parses a report: checks that tags balance, and collects ids, references, sections and tables."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.ids: set[str] = set()
        self.references: list[str] = []
        self.sections: list[str] = []
        self.headings: dict[str, list[str]] = {}  # section id -> its h2/h3/h4 texts
        self.summaries: dict[str, dict[str, str]] = {}  # section id -> key/value rows of table.summary
        self.tables: list[list[list[str]]] = []
        self.cases: dict[str, int] = {}  # section id -> number of figure.case
        self.doctype = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self._summary = False
        self.feed(text)
        self.close()
        if self.stack:
            self.problems.append(f"unclosed at the end: {self.stack}")

    @property
    def section(self) -> str:
        return self.sections[-1] if self.sections else ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            if found["id"] in self.ids:
                self.problems.append(f"duplicate id {found['id']}")
            self.ids.add(found["id"])
        for key in ("src", "href"):
            if found.get(key) is not None:
                self.references.append(found[key])
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "section" and "run" in (found.get("class") or ""):
            self.sections.append(found["id"])
            self.headings[found["id"]] = []
            self.summaries[found["id"]] = {}
            self.cases[found["id"]] = 0
        elif tag in ("h2", "h3", "h4"):
            self._heading = []
        elif tag == "table":
            self.tables.append([])
            self._summary = found.get("class") == "summary"
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "figure" and found.get("class") == "case":
            self.cases[self.section] += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.problems.append(f"self-closed <{tag}/>")
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.problems.append(f"end tag for void element {tag}")
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("h2", "h3", "h4") and self._heading is not None:
            if self.section:
                self.headings[self.section].append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            if self._summary and len(self._row) == 2:
                self.summaries[self.section][self._row[0]] = self._row[1]
            self._row = None

    def handle_data(self, data: str) -> None:
        for part in (self._heading, self._cell):
            if part is not None:
                part.append(data)


def read_report(folder: Path) -> tuple[str, Page]:
    text = (folder / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert page.problems == []
    assert page.doctype.lower() == "doctype html"
    return text, page


def check_references(text: str, page: Page, folder: Path) -> None:
    """Every src/href is an image data URI that decodes, a fragment that exists, or a file in `folder`."""
    assert "http:" not in text.lower() and "https:" not in text.lower() and "url(" not in text.lower()
    assert "<script" not in text.lower()
    assert page.references
    for reference in page.references:
        if reference.startswith("data:"):
            header, payload = reference.split(",", 1)
            assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
            Image.open(io.BytesIO(base64.b64decode(payload))).verify()
        elif reference.startswith("#"):
            assert reference[1:] in page.ids, reference
        else:
            assert not reference.startswith("//") and (folder / reference).is_file(), reference


SECTIONS = [
    "Summary",
    "Score distribution",
    "ROC curves",
    "Image AUROC per defect type",
    "Hardest cases",
    "Configuration and bank",
]


def check_numbers(page: Page, section: str, result: dict) -> None:
    """The section's summary and per-defect table show results.json's numbers, formatted as in the report."""
    summary = page.summaries[section]
    image, pixel = result["image"], result["pixel"]
    assert summary["image AUROC"] == fmt(image["image_auroc"])
    if pixel is not None:
        assert summary["pixel AUROC"] == fmt(pixel["pixel_auroc"])
        assert summary["AUPRO (FPR <= 0.3)"] == fmt(pixel["aupro"])
    calibrated, oracle = image["calibrated"], image["oracle"]
    assert summary["calibrated threshold (good images only)"] == fmt(calibrated["threshold"], 4)
    assert summary["oracle F1-max threshold (test labels)"] == fmt(oracle["threshold"], 4)
    for key, block in (("calibrated", calibrated), ("oracle", oracle)):
        assert summary[f"{key}: balanced accuracy"] == fmt(block["balanced_accuracy"])
        assert summary[f"{key}: F1"] == fmt(block["f1"])
        counts = f"{block['tp']} / {block['fp']} / {block['tn']} / {block['fn']}"
        assert summary[f"{key}: TP / FP / TN / FN"] == counts
    promise = result["promise"]
    assert summary["promised FPR (good images)"] == promise_text(promise["promised"])
    assert summary["measured FPR (good test images)"] == measured_text(promise)
    assert promise["false_positives"] == calibrated["fp"]
    per_defect = [[name, fmt(value)] for name, value in image["per_defect_auroc"].items()]
    assert [["defect type", "image AUROC"], *per_defect] in page.tables
    fp, fn = calibrated["fp"], calibrated["fn"]
    assert (
        f"Good images with the highest scores ({fp} false positive{'' if fp == 1 else 's'})"
        in (page.headings[section])
    )
    assert (
        f"Defective images with the lowest scores ({fn} false negative{'' if fn == 1 else 's'})"
        in (page.headings[section])
    )


# --- evaluate --report ----------------------------------------------------------------------------------


def test_evaluate_report_is_valid_self_contained_and_shows_the_results(bank, washer, tmp_path):
    folder = tmp_path / "report"
    result = invoke("evaluate", washer, "--bank", bank, "--report", folder, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"report: {folder / 'report.html'}" in result.stderr
    assert {p.name for p in folder.iterdir()} == {"report.html", "results.json"}
    data = json.loads((folder / "results.json").read_text())
    assert data == json.loads((tmp_path / "out" / "results.json").read_text())

    text, page = read_report(folder)
    check_references(text, page, folder)
    assert page.sections == ["run-1"]
    assert [h for h in page.headings["run-1"] if h in SECTIONS] == SECTIONS
    check_numbers(page, "run-1", data)
    # 4 good and 8 defective test images: every good one and the 6 lowest-scoring defective ones.
    assert page.cases["run-1"] == 4 + 6
    # Histogram, ROC and per-defect figures, then an image and an overlay per case.
    assert sum(r.startswith("data:image/png") for r in page.references) == 3
    assert sum(r.startswith("data:image/jpeg") for r in page.references) == 2 * 10
    assert str(bank) in text and "resnet18" in text


def test_report_without_pixel_metrics_still_shows_the_hardest_cases(bank, washer, tmp_path):
    folder = tmp_path / "report"
    args = ["--good", washer / "test" / "good", "--defect", washer / "test" / "hole"]
    result = invoke("evaluate", "--bank", bank, *args, "--no-pixel-metrics", "--report", folder)
    assert result.exit_code == 0, result.output
    text, page = read_report(folder)
    check_references(text, page, folder)
    summary = page.summaries["run-1"]
    assert summary["pixel metrics"] == "off" and "pixel AUROC" not in summary
    assert "No pixel ROC" in text
    assert page.cases["run-1"] == 4 + 2


def test_report_folder_that_cannot_be_made_is_exit_code_6(bank, washer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("evaluate", washer, "--bank", bank, "--report", blocker / "report")
    assert result.exit_code == 6 and "cannot create folder" in result.stderr


def test_hardest_cases_are_the_extremes_and_other_maps_are_dropped(washer):
    from patchcore_cli import config as config_mod
    from patchcore_cli.data import list_images, mvtec_category
    from patchcore_cli.engine import Scorer, fit
    from patchcore_cli.evaluation import evaluate

    fitted = fit(list_images([washer / "train" / "good"]), config_mod.build(**TINY_CONFIG))
    scorer = Scorer(fitted.bank)
    split = mvtec_category(washer.parent, washer.name, require_masks=False)
    seen = []
    original = scorer.score_paths

    def spy(*args, **kwargs):
        results = original(*args, **kwargs)
        seen.extend(results)
        return results

    scorer.score_paths = spy
    evaluation = evaluate(scorer, split, pixel_metrics=False, report_cases=2)
    assert all(result.anomaly_map is None for result in seen)  # dropped as soon as they were scored

    visuals = evaluation.visuals
    records = evaluation.images
    good = sorted((r["score"] for r in records if r["label"] == 0), reverse=True)
    defect = sorted(r["score"] for r in records if r["label"] == 1)
    assert [case.score for case in visuals.highest_good] == good[:2]
    assert [case.score for case in visuals.lowest_defect] == defect[:2]
    for case in visuals.highest_good + visuals.lowest_defect:
        assert case.anomaly_map.shape == (64, 64)
        assert case.anomalous == (case.score >= scorer.threshold)
    assert visuals.pixel_roc is None and visuals.image_roc is not None
    assert visuals.bank["calibration"]["image_threshold"] == scorer.threshold


# --- benchmark --report -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_report_has_one_section_per_row_and_dataset(synthetic_root, tmp_path):
    root = tmp_path / "mvtec"
    root.mkdir()
    (root / "bottle").symlink_to(synthetic_root / "washer", target_is_directory=True)
    (root / "screw").symlink_to(synthetic_root / "washer", target_is_directory=True)
    configs = []
    for name, ratio in (("small", 0.05), ("large", 0.2)):
        configs += ["--config", tmp_path / f"{name}.yaml"]
        (tmp_path / f"{name}.yaml").write_text(f"coreset: {ratio}\n")
    folder = tmp_path / "report"
    args = ["--root", root, "--categories", "bottle,screw", *TINY_OPTIONS, *configs]
    result = invoke("benchmark", "mvtec", *args, "--report", folder)
    assert result.exit_code == 0, result.output
    data = json.loads((folder / "results.json").read_text())
    text, page = read_report(folder)
    check_references(text, page, folder)
    assert page.sections == ["run-1", "run-2", "run-3", "run-4"]
    assert [(r["row"], r["dataset"]) for r in data["results"]] == [
        ("resnet18 [small]", "bottle"),
        ("resnet18 [small]", "screw"),
        ("resnet18 [large]", "bottle"),
        ("resnet18 [large]", "screw"),
    ]
    for number, row in enumerate(data["results"], start=1):
        section = f"run-{number}"
        assert page.headings[section][0] == f"{row['row']} / {report.display_name(row['dataset'])}"
        assert [h for h in page.headings[section] if h in SECTIONS] == SECTIONS
        check_numbers(page, section, row)
    assert [f"#run-{n}" for n in range(1, 5)] == [r for r in page.references if r.startswith("#")]
    # The summary grid: one row per configuration, Avg then the two categories that ran.
    image_grid = next(t for t in page.tables if t[0] == ["backbone / config", "Avg", "Bottle", "Screw"])
    bottle = {r["row"]: r["image"]["image_auroc"] for r in data["results"] if r["dataset"] == "bottle"}
    assert image_grid[1][0] == "resnet18 [small]" and image_grid[1][2] == fmt(bottle["resnet18 [small]"])


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
    small = report.shrink_to_fit(image, amap, inspected, 300)
    assert [part.shape[:2] for part in small] == [(200, 300)] * 3
    assert small[2].dtype == bool and not small[2][:, :29].any() and small[2][:, 31:].all()
    picture = report.heatmap_picture(*small, 3.0, 21.5, 19.0, True)
    assert picture.shape == (200 + report.legend_size(300)[1], report.LEGEND_MIN_WIDTH, 3)
    assert report.shrink_to_fit(*small, 300)[0] is small[0]


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
