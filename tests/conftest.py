"""Shared fixtures: one local Ray cluster per session, a tiny prepared dataset."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pogdiff_dist.config import RayConfig
    from pogdiff_dist.dist.runtime import init_ray

    init_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """configs/tiny.yaml, with every output under a temp dir."""
    from pogdiff_dist.config import load_config

    tmp = tmp_path_factory.mktemp("run")
    return load_config(REPO / "configs" / "tiny.yaml", {
        "prepare.out_dir": str(tmp / "prepared"),
        "train.storage_path": str(tmp / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    })


@pytest.fixture(scope="session")
def prepared(ray_local, tiny_cfg):
    from pogdiff_dist.dist.prepare import run_prepare

    return run_prepare(tiny_cfg)
