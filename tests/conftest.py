"""Shared fixtures: a tiny synthetic MVTec-layout dataset and a tiny random-weight configuration.

Nothing here touches the network or the real datasets; every image is generated in the test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from patchcore_cli.synthetic import SyntheticSpec, generate_dataset

# A random-weight ResNet-18 at 64 x 64 is enough to exercise every code path in well under a second.
TINY_OPTIONS = ["--backbone", "resnet18", "--weights", "random", "--image-size", "72", "--crop", "64"]
TINY_CONFIG = {"backbone": "resnet18", "weights": "random", "image_size": 72, "crop": 64}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic category ('washer') in the MVTec AD layout, made once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    spec = SyntheticSpec(image_size=96, n_train=8, n_test_good=4, n_test_defect_per_type=2)
    generate_dataset(root, categories=["washer"], spec=spec, seed=7)
    return root


@pytest.fixture(scope="session")
def washer(synthetic_root: Path) -> Path:
    return synthetic_root / "washer"
