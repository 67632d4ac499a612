"""Scoring images as they arrive in a folder (`patchcore score --watch DIR`): one process, many parts.

A cold `patchcore score one.png` spends seconds importing torch and building the backbone and the
search index before its image (docs/latency.md). A line that inspects one part at a time pays that once
with a watcher: it loads the bank and the backbone, warms them up on a blank image, then scores every
image file that appears in the folder.

An image is handed over to the scorer only once it is complete:
- hidden files (`.part001.png`) and names without an image extension (`part001.png.tmp`) are never read,
  so a writer can write under such a name and rename the finished file into place: a rename within one
  file system is atomic, and with `settle=0` the file is scored as soon as it is seen;
- otherwise a file must keep its size and modification time for `settle` seconds;
- should a file still fail to decode while it is changing (a writer that paused longer than `settle`),
  it is not reported: it is scored again once it settles.

Files already in the folder when the watch starts are not scored unless asked (`existing`). A file that
is replaced under the same name by a rename (a new inode) is scored again; one rewritten in place after
it was scored is not, nor one deleted and written again between two looks if the file system gives it
the old inode back. The folder is read with one `os.scandir` per look, and only new or unsettled files
are `stat`-ed, so a folder that keeps thousands of scored images stays cheap to watch.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patchcore_cli.data import IMAGE_EXTENSIONS
from patchcore_cli.errors import InputError

if TYPE_CHECKING:
    from patchcore_cli.engine import Scorer, ScoreResult

DEFAULT_SETTLE = 0.25  # seconds a file must stay unchanged before it is read
POLL = 0.05  # seconds between looks at the folder: small next to scoring one image


@dataclass
class _File:
    inode: int
    signature: tuple[int, int] | None  # (size, mtime in ns) when last looked at; None: not stat-ed yet
    since: float  # when this signature was first seen (time.monotonic)
    handed: bool  # handed over with this signature


class FolderWatch:
    """The image files of one folder (not its subfolders) and when each became complete.

    `poll()` looks once and returns the files that became complete since the last look, oldest
    modification first. `settle`: seconds a file must keep its size and modification time.
    `existing`: hand over the image files already there at the first look too.
    """

    def __init__(self, folder: Path, settle: float = DEFAULT_SETTLE, existing: bool = False) -> None:
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder (--watch needs an existing folder)")
        self.folder = folder
        self.settle = settle
        self.files: dict[str, _File] = {}
        self.skipped = 0
        """Image files that were already in the folder at the start and will not be scored."""
        if not existing:
            for name, inode in self._images().items():
                self.files[name] = _File(inode, None, 0.0, handed=True)
            self.skipped = len(self.files)

    def _images(self) -> dict[str, int]:
        """name -> inode of the folder's visible image files (one directory read, no stat)."""
        try:
            with os.scandir(self.folder) as entries:
                return {
                    entry.name: entry.inode()
                    for entry in entries
                    if not entry.name.startswith(".")
                    and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                }
        except OSError as exc:
            raise InputError(f"{self.folder}: cannot read folder ({exc.strerror or exc})") from None

    def poll(self, now: float | None = None, limit: int | None = None) -> list[Path]:
        """Look at the folder once; return the files that became complete, oldest modification first
        (at most `limit`: the others are handed over by the next looks)."""
        now = time.monotonic() if now is None else now
        present = self._images()
        for name in self.files.keys() - present.keys():  # deleted or moved away
            del self.files[name]
        complete: list[tuple[int, str]] = []
        for name, inode in present.items():
            known = self.files.get(name)
            if known is None or known.inode != inode:  # new, or replaced by a rename
                known = self.files[name] = _File(inode, None, now, handed=False)
            if known.handed:
                continue
            signature = self._signature(name)
            if signature is None:  # vanished, or not a regular file
                continue
            if signature != known.signature:
                known.signature, known.since = signature, now
            if now - known.since >= self.settle:
                complete.append((signature[1], name))
        chosen = sorted(complete)[:limit]
        for _, name in chosen:
            self.files[name].handed = True
        return [self.folder / name for _, name in chosen]

    def _signature(self, name: str) -> tuple[int, int] | None:
        """(size, modification time in ns) of a regular file; None if it is gone or not a file."""
        try:
            status = os.stat(self.folder / name)
        except OSError:
            return None
        return (status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None

    def still_changing(self, path: Path) -> bool:
        """Whether `path` changed after it was handed over. If so it is forgotten, so that the next
        looks treat it as new and hand it over again once it settles."""
        known = self.files.get(path.name)
        if known is None or self._signature(path.name) == known.signature:
            return False
        del self.files[path.name]
        return True


def watch(
    scorer: Scorer,
    folder: Path,
    on_result: Callable[[ScoreResult], None],
    settle: float = DEFAULT_SETTLE,
    existing: bool = False,
    max_images: int | None = None,
    keep_maps: bool = False,
    max_pixels: int | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[FolderWatch], None] | None = None,
) -> int:
    """Score each image that becomes complete in `folder`, in arrival order, until `stop` is set or
    `max_images` results were given. Returns the number of results given to `on_result`.

    Images that arrive together are scored as one batch. An unreadable image gives a result with its
    `error` set, and the watch goes on. `on_ready` is called once the scorer is warm and the folder's
    first look is taken: from then on every new image is scored.
    """
    stop = stop or threading.Event()
    watcher = FolderWatch(folder, settle, existing)  # before warming up: what arrives meanwhile is new
    scorer.warm_up(keep_maps)
    if on_ready is not None:
        on_ready(watcher)
    given = 0

    def give(result: ScoreResult) -> None:
        nonlocal given
        if result.error is not None and watcher.still_changing(result.path):
            return  # read while it was still being written: it comes again once it settles
        on_result(result)
        given += 1

    while not stop.is_set() and (max_images is None or given < max_images):
        ready = watcher.poll(limit=None if max_images is None else max_images - given)
        if not ready:
            stop.wait(POLL)
            continue
        scorer.score_paths(ready, keep_maps=keep_maps, skip_bad=True, max_pixels=max_pixels, on_result=give)
    return given
