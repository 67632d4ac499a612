"""Domain exceptions. The core raises these; the CLI turns each into one line on stderr and an exit code.

Exit codes (documented in the README, "Errors and exit codes"):

| code | meaning |
| ---- | ------- |
| 0    | success |
| 1    | `--fail-on-anomaly` was given and an image was flagged, or `--fail-on-skip` and a file was skipped |
| 2    | usage error: bad option, bad config file (Typer uses 2 for its own usage errors too) |
| 3    | bad input data: unreadable image, empty folder, missing mask, too few images |
| 4    | bad or incompatible bank file |
| 5    | backbone weights unavailable or invalid |
| 6    | could not write output (read-only folder, disk full) |
| 130  | interrupted (Ctrl-C) |
"""

from __future__ import annotations


class PatchcoreError(Exception):
    """Base class: a message for the user and the exit code that goes with it."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PatchcoreError):
    """An option or config-file value is invalid."""

    exit_code = 2


class InputError(PatchcoreError):
    """An input image, folder or dataset is unusable."""

    exit_code = 3


class ImageError(InputError):
    """One image file cannot be read. `path` names it, so `--skip-bad` can list it."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from (path, problem), so it crosses a process boundary (a Ray worker) intact.
        return type(self), (self.path, self.problem)


class BankError(PatchcoreError):
    """A memory-bank file is missing, corrupt, or incompatible."""

    exit_code = 4


class WeightsError(PatchcoreError):
    """Backbone weights could not be found or do not fit the model."""

    exit_code = 5


class OutputError(PatchcoreError):
    """An output file could not be written."""

    exit_code = 6
