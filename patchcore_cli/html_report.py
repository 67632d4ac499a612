"""The HTML report of `evaluate --report DIR` and `benchmark --report DIR`: matplotlib figures in one page.

`DIR/report.html` is self-contained: figures are PNG data URIs, thumbnails JPEG data URIs, the style sheet
is inline, and there are no scripts, web fonts or links to other files, so it opens offline and can be
mailed as one file. `DIR/results.json`, the same document `--out` writes, holds the numbers the page shows.

This module draws what `evaluation` returns and computes no metric of its own: AUROC, AUPRO, thresholds,
confusion counts and ROC curve points all come from `metrics` through the `Evaluation` and its `Visuals`.
Figures are drawn with matplotlib's Agg canvas directly (no pyplot, so no global state), imported only here.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcore_cli import report
from patchcore_cli.data import DEFAULT_MAX_PIXELS
from patchcore_cli.report import fmt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from patchcore_cli.evaluation import BenchmarkRow, Case, Evaluation, Visuals

REPORT_CASES = 6
"""Hardest images shown per class: the highest-scoring good ones and the lowest-scoring defective ones."""
THUMBNAIL_SIDE = 320
"""px: the longer side of a thumbnail's image area, and so the width of its legend strip."""
REPORT_NAME = "report.html"

GOOD_COLOUR, DEFECT_COLOUR = "#2e7d32", "#c62828"
CALIBRATED_COLOUR, ORACLE_COLOUR = "#111111", "#6a1b9a"

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1b1b; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; } h2 { border-bottom: 2px solid #ccc; padding-bottom: 4px; margin-top: 40px; }
h3 { margin: 28px 0 8px; } .meta, .note { color: #555; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f3f3f3; }
img.figure { max-width: 100%; height: auto; }
.cases { display: flex; flex-wrap: wrap; gap: 16px; }
figure.case { margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }
figure.case img { margin-right: 4px; vertical-align: top; }
figcaption { margin-top: 4px; max-width: 660px; overflow-wrap: anywhere; }
.fp, .fn { color: #c62828; font-weight: bold; } .ok { color: #2e7d32; font-weight: bold; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; overflow-wrap: anywhere; }
"""


# --- writing ------------------------------------------------------------------------------------------


def write_evaluation_report(
    folder: Path,
    evaluation: Evaluation,
    results: dict[str, Any],
    bank: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Path:
    """Write `folder/report.html` for one evaluation, and `results` as `folder/results.json`.

    `evaluation` must carry `visuals` (run `evaluate` with `report_cases`); the hardest cases' images are
    read again, with the `max_pixels` limit they were scored with. Returns the page's path.
    """
    body = [
        f"<h1>PatchCore evaluation: {_text(evaluation.name)}</h1>",
        _meta_line(f"bank <code>{_text(bank)}</code>"),
        _evaluation_sections(evaluation, "run-1", None, max_pixels),
    ]
    return _write(folder, f"PatchCore evaluation: {evaluation.name}", body, results)


def write_benchmark_report(
    folder: Path,
    rows: Sequence[BenchmarkRow],
    columns: Sequence[str],
    results: dict[str, Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Path:
    """Write `folder/report.html` for a benchmark, and `results` as `folder/results.json`.

    The page opens with the metric tables (as results.md, the columns that ran) and the cost table, then
    has one section per (row, dataset), each as the evaluation report. Every row's evaluation must carry
    `visuals`; see `write_evaluation_report` for `max_pixels`. Returns the page's path.
    """
    ran = [column for column in columns if any(r.dataset == column for r in rows)]
    contents = "".join(
        f'<li><a href="#run-{number}">{_text(r.row)} / {_text(report.display_name(r.dataset))}</a></li>'
        for number, r in enumerate(rows, start=1)
    )
    body = [
        "<h1>PatchCore benchmark</h1>",
        _meta_line(f"{len(rows)} runs"),
        "<h2>Summary</h2>",
        _benchmark_summary(rows, ran),
        "<h3>Runs</h3>",
        f"<ol>{contents}</ol>",
    ]
    for number, r in enumerate(rows, start=1):
        heading = f"{r.row} / {report.display_name(r.dataset)}"
        body.append(_evaluation_sections(r.evaluation, f"run-{number}", heading, max_pixels, fit=r))
    return _write(folder, "PatchCore benchmark", body, results)


def _write(folder: Path, title: str, body: list[str], results: dict[str, Any]) -> Path:
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_text(title)}</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
        ]
    )
    report.write_json(folder / "results.json", results)
    path = folder / REPORT_NAME
    report.write_text(path, page + "\n")
    return path


def _meta_line(what: str) -> str:
    from patchcore_cli import __version__

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f'<p class="meta">{what}; patchcore {_text(__version__)}; written {now}</p>'


def _text(value: Any) -> str:
    return html.escape(str(value))


# --- one evaluation -----------------------------------------------------------------------------------


def _evaluation_sections(
    evaluation: Evaluation,
    section_id: str,
    heading: str | None,
    max_pixels: int,
    fit: BenchmarkRow | None = None,
) -> str:
    visuals = evaluation.visuals
    if visuals is None:
        raise ValueError("the evaluation was run without report_cases, so it has nothing to draw")
    image = evaluation.image
    parts = [f'<section class="run" id="{section_id}">']
    if heading is not None:
        parts.append(f"<h2>{_text(heading)}</h2>")
    parts += ["<h3>Summary</h3>", _summary_table(evaluation)]
    parts += [
        "<h3>Score distribution</h3>",
        _img(_figure_png(_score_histogram(evaluation)), "Histogram of good and defective image scores"),
        '<p class="note">Image scores of the good and the defective test images. The solid line is the '
        "calibrated threshold, set from good training images only; the dashed line is the oracle F1-max "
        "threshold, set on these test labels. Images at or above a threshold are flagged.</p>",
    ]
    parts += [
        "<h3>ROC curves</h3>",
        _img(_figure_png(_roc_figure(evaluation, visuals)), "Image and pixel ROC curves"),
    ]
    if visuals.pixel_roc is None:
        parts.append('<p class="note">No pixel ROC: pixel metrics were off or no pixel was defective.</p>')
    if image["per_defect_auroc"]:
        parts += [
            "<h3>Image AUROC per defect type</h3>",
            _img(_figure_png(_per_defect_figure(image["per_defect_auroc"])), "Image AUROC per defect type"),
            _table(
                ["defect type", "image AUROC"],
                [[defect, fmt(value)] for defect, value in image["per_defect_auroc"].items()],
            ),
        ]
    parts.append(_cases_section(evaluation, visuals, max_pixels))
    parts.append(_configuration_section(visuals.bank, fit))
    parts.append("</section>")
    return "\n".join(parts)


def _summary_table(evaluation: Evaluation) -> str:
    image, pixel = evaluation.image, evaluation.pixel
    rows = [
        ["test images", f"{evaluation.n_good} good, {evaluation.n_defect} defective"],
        ["image AUROC", fmt(image["image_auroc"])],
    ]
    if pixel is not None:
        rows += [["pixel AUROC", fmt(pixel["pixel_auroc"])], ["AUPRO (FPR <= 0.3)", fmt(pixel["aupro"])]]
    else:
        rows.append(["pixel metrics", "off"])
    for key, label in (
        ("calibrated", "calibrated threshold (good images only)"),
        ("oracle", "oracle F1-max threshold (test labels)"),
    ):
        block = image.get(key)
        if not block:
            continue
        rows += [
            [label, fmt(block["threshold"], 4)],
            [f"{key}: balanced accuracy", fmt(block["balanced_accuracy"])],
            [f"{key}: F1", fmt(block["f1"])],
            [f"{key}: TPR / FPR", f"{fmt(block['tpr'])} / {fmt(block['fpr'])}"],
            [f"{key}: TP / FP / TN / FN", f"{block['tp']} / {block['fp']} / {block['tn']} / {block['fn']}"],
        ]
    rows += [[label, value] for label, value in report.promise_rows(evaluation)]
    rows.append(["score time", f"{evaluation.ms_per_image:.0f} ms/image"])
    return _key_value_table(rows, css="summary")


def _cases_section(evaluation: Evaluation, visuals: Visuals, max_pixels: int) -> str:
    calibrated = evaluation.image["calibrated"] or {}
    false_positives = _count(calibrated.get("fp"), "false positive")
    false_negatives = _count(calibrated.get("fn"), "false negative")
    parts = [
        "<h3>Hardest cases</h3>",
        '<p class="note">Each case shows the image and its heatmap overlay; the overlay\'s legend gives '
        "the verdict at the calibrated threshold and the colour scale, whose middle is the calibrated "
        "pixel threshold. Hatched areas were not inspected.</p>",
        f"<h4>Good images with the highest scores ({false_positives})</h4>",
        _case_grid(visuals.highest_good, visuals, max_pixels, "no good test images"),
        f"<h4>Defective images with the lowest scores ({false_negatives})</h4>",
        _case_grid(visuals.lowest_defect, visuals, max_pixels, "no defective test images"),
    ]
    return "\n".join(parts)


def _count(number: int | None, noun: str) -> str:
    if number is None:
        return f"{noun}s: n/a"
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _case_grid(cases: Sequence[Case], visuals: Visuals, max_pixels: int, empty: str) -> str:
    if not cases:
        return f'<p class="note">{_text(empty)}.</p>'
    figures = "".join(_case_figure(case, visuals, max_pixels) for case in cases)
    return f'<div class="cases">{figures}</div>'


# (label, flagged at the calibrated threshold) -> (CSS class, what that makes the case)
_OUTCOMES = {
    (0, False): ("ok", "passed"),
    (0, True): ("fp", "FALSE POSITIVE"),
    (1, True): ("ok", "flagged"),
    (1, False): ("fn", "FALSE NEGATIVE"),
}


def _case_figure(case: Case, visuals: Visuals, max_pixels: int) -> str:
    """The image and its overlay (see `report.heatmap_picture`) as thumbnails, with a caption."""
    from patchcore_cli.data import load_image

    calibration = visuals.bank["calibration"]
    full, inspected = report.map_to_original(case.anomaly_map, case.geometry)
    image, full, inspected = report.shrink_to_fit(
        np.asarray(load_image(case.path, max_pixels)), full, inspected, THUMBNAIL_SIDE
    )
    picture = report.heatmap_picture(
        image,
        full,
        inspected,
        float(calibration["pixel_threshold"]),
        case.score,
        float(calibration["image_threshold"]),
        case.anomalous,
    )
    css, verdict = _OUTCOMES[(case.label, case.anomalous)]
    caption = (
        f'<span class="{css}">{verdict}</span>: <code>{_text(Path(*case.path.parts[-3:]))}</code>, '
        f"{_text(case.defect_type)}, score {fmt(case.score, 4)}"
    )
    return (
        f'<figure class="case" title="{_text(case.path)}">'
        f'<img src="{_jpeg(image)}" width="{image.shape[1]}" height="{image.shape[0]}" alt="image">'
        f'<img src="{_jpeg(picture)}" width="{picture.shape[1]}" height="{picture.shape[0]}" '
        f'alt="heatmap overlay"><figcaption>{caption}</figcaption></figure>'
    )


def _configuration_section(bank: dict[str, Any], fit: BenchmarkRow | None) -> str:
    parts = ["<h3>Configuration and bank</h3>", "<h4>Model configuration (stored in the bank)</h4>"]
    parts.append(_key_value_table([[key, _value(value)] for key, value in bank["config"].items()]))
    parts += ["<h4>Run options</h4>"]
    parts.append(_key_value_table([[key, _value(value)] for key, value in bank["runtime"].items()]))
    parts += ["<h4>Bank</h4>"]
    parts.append(_key_value_table([[key, _value(value)] for key, value in bank["bank"].items()]))
    parts += ["<h4>Calibration</h4>"]
    calibration = bank["calibration"].items()
    parts.append(_key_value_table([[key, _value(value, 4)] for key, value in calibration]))
    if fit is not None:
        parts += ["<h4>Fit</h4>"]
        rows = [["training images", str(fit.n_train)], ["peak RSS", f"{fit.peak_rss_mb:.0f} MB"]]
        rows += [[f"time: {stage}", f"{seconds:.2f} s"] for stage, seconds in fit.fit_seconds.items()]
        parts.append(_key_value_table(rows))
    return "\n".join(parts)


def _value(value: Any, digits: int | None = None) -> str:
    """A config or bank value for a table: floats to `digits` decimals, or to 6 significant digits."""
    if isinstance(value, float):
        return fmt(value, digits) if digits is not None else f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return "n/a" if value is None or value == "" else str(value)


# --- benchmark summary --------------------------------------------------------------------------------


def _benchmark_summary(rows: Sequence[BenchmarkRow], columns: Sequence[str]) -> str:
    parts = []
    headers = ["backbone / config", "Avg", *map(report.display_name, columns)]
    for metric, title in report.BENCHMARK_METRICS:
        parts.append(f"<h4>{_text(title)}</h4>")
        grid = report.metric_grid(rows, metric, columns)
        parts.append(_table(headers, [[label, *(fmt(v) for v in values)] for label, values in grid]))
    parts.append("<h4>Cost per dataset</h4>")
    parts.append(
        _table(
            ["backbone / config", "dataset", "fit s", "score ms/img", "bank rows", "bank MB", "peak RSS MB"],
            [
                [
                    r.row,
                    report.display_name(r.dataset),
                    f"{sum(r.fit_seconds.values()):.1f}",
                    f"{r.evaluation.ms_per_image:.0f}",
                    f"{r.bank_rows:,}",
                    f"{r.bank_mb:.1f}",
                    f"{r.peak_rss_mb:.0f}",
                ]
                for r in rows
            ],
        )
    )
    return "\n".join(parts)


# --- HTML pieces --------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(cell, numeric=index > 0) for index, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(text: str, numeric: bool) -> str:
    return f'<td class="num">{_text(text)}</td>' if numeric else f"<td>{_text(text)}</td>"


def _key_value_table(rows: Sequence[Sequence[str]], css: str = "") -> str:
    body = "".join(f"<tr><th>{_text(key)}</th><td>{_text(value)}</td></tr>" for key, value in rows)
    klass = f' class="{css}"' if css else ""
    return f"<table{klass}><tbody>{body}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img class="figure" src="{uri}" alt="{_text(alt)}">'


def _jpeg(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    # No chroma subsampling: it smears the red and green of the legend's verdict badge.
    Image.fromarray(array).save(buffer, format="JPEG", quality=88, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- figures ------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _score_histogram(evaluation: Evaluation) -> Figure:
    """Good and defective image scores on shared bins, with the calibrated and oracle thresholds."""
    scores = np.array([record["score"] for record in evaluation.images], dtype=np.float64)
    labels = np.array([record["label"] for record in evaluation.images])
    figure = _new_figure(9.0, 3.8)
    axes = figure.add_subplot()
    edges = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 3)))
    for label, name, colour in ((0, "good", GOOD_COLOUR), (1, "defective", DEFECT_COLOUR)):
        chosen = scores[labels == label]
        if chosen.size:
            axes.hist(chosen, bins=edges, color=colour, alpha=0.55, label=f"{name} ({chosen.size})")
    for key, name, colour, style in (
        ("calibrated", "calibrated threshold", CALIBRATED_COLOUR, "-"),
        ("oracle", "oracle F1-max threshold", ORACLE_COLOUR, "--"),
    ):
        block = evaluation.image.get(key)
        if block:
            threshold = block["threshold"]
            axes.axvline(
                threshold, color=colour, linestyle=style, linewidth=1.8, label=f"{name} {fmt(threshold, 4)}"
            )
    axes.set_xlabel("image score")
    axes.set_ylabel("images")
    axes.legend(loc="upper right", fontsize="small")
    axes.grid(alpha=0.25)
    return figure


def _roc_figure(evaluation: Evaluation, visuals: Visuals) -> Figure:
    """Image ROC (with the calibrated and oracle operating points) and pixel ROC, side by side."""
    panels = [("Image ROC", visuals.image_roc, evaluation.image["image_auroc"])]
    if visuals.pixel_roc is not None and evaluation.pixel is not None:
        panels.append(("Pixel ROC", visuals.pixel_roc, evaluation.pixel["pixel_auroc"]))
    figure = _new_figure(4.6 * len(panels) + 0.4, 4.4)
    for number, (title, curve, auroc) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), number)
        axes.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
        if curve is not None:
            axes.plot(curve["fpr"], curve["tpr"], color="#1565c0", linewidth=1.8, label=f"AUROC {fmt(auroc)}")
        if number == 1:
            for key, name, colour, marker in (
                ("calibrated", "calibrated threshold", CALIBRATED_COLOUR, "o"),
                ("oracle", "oracle threshold", ORACLE_COLOUR, "s"),
            ):
                block = evaluation.image.get(key)
                if block and np.isfinite(block["fpr"]) and np.isfinite(block["tpr"]):
                    axes.plot(
                        block["fpr"], block["tpr"], marker=marker, color=colour, linestyle="", label=name
                    )
        axes.set_title(f"{title} (AUROC {fmt(auroc)})")
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate")
        axes.set_xlim(-0.01, 1.01)
        axes.set_ylim(-0.01, 1.01)
        axes.set_aspect("equal")
        axes.grid(alpha=0.25)
        axes.legend(loc="lower right", fontsize="small")
    return figure


def _per_defect_figure(per_defect: dict[str, float]) -> Figure:
    """One horizontal bar per defect type: its image AUROC against the good images."""
    names = list(per_defect)
    values = [per_defect[name] for name in names]
    figure = _new_figure(7.0, 0.9 + 0.38 * len(names))
    axes = figure.add_subplot()
    positions = np.arange(len(names))
    shown = [0.0 if np.isnan(v) else v for v in values]
    axes.barh(positions, shown, color="#1565c0", height=0.6)
    for position, value in zip(positions, values, strict=True):
        axes.text(min(value, 1.0) + 0.01 if not np.isnan(value) else 0.01, position, fmt(value), va="center")
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.12)
    axes.axvline(0.5, color="#999999", linestyle=":", linewidth=1)
    axes.set_xlabel("image AUROC (defect type against good images)")
    axes.grid(axis="x", alpha=0.25)
    return figure
