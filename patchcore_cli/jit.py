"""Where the numba kernels of coreset.py and search.py are cached, and compiling them ahead of time.

numba compiles a kernel the first time a process calls it: about 14 s of CPU for the coreset and 7 s for
the exact search (docs/latency.md). With `cache=True` it writes the machine code to disk and later
processes load it in under half a second. An entry holds for one source file content (numba 0.68; older
releases compared its modification time and size), one Python and numba version, one set of argument
types and one CPU model. A new install or clone starts with an empty cache, and an upgrade or another
CPU model compiles once more.

numba only uses a folder it can write to: $NUMBA_CACHE_DIR when set, else the package's `__pycache__`,
else the user's cache folder. When none of them is writable, as in a container with a read-only root
filesystem, importing a kernel module fails. `ensure_cache_dir` chooses the folder itself when the
package's is read-only: the user's cache folder, else a private folder in the temp directory. `warm_up`
(`patchcore warmup`) compiles every kernel before the first real run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PACKAGE_CACHE = Path(__file__).parent / "__pycache__"


def _writable(folder: Path, private: bool = False) -> bool:
    """Whether files can be created in `folder` (made if missing), tested as numba tests it.

    private: the folder must also belong to this user and be closed to others. A cache folder in a
    shared temp directory must be, since a cache file holds machine code that is loaded and run.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if private and hasattr(os, "getuid"):
            status = folder.stat()
            if status.st_uid != os.getuid() or status.st_mode & 0o077:
                return False
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "patchcore" / "numba"


def _temp_cache() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"patchcore-numba-{user}"


def ensure_cache_dir() -> str:
    """Make sure numba has a writable cache folder, and return it.

    Call before any kernel is defined: numba picks a function's cache folder when it is decorated.
    In order: $NUMBA_CACHE_DIR when set (left to numba as it is); the package's `__pycache__` (numba's
    own choice); `$XDG_CACHE_HOME/patchcore/numba` or `~/.cache/patchcore/numba`; a private folder in
    the temp directory. numba files its cache in a subfolder of the chosen folder.
    """
    import numba

    if numba.config.CACHE_DIR:
        return str(numba.config.CACHE_DIR)
    if _writable(PACKAGE_CACHE):
        return str(PACKAGE_CACHE)
    for folder, private in ((_user_cache(), False), (_temp_cache(), True)):
        if _writable(folder, private):
            numba.config.CACHE_DIR = str(folder)
            return str(folder)
    return str(PACKAGE_CACHE)  # nothing is writable: numba's own error will say so


@dataclass(frozen=True)
class Warmed:
    """One module's kernels after `warm_up`: compiled now or loaded from the cache, in how many wall
    and CPU seconds (compiling runs on one core, so on a busy machine the CPU time is the steadier)."""

    module: str
    compiled: bool
    seconds: float
    cpu_seconds: float
    cache: str


def warm_up() -> list[Warmed]:
    """Compile, or load from the cache, every kernel with the argument types that real runs pass.

    The kernels are called on a tiny problem: numba compiles a function together with everything it
    calls, and the types (float32 C-contiguous rows, int64 indices) are fixed by the Python wrappers,
    whatever the data, so this covers every signature that `fit` and `score` use.
    """
    import numpy as np
    import torch  # noqa: F401  (imported first: search.py seeds its clusters with it)

    from patchcore_cli import coreset, search

    rng = np.random.default_rng(0)
    points = rng.standard_normal((64, 8)).astype(np.float32)
    sources = np.repeat(np.arange(8), 8)

    def pick() -> None:
        coreset.greedy_coreset(points, 8, projection_dim=None, seed=0)
        # Points spread evenly in 16 dimensions: the pruned search hands over to the batched fallback.
        spread = rng.standard_normal((1024, 16)).astype(np.float32)
        coreset.greedy_coreset(spread, 130, projection_dim=None, seed=0)
        coreset._distances_to(points, points, 0)  # the first pick's distances on large inputs

    def find() -> None:
        index = search.ClusterIndex(points, sources)
        index.nearest(points[:16], sources[:16])
        index.nearest_dense(points[:16], sources[:16])
        index.neighbours(points[:1], 3, sources[:1])

    return [_timed("coreset", coreset, pick), _timed("search", search, find)]


def _timed(name: str, module: object, run: Callable[[], None]) -> Warmed:
    from numba.core.registry import CPUDispatcher

    kernels = [value for value in vars(module).values() if isinstance(value, CPUDispatcher)]
    misses = sum(sum(kernel.stats.cache_misses.values()) for kernel in kernels)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    compiled = sum(sum(kernel.stats.cache_misses.values()) for kernel in kernels) > misses
    return Warmed(name, compiled, wall, cpu, str(kernels[0].stats.cache_path))
