"""A submitted Ray job runs in Ray's temporary copy of its working directory: relative output
paths are refused before any work, naming each setting; absolute paths and URIs pass."""

import pytest
from conftest import REPO

COPY = "/tmp/ray/session_2026/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_relative_outputs_inside_a_submitted_job_are_refused():
    from pogdiff_dist.config import load_config
    from pogdiff_dist.runtime import check_output_paths

    cfg = load_config(REPO / "configs" / "tiny.yaml", {"tracking.tracking_uri": "sqlite:///mlflow.db"})
    with pytest.raises(ValueError) as e:
        check_output_paths(cfg, cwd=COPY)
    for named in ("prepare.out_dir=", "train.storage_path=", "tracking.tracking_uri='sqlite:///mlflow.db'", COPY):
        assert named in str(e.value)
    shared = cfg.with_overrides({"prepare.out_dir": "/shared/prepared", "train.storage_path": "s3://bucket/runs",
                                 "tracking.tracking_uri": "http://mlflow:5000"})
    check_output_paths(shared, cwd=COPY)  # absolute paths and URIs are kept
    check_output_paths(cfg, cwd=REPO)  # outside a job, relative paths are the user's own folder
