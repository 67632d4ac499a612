"""Shell completion scripts, generated from the Typer app.

Regenerate the committed files with `python -m patchcore_cli.completions`; a test fails when they are stale.
The scripts call back into `patchcore` at completion time, so they stay correct as options change, but
their own text must match what this Typer version generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")
PROG = "patchcore"
COMPLETE_VAR = "_PATCHCORE_COMPLETE"


def script(shell: str) -> str:
    """The completion script for `shell` (bash, zsh or fish)."""
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell in SHELLS:
        path = folder / f"{PROG}.{shell}"
        path.write_text(script(shell), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "completions"
    for path in write(target):
        print(path)
