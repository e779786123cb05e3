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


def test_local_inputs_and_outputs_become_absolute_against_the_drivers_folder(tmp_path):
    """Ray workers, prepare tasks and Tune trials run in other folders: every relative local
    path is read against the driver's working directory; a relative input that is not there is
    an error naming the setting; URIs, bundled names and absolute paths are kept."""
    from pogdiff_dist.config import load_config
    from pogdiff_dist.runtime import absolute_paths

    (tmp_path / "assets" / "base" / "unet").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "model.init_unet": "assets/base/unet", "tracking.tracking_uri": "sqlite:///mlflow.db",
        "prepare.out_dir": "prep", "train.storage_path": "s3://bucket/runs"})
    out = absolute_paths(cfg, cwd=tmp_path)
    assert out.model.init_unet == str(tmp_path / "assets" / "base" / "unet")
    assert out.prepare.out_dir == str(tmp_path / "prep")
    assert out.train.storage_path == "s3://bucket/runs"
    assert out.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert out.data.dataset == cfg.data.dataset and out.model.text_encoder == cfg.model.text_encoder
    assert cfg.model.init_unet == "assets/base/unet"  # a new config: the loaded one is never mutated
    assert absolute_paths(out, cwd=REPO) == out  # idempotent: nothing left to resolve

    with pytest.raises(ValueError) as e:
        absolute_paths(cfg.with_overrides({"model.init_unet": "assets/nope/unet", "model.pretrained": "sd15"}),
                       cwd=tmp_path)
    assert "model.init_unet='assets/nope/unet'" in str(e.value) and "model.pretrained='sd15'" in str(e.value)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("job", ["train", "prepare"])
def test_a_missing_relative_input_is_a_usage_error_before_ray_starts(job, capsys, monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jobs_{job}", REPO / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        module.main([str(REPO / "configs" / "tiny.yaml"), "--set", "model.init_unet=assets/nope/unet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_unet='assets/nope/unet'" in err and str(tmp_path) in err
