"""The Ray runner's pieces that need no cluster: the engine stays Ray-free, Ray stays optional, the bank
travels as plain data, URIs are told apart from paths."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore_cli import distributed
from patchcore_cli.bank import Bank
from patchcore_cli.cli import app

PACKAGE = Path(distributed.__file__).parent
runner = CliRunner()


def _imports_ray(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            return True
    return False


def test_only_the_runner_imports_ray() -> None:
    """The engine never imports Ray, not even lazily inside a function: only distributed.py does."""
    importing = {
        path.name
        for path in PACKAGE.glob("*.py")
        if _imports_ray(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert importing == {"distributed.py"}


def test_a_local_fit_and_score_never_load_ray(washer: Path, tmp_path: Path) -> None:
    """At run time too: fit, score (with maps) and the CLI without --ray leave Ray unimported."""
    code = f"""
import sys
from pathlib import Path
from typer.testing import CliRunner
from patchcore_cli.cli import app
from tests.conftest import TINY_OPTIONS
bank = {str(tmp_path / "bank.st")!r}
runner = CliRunner()
fit = runner.invoke(app, ["fit", {str(washer / "train" / "good")!r}, "--out", bank, *TINY_OPTIONS])
assert fit.exit_code == 0, fit.output
score = runner.invoke(app, ["score", {str(washer / "test")!r}, "--bank", bank, "--heatmaps",
                            {str(tmp_path / "heat")!r}, "--json"])
assert score.exit_code == 0, score.output
print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""
    root = PACKAGE.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ray_missing_is_one_line_with_the_install_command(
    washer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now raises ImportError
    for command in (
        ["score", str(washer / "test"), "--ray"],
        ["score", str(washer / "test"), "--ray-address", "auto"],
        ["benchmark", "folder", "--good", str(washer / "train" / "good"), "--defect", str(washer), "--ray"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            "error: --ray needs Ray, which is not installed: pip install 'patchcore-cli[ray]'"
        )


def test_ray_sizing_options_need_ray(washer: Path) -> None:
    result = runner.invoke(app, ["score", str(washer / "test"), "--ray-cpus", "2"])
    assert result.exit_code == 2
    assert "--ray-cpus and --ray-actors go with --ray" in result.stderr


def _bank(rows: int, seed: int) -> Bank:
    memory = np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)
    calibration = {"image_threshold": 1.5, "pixel_threshold": 2.5, "image_std": 0.1}
    return Bank(memory, {"backbone": "resnet18", "layers": ["layer2"]}, calibration, "random", 3)


def _plain(value: object) -> bool:
    """JSON-able data and numpy arrays only: nothing a worker would have to unpickle as a class."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return True
    json.dumps(value)
    return True


@pytest.mark.parametrize("ensemble", [False, True])
def test_bank_payload_round_trip(ensemble: bool) -> None:
    bank = _bank(5, 0)
    if ensemble:
        members = [_bank(5, 1), _bank(7, 2)]
        sha = "random+random"
        bank = Bank(members[0].memory_bank, bank.config, bank.calibration, sha, 3, members=members)
    payload = distributed.bank_payload(bank)
    assert _plain(payload)
    back = distributed.bank_from_payload(payload)
    assert len(back.parts) == len(bank.parts)
    for original, copy in zip(bank.parts, back.parts, strict=True):
        np.testing.assert_array_equal(copy.memory_bank, original.memory_bank)
        assert (copy.config, copy.calibration, copy.weights_sha256) == (
            original.config,
            original.calibration,
            original.weights_sha256,
        )
    np.testing.assert_array_equal(back.memory_bank, bank.memory_bank)
    assert (back.config, back.calibration, back.n_train_images) == (bank.config, bank.calibration, 3)
    if ensemble:  # the first member's rows travel once, not twice
        assert payload["memory_bank"] is None


@pytest.mark.parametrize(
    ("text", "uri"),
    [
        ("s3://bucket/line-3/", True),
        ("gs://b/x.png", True),
        ("file:///data/x.png", True),
        ("abfss://c@acct.dfs.core.windows.net/p", True),
        ("images/x.png", False),
        ("/abs/x.png", False),
        ("C:/images", False),
        ("odd:name.png", False),
    ],
)
def test_is_uri(text: str, uri: bool) -> None:
    assert distributed.is_uri(text) is uri


def test_list_inputs_expands_uri_folders_like_local_folders(washer: Path) -> None:
    pytest.importorskip("pyarrow")
    from patchcore_cli.data import list_images

    test = washer / "test"
    found = distributed.list_inputs([str(test / "good"), (test / "hole").as_uri(), (test / "good").as_uri()])
    local = list_images([test / "good"])
    holes = list_images([test / "hole"])
    assert found.names[: len(local)] == local
    assert found.names[len(local) :] == [p.as_uri() for p in holes] + [p.as_uri() for p in local]
    remote = found.items[len(local) :]
    assert {item.filesystem for item in remote} == {0} and len(found.filesystems) == 1
    assert [item.path for item in remote[: len(holes)]] == [str(p) for p in holes]


def test_list_inputs_errors_name_the_uri(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from patchcore_cli.errors import InputError

    with pytest.raises(InputError, match=r"^file:///.*/nope: no such file or folder$"):
        distributed.list_inputs([(tmp_path / "nope").as_uri()])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no images found in folder"):
        distributed.list_inputs([tmp_path.as_uri()])
