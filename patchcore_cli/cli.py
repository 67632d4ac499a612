"""The Typer app: parsing, console output and exit codes. All computation lives in the engine.

stdout carries results (tables, or one JSON/CSV document); progress, warnings and errors go to stderr.
torch, torchvision and faiss are imported inside commands so that `--help` and completion stay fast.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from patchcore_cli import __version__
from patchcore_cli.errors import PatchcoreError

app = typer.Typer(
    name="patchcore",
    help="PatchCore anomaly detection: fit on good images, then score, evaluate and benchmark.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _stdout_console() -> Console:
    """Tables on stdout: the terminal's width, or wide enough for the 17-column benchmark tables when
    stdout is a file or a pipe (Rich would otherwise squeeze them to 80 columns)."""
    import os

    console = Console(soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(soft_wrap=False, width=200)
    return console


out = _stdout_console()

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(command: F) -> F:
    """Turn domain errors into one line on stderr and their exit code; Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PatchcoreError as exc:
            # The message names user files: `part[/red].png` must print as it is, not be read as markup.
            message = escape(exc.message)
            err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        print(f"patchcore {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """PatchCore anomaly detection (Roth et al., CVPR 2022) on an ordinary CPU."""


class RichProgress:
    """Engine progress as Rich bars on stderr, one per stage."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not enabled,
        )
        self.task: Any = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            task = self.progress.tasks[-1]
            if task.total is None:
                self.progress.update(self.task, total=1, completed=1)
        self.progress.stop()

    def start(self, stage: str, total: int | None) -> None:
        if self.task is not None:
            task = self.progress.tasks[-1]
            if task.total is None:
                self.progress.update(self.task, total=1, completed=1)
        self.task = self.progress.add_task(stage, total=total)

    def advance(self, count: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, count)


# --- options shared by several commands -------------------------------------------------------------

BackboneOpt = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        "-b",
        help="Backbone: wide_resnet50_2 (default), resnet18, resnet50, efficientnet_lite0/1/2.",
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Local backbone weights file (.pth state dict). 'random' = untrained weights, for tests only.",
    ),
]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Backbone stages to use, e.g. layer2,layer3 (default).")
]
CoresetOpt = Annotated[float | None, typer.Option("--coreset", help="Coreset ratio in (0, 1]; default 0.1.")]
CoresetMaxRowsOpt = Annotated[
    str | None,
    typer.Option(
        "--coreset-max-rows",
        help="The most rows a bank keeps, past which the ratio falls: auto (default; 25 crop-sized "
        "views' worth of patches: 19600 at 224, 40000 at 320), a row count, or 0 for no cap.",
        show_default=False,
    ),
]
DimOpt = Annotated[int | None, typer.Option("--dim", help="Embedding dimension cap; default 1024.")]
ReductionOpt = Annotated[
    str | None,
    typer.Option(
        "--reduction", help="How to reach --dim when stages have more channels: avgpool (default) or random."
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option("--image-size", help="With --framing crop: resize the shorter side to this; default 256."),
]
WeightingOpt = Annotated[
    str | None,
    typer.Option(
        "--stage-weighting",
        help="equal: every stage weighs the same in the distance, whatever its channel count; "
        "none: each channel counts once. Default none.",
    ),
]
FramingOpt = Annotated[
    str | None,
    typer.Option(
        "--framing",
        help="whole: the whole image resized to a --crop square (default); crop: shorter side to "
        "--image-size, then the centre --crop square (paper); aspect: shorter side to --crop, aspect kept; "
        "tile: overlapping --tile-size tiles, each resized to --crop.",
    ),
]
TileSizeOpt = Annotated[
    int | None,
    typer.Option("--tile-size", help="With --framing tile: tile side in original image pixels."),
]
TileOverlapOpt = Annotated[
    float | None,
    typer.Option(
        "--tile-overlap", help="With --framing tile: least overlap of neighbouring tiles; default 0.25."
    ),
]
CropOpt = Annotated[
    str | None,
    typer.Option(
        "--crop",
        help="Side of the square the backbone sees, or auto (default): 320 when the training images' "
        "median shorter side reaches it, else 224, so small images are not enlarged.",
    ),
]
PatchSizeOpt = Annotated[
    int | None,
    typer.Option("--patch-size", help="Neighbourhood p each feature is averaged over (odd); default 3."),
]
NeighboursOpt = Annotated[
    int | None,
    typer.Option(
        "--num-neighbors", help="Bank neighbours b of the eq. 7 reweighting; 1 turns it off. Default 9."
    ),
]
ImageScoreOpt = Annotated[
    str | None,
    typer.Option(
        "--image-score",
        help="s* of the image score: map (default), the peak of the blurred anomaly map; patch, the "
        "largest patch score (paper eq. 6).",
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for coreset and calibration; default 42.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass; default 8.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch and faiss.")]
IndexOpt = Annotated[
    str | None,
    typer.Option(
        "--index", help="Nearest-neighbour search: exact (default), faiss (exact), hnsw (approximate)."
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto (default): CUDA when torch sees a GPU, else the CPU; cpu; or cuda. Banks work on either.",
    ),
]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="fp32 (default) or bf16 (channels-last + autocast).")
]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="fast or accurate: a measured bundle of options (see README)."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file of options; command-line options override it.")
]
TargetFprOpt = Annotated[
    float | None,
    typer.Option(
        "--target-fpr",
        help="False-alarm rate on good parts the threshold is calibrated to, in (0, 1); default 0.02.",
    ),
]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option("--max-pixels", min=1, help="Refuse images with more pixels than this (default 64M)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory budget of the coreset, such as 2GB or 500MB (powers of 1024); past it the coreset runs "
        "in shards of images. Default: 1/16 of RAM, at most 1GB.",
        show_default=False,
    ),
]
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run on Ray (pip install 'patchcore-cli[ray]'): a local Ray on this machine, "
        "or the cluster at --ray-address. Same results as without.",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Join this Ray cluster instead of starting a local Ray: auto (on a cluster node), "
        "HOST:6379 or ray://HOST:10001. Implies --ray.",
    ),
]
RayCpusOpt = Annotated[
    int | None,
    typer.Option(
        "--ray-cpus",
        min=1,
        help="With --ray: CPUs each Ray worker reserves, also its torch threads unless --threads. Default 2.",
    ),
]


def _ray_options(ray: bool, address: str | None, cpus: int | None, actors: int | None = None) -> Any:
    """The Ray settings of a command, or None to run here; ConfigError if Ray is asked for but missing."""
    from patchcore_cli import distributed
    from patchcore_cli.errors import ConfigError

    if not ray and address is None:
        if cpus is not None or actors is not None:
            raise ConfigError("--ray-cpus and --ray-actors go with --ray")
        return None
    distributed.require_ray()
    return distributed.RayOptions(address=address, cpus=cpus, actors=actors)


def _max_pixels(value: int | None) -> int:
    from patchcore_cli.data import DEFAULT_MAX_PIXELS

    return value if value is not None else DEFAULT_MAX_PIXELS


def _open_scorer(bank_path: Path, **runtime: Any) -> Any:
    """Load a bank and build its scorer (shared by `score` and `evaluate`), warning about random weights."""
    from patchcore_cli import bank as bank_io
    from patchcore_cli.engine import Scorer

    scorer = Scorer(bank_io.load(bank_path), bank_path=str(bank_path), **runtime)
    _warn_random(scorer.random_weights)
    return scorer


def _warn_random(random_weights: bool) -> None:
    if random_weights:
        err.print("[bold yellow]warning:[/] using RANDOM backbone weights (--weights random): for tests only")


# --- fit -------------------------------------------------------------------------------------------


@app.command()
@handle_errors
def fit(
    inputs: Annotated[
        list[str], typer.Argument(help="Folders, files or globs of GOOD images.", show_default=False)
    ],
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Bank file to write. Default bank.st; with --update, the updated bank."
        ),
    ] = None,
    update: Annotated[
        Path | None,
        typer.Option(
            "--update",
            help="Add the good images to this bank, with its own settings, and recalibrate its threshold.",
            show_default=False,
        ),
    ] = None,
    max_memory: MaxMemoryOpt = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Folder for the fit's temporary embedding files (default: beside --out). With --ray, a "
            "folder on every worker node (default: their temporary folder).",
            show_default=False,
        ),
    ] = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    coreset: CoresetOpt = None,
    coreset_max_rows: CoresetMaxRowsOpt = None,
    dim: DimOpt = None,
    reduction: ReductionOpt = None,
    stage_weighting: WeightingOpt = None,
    patch_size: PatchSizeOpt = None,
    num_neighbors: NeighboursOpt = None,
    image_score: ImageScoreOpt = None,
    image_size: ImageSizeOpt = None,
    framing: FramingOpt = None,
    tile_size: TileSizeOpt = None,
    tile_overlap: TileOverlapOpt = None,
    crop: CropOpt = None,
    seed: SeedOpt = None,
    batch_size: BatchOpt = None,
    threads: ThreadsOpt = None,
    index: IndexOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    target_fpr: TargetFprOpt = None,
    preset: PresetOpt = None,
    config_file: ConfigOpt = None,
    max_pixels: MaxPixelsOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_cpus: RayCpusOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit a memory bank on good images and calibrate its threshold (from good images only).

    With --update BANK, add good images (say, false alarms an operator confirmed) to a fitted bank.
    """
    from patchcore_cli import bank as bank_io
    from patchcore_cli import config as config_mod
    from patchcore_cli import distributed
    from patchcore_cli.config import FitConfig
    from patchcore_cli.data import list_images
    from patchcore_cli.device import resolve
    from patchcore_cli.engine import fit as run_fit
    from patchcore_cli.engine import update as run_update
    from patchcore_cli.errors import ConfigError

    budget = config_mod.parse_size(max_memory) if max_memory is not None else None
    overrides = _fit_overrides(locals())
    ray_options = _ray_options(ray, ray_address, ray_cpus)
    if ray_options is not None and update is not None:
        raise ConfigError("--update runs on this machine; drop --ray")
    if update is None:
        config = config_mod.build(config_file, preset=preset, backbone=backbone, **overrides)
        resolve(config.device)  # a missing GPU fails now, before any image is read
    else:  # the bank's settings, with the options given only checked against them
        options = config_mod.given(config_file, preset=preset, backbone=backbone, **overrides)
        runtime = {key: options.pop(key, None) for key in FitConfig.RUNTIME}
        bank = bank_io.load(update)
    out_path = out_path or update or Path("bank.st")
    paths = list_images(inputs)
    bank_io.check_destination(out_path)  # a mistyped --out fails now, not after the whole fit
    _warn_random(config.weights == "random" if update is None else bank.weights_sha256 == "random")
    limits = {
        "max_pixels": _max_pixels(max_pixels),
        "max_memory": budget,
        "work_dir": work_dir or out_path.parent,
    }
    with RichProgress(enabled=not as_json or err.is_terminal) as progress:
        if ray_options is not None:  # the work files are on the workers: --work-dir is a folder there
            limits["work_dir"] = work_dir
            result = distributed.fit(paths, config, ray_options, progress=progress, **limits)
        elif update is None:
            result = run_fit(paths, config, progress=progress, **limits)
        else:
            result = run_update(bank, paths, str(update), options, progress, **limits, **runtime)
        with result.timings.stage("bank write"):
            bank_io.save(result.bank, out_path)
    from patchcore_cli import report

    if as_json:
        print(json.dumps(report.fit_json(result, out_path)))
    else:
        out.print(report.fit_table(result, out_path))


# --- score -----------------------------------------------------------------------------------------


@app.command()
@handle_errors
def score(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Images, folders or globs to score (or --watch DIR).", show_default=False),
    ] = None,
    bank_path: Annotated[Path, typer.Option("--bank", help="Bank file written by `patchcore fit`.")] = Path(
        "bank.st"
    ),
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout instead of a table.")] = False,
    heatmaps: Annotated[
        Path | None, typer.Option("--heatmaps", help="Write heatmap overlays (PNG, original size) here.")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option("--masks", help="Write binary defect masks (PNG) here.")
    ] = None,
    fail_on_anomaly: Annotated[
        bool, typer.Option("--fail-on-anomaly", help="Exit with code 1 if any image is anomalous.")
    ] = False,
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="Skip unreadable images (listed in the output) instead of stopping."),
    ] = False,
    fail_on_skip: Annotated[
        bool,
        typer.Option("--fail-on-skip", help="With --skip-bad: exit with code 1 if any file was skipped."),
    ] = False,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = None,
    threads: ThreadsOpt = None,
    index: IndexOpt = None,
    device: DeviceOpt = None,
    max_pixels: MaxPixelsOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_cpus: RayCpusOpt = None,
    ray_actors: Annotated[
        int | None,
        typer.Option("--ray-actors", min=1, help="With --ray: scoring actors; default as many as fit."),
    ] = None,
    watch_dir: Annotated[
        Path | None,
        typer.Option(
            "--watch",
            help="Keep running: score each new image file that appears in this folder, one result line "
            "each (JSON lines with --json). Load once, score many; Ctrl-C stops.",
        ),
    ] = None,
    settle: Annotated[
        float | None,
        typer.Option(
            "--settle",
            min=0.0,
            help="With --watch: seconds a new file must keep its size before it is read (default 0.25); "
            "0 when files are renamed into the folder complete.",
            show_default=False,
        ),
    ] = None,
    existing: Annotated[
        bool, typer.Option("--existing", help="With --watch: also score the images already in the folder.")
    ] = False,
    max_images: Annotated[
        int | None, typer.Option("--max-images", min=1, help="With --watch: stop after this many results.")
    ] = None,
) -> None:
    """Score images against a bank: raw score, normalised score (threshold = 0.5) and verdict."""
    from patchcore_cli import report
    from patchcore_cli.data import list_images
    from patchcore_cli.errors import ConfigError

    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv")
    if watch_dir is not None:
        given = [name for name, on in (("PATH", inputs), ("--fail-on-anomaly", fail_on_anomaly),
                 ("--skip-bad", skip_bad), ("--fail-on-skip", fail_on_skip), ("--ray", ray or ray_address))
                 if on]  # fmt: skip
        if given:
            raise ConfigError(f"--watch scores the images that arrive in its folder; drop {', '.join(given)}")
        for output in (heatmaps, masks):
            if output is not None:
                _make_dir(output)
                if watch_dir.is_dir() and output.resolve() == watch_dir.resolve():
                    raise ConfigError(f"{output}: write heatmaps and masks outside the watched folder")
        scorer = _open_scorer(
            bank_path, batch_size=batch_size, threads=threads, weights=weights, index=index, device=device
        )
        _watch(scorer, watch_dir, as_json, as_csv, heatmaps, masks, settle, existing, max_images, max_pixels)
        return
    if not inputs:
        raise ConfigError("score needs images to score (PATH...) or a folder to watch (--watch DIR)")
    ray_options = _ray_options(ray, ray_address, ray_cpus, ray_actors)
    if ray_options is not None:
        runtime = {"batch_size": batch_size, "threads": threads, "weights": weights, "index": index}
        results, threshold, promise = _score_on_ray(
            inputs, bank_path, ray_options, heatmaps, masks, skip_bad, as_json or as_csv, max_pixels, runtime
        )
    else:
        paths = list_images(inputs)
        scorer = _open_scorer(
            bank_path, batch_size=batch_size, threads=threads, weights=weights, index=index, device=device
        )
        for folder in (heatmaps, masks):
            if folder is not None:
                _make_dir(folder)
        heat_names = report.output_names(paths, "_heatmap") if heatmaps is not None else {}
        mask_names = report.output_names(paths, "_mask") if masks is not None else {}

        def write_outputs(result: Any) -> None:
            if result.error is not None or result.anomaly_map is None:
                return
            _write_maps(result, scorer, heatmaps, heat_names, masks, mask_names, _max_pixels(max_pixels))

        keep_maps = heatmaps is not None or masks is not None
        with RichProgress(enabled=not (as_json or as_csv) or err.is_terminal) as progress:
            results = scorer.score_paths(
                paths,
                progress=progress,
                keep_maps=keep_maps,
                skip_bad=skip_bad,
                max_pixels=_max_pixels(max_pixels),
                on_result=write_outputs,
            )
        threshold, promise = scorer.threshold, scorer.promise
    records = [report.score_record(r) for r in results]
    skipped = [r for r in results if r.error is not None]
    if as_json:
        document = {"bank": str(bank_path), "threshold": threshold, "promise": promise}
        print(json.dumps({**document, "results": records}))
    elif as_csv:
        sys.stdout.write(report.csv_text(records, ["file", "score", "normalized", "anomalous", "error"]))
    else:
        out.print(report.score_table(results, threshold, promise))
        flagged = sum(bool(r.anomalous) for r in results)
        err.print(f"{len(results) - len(skipped)} scored, {flagged} anomalous, {len(skipped)} skipped")
    if skipped:
        err.print(f"[yellow]skipped {len(skipped)} unreadable file(s)[/]")
    if (fail_on_anomaly and any(r.anomalous for r in results)) or (fail_on_skip and skipped):
        raise typer.Exit(1)


def _score_on_ray(
    inputs: list[str],
    bank_path: Path,
    options: Any,
    heatmaps: Path | None,
    masks: Path | None,
    skip_bad: bool,
    machine_output: bool,
    max_pixels: int | None,
    runtime: dict[str, Any],
) -> tuple[list[Any], float, dict[str, Any] | None]:
    """`score --ray`: the bank goes to the workers through the object store; their pictures come back as
    PNG bytes and are named and written here in input order, like a local run's."""
    from patchcore_cli import bank as bank_io
    from patchcore_cli import distributed, report
    from patchcore_cli.backbones import RANDOM_WEIGHTS
    from patchcore_cli.calibration import stored_promise

    sources = distributed.list_inputs(inputs)
    bank = bank_io.load(bank_path)
    _warn_random(any(part.weights_sha256 == RANDOM_WEIGHTS for part in bank.parts))
    for folder in (heatmaps, masks):
        if folder is not None:
            _make_dir(folder)
    # Named as a local run names them (report.output_names), URIs by their path parts.
    as_paths = [Path(str(name)) for name in sources.names]
    heat_names = report.output_names(as_paths, "_heatmap") if heatmaps is not None else {}
    mask_names = report.output_names(as_paths, "_mask") if masks is not None else {}

    def write_outputs(result: Any, heat: bytes | None, mask: bytes | None) -> None:
        if heatmaps is not None and heat is not None:
            report.write_bytes(heatmaps / heat_names[Path(str(result.path))], heat)
        if masks is not None and mask is not None:
            report.write_bytes(masks / mask_names[Path(str(result.path))], mask)

    with RichProgress(enabled=not machine_output or err.is_terminal) as progress:
        results = distributed.score(
            sources,
            bank,
            str(bank_path),
            runtime,
            options,
            heatmaps=heatmaps is not None,
            masks=masks is not None,
            skip_bad=skip_bad,
            max_pixels=_max_pixels(max_pixels),
            progress=progress,
            on_result=write_outputs,
        )
    return results, float(bank.calibration["image_threshold"]), stored_promise(bank.calibration)


def _watch(
    scorer: Any,
    folder: Path,
    as_json: bool,
    as_csv: bool,
    heatmaps: Path | None,
    masks: Path | None,
    settle: float | None,
    existing: bool,
    max_images: int | None,
    max_pixels: int | None,
) -> None:
    """`score --watch`: one result line per image on stdout, flushed at once, until Ctrl-C (exit 130),
    SIGTERM (exit 0) or --max-images."""
    import signal
    import threading

    from patchcore_cli import report
    from patchcore_cli.errors import ImageError
    from patchcore_cli.watch import DEFAULT_SETTLE, FolderWatch, watch

    columns = ["file", "score", "normalized", "anomalous", "error"]
    counts = {"scored": 0, "anomalous": 0, "unreadable": 0}

    def give(result: Any) -> None:
        if result.error is None:
            counts["scored"] += 1
            counts["anomalous"] += bool(result.anomalous)
            if result.anomaly_map is not None:  # named as `score` names them: <stem>_heatmap.png
                heat_names = report.output_names([result.path], "_heatmap")
                mask_names = report.output_names([result.path], "_mask")
                try:
                    _write_maps(
                        result, scorer, heatmaps, heat_names, masks, mask_names, _max_pixels(max_pixels)
                    )
                except ImageError as exc:  # the overlay reads the image again: it may be gone by now
                    err.print(f"[yellow]no heatmap or mask:[/] {escape(exc.message)}", highlight=False)
        else:
            counts["unreadable"] += 1
        record = report.score_record(result)
        if as_json:
            print(json.dumps(record), flush=True)
        elif as_csv:
            sys.stdout.write(report.csv_text([record], columns, header=False))
            sys.stdout.flush()
        else:
            out.print(report.score_line(result), highlight=False, soft_wrap=True)

    def ready(watcher: FolderWatch) -> None:
        before = f"; {watcher.skipped} image(s) already there are not scored" if watcher.skipped else ""
        err.print(f"watching {escape(str(folder))} (Ctrl-C stops){before}", highlight=False, soft_wrap=True)

    stop = threading.Event()
    # A service manager's stop (SIGTERM) ends the watch after the current image, with the summary line.
    in_main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main else None
    if as_csv:
        sys.stdout.write(report.csv_text([], columns))
        sys.stdout.flush()
    try:
        watch(
            scorer, folder, give, DEFAULT_SETTLE if settle is None else settle, existing, max_images,
            keep_maps=heatmaps is not None or masks is not None, max_pixels=_max_pixels(max_pixels),
            stop=stop, on_ready=ready,
        )  # fmt: skip
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        err.print(
            f"{counts['scored']} scored, {counts['anomalous']} anomalous, {counts['unreadable']} unreadable"
        )


def _make_dir(folder: Path) -> None:
    from patchcore_cli.errors import OutputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create folder ({exc.strerror or exc})") from exc


def _write_maps(
    result: Any,
    scorer: Any,
    heatmaps: Path | None,
    heat_names: dict[Path, str],
    masks: Path | None,
    mask_names: dict[Path, str],
    max_pixels: int,
) -> None:
    import numpy as np

    from patchcore_cli import report
    from patchcore_cli.data import load_image

    pixel_threshold = float(scorer.bank.calibration["pixel_threshold"])
    image = np.asarray(load_image(result.path, max_pixels)) if heatmaps is not None else None
    heat, binary = report.score_pictures(
        result.anomaly_map,
        result.geometry,
        pixel_threshold,
        image,
        masks is not None,
        result.score,
        scorer.threshold,
        result.anomalous,
    )
    if heat is not None:
        report.save_png(heatmaps / heat_names[result.path], heat)
    if binary is not None:
        report.save_png(masks / mask_names[result.path], binary)


# --- export ----------------------------------------------------------------------------------------


@app.command("export")
@handle_errors
def export_onnx(
    bank_path: Annotated[
        Path, typer.Argument(help="Bank file written by `patchcore fit`.", show_default=False)
    ],
    onnx_path: Annotated[Path, typer.Option("--onnx", help="ONNX model file to write.", show_default=False)],
    check: Annotated[
        list[str] | None,
        typer.Option(
            "--check",
            help="Images, folders or globs to compare the model with `patchcore score` on before writing it "
            "(default: 4 seeded random images).",
        ),
    ] = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a bank and its backbone to one ONNX model: image in; score, normalised score, verdict and
    anomaly map out (see docs/deploy.md)."""
    from patchcore_cli import bank as bank_io
    from patchcore_cli import export, report
    from patchcore_cli.data import list_images

    export.require_runtime()
    bank_io.check_destination(onnx_path, "ONNX model")
    paths = list_images(check) if check else []
    scorer = _open_scorer(bank_path, threads=threads, weights=weights)
    with err.status("exporting and checking against the engine"):
        result = export.export(scorer, onnx_path, paths, threads)
    if as_json:
        print(json.dumps(report.export_json(result, bank_path)))
    else:
        out.print(report.export_table(result, bank_path))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        # At exit the interpreter's last garbage collections walk every object torch, timm and numba
        # made: about 1.5 s here, longer on a loaded machine, spent after the last result (a Ctrl-C'd
        # watch waited for it). Nothing left needs collecting: moved to the permanent generation, which
        # those collections skip, they take a few milliseconds.
        gc.freeze()


# --- evaluate --------------------------------------------------------------------------------------

NoPixelOpt = Annotated[
    bool, typer.Option("--no-pixel-metrics", help="Skip pixel AUROC and AUPRO (no masks needed).")
]
OutDirOpt = Annotated[
    Path | None, typer.Option("--out", help="Folder for results.json, results.csv, results.md.")
]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        help="Folder for report.html (self-contained: charts, hardest cases with heatmaps, config) "
        "and results.json.",
    ),
]


@app.command()
@handle_errors
def evaluate(
    dataset: Annotated[
        Path | None,
        typer.Argument(
            help="An MVTec AD category folder (test/, ground_truth/). Or use --good/--defect.",
            show_default=False,
        ),
    ] = None,
    bank_path: Annotated[Path, typer.Option("--bank", help="Bank file written by `patchcore fit`.")] = Path(
        "bank.st"
    ),
    good: Annotated[
        list[Path] | None, typer.Option("--good", help="Folder of good test images (generic layout).")
    ] = None,
    defect: Annotated[
        list[Path] | None,
        typer.Option("--defect", help="Folder of defective images; repeat for each defect type."),
    ] = None,
    masks: Annotated[
        list[Path] | None, typer.Option("--masks", help="Folder of masks (<stem>.png or <stem>_mask.png).")
    ] = None,
    no_pixel_metrics: NoPixelOpt = False,
    as_json: JsonOpt = False,
    out_dir: OutDirOpt = None,
    report_dir: ReportOpt = None,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = None,
    threads: ThreadsOpt = None,
    index: IndexOpt = None,
    device: DeviceOpt = None,
    max_pixels: MaxPixelsOpt = None,
) -> None:
    """Score a labelled test set with a bank: image/pixel AUROC, AUPRO, thresholded metrics."""
    from patchcore_cli import html_report, report
    from patchcore_cli.data import mvtec_category, test_split
    from patchcore_cli.errors import ConfigError
    from patchcore_cli.evaluation import evaluate as run_evaluate

    require = not no_pixel_metrics
    if dataset is not None and (good or defect):
        raise ConfigError("give either a DATASET folder or --good/--defect, not both")
    if dataset is not None:
        split = mvtec_category(dataset.parent, dataset.name, require_masks=require)
    elif good and defect:
        split = test_split(good, defect, masks or [], require_masks=require)
    else:
        raise ConfigError("evaluate needs a DATASET folder, or --good DIR and --defect DIR")
    scorer = _open_scorer(
        bank_path, batch_size=batch_size, threads=threads, weights=weights, index=index, device=device
    )
    if report_dir is not None:
        _make_dir(report_dir)
    cases = html_report.REPORT_CASES if report_dir is not None else None
    with RichProgress(enabled=not as_json or err.is_terminal) as progress:
        evaluation = run_evaluate(scorer, split, require, progress, _max_pixels(max_pixels), cases)
    data = {"bank": str(bank_path), **evaluation.as_dict()}
    if report_dir is not None:
        page = html_report.write_evaluation_report(
            report_dir, evaluation, data, bank_path, _max_pixels(max_pixels)
        )
        _announce_report(page)
    if out_dir is not None:
        _make_dir(out_dir)
        report.write_json(out_dir / "results.json", data)
        report.write_text(
            out_dir / "results.csv",
            report.csv_text(evaluation.images, ["file", "label", "defect_type", "score", "anomalous"]),
        )
        report.write_text(out_dir / "results.md", report.evaluation_markdown(evaluation))
    if as_json:
        print(json.dumps(data))
    else:
        out.print(report.evaluation_table(evaluation))


# --- benchmark -------------------------------------------------------------------------------------

bench_app = typer.Typer(
    help="Fit and evaluate per dataset; print one table per metric (rows = backbones/configs).",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="benchmark")

MultiBackboneOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backbone", "-b", help="Backbone for one row; repeat for several rows. Default wide_resnet50_2."
    ),
]
MultiPresetOpt = Annotated[
    list[str] | None, typer.Option("--preset", help="fast or accurate; repeat for one row per preset.")
]
MultiConfigOpt = Annotated[
    list[Path] | None, typer.Option("--config", help="YAML config for one row variant; repeat for several.")
]
ProfileOpt = Annotated[bool, typer.Option("--profile", help="Print a per-stage time breakdown.")]


def _row_configs(
    backbones: list[str] | None,
    configs: list[Path] | None,
    overrides: dict[str, Any],
    presets: list[str] | None = None,
) -> list[tuple[str, Any]]:
    """One benchmark row per preset x config file x backbone given (each defaulting to 'none given')."""
    from patchcore_cli import config as config_mod

    rows = []
    for preset in presets or [None]:
        for config_file in configs or [None]:
            for backbone in backbones or [None]:
                built = config_mod.build(config_file, preset=preset, **{**overrides, "backbone": backbone})
                tags = [t for t in (preset, config_file.stem if config_file else None) if t]
                label = built.backbone + (f" [{', '.join(tags)}]" if tags else "")
                rows.append((label, built))
    return rows


def _announce_report(path: Path) -> None:
    err.print(
        f"report: {escape(str(path))} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True
    )


def _run_benchmark(
    splits: list[Any],
    rows: list[tuple[str, Any]],
    columns: list[str],
    pixel: bool,
    out_dir: Path | None,
    as_json: bool,
    max_pixels: int | None,
    profile: bool = False,
    report_dir: Path | None = None,
    ray_options: Any = None,
    max_memory: str | None = None,
) -> None:
    from patchcore_cli import html_report, report
    from patchcore_cli.config import parse_size
    from patchcore_cli.device import resolve
    from patchcore_cli.evaluation import benchmark as run_benchmark

    budget = parse_size(max_memory) if max_memory is not None else None

    for _, config in rows:
        resolve(config.device)  # a missing GPU fails now, not after the first row
        _warn_random(config.weights == "random")

    def announce(row: Any) -> None:
        err.print(
            f"[bold]{escape(row.row)}[/] / {escape(row.dataset)}: "
            f"image AUROC {report.fmt(row.metric('image_auroc'))}, "
            f"pixel AUROC {report.fmt(row.metric('pixel_auroc'))}, AUPRO {report.fmt(row.metric('aupro'))}"
        )

    if report_dir is not None:
        _make_dir(report_dir)
    cases = html_report.REPORT_CASES if report_dir is not None else None
    with RichProgress(enabled=not as_json or err.is_terminal) as progress:
        if ray_options is not None:
            from patchcore_cli import distributed

            results = distributed.benchmark(
                splits,
                rows,
                ray_options,
                pixel,
                progress,
                announce,
                _max_pixels(max_pixels),
                profile,
                cases,
                max_memory=budget,
            )
        else:
            results = run_benchmark(
                splits,
                rows,
                pixel,
                progress,
                announce,
                _max_pixels(max_pixels),
                profile,
                cases,
                max_memory=budget,
            )
    data = {"columns": columns, "results": [r.as_dict() for r in results]}
    if report_dir is not None:
        page = html_report.write_benchmark_report(report_dir, results, columns, data, _max_pixels(max_pixels))
        _announce_report(page)
    if out_dir is not None:
        _make_dir(out_dir)
        report.write_json(out_dir / "results.json", data)
        report.write_text(out_dir / "results.csv", report.benchmark_csv(results))
        report.write_text(out_dir / "results.md", report.benchmark_markdown(results, columns))
    if as_json:
        print(json.dumps(data))
        return
    for table in report.benchmark_tables(results, columns, width=out.width):
        out.print(table)
    out.print(report.timing_table(results))
    if profile:
        for table in report.profile_tables(results):
            out.print(table)


# The fit options that `fit` and `benchmark` (for every row) take from the command line, when given.
_FIT_OPTIONS = (
    "seed",
    "weights",
    "layers",
    "coreset",
    "coreset_max_rows",
    "dim",
    "reduction",
    "stage_weighting",
    "patch_size",
    "num_neighbors",
    "image_score",
    "image_size",
    "framing",
    "tile_size",
    "tile_overlap",
    "crop",
    "batch_size",
    "threads",
    "index",
    "device",
    "precision",
    "target_fpr",
)


def _fit_overrides(options: dict[str, Any]) -> dict[str, Any]:
    """The fit options given on a command line (the command's `locals()`), for `config.build`."""
    return {key: options[key] for key in _FIT_OPTIONS if options.get(key) is not None}


@bench_app.command("mvtec")
@handle_errors
def benchmark_mvtec(
    root: Annotated[
        Path | None, typer.Option("--root", help="MVTec AD root. Default $MVTEC_ROOT or ./datasets/MVTecAD.")
    ] = None,
    backbone: MultiBackboneOpt = None,
    categories: Annotated[
        str | None, typer.Option("--categories", help="Comma-separated categories (default: all present).")
    ] = None,
    seed: SeedOpt = None,
    config_files: MultiConfigOpt = None,
    presets: MultiPresetOpt = None,
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    coreset: CoresetOpt = None,
    coreset_max_rows: CoresetMaxRowsOpt = None,
    dim: DimOpt = None,
    reduction: ReductionOpt = None,
    stage_weighting: WeightingOpt = None,
    patch_size: PatchSizeOpt = None,
    num_neighbors: NeighboursOpt = None,
    image_score: ImageScoreOpt = None,
    image_size: ImageSizeOpt = None,
    framing: FramingOpt = None,
    tile_size: TileSizeOpt = None,
    tile_overlap: TileOverlapOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    threads: ThreadsOpt = None,
    index: IndexOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    target_fpr: TargetFprOpt = None,
    no_pixel_metrics: NoPixelOpt = False,
    out_dir: OutDirOpt = None,
    report_dir: ReportOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = False,
    max_pixels: MaxPixelsOpt = None,
    max_memory: MaxMemoryOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_cpus: RayCpusOpt = None,
) -> None:
    """MVTec AD: fit on train/good and evaluate on test/ for each category present under --root.

    Other categories in the same layout can be named with --categories; they follow the official ones.
    """
    import os

    from patchcore_cli.data import MVTEC_CATEGORIES, mvtec_available, mvtec_category, mvtec_layout
    from patchcore_cli.errors import ConfigError, InputError

    ray_options = _ray_options(ray, ray_address, ray_cpus)
    root = root or Path(os.environ.get("MVTEC_ROOT", "datasets/MVTecAD"))
    present, missing = mvtec_available(root)
    wanted = [c.strip() for c in categories.split(",") if c.strip()] if categories else list(MVTEC_CATEGORIES)
    # Other categories in the MVTec AD layout (your own parts, the demo's) run too, after the official ones.
    extra = [c for c in wanted if c not in MVTEC_CATEGORIES]
    unknown = [c for c in extra if not mvtec_layout(root / c)]
    if unknown:
        raise ConfigError(
            f"unknown categories: {', '.join(unknown)} (not MVTec AD categories, and no "
            f"<category>/train/good and <category>/test folders under {root})"
        )
    present += extra
    absent = [c for c in wanted if c in missing]
    if absent:
        err.print(
            f"[yellow]note:[/] skipping {len(absent)} categories not found under {root}: {', '.join(absent)}"
        )
    run = [c for c in wanted if c in present]
    if not run:
        raise InputError(f"{root}: none of the requested MVTec AD categories is present")
    splits = [mvtec_category(root, c, require_masks=not no_pixel_metrics) for c in run]
    rows = _row_configs(backbone, config_files, _fit_overrides(locals()), presets)
    columns = list(MVTEC_CATEGORIES) + extra
    pixel = not no_pixel_metrics
    _run_benchmark(
        splits,
        rows,
        columns,
        pixel,
        out_dir,
        as_json,
        max_pixels,
        profile,
        report_dir,
        ray_options,
        max_memory,
    )


@bench_app.command("folder")
@handle_errors
def benchmark_folder(
    good: Annotated[list[Path], typer.Option("--good", help="Folder(s) of good images.")],
    defect: Annotated[
        list[Path], typer.Option("--defect", help="Folder of defective images; repeat per type.")
    ],
    train: Annotated[
        list[Path] | None,
        typer.Option("--train", help="Training folder(s); default: a seeded split of --good."),
    ] = None,
    masks: Annotated[list[Path] | None, typer.Option("--masks", help="Folder(s) holding masks.")] = None,
    train_fraction: Annotated[
        float,
        typer.Option("--train-fraction", help="Share of --good used for training when --train is absent."),
    ] = 0.5,
    name: Annotated[str, typer.Option("--name", help="Dataset name in the tables.")] = "folder",
    backbone: MultiBackboneOpt = None,
    seed: SeedOpt = None,
    config_files: MultiConfigOpt = None,
    presets: MultiPresetOpt = None,
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    coreset: CoresetOpt = None,
    coreset_max_rows: CoresetMaxRowsOpt = None,
    dim: DimOpt = None,
    reduction: ReductionOpt = None,
    stage_weighting: WeightingOpt = None,
    patch_size: PatchSizeOpt = None,
    num_neighbors: NeighboursOpt = None,
    image_score: ImageScoreOpt = None,
    image_size: ImageSizeOpt = None,
    framing: FramingOpt = None,
    tile_size: TileSizeOpt = None,
    tile_overlap: TileOverlapOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    threads: ThreadsOpt = None,
    index: IndexOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    target_fpr: TargetFprOpt = None,
    no_pixel_metrics: NoPixelOpt = False,
    out_dir: OutDirOpt = None,
    report_dir: ReportOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = False,
    max_pixels: MaxPixelsOpt = None,
    max_memory: MaxMemoryOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_cpus: RayCpusOpt = None,
) -> None:
    """Your own data: good and defective folders (masks beside images or in --masks)."""
    from patchcore_cli.data import folder_split

    ray_options = _ray_options(ray, ray_address, ray_cpus)
    split = folder_split(
        good,
        defect,
        train=train,
        masks=masks or [],
        require_masks=not no_pixel_metrics,
        train_fraction=train_fraction,
        seed=seed if seed is not None else 42,
        name=name,
    )
    rows = _row_configs(backbone, config_files, _fit_overrides(locals()), presets)
    pixel = not no_pixel_metrics
    _run_benchmark(
        [split],
        rows,
        [name],
        pixel,
        out_dir,
        as_json,
        max_pixels,
        profile,
        report_dir,
        ray_options,
        max_memory,
    )


# --- demo ------------------------------------------------------------------------------------------


@app.command()
@handle_errors
def demo(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Keep the generated data and results here (default: a temp folder)."),
    ] = None,
    backbone: Annotated[
        str, typer.Option("--backbone", "-b", help="Backbone to run.")
    ] = "efficientnet_lite0",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated data.")] = 0,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = None,
    index: IndexOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    report_dir: ReportOpt = None,
) -> None:
    """Generate a synthetic inspection dataset and run fit + evaluate + the benchmark tables on it."""
    import tempfile
    import time

    from patchcore_cli import config as config_mod
    from patchcore_cli.data import mvtec_category
    from patchcore_cli.synthetic import CATEGORIES, generate_dataset

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="patchcore-demo-") as scratch:
        base = out_dir or Path(scratch)
        data_root = base / "data"
        err.print(f"generating synthetic dataset ({', '.join(CATEGORIES)}) in {data_root}")
        generate_dataset(data_root, seed=seed)
        splits = [mvtec_category(data_root, category) for category in CATEGORIES]
        config = config_mod.build(
            backbone=backbone, weights=weights, threads=threads, index=index, device=device
        )
        rows = [(config.backbone, config)]
        _run_benchmark(splits, rows, list(CATEGORIES), True, out_dir, as_json, None, report_dir=report_dir)
    err.print(f"demo finished in {time.perf_counter() - began:.1f} s")


# --- warmup ----------------------------------------------------------------------------------------


@app.command()
@handle_errors
def warmup() -> None:
    """Compile the coreset and search kernels now, so that no later run waits for it (once per install)."""
    from patchcore_cli.jit import warm_up

    for item in warm_up():
        done = "compiled" if item.compiled else "loaded from the cache"
        seconds = f"{item.seconds:.1f} s ({item.cpu_seconds:.1f} s CPU)"
        print(f"{item.module} kernels {done} in {seconds}: {item.cache}")
