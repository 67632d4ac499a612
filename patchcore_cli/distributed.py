"""Running the engine on Ray: `score --ray`, `fit --ray` and `benchmark --ray`.

This module ships work to the engine and gathers what the engine returns. PatchCore itself happens only
in the engine, which never imports Ray, so a Ray worker runs the same code as a local run:

- score: Ray Data `map_batches` over the inputs with a fixed pool of actors. Each actor receives the bank
  once through the object store (its tensors as numpy arrays, its metadata as plain dicts), builds one
  `engine.Scorer`, and returns scores, verdicts and, when asked, the heatmap and mask PNGs drawn by
  `report.score_pictures`. Local paths are read by the actors (they must be on storage every node sees);
  URIs (`s3://...`) are read by Ray Data and decoded by `data.load_image` like files. The driver puts the
  rows back in input order, names the pictures like a local run and writes them.
- fit: the shards of the hierarchical coreset (sharding.py) run as Ray tasks. The driver plans them from
  each image's patch count (`sharding.plan`: the boundaries and picks a local fit with the same budget
  makes); for the aspect and tile framings, whose counts depend on each image's size, tasks frame the
  images first. Each shard task reads and embeds its images and takes its greedy picks
  (`engine.fit_shard`); its part of the bank and its calibration images' patches come back through the
  object store, and the driver assembles and calibrates the bank (`engine.fit_from_shards`).
- benchmark: one Ray task per (row, dataset) cell, each running `evaluation.benchmark_cell`.

One connection serves a command (`session`). Ray is an optional extra (`pip install 'patchcore-cli[ray]'`),
imported inside functions only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcore_cli.bank import Bank
from patchcore_cli.errors import (
    BankError,
    ConfigError,
    ImageError,
    InputError,
    OutputError,
    PatchcoreError,
    WeightsError,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from patchcore_cli.config import FitConfig
    from patchcore_cli.data import Split
    from patchcore_cli.engine import FitResult, Progress, ScoreResult, ShardFit, ShardJob
    from patchcore_cli.evaluation import BenchmarkRow

INSTALL_HINT = "pip install 'patchcore-cli[ray]'"
DEFAULT_CPUS = 2
"""CPUs (and torch threads) per worker when --ray-cpus is not given. Two, not one: with one thread the
EfficientNet-Lite convolutions round differently (about 1e-5 relative) from the multi-threaded local run,
and `--ray` must give the same numbers as a local run."""

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run. `address` None starts a local Ray on this machine."""

    address: str | None = None
    cpus: int | None = None  # CPUs each actor or task reserves; also its torch threads unless --threads
    actors: int | None = None  # score: actors in the pool; default as many as the cluster holds


def require_ray() -> None:
    """ConfigError (exit code 2) with the install command when Ray Data is not installed."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None


# --- connection ------------------------------------------------------------------------------------


def worker_env() -> dict[str, Any]:
    """The runtime_env for a Ray started on this machine: its workers import this very `patchcore_cli`.

    A worker is a fresh interpreter; a source checkout that is on the driver's sys.path only (not
    installed, or shadowing an installed copy through PYTHONPATH) would otherwise be missed or replaced.
    """
    import site

    import patchcore_cli

    root = str(Path(patchcore_cli.__file__).resolve().parents[1])
    installed = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in installed:
        return {}
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


@contextlib.contextmanager
def session(options: RayOptions) -> Iterator[None]:
    """Connected to Ray for one command: a connection this process already holds is reused; otherwise a
    local Ray is started (no address) or `options.address` is joined, and left again at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        settings: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,  # workers print nothing we need; their errors come back as exceptions
            "logging_level": logging.ERROR,
        }
        try:
            if options.address is None:
                # Ray runs workers at niceness 15; on this machine they would then lose every contest
                # with other programs that the local path, at the command's own priority, holds its own in.
                system = {"worker_niceness": 0}
                ray.init(address="local", runtime_env=worker_env(), _system_config=system, **settings)
            else:
                _reachable(options.address)
                ray.init(address=options.address, **settings)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if options.address is None:
                raise ConfigError(f"--ray: cannot start a local Ray ({_first_line(exc)})") from None
            problem = _first_line(exc)
            raise ConfigError(f"--ray-address {options.address}: cannot connect to Ray ({problem})") from None
    _quiet_ray_data()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _reachable(address: str, timeout: float = 10.0) -> None:
    """ConnectionError unless HOST:PORT (or ray://HOST:PORT) accepts a TCP connection within `timeout`:
    Ray itself retries an unreachable address for minutes before giving up."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself and fails on quickly
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port}: {exc.strerror or exc}") from None


def _quiet_ray_data() -> None:
    """Ray Data's progress bars and execution logs would mix with our stderr; our own bar stays."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def worker_shape(options: RayOptions) -> tuple[int, int]:
    """(CPUs per worker, how many such workers the live nodes hold). ConfigError when the request cannot
    be placed: more CPUs per worker than any node has, or more actors than the nodes hold."""
    import ray

    nodes = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    largest = max(nodes, default=0)
    if largest < 1:
        raise ConfigError("the Ray cluster has no CPUs to run on")
    cpus = options.cpus or min(DEFAULT_CPUS, largest)
    if cpus > largest:
        raise ConfigError(f"--ray-cpus {cpus}: no Ray node has that many CPUs (the largest has {largest})")
    room = sum(count // cpus for count in nodes)
    if options.actors is not None and options.actors > room:
        raise ConfigError(
            f"--ray-actors {options.actors}: the Ray cluster holds {room} workers of {cpus} CPUs "
            f"({sum(nodes)} CPUs on {len(nodes)} nodes)"
        )
    return cpus, options.actors or room


def _check_version(version: str) -> None:
    """ConfigError unless this worker runs the driver's patchcore `version`."""
    from patchcore_cli import __version__

    if version != __version__:
        raise ConfigError(
            f"this Ray worker runs patchcore {__version__}, the driver {version}: "
            "install the same version on every node"
        )


def _rebuild(kind: str, message: str) -> PatchcoreError:
    """A worker's patchcore error, sent back as (class name, message), raised here as itself."""
    kinds = {cls.__name__: cls for cls in (ConfigError, InputError, BankError, WeightsError, OutputError)}
    return kinds.get(kind, PatchcoreError)(message)


# --- the bank through the object store ---------------------------------------------------------------


def bank_payload(bank: Bank) -> dict[str, Any]:
    """A bank as plain data for `ray.put`: memory banks as numpy arrays (zero-copy for workers on one
    node), everything else JSON-able. Never a Bank object, never a path on the driver's disk."""

    def part(single: Bank) -> dict[str, Any]:
        return {
            "memory_bank": np.asarray(single.memory_bank),
            "config": single.config,
            "calibration": single.calibration,
            "weights_sha256": single.weights_sha256,
        }

    payload = part(bank)
    if bank.members:  # the top-level memory bank is the first member's: ship it once
        payload["memory_bank"] = None
    return {
        **payload,
        "n_train_images": bank.n_train_images,
        "tool_version": bank.tool_version,
        "created": bank.created,
        "members": [part(member) for member in bank.members],
    }


def bank_from_payload(payload: dict[str, Any]) -> Bank:
    """The Bank that `bank_payload` was made from."""
    n_train = payload["n_train_images"]
    members = [
        Bank(m["memory_bank"], m["config"], m["calibration"], m["weights_sha256"], n_train)
        for m in payload["members"]
    ]
    return Bank(
        memory_bank=members[0].memory_bank if members else payload["memory_bank"],
        config=payload["config"],
        calibration=payload["calibration"],
        weights_sha256=payload["weights_sha256"],
        n_train_images=n_train,
        tool_version=payload["tool_version"],
        created=payload["created"],
        members=members,
    )


# --- inputs: local paths and URIs --------------------------------------------------------------------


def is_uri(text: str) -> bool:
    """`s3://bucket/key`, `gs://...`, `file:///...`: read by Ray Data, not opened as a local path."""
    return bool(_URI.match(text))


@dataclass(frozen=True)
class RemoteImage:
    """An image named by a URI: `uri` names it in results, `path` is its path in `filesystem` (as Ray
    Data reports it), `filesystem` indexes `Inputs.filesystems`."""

    uri: str
    path: str
    filesystem: int


@dataclass
class Inputs:
    """What `score --ray` scores, in order: local files and remote images, and the remote filesystems."""

    items: list[Path | RemoteImage]
    filesystems: list[Any]  # pyarrow.fs.FileSystem, one per group of URIs that share one

    @property
    def names(self) -> list[Path | str]:
        return [item.uri if isinstance(item, RemoteImage) else item for item in self.items]


def list_inputs(inputs: Sequence[str]) -> Inputs:
    """Local files, folders and globs as `data.list_images` expands them, plus URIs: a URI names a file,
    or a folder (prefix) whose images are found as a local folder walk finds them. Each image once, in the
    order given."""
    from patchcore_cli.data import list_images

    if not any(is_uri(str(item)) for item in inputs):
        return Inputs(list(list_images(inputs)), [])
    items: list[Path | RemoteImage] = []
    filesystems: list[Any] = []
    seen: set[str] = set()
    for item in map(str, inputs):
        if not is_uri(item):
            found: list[Path | RemoteImage] = list(list_images([item]))
        else:
            filesystem, files = _list_uri(item)
            number = next((i for i, fs in enumerate(filesystems) if fs.equals(filesystem)), len(filesystems))
            if number == len(filesystems):
                filesystems.append(filesystem)
            found = [RemoteImage(uri, path, number) for uri, path in files]
        for image in found:
            key = image.uri if isinstance(image, RemoteImage) else os.path.realpath(image)
            if key not in seen:
                seen.add(key)
                items.append(image)
    return Inputs(items, filesystems)


def _list_uri(uri: str) -> tuple[Any, list[tuple[str, str]]]:
    """(filesystem, [(uri, path in it)]) for a URI naming a file or a folder (prefix) of images."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from patchcore_cli.data import IMAGE_EXTENSIONS, image_files

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            return filesystem, [(uri, root)]
        if info.type != pafs.FileType.Directory:
            raise InputError(f"{uri}: no such file or folder")
        listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{uri}: cannot read ({_first_line(exc)})") from None
    base = root.rstrip("/")
    names = [entry.path[len(base) + 1 :] for entry in listing if entry.type == pafs.FileType.File]
    images = image_files(names)
    if not images:
        looked_for = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"{uri}: no images found in folder (looked for {looked_for})")
    return filesystem, [(f"{uri.rstrip('/')}/{name}", f"{base}/{name}") for name in images]


# --- score -------------------------------------------------------------------------------------------

_ROWS = {"index": "int64", "source": "string", "bytes": "binary"}
"""Rows going to the scoring actors: input position, local path (or URI), the bytes of a remote image."""


def _schema(columns: dict[str, str]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in columns.items()])


def _attach_index(batch: pa.Table, index_of: dict[str, tuple[int, str]]) -> pa.Table:
    """Ray Data map: rows of `read_binary_files` ({bytes, path}) -> scoring rows ({index, source, bytes})."""
    import pyarrow as pa

    found = [index_of[path] for path in batch.column("path").to_pylist()]
    columns = [pa.array([i for i, _ in found]), pa.array([uri for _, uri in found]), batch.column("bytes")]
    return pa.Table.from_arrays(columns, schema=_schema(_ROWS))


_RESULTS = {
    "index": "int64",
    "score": "float64",
    "normalized": "float64",
    "anomalous": "bool_",
    "error": "string",
    "heatmap": "binary",
    "mask": "binary",
    "failure_kind": "string",
    "failure": "string",
}
"""Rows coming back: a scored image, or (failure_kind, failure) when the actor could not start."""


class ScoreWorker:
    """A Ray Data actor: one `engine.Scorer` on the bank the driver put in the object store."""

    def __init__(
        self,
        bank: list[Any],
        version: str,
        bank_path: str,
        runtime: dict[str, Any],
        heatmaps: bool,
        masks: bool,
        max_pixels: int,
    ) -> None:
        import ray

        from patchcore_cli.engine import Scorer

        self.heatmaps, self.masks, self.max_pixels = heatmaps, masks, max_pixels
        # A failed start is sent back as data: Ray would turn the exception into a dead actor whose
        # error is only text, and the user would get a page of traceback instead of one line.
        self.failure: PatchcoreError | None = None
        try:
            _check_version(version)
            # `bank` wraps the ObjectRef in a list, so Ray hands it over unresolved and the actor fetches
            # the bank itself, once.
            self.scorer = Scorer(bank_from_payload(ray.get(bank[0])), bank_path=bank_path, **runtime)
        except PatchcoreError as exc:
            self.failure = exc
            return
        self.pixel_threshold = float(self.scorer.bank.calibration["pixel_threshold"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from patchcore_cli.data import ImageBytes

        if self.failure is not None:
            rows, schema = batch.num_rows, _schema(_RESULTS)
            columns = {field.name: pa.nulls(rows, field.type) for field in schema}
            columns["index"] = batch.column("index")
            columns["failure_kind"] = pa.array([type(self.failure).__name__] * rows, pa.string())
            columns["failure"] = pa.array([self.failure.message] * rows, pa.string())
            return pa.table(columns, schema=schema)
        sources = [
            Path(name) if data is None else ImageBytes(name, data)
            for name, data in zip(
                batch.column("source").to_pylist(), batch.column("bytes").to_pylist(), strict=True
            )
        ]
        results = self.scorer.score_paths(
            sources, keep_maps=self.heatmaps or self.masks, skip_bad=True, max_pixels=self.max_pixels
        )
        pictures = [self._pictures(source, result) for source, result in zip(sources, results, strict=True)]
        columns = [
            batch.column("index"),
            [r.score for r in results],
            [r.normalized for r in results],
            [r.anomalous for r in results],
            [r.error for r in results],
            [heatmap for heatmap, _ in pictures],
            [mask for _, mask in pictures],
            [None] * len(results),
            [None] * len(results),
        ]
        return pa.Table.from_arrays([pa.array(c) for c in columns], schema=_schema(_RESULTS))

    def _pictures(self, source: Path | Any, result: ScoreResult) -> tuple[bytes | None, bytes | None]:
        from patchcore_cli import report
        from patchcore_cli.data import load_image

        if result.anomaly_map is None:
            return None, None
        image = np.asarray(load_image(source, self.max_pixels)) if self.heatmaps else None
        heatmap, mask = report.score_pictures(
            result.anomaly_map,
            result.geometry,
            self.pixel_threshold,
            image,
            self.masks,
            result.score,
            self.scorer.threshold,
            result.anomalous,
        )
        return (
            None if heatmap is None else report.png_bytes(heatmap),
            None if mask is None else report.png_bytes(mask),
        )


def _dataset(inputs: Inputs, block_rows: int, readers: int) -> Any:
    """The scoring rows as a Ray Data dataset: local files as in-memory blocks of `block_rows`, each
    group of remote images read by `read_binary_files`."""
    import pyarrow as pa
    import ray.data

    # Absolute paths: a worker's current folder is not the driver's. Results keep the names as given.
    local = [(i, str(item.absolute())) for i, item in enumerate(inputs.items) if isinstance(item, Path)]
    parts = []
    if local:
        blocks = [local[start : start + block_rows] for start in range(0, len(local), block_rows)]
        tables = [
            pa.Table.from_arrays(
                [[i for i, _ in rows], [name for _, name in rows], pa.nulls(len(rows), pa.binary())],
                schema=_schema(_ROWS),
            )
            for rows in blocks
        ]
        parts.append(ray.data.from_arrow(tables))
    for number, filesystem in enumerate(inputs.filesystems):
        group = {
            item.path: (i, item.uri)
            for i, item in enumerate(inputs.items)
            if isinstance(item, RemoteImage) and item.filesystem == number
        }
        # Reading takes no CPU from the actors' reservation: the pool holds all the CPUs, and a read task
        # waiting for one would wait forever.
        read = ray.data.read_binary_files(
            list(group),
            filesystem=filesystem,
            include_paths=True,
            num_cpus=0,
            concurrency=readers,
        )
        parts.append(
            read.map_batches(_attach_index, fn_kwargs={"index_of": group}, batch_format="pyarrow", num_cpus=0)
        )
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


OnScored = Callable[["ScoreResult", "bytes | None", "bytes | None"], None]
CALL_BATCHES = 4
"""Scoring batches per actor call (`score`): one call per batch leaves the actor idle while the first
image of each call decodes (bench/ray_score.py: 0.84x the local rate with one batch per call)."""


def score(
    inputs: Inputs,
    bank: Bank,
    bank_path: str,
    runtime: dict[str, Any],
    options: RayOptions,
    heatmaps: bool = False,
    masks: bool = False,
    skip_bad: bool = False,
    max_pixels: int | None = None,
    progress: Progress | None = None,
    on_result: OnScored | None = None,
) -> list[ScoreResult]:
    """`Scorer.score_paths` on a Ray actor pool: the same results, in input order.

    `runtime` holds the run options (batch_size, threads, weights, index) as `Scorer` takes them.
    `on_result(result, heatmap_png, mask_png)` is called in input order; the PNGs are None unless asked
    for. An unreadable image raises its ImageError when its turn comes, unless `skip_bad`.
    """
    import ray
    import ray.data

    from patchcore_cli import __version__
    from patchcore_cli.config import FitConfig
    from patchcore_cli.data import DEFAULT_MAX_PIXELS
    from patchcore_cli.engine import ScoreResult, _checked_config, _Silent

    progress = progress or _Silent()
    names = inputs.names
    for part in bank.parts:  # the checks each worker's Scorer makes, here before any worker starts
        _checked_config(part.config, bank_path, **runtime)
    with session(options):
        cpus, room = worker_shape(options)
        batch = runtime.get("batch_size") or FitConfig.batch_size
        actors = min(room, math.ceil(len(names) / batch))  # an actor without a batch would only load
        # Each call hands an actor up to CALL_BATCHES of the Scorer's batches, whole ones, so that its
        # decoding thread reads ahead across them as a local run's does; but no fewer calls than actors.
        per_call = batch * max(1, min(CALL_BATCHES, len(names) // (batch * actors)))
        runtime = {**runtime, "threads": runtime.get("threads") or cpus}
        bank_ref = ray.put(bank_payload(bank))
        scored = _dataset(inputs, per_call, actors).map_batches(
            ScoreWorker,
            fn_constructor_kwargs={
                "bank": [bank_ref],
                "version": __version__,
                "bank_path": bank_path,
                "runtime": runtime,
                "heatmaps": heatmaps,
                "masks": masks,
                "max_pixels": max_pixels or DEFAULT_MAX_PIXELS,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            batch_size=per_call,
            batch_format="pyarrow",
            zero_copy_batch=True,
        )
        progress.start("scoring", len(names))
        waiting: dict[int, dict[str, Any]] = {}  # rows that arrived before an earlier one
        results: list[ScoreResult] = []
        for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in block.to_pylist():
                if row["failure"] is not None:
                    raise _rebuild(row["failure_kind"], row["failure"])
                waiting[row["index"]] = row
                progress.advance()
            while len(results) in waiting:
                row = waiting.pop(len(results))
                name = names[row["index"]]
                if row["error"] is not None and not skip_bad:
                    raise ImageError(name, row["error"])
                result = ScoreResult(
                    path=name,
                    score=row["score"],
                    normalized=row["normalized"],
                    anomalous=row["anomalous"],
                    error=row["error"],
                )
                results.append(result)
                if on_result is not None:
                    on_result(result, row["heatmap"], row["mask"])
    return results


# --- fit ---------------------------------------------------------------------------------------------

FRAME_CHUNK = 64
"""Images per framing task (aspect and tile framings): each task decodes its images once to learn their
sizes, a small fraction of what embedding them costs."""


def _frame_task(
    paths: list[str], names: list[str], config: FitConfig, max_pixels: int, version: str
) -> list[list[tuple[int, int]] | ImageError] | PatchcoreError:
    """A Ray task: `engine.frame_images` of some images, their errors naming them as the user did."""
    from patchcore_cli.engine import frame_images

    try:
        _check_version(version)
        framed = frame_images([Path(path) for path in paths], config, max_pixels)
    except PatchcoreError as exc:  # returned, not raised: Ray would wrap it in pages of traceback
        return exc
    given = dict(zip(paths, names, strict=True))
    return [
        ImageError(given.get(item.path, item.path), item.problem) if isinstance(item, ImageError) else item
        for item in framed
    ]


def _shard_task(
    paths: list[str],
    names: list[str],
    config: FitConfig,
    job: ShardJob,
    max_pixels: int,
    work_dir: str | None,
    cpus: int,
    version: str,
) -> ShardFit | PatchcoreError:
    """A Ray task: `engine.fit_shard`, with torch on this task's CPUs unless the config sets threads. A
    patchcore error (an unreadable image...) is returned for the driver to raise, naming the image as the
    user named it."""
    from patchcore_cli.engine import fit_shard, set_threads

    set_threads(config.threads or cpus, config.index)
    try:
        _check_version(version)
        folder = None if work_dir is None else Path(work_dir)
        return fit_shard([Path(path) for path in paths], config, job, max_pixels, folder)
    except ImageError as exc:
        return ImageError(dict(zip(paths, names, strict=True)).get(exc.path, exc.path), exc.problem)
    except PatchcoreError as exc:
        return exc


def _shipped(config: FitConfig) -> FitConfig:
    """The config the workers get: a weights file by its absolute path (their current folder is not the
    driver's); the device as the user gave it, for each worker to resolve on its own hardware."""
    from dataclasses import replace

    from patchcore_cli.backbones import RANDOM_WEIGHTS

    if config.weights is None or config.weights == RANDOM_WEIGHTS:
        return config
    return replace(config, weights=str(Path(config.weights).expanduser().absolute()))


def _gather(refs: Sequence[Any], progress: Progress, sizes: Sequence[int]) -> list[Any]:
    """The values of task `refs`, in their order, advancing `progress` by `sizes[i]` as task i finishes.
    A task that returns a patchcore error raises it, once every earlier task has finished and returned
    none: so the error is the one a local run, working in that order, meets first. Later tasks are
    cancelled then, and all of them on any other way out (Ctrl-C)."""
    import ray

    order = {ref: i for i, ref in enumerate(refs)}
    values: dict[int, Any] = {}
    failed: int | None = None
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = order[ready[0]]
            value = ray.get(ready[0])
            values[i] = value
            if isinstance(value, PatchcoreError):
                failed = i if failed is None else min(failed, i)
                for ref in [ref for ref in pending if order[ref] > failed]:
                    ray.cancel(ref)
                pending = [ref for ref in pending if order[ref] < failed]
            else:
                progress.advance(sizes[i])
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    if failed is not None:
        raise values[failed]
    return [values[i] for i in range(len(refs))]


def _frames(
    paths: list[str], names: list[str], config: FitConfig, max_pixels: int, progress: Progress
) -> list[list[tuple[int, int]] | ImageError]:
    """Every image's view sizes (or its ImageError), from framing tasks of FRAME_CHUNK images."""
    import ray

    from patchcore_cli import __version__

    task = ray.remote(_frame_task).options(num_cpus=1)
    chunks = range(0, len(paths), FRAME_CHUNK)
    refs = [
        task.remote(
            paths[lo : lo + FRAME_CHUNK], names[lo : lo + FRAME_CHUNK], config, max_pixels, __version__
        )
        for lo in chunks
    ]
    progress.start("framing", len(paths))
    return [
        item
        for chunk in _gather(refs, progress, [len(paths[lo : lo + FRAME_CHUNK]) for lo in chunks])
        for item in chunk
    ]


def fit(
    paths: Sequence[Path],
    config: FitConfig,
    options: RayOptions,
    progress: Progress | None = None,
    max_pixels: int | None = None,
    max_memory: int | None = None,
    work_dir: Path | None = None,
) -> FitResult:
    """`engine.fit` with the shards of its coreset run as Ray tasks: the same bank and calibration as a
    local fit with the same `max_memory`, bit for bit, when the workers compute the embeddings as this
    machine does (the same torch threads: see `DEFAULT_CPUS`).

    The driver loads the backbone once, to learn the patch grid of a view, plans the shards
    (`sharding.plan`) and calibrates the bank; the tasks read the images (local paths every node sees),
    embed them and take each shard's greedy picks. `work_dir`: a folder, on every worker node, for the
    shards' work files (default: each worker's temporary folder). An unreadable image raises the local
    fit's error; so does a `max_memory` below one image.
    """
    import ray

    from patchcore_cli import __version__
    from patchcore_cli.config import members
    from patchcore_cli.data import DEFAULT_MAX_PIXELS
    from patchcore_cli.engine import (
        Extractor,
        Timings,
        _Silent,
        check_fit_images,
        combine_members,
        fit_from_shards,
        patch_counts,
        plan_fit,
        resolve_auto,
        set_threads,
        view_sizes,
    )
    from patchcore_cli.sharding import default_max_memory, plan

    progress = progress or _Silent()
    check_fit_images(paths)
    config = resolve_auto(config, paths)  # `crop: auto` from the headers, and the row cap, as a local fit
    timings = Timings()
    limit = max_pixels or DEFAULT_MAX_PIXELS
    budget = default_max_memory() if max_memory is None else max_memory
    names = [str(path) for path in paths]
    # Absolute paths: a worker's current folder is not the driver's. Errors name the images as given.
    files = [str(Path(path).absolute()) for path in paths]
    folder = None if work_dir is None else str(work_dir)
    set_threads(config.threads, config.index)  # the driver's calibration searches as a local fit's do
    with session(options):
        cpus, _ = worker_shape(options)
        parts = list(zip(members(config), members(_shipped(config)), strict=True))
        with timings.stage("load backbone"):
            extractors = [Extractor(member) for member, _ in parts]
        framed: list[Any] = [view_sizes(config)] * len(paths)
        if framed[0] is None:  # aspect, tile: the views depend on each image's size
            with timings.stage("framing"):
                framed = _frames(files, names, _shipped(config), limit, progress)
        bad = next((i for i, item in enumerate(framed) if isinstance(item, ImageError)), None)
        if bad is not None:
            # As a local fit, which meets it first, fails on an image too large for one pass before it.
            for (member, _), extractor in zip(parts, extractors, strict=True):
                counts = patch_counts(extractor, framed[:bad])
                plan(
                    counts,
                    names,
                    member.coreset,
                    extractor.dim,
                    member.projection_dim,
                    budget,
                    member.coreset_max_rows,
                )
            raise framed[bad]
        plans = [
            plan_fit(names, member, extractor, framed, budget)
            for (member, _), extractor in zip(parts, extractors, strict=True)
        ]
        task = ray.remote(_shard_task).options(num_cpus=cpus)
        refs = [
            task.remote(
                files[job.first : job.last], names[job.first : job.last], shipped, job, limit, folder, cpus,
                __version__,
            )
            for (_, shipped), (_, jobs) in zip(parts, plans, strict=True)
            for job in jobs
        ]  # fmt: skip
        sizes = [job.shard.hi - job.shard.lo for _, jobs in plans for job in jobs]
        progress.start("features", len(paths) * len(parts))
        with timings.stage("shards (Ray)"):
            fits = _gather(refs, progress, sizes)
        fitted, first = [], 0
        for (member, _), extractor, (counts, jobs) in zip(parts, extractors, plans, strict=True):
            shard_fits = fits[first : first + len(jobs)]
            fitted.append(
                fit_from_shards(names, member, extractor, jobs, shard_fits, counts, timings, progress)
            )
            first += len(jobs)
    return combine_members(fitted, config, len(paths), timings)


# --- benchmark ---------------------------------------------------------------------------------------


def _benchmark_cell(
    split: Split,
    label: str,
    config: FitConfig,
    pixel_metrics: bool,
    max_pixels: int,
    profile: bool,
    cpus: int,
    report_cases: int | None = None,
    max_memory: int | None = None,
) -> BenchmarkRow | PatchcoreError:
    """A Ray task: one benchmark cell, with torch on this task's CPUs unless the config sets threads.
    A patchcore error (an unreadable training image...) is returned for the driver to raise."""
    from patchcore_cli.engine import set_threads
    from patchcore_cli.evaluation import benchmark_cell

    set_threads(config.threads or cpus, config.index)
    try:
        return benchmark_cell(
            split, label, config, pixel_metrics, None, max_pixels, profile, report_cases, max_memory
        )
    except PatchcoreError as exc:  # returned, not raised: Ray would wrap it in pages of traceback
        return exc


def benchmark(
    splits: Sequence[Split],
    configs: Sequence[tuple[str, FitConfig]],
    options: RayOptions,
    pixel_metrics: bool = True,
    progress: Progress | None = None,
    on_row: Callable[[BenchmarkRow], None] | None = None,
    max_pixels: int | None = None,
    profile: bool = False,
    report_cases: int | None = None,
    max_memory: int | None = None,
) -> list[BenchmarkRow]:
    """`evaluation.benchmark` with one Ray task per (configuration, split) cell. Rows come back in the
    local order; `on_row` is called as each cell finishes."""
    import ray

    from patchcore_cli.data import DEFAULT_MAX_PIXELS
    from patchcore_cli.engine import _Silent

    progress = progress or _Silent()
    with session(options):
        cpus, _ = worker_shape(options)
        cell = ray.remote(_benchmark_cell).options(num_cpus=cpus)
        limit = max_pixels or DEFAULT_MAX_PIXELS
        refs = [
            cell.remote(split, label, config, pixel_metrics, limit, profile, cpus, report_cases, max_memory)
            for label, config in configs
            for split in splits
        ]
        progress.start("cells", len(refs))
        finished: dict[Any, BenchmarkRow] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            row = ray.get(ready[0])
            if isinstance(row, PatchcoreError):
                for ref in pending:
                    ray.cancel(ref)
                raise row
            finished[ready[0]] = row
            progress.advance()
            if on_row is not None:
                on_row(row)
        return [finished[ref] for ref in refs]
