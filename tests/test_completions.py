"""The committed completion scripts are exactly what the app generates now."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchcore_cli.completions import SHELLS, script

FOLDER = Path(__file__).parents[1] / "completions"


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completion_is_current(shell):
    committed = (FOLDER / f"patchcore.{shell}").read_text(encoding="utf-8")
    assert committed == script(shell), f"stale: run `python -m patchcore_cli.completions` ({shell})"
    assert "_PATCHCORE_COMPLETE" in committed
