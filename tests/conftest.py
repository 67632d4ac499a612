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


@pytest.fixture(scope="session")
def ray_cluster():
    """A simulated Ray cluster for the session: a head node with no CPUs and two worker nodes of one CPU
    each, so every actor and task runs on a worker node and the bank crosses nodes through the object
    store. This process is connected to it; `--ray` commands reuse that connection."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from patchcore_cli.distributed import worker_env

    store = 100 * 1024 * 1024  # bytes per node: small, the banks and pictures here are tiny
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": store,
            "include_dashboard": False,
            "_system_config": {"worker_niceness": 0},  # as `--ray` starts a local Ray: see session()
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=worker_env(), log_to_driver=False, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()
