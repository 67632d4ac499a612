"""PatchCore industrial anomaly detection: a small library with a CLI on top."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("patchcore-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
