"""Rich tables, JSON/CSV/Markdown writers and heatmap overlays. Formatting only: no scoring here."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape

from patchcore_cli.calibration import stored_promise
from patchcore_cli.errors import OutputError

if TYPE_CHECKING:
    from rich.table import Table

    from patchcore_cli.engine import FitResult, ScoreResult
    from patchcore_cli.export import ExportResult
    from patchcore_cli.geometry import Geometry


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def promise_text(promise: dict[str, Any] | None) -> str:
    """A bank's promised FPR on good images (`Scorer.promise`): "2.00 % [0.17 %, 8.76 %] (target 2.00 %)"."""
    if promise is None:
        return "none stored (a bank fitted before promised FPRs)"
    reason = (
        f"target {percent(promise['target_fpr'])}" if promise["target_fpr"] is not None else promise["method"]
    )
    interval = f"{percent(promise['low'])}, {percent(promise['high'])}"
    return f"{percent(promise['predicted_fpr'])} [{interval}] ({reason})"


def measured_text(check: dict[str, Any]) -> str:
    """The FPR measured on good test images (`evaluation.promise_check`): "0.00 % = 0/20 [0.00 %, 16.84 %]"
    with its confidence interval."""
    if check["measured_fpr"] is None:
        return "n/a (no good test images)"
    low, high = check["measured_interval"]
    measured = f"{percent(check['measured_fpr'])} = {check['false_positives']}/{check['n_good']}"
    return f"{measured} [{percent(low)}, {percent(high)}]"


def consistency_text(check: dict[str, Any]) -> str:
    consistent = check["consistent"]
    if consistent is None:
        return "n/a"
    confidence = round(100 * check["confidence"])
    verdict = "yes: inside" if consistent else "NO: outside"
    return f"{verdict} the measured FPR's {confidence} % interval"


def _cap_text(config: dict[str, Any], n_patches: int) -> str:
    """', capped: ...' when --coreset-max-rows kept the bank below its share of the patches, else ''."""
    cap = int(config.get("coreset_max_rows") or 0)
    if not cap or round(config["coreset"] * n_patches) <= cap:
        return ""
    return f", capped at {cap:,} rows (--coreset-max-rows): {cap / n_patches:.2%} of the patches"


def fit_table(result: FitResult, out: Path) -> Table:
    from rich.markup import escape
    from rich.table import Table

    bank = result.bank
    cal = bank.calibration
    table = Table(title=f"Fitted {escape(str(out))}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("backbone", f"{bank.config['backbone']} ({'+'.join(bank.config['layers'])})")
    table.add_row("input", input_text(bank.config))
    table.add_row("device", result.extractor.device)
    added = bank.n_train_images != result.n_images  # fit --update: the bank had images before
    table.add_row(
        "images", f"{result.n_images} new, {bank.n_train_images} in all" if added else str(result.n_images)
    )
    table.add_row("patches", f"{result.n_patches:,}")
    if any(passes > 1 for passes in result.coreset_passes):  # say so only when it was hierarchical
        passes = [f"{n} shards" if n > 1 else "one pass" for n in result.coreset_passes]
        table.add_row("coreset", " + ".join(passes) + " (--max-memory)")
    table.add_row(
        "bank",
        " + ".join(f"{p.memory_bank.shape[0]:,} x {p.memory_bank.shape[1]}" for p in bank.parts)
        + f" ({bank.nbytes / 1e6:.1f} MB)"
        + _cap_text(bank.config, result.n_patches),
    )
    for stage, seconds in result.timings.seconds.items():
        table.add_row(f"time: {stage}", f"{seconds:.2f} s")
    table.add_row("time: total", f"{result.timings.total:.2f} s")
    table.add_row(
        "threshold",
        f"{cal['image_threshold']:.4f} (good mean {cal['image_mean']:.4f}, std {cal['image_std']:.4f}, "
        f"{cal['n_images']} images left out; calibration FPR {cal['calibration_fpr']:.3f})",
    )
    table.add_row("promised FPR", escape(f"{promise_text(stored_promise(cal))} on good images"))
    return table


def input_text(config: dict[str, Any]) -> str:
    """What the backbone sees, in words: the framing and the side `crop: auto` or the user chose."""
    side, framing = config["crop"], config.get("framing", "crop")
    if framing == "whole":
        return f"whole image to {side} x {side} px"
    if framing == "aspect":
        return f"shorter side to {side} px, aspect kept"
    if framing == "tile":
        return f"tiles of {config.get('tile_size')} px, each to {side} x {side} px"
    return f"shorter side to {config.get('image_size')} px, centre {side} x {side} px"


def fit_json(result: FitResult, out: Path) -> dict[str, Any]:
    bank = result.bank
    return {
        "bank": str(out),
        "images": result.n_images,
        "bank_images": bank.n_train_images,
        "patches": result.n_patches,
        "coreset_passes": result.coreset_passes,
        "bank_rows": bank.rows,
        "bank_dim": int(bank.memory_bank.shape[1]),
        "bank_mb": round(bank.nbytes / 1e6, 3),
        "timings_s": {k: round(v, 4) for k, v in result.timings.seconds.items()},
        "device": result.extractor.device,
        "calibration": bank.calibration,
        "config": bank.config,
        "random_weights": result.random_weights,
    }


def export_table(result: ExportResult, bank_path: Path) -> Table:
    from rich.table import Table

    parity = result.parity
    table = Table(title=f"Exported {escape(str(result.path))}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("bank", escape(str(bank_path)))
    table.add_row("model", f"ONNX opset {result.opset}, {result.nbytes / 1e6:.1f} MB")
    table.add_row("input", f"image: {result.input} (see docs/deploy.md)")
    table.add_row("outputs", ", ".join(result.outputs))
    table.add_row(f"checked on {result.checked_on}", "same verdicts as `patchcore score`")
    table.add_row("  score: max rel. difference", f"{parity.score_rel:.1e}")
    table.add_row("  map: max abs. difference", f"{parity.map_abs:.1e}")
    table.add_row("time", f"{result.seconds:.1f} s")
    return table


def export_json(result: ExportResult, bank_path: Path) -> dict[str, Any]:
    return {
        "bank": str(bank_path),
        "onnx": str(result.path),
        "bytes": result.nbytes,
        "opset": result.opset,
        "input": result.input,
        "outputs": list(result.outputs),
        "checked_on": result.checked_on,
        "parity": result.parity.as_dict(),
        "seconds": round(result.seconds, 3),
    }


def score_record(result: ScoreResult) -> dict[str, Any]:
    if result.error is not None:
        return {"file": str(result.path), "skipped": True, "error": result.error}
    return {
        "file": str(result.path),
        "score": round(result.score, 6) if result.score is not None else None,
        "normalized": round(result.normalized, 6) if result.normalized is not None else None,
        "anomalous": result.anomalous,
    }


def score_table(
    results: Sequence[ScoreResult], threshold: float, promise: dict[str, Any] | None = None
) -> Table:
    """Scores and verdicts; the title gives the threshold and the FPR on good images it promises."""
    from rich.markup import escape
    from rich.table import Table

    title = (
        f"Scores (threshold {threshold:.4f} -> normalised 0.5; "
        f"promised FPR on good images {promise_text(promise)})"
    )
    table = Table(title=escape(title), title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("normalised", justify="right")
    table.add_column("verdict")
    for result in results:
        if result.error is not None:
            table.add_row(escape(str(result.path)), "-", "-", f"[yellow]skipped: {escape(result.error)}[/]")
            continue
        verdict = "[bold red]ANOMALOUS[/]" if result.anomalous else "[green]good[/]"
        table.add_row(escape(str(result.path)), fmt(result.score, 4), fmt(result.normalized, 3), verdict)
    return table


def score_line(result: ScoreResult) -> str:
    """One result as one line of Rich markup (`score --watch`): file, score, normalised score, verdict."""
    from rich.markup import escape

    if result.error is not None:
        return f"{escape(str(result.path))}  [yellow]unreadable: {escape(result.error)}[/]"
    verdict = "[bold red]ANOMALOUS[/]" if result.anomalous else "[green]good[/]"
    return (
        f"{escape(str(result.path))}  score {fmt(result.score, 4)}  "
        f"normalised {fmt(result.normalized, 3)}  {verdict}"
    )


def csv_text(records: Sequence[dict[str, Any]], columns: Sequence[str], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    for record in records:
        writer.writerow(record)
    return buffer.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file in the same folder, then a rename.

    A failed write leaves the previous file (or none) and no temporary file behind.
    """
    import os
    import secrets

    # Not mkstemp: its files are private (0600), and these are for sharing, so the umask decides.
    tmp: Path | None = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# --- heatmaps --------------------------------------------------------------------------------------


def _colormap(values: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] -> H x W x 3 uint8, a blue-cyan-yellow-red ramp (low = blue)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    position = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def map_to_original(amap: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Map in its map frame -> (H x W map in the original image's pixels, H x W bool 'was inspected').

    The map is stretched back over exactly the box it covers, so it lines up with the original image;
    pixels outside the box (the border the centre crop cuts off) were not inspected.
    """
    from PIL import Image

    width, height = geometry.original_size
    left, top, right, bottom = geometry.box
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(right)), min(height, round(bottom))
    full = np.zeros((height, width), dtype=np.float32)
    inspected = np.zeros((height, width), dtype=bool)
    if x1 > x0 and y1 > y0:
        resized = Image.fromarray(amap.astype(np.float32), mode="F").resize(
            (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
        )
        full[y0:y1, x0:x1] = np.asarray(resized)
        inspected[y0:y1, x0:x1] = True
    return full, inspected


def overlay(image: np.ndarray, amap: np.ndarray, inspected: np.ndarray, scale: float) -> np.ndarray:
    """Blend a heatmap onto an H x W x 3 uint8 image; `scale` maps to the top of the colour ramp.

    Pixels outside the inspected area are darkened and hatched, so a border the crop dropped is never
    mistaken for a clean one.
    """
    heat = _colormap(amap / max(scale, 1e-12)).astype(np.float32)
    out = image.astype(np.float32)
    out[inspected] = 0.5 * out[inspected] + 0.5 * heat[inspected]
    rows, cols = np.indices(inspected.shape)
    hatch = ((rows + cols) // 6) % 4 == 0
    outside = ~inspected
    out[outside] *= 0.35
    out[outside & hatch] = 90.0
    return out.clip(0, 255).astype(np.uint8)


LEGEND_MIN_WIDTH = 320
"""px: the narrowest legend strip that holds the verdict line and the colour scale; a narrower picture is
widened to this on the right."""
LEGEND_HEIGHT = 64
"""px: the legend strip's height under a picture up to LEGEND_GROWS_FROM wide."""
LEGEND_GROWS_FROM = 640
"""px: under wider pictures the strip and its text grow in proportion, so they read the same at any size."""


def legend_size(width: int) -> tuple[int, int]:
    """(canvas width, legend strip height) in pixels for a picture `width` pixels wide."""
    unit = max(1.0, width / LEGEND_GROWS_FROM)
    return max(width, LEGEND_MIN_WIDTH), round(LEGEND_HEIGHT * unit)


def heatmap_picture(
    image: np.ndarray,
    amap: np.ndarray,
    inspected: np.ndarray,
    pixel_threshold: float,
    score: float,
    image_threshold: float,
    anomalous: bool,
) -> np.ndarray:
    """The overlay with its legend: what `score --heatmaps` writes and the HTML report shows.

    H x W x 3 uint8 image, H x W map and H x W bool inspected area in the original image's pixels (see
    `map_to_original`) -> (H + strip) x max(W, LEGEND_MIN_WIDTH) x 3 uint8, the strip and canvas from
    `legend_size(W)` (for a thumbnail, `shrink_to_fit` the inputs first). The top-left H x W is exactly
    `overlay(image, amap, inspected, 2 * pixel_threshold)`: the calibrated pixel threshold is the middle of
    the colour ramp, so the pixels coloured past the middle are the ones `--masks` marks. The strip below
    holds the verdict, the image score against the image threshold, and the colour scale with the pixel
    threshold marked; anything to the right of a narrow picture is white.
    """
    height, width = amap.shape
    picture = overlay(image, amap, inspected, scale=2.0 * pixel_threshold)
    canvas_width, strip_height = legend_size(width)
    canvas = np.full((height + strip_height, canvas_width, 3), 255, dtype=np.uint8)
    canvas[:height, :width] = picture
    canvas[height:] = _legend_strip(
        canvas_width, strip_height, pixel_threshold, score, image_threshold, anomalous
    )
    return canvas


def shrink_to_fit(
    image: np.ndarray, amap: np.ndarray, inspected: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale an image, its map and its inspected area (as `heatmap_picture` takes them) down together so
    that they fit in max_side x max_side pixels; returned as they are if they fit already."""
    from PIL import Image

    height, width = amap.shape
    if max(height, width) <= max_side:
        return image, amap, inspected
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    small_map = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(size))
    small_inspected = np.asarray(Image.fromarray(inspected).resize(size, Image.Resampling.NEAREST))
    return small_image, small_map, small_inspected


def _legend_strip(
    width: int, height: int, pixel_threshold: float, score: float, image_threshold: float, anomalous: bool
) -> np.ndarray:
    """height x width x 3 uint8: verdict badge and score on the first line, the colour scale below.

    Drawn with matplotlib (Agg, no pyplot state); the scale is the overlay's own ramp from 0 to twice the
    pixel threshold, with the threshold marked at its middle.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100.0
    unit = height / LEGEND_HEIGHT  # every length below is in pixels of a LEGEND_HEIGHT-high strip
    points = 72.0 / dpi * unit  # font size in points per pixel of text height
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(figure)
    margin = 8 * unit / width
    verdict, colour = ("ANOMALOUS", "#c62828") if anomalous else ("GOOD", "#2e7d32")
    badge = figure.text(
        margin,
        1 - 15 * unit / height,
        verdict,
        color="white",
        fontsize=10 * points,
        fontweight="bold",
        va="center",
        bbox={"boxstyle": "round,pad=0.3", "facecolor": colour, "edgecolor": "none"},
    )
    renderer = figure.canvas.get_renderer()
    badge_right = badge.get_window_extent(renderer).x1 / width
    relation = "\u2265" if anomalous else "<"
    line = figure.text(
        badge_right + 8 * unit / width,
        1 - 15 * unit / height,
        f"score {fmt(score, 4)} {relation} image threshold {fmt(image_threshold, 4)}",
        fontsize=10 * points,
        va="center",
    )
    overflow = line.get_window_extent(renderer).x1 / (width * (1 - margin))
    if overflow > 1:  # very large scores: shrink the line rather than cut it off
        line.set_fontsize(10 * points / overflow)
    bar = figure.add_axes((margin, 18 * unit / height, 1 - 2 * margin, 12 * unit / height))
    top = 2.0 * pixel_threshold
    bar.imshow(
        _colormap(np.linspace(0.0, 1.0, 256))[None],
        aspect="auto",
        extent=(0.0, top, 0.0, 1.0),
        interpolation="nearest",
    )
    bar.axvline(pixel_threshold, color="black", linewidth=2.5 * unit)
    bar.set_yticks([])
    bar.set_xlim(0.0, top)
    bar.set_xticks(
        [0.0, pixel_threshold, top],
        ["0", f"pixel threshold {pixel_threshold:.4g}", f"\u2265 {top:.4g}"],
        fontsize=8 * points,
    )
    labels = bar.get_xticklabels()
    labels[0].set_horizontalalignment("left")
    labels[-1].set_horizontalalignment("right")
    bar.tick_params(axis="x", length=3 * unit, width=unit, pad=1.5 * unit)
    for spine in bar.spines.values():
        spine.set_linewidth(0.5 * unit)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def score_pictures(
    amap: np.ndarray,
    geometry: Geometry,
    pixel_threshold: float,
    image: np.ndarray | None,
    mask: bool,
    score: float,
    image_threshold: float,
    anomalous: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One scored image's pictures at its original size: (the heatmap overlay with its legend on `image`
    (H x W x 3 uint8), if given; the binary defect mask (H x W uint8, 255 = defect) at the calibrated pixel
    threshold, if `mask`). A local `score` and a Ray worker both draw with this, so their files are the
    same."""
    full, inspected = map_to_original(amap, geometry)
    heatmap = None
    if image is not None:
        heatmap = heatmap_picture(image, full, inspected, pixel_threshold, score, image_threshold, anomalous)
    binary = ((full >= pixel_threshold) & inspected).astype(np.uint8) * 255 if mask else None
    return heatmap, binary


def save_png(path: Path, array: np.ndarray) -> None:
    """Write an H x W (x 3) uint8 array as a PNG, atomically."""
    write_bytes(path, png_bytes(array))


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


_UNSAFE_IN_NAME = re.compile(r"[^\w.-]+")  # \w is Unicode-aware: letters and digits of any script
MAX_NAME_BYTES = 255  # the longest file name ext4, APFS and NTFS take


def output_names(paths: Sequence[Path], suffix: str) -> dict[Path, str]:
    """A collision-free output file name, `<base><suffix>.png`, for each of `paths`, in one flat folder.

    The base is the file's stem. Files that share a stem get the shortest run of their parent folders'
    names, counted from the innermost, that no other file with that stem has, joined with `__`:
    `lot1/good/000.png` and `lot1/hole/000.png` become `good__000` and `hole__000`, and `a/cam1/000.png`
    beside `b/cam1/000.png` become `a__cam1__000` and `b__cam1__000`. Files in the same folder that share
    a stem keep their extension (`000.png`, `000.jpg`). Names depend on the set of paths, not their order.
    Characters other than letters, digits, `.`, `-` and `_` become `_`, no name starts with `.`, and names
    stay within MAX_NAME_BYTES. Should two names still coincide (ignoring case, for case-insensitive file
    systems), the later path in sorted order gets `-2`, `-3`, ...
    """
    import hashlib
    import os

    folders = {path: Path(os.path.normpath(os.path.abspath(path))).parent.parts[1:] for path in paths}
    by_stem: dict[str, list[Path]] = {}
    for path in dict.fromkeys(paths):
        by_stem.setdefault(path.stem, []).append(path)
    bases = {}
    for stem, group in by_stem.items():
        for path in group:
            folder = folders[path]
            elsewhere = [folders[other] for other in group if folders[other] != folder]
            beside = any(other != path and folders[other] == folder for other in group)
            tail = _shortest_unique_tail(folder, elsewhere) if elsewhere else ()
            bases[path] = [*tail, path.name if beside else stem]

    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in sorted(bases, key=str):
        base = "__".join((_UNSAFE_IN_NAME.sub("_", part) or "_") for part in bases[path]).lstrip(".") or "_"
        room = MAX_NAME_BYTES - len(f"-99{suffix}.png".encode())
        if len(base.encode()) > room:
            digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
            base = base.encode()[: room - 13].decode(errors="ignore") + f"~{digest}"
        name, counter = f"{base}{suffix}.png", 2
        while name.casefold() in taken:
            name = f"{base}-{counter}{suffix}.png"
            counter += 1
        taken.add(name.casefold())
        names[path] = name
    return names


def _shortest_unique_tail(folder: tuple[str, ...], others: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The fewest innermost names of `folder` that end none of `others` the same way (all of it if none)."""
    for count in range(1, len(folder) + 1):
        tail = folder[-count:]
        if all(other[-count:] != tail for other in others):
            return tail
    return folder


# --- benchmark tables ---------------------------------------------------------------------------------

BENCHMARK_METRICS = (
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO (FPR <= 0.3)"),
    ("balanced_accuracy", "Balanced accuracy at the calibrated threshold (good images only)"),
    ("f1", "Image F1 at the calibrated threshold (good images only)"),
    ("oracle_balanced_accuracy", "Balanced accuracy at the oracle F1-max threshold (as anomalib reports)"),
    ("oracle_f1", "Image F1 at the oracle F1-max threshold (as anomalib reports)"),
    ("promised_fpr", "False-positive rate on good images that the calibrated threshold promises"),
    ("fpr", "False-positive rate measured on good test images at the calibrated threshold"),
)


def display_name(dataset: str) -> str:
    return dataset.replace("_", " ").title() if dataset.islower() else dataset


def metric_grid(rows: Sequence[Any], metric: str, columns: Sequence[str]) -> list[tuple[str, list[float]]]:
    """rows (BenchmarkRow) -> [(row label, [Avg, value per column])]; absent cells are NaN.

    Avg is the mean over the columns that were run.
    """
    labels = list(dict.fromkeys(r.row for r in rows))
    grid = []
    for label in labels:
        cells = {r.dataset: r.metric(metric) for r in rows if r.row == label}
        values = [cells.get(column, math.nan) for column in columns]
        present = [v for v in values if not math.isnan(v)]
        grid.append((label, [float(np.mean(present)) if present else math.nan, *values]))
    return grid


def benchmark_tables(rows: Sequence[Any], columns: Sequence[str], width: int | None = None) -> list[Table]:
    """One table per metric: Avg, then every column in order (n/a where it did not run).

    When the tables would not fit in `width` characters, columns with no results are left out (and the
    first table says so), so that no number is cut short. results.md always keeps every column.
    """
    from rich.console import Console

    tables = _metric_tables(rows, columns)
    ran = [column for column in columns if any(r.dataset == column for r in rows)]
    if width is None or len(ran) == len(columns):
        return tables
    probe = Console(width=100_000)
    if all(probe.measure(table).maximum <= width for table in tables):
        return tables
    tables = _metric_tables(rows, ran)
    left_out = len(columns) - len(ran)
    tables[0].caption = f"{left_out} columns without results left out to fit; results.md has all"
    return tables


def _metric_tables(rows: Sequence[Any], columns: Sequence[str]) -> list[Table]:
    from rich.table import Table

    tables = []
    for metric, title in BENCHMARK_METRICS:
        table = Table(title=title, title_justify="left", caption_justify="left")
        table.add_column("backbone / config")
        for header in ("Avg", *map(display_name, columns)):
            table.add_column(header, justify="right")
        for label, values in metric_grid(rows, metric, columns):
            table.add_row(escape(label), *(fmt(v) for v in values))
        tables.append(table)
    return tables


def timing_table(rows: Sequence[Any]) -> Table:
    from rich.table import Table

    table = Table(title="Cost per dataset", title_justify="left")
    for header in (
        "backbone / config",
        "dataset",
        "features s",
        "coreset s",
        "calibrate s",
        "fit s",
        "score ms/img",
        "bank rows",
        "bank MB",
        "peak RSS MB",
    ):
        table.add_column(header, justify="right" if header[0].islower() and header != "dataset" else "left")
    for r in rows:
        features = sum(
            v for k, v in r.fit_seconds.items() if k in ("backbone", "aggregate + reduce", "decode (waiting)")
        )
        table.add_row(
            escape(r.row),
            display_name(r.dataset),
            f"{features:.1f}",
            f"{r.fit_seconds.get('coreset', 0.0):.1f}",
            f"{r.fit_seconds.get('calibrate', 0.0):.1f}",
            f"{sum(r.fit_seconds.values()):.1f}",
            f"{r.evaluation.ms_per_image:.0f}",
            f"{r.bank_rows:,}",
            f"{r.bank_mb:.1f}",
            f"{r.peak_rss_mb:.0f}",
        )
    return table


def benchmark_markdown(rows: Sequence[Any], columns: Sequence[str]) -> str:
    lines = []
    for metric, title in BENCHMARK_METRICS:
        lines += [f"### {title}", ""]
        lines.append("| backbone / config | Avg | " + " | ".join(map(display_name, columns)) + " |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for label, values in metric_grid(rows, metric, columns):
            lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def benchmark_csv(rows: Sequence[Any]) -> str:
    columns = [
        "row",
        "dataset",
        *(m for m, _ in BENCHMARK_METRICS),
        "score_ms_per_image",
        "fit_s",
        "coreset_s",
        "bank_rows",
        "bank_mb",
        "peak_rss_mb",
    ]
    records = []
    for r in rows:
        record = {"row": r.row, "dataset": r.dataset}
        record.update({m: round(r.metric(m), 5) for m, _ in BENCHMARK_METRICS})
        record.update(
            score_ms_per_image=round(r.evaluation.ms_per_image, 2),
            fit_s=round(sum(r.fit_seconds.values()), 3),
            coreset_s=round(r.fit_seconds.get("coreset", 0.0), 3),
            bank_rows=r.bank_rows,
            bank_mb=round(r.bank_mb, 3),
            peak_rss_mb=round(r.peak_rss_mb, 1),
        )
        records.append(record)
    return csv_text(records, columns)


def evaluation_table(evaluation: Any) -> Table:
    from rich.table import Table

    image, pixel = evaluation.image, evaluation.pixel
    table = Table(
        title=f"Evaluation: {evaluation.name} ({evaluation.n_good} good, {evaluation.n_defect} defective)",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("image AUROC", fmt(image["image_auroc"]))
    if pixel is not None:
        table.add_row("pixel AUROC", fmt(pixel["pixel_auroc"]))
        table.add_row("AUPRO (FPR <= 0.3)", fmt(pixel["aupro"]))
    for key, label in (
        ("calibrated", "calibrated threshold (good images only)"),
        ("oracle", "oracle F1-max threshold (test labels)"),
    ):
        block = image.get(key)
        if block:
            table.add_row(f"{label}", fmt(block["threshold"], 4))
            table.add_row("  balanced accuracy", fmt(block["balanced_accuracy"]))
            table.add_row("  F1", fmt(block["f1"]))
            table.add_row("  TPR / FPR", f"{fmt(block['tpr'])} / {fmt(block['fpr'])}")
    for label, value in promise_rows(evaluation):
        table.add_row(label, escape(value))
    for defect, value in image["per_defect_auroc"].items():
        table.add_row(f"image AUROC: {defect}", fmt(value))
    table.add_row("score time", f"{evaluation.ms_per_image:.0f} ms/image")
    return table


def promise_rows(evaluation: Any) -> list[tuple[str, str]]:
    """(label, value) rows: the promised FPR on good images against the one measured on the test set."""
    check = evaluation.promise
    if check is None:
        return []
    return [
        ("promised FPR (good images)", promise_text(check["promised"])),
        ("measured FPR (good test images)", measured_text(check)),
        ("promise consistent with the test", consistency_text(check)),
    ]


def evaluation_markdown(evaluation: Any) -> str:
    image, pixel = evaluation.image, evaluation.pixel
    lines = [
        f"# Evaluation: {evaluation.name}",
        "",
        f"{evaluation.n_good} good, {evaluation.n_defect} defective images.",
        "",
    ]
    lines += ["| metric | value |", "|---|---|", f"| image AUROC | {fmt(image['image_auroc'])} |"]
    if pixel is not None:
        lines += [
            f"| pixel AUROC | {fmt(pixel['pixel_auroc'])} |",
            f"| AUPRO (FPR <= 0.3) | {fmt(pixel['aupro'])} |",
        ]
    for key, label in (("calibrated", "calibrated threshold"), ("oracle", "oracle F1-max threshold")):
        block = image.get(key)
        if block:
            lines.append(f"| balanced accuracy, {label} | {fmt(block['balanced_accuracy'])} |")
            lines.append(f"| F1, {label} | {fmt(block['f1'])} |")
    for label, value in promise_rows(evaluation):
        lines.append(f"| {label} | {value} |")
    for defect, value in image["per_defect_auroc"].items():
        lines.append(f"| image AUROC: {defect} | {fmt(value)} |")
    return "\n".join(lines) + "\n"


def profile_tables(rows: Sequence[Any]) -> list[Table]:
    """Per-stage breakdown of fit and score for each benchmark row, against the bare forward pass."""
    from rich.table import Table

    tables = []
    for r in rows:
        n_test = r.evaluation.n_good + r.evaluation.n_defect
        for phase, stages, n_images in (("fit", r.fit_seconds, r.n_train), ("score", r.score_stages, n_test)):
            total = sum(stages.values())
            table = Table(
                title=f"Profile: {escape(r.row)} / {escape(display_name(r.dataset))} / {phase} "
                f"({n_images} images)",
                title_justify="left",
            )
            for header in ("stage", "seconds", "share", "images/s"):
                table.add_column(header, justify="left" if header == "stage" else "right")
            for stage, seconds in stages.items():
                rate = n_images / seconds if seconds > 0 else math.inf
                table.add_row(
                    stage, f"{seconds:.2f}", f"{100 * seconds / max(total, 1e-12):.1f}%", f"{rate:.1f}"
                )
            table.add_row("[bold]total[/]", f"{total:.2f}", "100%", f"{n_images / max(total, 1e-12):.1f}")
            if r.bare_forward:
                bare_seconds = n_images / r.bare_forward
                table.add_row(
                    "bare forward (same batch shape)", f"{bare_seconds:.2f}", "", f"{r.bare_forward:.1f}"
                )
                table.add_row("[bold]total / bare forward[/]", f"{total / bare_seconds:.2f}x", "", "")
            tables.append(table)
    return tables
