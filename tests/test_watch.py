"""`score --watch`: images are scored as they arrive, once each, when complete, as `score` scores them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchcore_cli import config as config_mod
from patchcore_cli.bank import load, save
from patchcore_cli.cli import app
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit
from patchcore_cli.errors import InputError
from patchcore_cli.watch import DEFAULT_SETTLE, FolderWatch, watch
from tests.conftest import TINY_CONFIG

runner = CliRunner()
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bank_file(washer, tmp_path_factory) -> Path:
    config = config_mod.build(**TINY_CONFIG)
    path = tmp_path_factory.mktemp("watch-bank") / "bank.st"
    save(fit(list_images([washer / "train" / "good"]), config).bank, path)
    return path


@pytest.fixture
def images(washer) -> list[Path]:
    return sorted((washer / "test").rglob("*.png"))[:4]


def drop(source: Path, folder: Path, name: str) -> Path:
    """Write `source` under a hidden name in `folder`, then rename it into place (the documented way)."""
    hidden = folder / f".{name}"
    shutil.copyfile(source, hidden)
    os.replace(hidden, folder / name)
    return folder / name


# --- FolderWatch, on a clock the test moves by hand ---------------------------------------------------


def test_only_complete_visible_images_are_handed_over_once(tmp_path, images):
    (tmp_path / "old.png").write_bytes(images[0].read_bytes())
    watcher = FolderWatch(tmp_path, settle=1.0)
    assert watcher.skipped == 1
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(images[1].read_bytes())
    (tmp_path / "part.png.tmp").write_bytes(images[1].read_bytes())
    (tmp_path / "sub.png").mkdir()
    data = images[1].read_bytes()
    growing = tmp_path / "growing.png"
    growing.write_bytes(data[:100])
    assert watcher.poll(now=0.0) == []
    with open(growing, "ab") as handle:  # the writer goes on: the wait starts again
        handle.write(data[100:])
    assert watcher.poll(now=0.9) == []
    assert watcher.poll(now=1.5) == []  # unchanged for 0.6 s only
    assert watcher.poll(now=2.0) == [growing]
    assert watcher.poll(now=9.0) == []  # handed over once


def test_renamed_files_are_ready_at_once_with_no_settle(tmp_path, images):
    watcher = FolderWatch(tmp_path, settle=0.0)
    placed = drop(images[0], tmp_path, "a.png")
    assert watcher.poll(now=0.0) == [placed]
    drop(images[1], tmp_path, "a.png")  # replaced by a rename: a new file under the same name
    assert watcher.poll(now=0.1) == [placed]


def test_existing_images_and_limit(tmp_path, images):
    for number, image in enumerate(images[:3]):
        target = tmp_path / f"{number}.png"
        shutil.copyfile(image, target)
        os.utime(target, ns=(10**9 * (3 - number), 10**9 * (3 - number)))  # 2.png is the oldest
    watcher = FolderWatch(tmp_path, settle=0.0, existing=True)
    assert watcher.skipped == 0
    assert watcher.poll(now=0.0, limit=2) == [tmp_path / "2.png", tmp_path / "1.png"]
    assert watcher.poll(now=0.0) == [tmp_path / "0.png"]


def test_a_file_that_changed_after_hand_over_comes_again(tmp_path, images):
    watcher = FolderWatch(tmp_path, settle=0.5)
    data = images[0].read_bytes()
    path = tmp_path / "slow.png"
    path.write_bytes(data[:200])
    watcher.poll(now=0.0)
    assert watcher.poll(now=1.0) == [path]  # the writer paused longer than settle
    assert not watcher.still_changing(path)
    with open(path, "ab") as handle:
        handle.write(data[200:])
    assert watcher.still_changing(path)
    assert watcher.poll(now=1.1) == []
    assert watcher.poll(now=1.7) == [path]


def test_watching_something_that_is_not_a_folder(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        FolderWatch(tmp_path / "missing")


# --- the watch loop, against a real scorer ---------------------------------------------------------------


def test_watch_scores_arrivals_like_score_and_survives_bad_files(tmp_path, bank_file, images):
    folder = tmp_path / "incoming"
    folder.mkdir()
    results: list = []
    arrived = threading.Condition()
    ready = threading.Event()
    stop = threading.Event()

    def take(result) -> None:
        with arrived:
            results.append(result)
            arrived.notify()

    scorer = Scorer(load(bank_file), batch_size=1)
    thread = threading.Thread(
        target=lambda: watch(scorer, folder, take, settle=0.0, stop=stop, on_ready=lambda _: ready.set())
    )
    thread.start()
    try:
        assert ready.wait(120)
        names = []
        for number, image in enumerate(images):
            if number == 2:  # an unreadable file in the middle of the run
                (folder / "broken.png").write_bytes(b"not a png")
                names.append("broken.png")
            names.append(f"part{number}.png")
            drop(image, folder, names[-1])
            with arrived:  # one at a time, as parts come off a line
                assert arrived.wait_for(lambda: len(results) == len(names), timeout=120)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert [r.path.name for r in results] == names
    broken = results[names.index("broken.png")]
    assert broken.score is None and "not an image" in broken.error
    # The same images through `score`, one per batch as they arrived: the same numbers exactly.
    cold = runner.invoke(
        app, ["score", *map(str, images), "--bank", str(bank_file), "--batch-size", "1", "--json"]
    )
    assert cold.exit_code == 0, cold.output
    expected = [record["score"] for record in json.loads(cold.stdout)["results"]]
    assert [round(r.score, 6) for r in results if r.error is None] == expected


def test_cli_watch_json_lines_and_heatmaps(tmp_path, bank_file, images):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for number, image in enumerate(images[:3]):
        shutil.copyfile(image, folder / f"{number}.png")
        os.utime(folder / f"{number}.png", ns=(10**9 * number, 10**9 * number))
    (folder / "3.png").write_bytes(b"broken")
    os.utime(folder / "3.png", ns=(10**10, 10**10))
    (folder / "notes.txt").write_text("ignored")
    heat = tmp_path / "heat"
    args = [
        "score",
        "--watch",
        folder,
        "--bank",
        bank_file,
        "--existing",
        "--settle",
        "0",
        "--max-images",
        "4",
    ]
    result = runner.invoke(app, [*map(str, args), "--json", "--heatmaps", str(heat)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["file"]).name for line in lines] == ["0.png", "1.png", "2.png", "3.png"]
    assert lines[3]["skipped"] and lines[3]["error"]
    assert sorted(p.name for p in heat.iterdir()) == [f"{n}_heatmap.png" for n in range(3)]
    assert "3 scored, " in result.stderr and "1 unreadable" in result.stderr
    cold = runner.invoke(app, ["score", str(folder), "--bank", str(bank_file), "--json", "--skip-bad"])
    assert [r.get("score") for r in json.loads(cold.stdout)["results"]] == [
        line.get("score") for line in lines
    ]


def test_cli_watch_csv_and_plain_lines(tmp_path, bank_file, images):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copyfile(images[0], folder / "a.png")
    base = ["score", "--watch", str(folder), "--bank", str(bank_file), "--existing", "--max-images", "1"]
    csv = runner.invoke(app, [*base, "--csv", "--settle", "0"])
    assert csv.exit_code == 0, csv.output
    header, row = csv.stdout.splitlines()
    assert header == "file,score,normalized,anomalous,error" and row.startswith(str(folder / "a.png") + ",")
    plain = runner.invoke(app, base)  # the default settle
    assert plain.exit_code == 0, plain.output
    assert "a.png" in plain.stdout and "score " in plain.stdout and "normalised" in plain.stdout
    assert "watching" in plain.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["some.png"], "drop PATH"),
        (["--fail-on-anomaly"], "drop --fail-on-anomaly"),
        (["--skip-bad"], "drop --skip-bad"),
    ],
)
def test_watch_refuses_options_that_do_not_apply(tmp_path, bank_file, extra, message):
    result = runner.invoke(app, ["score", "--watch", str(tmp_path), "--bank", str(bank_file), *extra])
    assert result.exit_code == 2 and message in result.stderr


def test_watch_usage_errors(tmp_path, bank_file):
    nothing = runner.invoke(app, ["score", "--bank", str(bank_file)])
    assert nothing.exit_code == 2 and "--watch DIR" in nothing.stderr
    into_itself = runner.invoke(
        app, ["score", "--watch", str(tmp_path), "--bank", str(bank_file), "--heatmaps", str(tmp_path)]
    )
    assert into_itself.exit_code == 2 and "outside the watched folder" in into_itself.stderr
    missing = runner.invoke(app, ["score", "--watch", str(tmp_path / "no"), "--bank", str(bank_file)])
    assert missing.exit_code == 3 and "not a folder" in missing.stderr
    assert f"default {DEFAULT_SETTLE:g}" in runner.invoke(app, ["score", "--help"]).stdout


@pytest.mark.slow
@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_interrupt_and_service_stop_end_cleanly(tmp_path, bank_file, sent, code):
    command = [
        sys.executable,
        "-m",
        "patchcore_cli",
        "score",
        "--watch",
        str(tmp_path),
        "--bank",
        str(bank_file),
    ]
    # faulthandler: if it hangs, SIGABRT makes the child print every thread's stack before it dies
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    # Started as a terminal starts a program, with SIGINT not ignored. A shell starts its background jobs
    # (`pytest &` in a script) with SIGINT ignored, a child inherits that, and Python then installs no
    # Ctrl-C handler: the watch would rightly ignore the SIGINT, as a background job should.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler is not inherited
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # wait until it is watching
        seen.append(line)
        if line.startswith("watching"):
            break
    time.sleep(0.2)
    proc.send_signal(sent)
    try:
        _, rest = proc.communicate(timeout=180)  # generous: on a loaded machine it once took over 60 s
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, rest = proc.communicate(timeout=60)
        pytest.fail(f"no exit within 180 s of {sent.name}; its stacks:\n{''.join(seen)}{rest}")
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "0 scored, 0 anomalous, 0 unreadable" in stderr


def test_an_image_gone_before_its_heatmap_is_drawn_does_not_stop_the_watch(
    tmp_path, bank_file, images, monkeypatch
):
    from patchcore_cli import cli
    from patchcore_cli.errors import ImageError

    def vanished(result, *args):
        raise ImageError(result.path, "file not found")  # moved away by the line before the overlay

    monkeypatch.setattr(cli, "_write_maps", vanished)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copyfile(images[0], folder / name)
    args = [
        "score",
        "--watch",
        folder,
        "--bank",
        bank_file,
        "--existing",
        "--settle",
        "0",
        "--max-images",
        "2",
    ]
    result = runner.invoke(app, [*map(str, args), "--json", "--heatmaps", str(tmp_path / "heat")])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2 and result.stderr.count("no heatmap or mask") == 2
