"""The CLI end to end through Typer's runner: fit -> score -> evaluate, exit codes, machine output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchcore_cli import __version__
from patchcore_cli.cli import app
from patchcore_cli.report import legend_size
from tests.conftest import TINY_OPTIONS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bank(washer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.st"
    result = invoke("fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 8 and report["bank_rows"] == 51 and report["random_weights"] is True
    assert "RANDOM backbone weights" in result.stderr
    return path


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"patchcore {__version__}"


def test_the_entry_point_leaves_its_objects_out_of_the_exit_collections(monkeypatch):
    import gc

    from patchcore_cli import cli

    monkeypatch.setattr("sys.argv", ["patchcore", "--version"])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main()
        assert ended.value.code == 0
        assert gc.get_freeze_count() > 0  # frozen even though the command ended by raising SystemExit
    finally:
        gc.unfreeze()


def test_fit_table_lists_stages_and_threshold(washer, tmp_path):
    result = invoke(
        "fit", washer / "train" / "good", "--out", tmp_path / "b.st", *TINY_OPTIONS, "--coreset", "0.2"
    )
    assert result.exit_code == 0, result.output
    for field in (
        "images",
        "patches",
        "bank",
        "time: backbone",
        "time: coreset",
        "time: bank write",
        "threshold",
    ):
        assert field in result.stdout
    # TINY_OPTIONS: --framing whole (the default), --crop 64; the row says what the backbone saw
    assert "whole image to 64 x 64 px" in result.stdout


def test_score_json_is_valid_and_complete(bank, washer):
    result = invoke("score", washer / "test", "--bank", bank, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    files = {Path(r["file"]).parent.name for r in data["results"]}
    assert files == {"good", "hole", "scratch", "missing_piece", "color_shift"}
    for record in data["results"]:
        assert (record["normalized"] >= 0.5) == record["anomalous"] == (record["score"] >= data["threshold"])


def test_score_csv(bank, washer):
    result = invoke("score", washer / "test" / "good", "--bank", bank, "--csv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "file,score,normalized,anomalous,error" and len(lines) == 5


def test_fail_on_anomaly_sets_exit_code(bank, washer):
    everything = invoke("score", washer / "test", "--bank", bank, "--json", "--fail-on-anomaly")
    flagged = any(r["anomalous"] for r in json.loads(everything.stdout)["results"])
    assert everything.exit_code == (1 if flagged else 0)


def test_heatmaps_carry_a_legend_and_masks_match_original_size(bank, washer, tmp_path):
    result = invoke(
        "score",
        washer / "test" / "hole",
        "--bank",
        bank,
        "--heatmaps",
        tmp_path / "h",
        "--masks",
        tmp_path / "m",
    )
    assert result.exit_code == 0, result.output
    heatmaps = sorted((tmp_path / "h").glob("*.png"))
    masks = sorted((tmp_path / "m").glob("*.png"))
    assert len(heatmaps) == len(masks) == 2
    original = Image.open(sorted((washer / "test" / "hole").glob("*.png"))[0])
    width, height = original.size
    canvas_width, strip = legend_size(width)  # the image area keeps the original size; see test_report
    assert Image.open(heatmaps[0]).size == (canvas_width, height + strip)
    mask = Image.open(masks[0])
    assert mask.size == original.size and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_missing_bank_is_exit_code_4(washer, tmp_path):
    result = invoke("score", washer / "test" / "good", "--bank", tmp_path / "none.st")
    assert result.exit_code == 4
    assert "bank file not found" in result.stderr and "Traceback" not in result.output


def test_bad_image_stops_or_is_skipped(bank, washer, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    good = sorted((washer / "test" / "good").glob("*.png"))[0]
    stopped = invoke("score", good, broken, "--bank", bank)
    assert stopped.exit_code == 3 and "broken.png" in stopped.stderr
    skipped = invoke("score", good, broken, "--bank", bank, "--skip-bad", "--json")
    assert skipped.exit_code == 0, skipped.output
    records = json.loads(skipped.stdout)["results"]
    assert records[1]["skipped"] and "broken.png" in records[1]["file"]
    assert invoke("score", good, broken, "--bank", bank, "--skip-bad", "--fail-on-skip").exit_code == 1


def test_evaluate_mvtec_layout(bank, washer, tmp_path):
    result = invoke("evaluate", washer, "--bank", bank, "--json", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_good"] == 4 and data["n_defect"] == 8
    assert 0.0 <= data["image"]["image_auroc"] <= 1.0 and 0.0 <= data["pixel"]["aupro"] <= 1.0
    assert set(data["image"]["per_defect_auroc"]) == {"hole", "scratch", "missing_piece", "color_shift"}
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"results.json", "results.csv", "results.md"}


def test_evaluate_generic_layout_needs_masks(bank, washer):
    args = [
        "evaluate",
        "--bank",
        bank,
        "--good",
        washer / "test" / "good",
        "--defect",
        washer / "test" / "hole",
    ]
    missing = invoke(*args)
    assert missing.exit_code == 3 and "no mask found" in missing.stderr
    with_masks = invoke(*args, "--masks", washer / "ground_truth" / "hole", "--json")
    assert with_masks.exit_code == 0, with_masks.output
    assert invoke(*args, "--no-pixel-metrics", "--json").exit_code == 0


def test_config_file_and_cli_override(washer, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("backbone: resnet18\nweights: random\nimage-size: 72\ncrop: 64\ncoreset: 0.3\n")
    result = invoke(
        "fit",
        washer / "train" / "good",
        "--out",
        tmp_path / "b.st",
        "--config",
        config,
        "--coreset",
        "0.2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["coreset"] == 0.2


def test_framing_and_stage_weighting_from_yaml_and_command_line(washer, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("framing: whole\nstage-weighting: none\n")
    path = tmp_path / "b.st"
    args = ["fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS, "--config", config]
    result = invoke(*args, "--stage-weighting", "equal", "--json")
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)["config"]
    assert (stored["framing"], stored["stage_weighting"]) == ("whole", "equal")
    scored = invoke("score", washer / "test", "--bank", path, "--json")
    assert scored.exit_code == 0, scored.output
    bad = invoke(*args, "--framing", "letterbox")
    assert bad.exit_code == 2 and "framing must be one of whole, crop, aspect, tile" in bad.stderr


def test_patch_size_and_neighbours_reach_the_bank_and_change_the_scores(washer, tmp_path):
    scores = {}
    for p, b in ((3, 9), (5, 3)):
        path = tmp_path / f"b{p}.st"
        args = ["fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS]
        result = invoke(*args, "--patch-size", p, "--num-neighbors", b, "--json")
        assert result.exit_code == 0, result.output
        stored = json.loads(result.stdout)["config"]
        assert (stored["patch_size"], stored["num_neighbors"]) == (p, b)
        scored = invoke("score", washer / "test" / "hole", "--bank", path, "--json")
        scores[p] = [r["score"] for r in json.loads(scored.stdout)["results"]]
    assert scores[3] != scores[5]
    bad = invoke(
        "fit", washer / "train" / "good", "--out", tmp_path / "x.st", *TINY_OPTIONS, "--patch-size", "2"
    )
    assert bad.exit_code == 2 and "patch_size must be a positive odd number" in bad.stderr


def test_preset_is_recorded_in_the_bank_and_options_override_it(washer, tmp_path):
    path = tmp_path / "b.st"
    result = invoke(
        "fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS, "--preset", "accurate", "--json"
    )
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)["config"]
    # The preset's framing and weighting reach the bank; the command line's backbone and crop win over it.
    assert (stored["framing"], stored["stage_weighting"]) == ("whole", "none")
    assert (stored["backbone"], stored["crop"]) == ("resnet18", 64)
    assert invoke("score", washer / "test", "--bank", path, "--json").exit_code == 0


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("backbone: resnet18\ncorset: 0.1\n", "unknown key 'corset' (did you mean 'coreset'?)"),
        ("coreset: lots\n", "'coreset' must be a number"),
        ("coreset: -0.5\n", "coreset must be in (0, 1]"),
        ("framing: crop\nimage_size: 128\ncrop: 256\n", "crop must be between 32 and image_size"),
        ("- a\n- b\n", "must be a mapping"),
        ("backbone: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_config_is_exit_code_2(washer, tmp_path, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    result = invoke("fit", washer / "train" / "good", "--config", config, "--out", tmp_path / "b.st")
    assert result.exit_code == 2
    assert message in result.stderr and str(config) in result.stderr


def test_every_command_has_help_and_is_documented():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = ["fit", "score", "evaluate", "benchmark mvtec", "benchmark folder", "demo", "export", "warmup"]
    for command in commands:
        result = invoke(*command.split(), "--help")
        assert result.exit_code == 0, command
        assert "Usage" in result.stdout
        assert f"patchcore {command}" in readme, command


def test_generic_layout_matches_masks_by_defect_type(washer):
    from patchcore_cli.data import folder_split, test_split

    good, truth = washer / "test" / "good", washer / "ground_truth"
    defects = [washer / "test" / "scratch", washer / "test" / "hole"]
    masks = [truth / "scratch", truth / "hole"]  # both hold 000_mask.png and 001_mask.png
    for split in (test_split([good], defects, masks), folder_split([good], defects, masks=masks)):
        for sample in (s for s in split.test if s.label == 1):
            assert sample.mask.parent.name == sample.defect_type, sample


# --- the promised false-positive rate ------------------------------------------------------------------


def test_score_and_evaluate_show_the_promise(bank, washer, tmp_path):
    from patchcore_cli.config import FitConfig

    target = FitConfig().target_fpr
    scored = invoke("score", washer / "test" / "good", "--bank", bank, "--json")
    assert scored.exit_code == 0, scored.output
    promise = json.loads(scored.stdout)["promise"]
    assert promise["target_fpr"] == target and promise["predicted_fpr"] == pytest.approx(target)
    assert promise["low"] < target < promise["high"] and promise["n_images"] == 8
    table = invoke("score", washer / "test" / "good", "--bank", bank)
    interval = f"[{100 * promise['low']:.2f} %, {100 * promise['high']:.2f} %]"
    title = f"promised FPR on good images {100 * target:.2f} % {interval} (target {100 * target:.2f} %)"
    assert title in " ".join(table.stdout.split())

    evaluated = invoke("evaluate", washer, "--bank", bank, "--json", "--out", tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.output
    check = json.loads(evaluated.stdout)["promise"]
    calibrated = json.loads(evaluated.stdout)["image"]["calibrated"]
    assert check["promised"] == promise and check["n_good"] == 4
    assert check["false_positives"] == calibrated["fp"] and check["measured_fpr"] == calibrated["fpr"]
    low, high = check["measured_interval"]
    assert low <= check["measured_fpr"] <= high and high >= 0.6  # 4 good images say little
    assert check["consistent"] == (low <= promise["predicted_fpr"] <= high)
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert f"| promised FPR (good images) | {100 * target:.2f} % {interval} " in markdown
    assert f"| measured FPR (good test images) | {100 * check['measured_fpr']:.2f} % = " in markdown
    table = invoke("evaluate", washer, "--bank", bank)
    assert "measured FPR (good test images)" in table.stdout and "promised FPR" in table.stdout


def test_target_fpr_is_stored_and_an_old_bank_says_it_has_no_promise(washer, tmp_path):
    from patchcore_cli import bank as bank_io

    path = tmp_path / "b.st"
    fitted = invoke(
        "fit", washer / "train" / "good", "--out", path, *TINY_OPTIONS, "--target-fpr", "0.05", "--json"
    )
    assert fitted.exit_code == 0, fitted.output
    report = json.loads(fitted.stdout)
    assert report["config"]["target_fpr"] == 0.05 == report["calibration"]["target_fpr"]
    assert report["calibration"]["predicted_fpr"] == pytest.approx(0.05)

    loaded = bank_io.load(path)
    old = bank_io.Bank(
        memory_bank=np.array(loaded.memory_bank),
        config={k: v for k, v in loaded.config.items() if k != "target_fpr"},
        calibration={k: v for k, v in loaded.calibration.items() if not k.startswith("predicted")},
        weights_sha256=loaded.weights_sha256,
        n_train_images=loaded.n_train_images,
    )
    bank_io.save(old, tmp_path / "old.st")
    scored = invoke("score", washer / "test" / "good", "--bank", tmp_path / "old.st", "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["promise"] is None
    table = invoke("score", washer / "test" / "good", "--bank", tmp_path / "old.st")
    assert "promised FPR on good images none stored" in " ".join(table.stdout.split())
    evaluated = invoke("evaluate", washer, "--bank", tmp_path / "old.st", "--json")
    check = json.loads(evaluated.stdout)["promise"]
    assert check["promised"] is None and check["consistent"] is None and check["n_good"] == 4


@pytest.mark.parametrize("value", ["0", "1", "-0.5", "1.5", "nan"])
def test_target_fpr_outside_zero_one_is_one_line_and_exit_2(washer, tmp_path, value):
    good, hole = washer / "test" / "good", washer / "test" / "hole"
    for command in (
        ["fit", washer / "train" / "good", "--out", tmp_path / "b.st"],
        ["benchmark", "folder", "--good", good, "--defect", hole, "--no-pixel-metrics"],
    ):
        result = invoke(*command, *TINY_OPTIONS, "--target-fpr", value)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().count("\n") == 0
        assert "target_fpr must be between 0 and 1 (exclusive)" in result.stderr
    assert not (tmp_path / "b.st").exists()
