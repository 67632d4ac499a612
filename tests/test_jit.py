"""The numba kernels always have a writable cache, `patchcore warmup` covers every signature that fit and
score compile, and `--help` stays free of what it does not need."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore_cli import jit, search
from patchcore_cli.cli import app

ROOT = Path(__file__).parents[1]


def python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run `code` in a fresh interpreter (the package importable from ROOT) and return its stdout."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def no_cache_dir(monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)


def test_package_cache_is_used_when_writable(no_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(jit, "PACKAGE_CACHE", tmp_path / "__pycache__")
    assert jit.ensure_cache_dir() == str(tmp_path / "__pycache__")
    assert numba.config.CACHE_DIR == ""  # numba's own choice, left alone


def test_read_only_package_falls_back_to_the_user_cache_then_temp(no_cache_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # nothing can be created under a file, whoever runs the test
    monkeypatch.setattr(jit, "PACKAGE_CACHE", blocker / "__pycache__")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.ensure_cache_dir() == numba.config.CACHE_DIR == str(tmp_path / "xdg" / "patchcore" / "numba")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    chosen = Path(jit.ensure_cache_dir())
    assert chosen.parent == tmp_path / "tmp" and chosen.name.startswith("patchcore-numba-")
    assert (chosen.stat().st_mode & 0o077) == 0


def test_a_temp_cache_open_to_others_is_not_used(no_cache_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(jit, "PACKAGE_CACHE", blocker / "__pycache__")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    shared = jit._temp_cache()
    shared.mkdir()
    shared.chmod(0o777)  # anyone could have planted machine code here
    jit.ensure_cache_dir()
    assert numba.config.CACHE_DIR == ""


def test_kernels_import_with_a_read_only_package_and_home(tmp_path):
    # Before ensure_cache_dir, numba failed at import ("cannot cache function ...: no locator available")
    # when neither the package folder nor the home folder could be written, as in a read-only container.
    copy = tmp_path / "site"
    shutil.copytree(
        ROOT / "patchcore_cli", copy / "patchcore_cli", ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / "patchcore_cli" / "__pycache__").write_text("")  # a file: the folder cannot be made
    (tmp_path / "home").write_text("")
    (tmp_path / "tmp").mkdir()
    env = {"PYTHONPATH": str(copy), "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "home" / "cache")
    code = "import numba, patchcore_cli.search, patchcore_cli.coreset; print(numba.config.CACHE_DIR)"
    out = python(code, {**env, "NUMBA_CACHE_DIR": ""}, cwd=tmp_path)  # not the checkout's package
    assert out.strip().startswith(str(tmp_path / "tmp" / "patchcore-numba-"))


def test_read_only_queries_compile_nothing_new():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((200, 8)).astype(np.float32)
    index = search.ClusterIndex(bank)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    index.nearest(queries)
    index.neighbours(queries[:1], 3)
    index.path = "dense"
    index.nearest(queries)
    kernels = (
        search._nearest,
        search._neighbours,
        search._dense_chunk_min,
        search._dense_pick,
        search._dense_skip,
    )
    counts = [len(kernel.signatures) for kernel in kernels]
    frozen = queries.copy()
    frozen.flags.writeable = False  # as a row of a memory-mapped bank is
    np.testing.assert_array_equal(index.nearest(frozen)[1], index.nearest(queries)[1])
    index.path = "clusters"
    np.testing.assert_array_equal(index.nearest(frozen)[1], index.nearest(queries)[1])
    index.neighbours(frozen[:1], 3)
    assert [len(kernel.signatures) for kernel in kernels] == counts


@pytest.mark.slow
def test_warm_up_covers_every_signature_of_fit_and_score(washer, tmp_path):
    code = f"""
import json
from patchcore_cli import bank, config, coreset, jit, search
from patchcore_cli.data import list_images
from patchcore_cli.engine import Scorer, fit
from numba.core.registry import CPUDispatcher

def signatures():
    return {{f"{{m.__name__}}.{{n}}": len(k.signatures) for m in (coreset, search)
            for n, k in vars(m).items() if isinstance(k, CPUDispatcher)}}

jit.warm_up()
warmed = signatures()
options = dict(backbone="resnet18", weights="random", image_size=72, crop=64)
fitted = fit(list_images([{str(washer / "train" / "good")!r}]), config.build(**options))
bank.save(fitted.bank, {str(tmp_path / "b.st")!r})
Scorer(bank.load({str(tmp_path / "b.st")!r})).score_paths(list_images([{str(washer / "test")!r}]))
print(json.dumps([warmed, signatures()]))
"""
    warmed, after = json.loads(python(code).strip().splitlines()[-1])
    assert after == warmed
    assert (
        warmed["patchcore_cli.coreset._greedy_kcenter"] == 1
        and warmed["patchcore_cli.coreset._distances_to"] == 1
        and warmed["patchcore_cli.coreset._batch_pass"] == 1
        and warmed["patchcore_cli.search._nearest"] == 1
        and warmed["patchcore_cli.search._dense_pick"] == 1
    )


def test_warmup_command_reports_both_modules():
    result = CliRunner().invoke(app, ["warmup"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["coreset", "search"]
    assert all(" in " in line and "s CPU" in line for line in lines)


def test_help_and_the_exact_search_import_no_more_than_they_need():
    code = """
import sys
from typer.testing import CliRunner
from patchcore_cli.cli import app
assert CliRunner().invoke(app, ["score", "--help"]).exit_code == 0
print(sorted(m for m in ("torch", "numba", "PIL", "timm", "torchvision") if m in sys.modules))
from patchcore_cli.engine import set_threads
set_threads(1, "exact")
print(sorted(m for m in ("faiss",) if m in sys.modules))
"""
    help_imports, search_imports = python(code).strip().splitlines()
    assert help_imports == "[]" and search_imports == "[]"


@pytest.mark.slow
def test_kernels_load_from_the_cache_whichever_entry_compiled_them(tmp_path):
    # numba's cache mishandled a parallel kernel called from another cached kernel: once the batched
    # fallback had been compiled on its own (as the tests call it) and the greedy search then compiled
    # around it, a later process that loaded them crashed. Each step here is a fresh process on one
    # cache folder.
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    fallback = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_coreset import fallback_data, run_batched_fallback
print(run_batched_fallback(fallback_data("normal"), 300, 7)[2])
"""
    full = """
import numpy as np
from patchcore_cli import coreset
points = np.random.default_rng(0).normal(size=(20000, 64)).astype(np.float32)
print(coreset.greedy_coreset(points, 2000, None, 42)[-5:].tolist())
"""
    python(fallback, env)
    first = python(full, env)
    assert python(full, env) == first
    python(fallback, env)
    assert python(full, env) == first
