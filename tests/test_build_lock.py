"""A DeepSpeed op build lock left by an interrupted first run: the Trainer fails fast with an
error naming the lock file instead of waiting on it forever; a build in progress is waited for."""

import os
import threading
import time

import pytest
from conftest import REPO


def _plant_lock(root, age_s: float):
    build = root / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - age_s
    os.utime(lock, (old, old))
    os.utime(build, (old, old))
    return lock


def test_a_stale_build_lock_is_an_error_naming_it(tmp_path, monkeypatch):
    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir
    from pogdiff_dist.train.local import train_local

    d = bundled_text_encoder_dir()
    build_synthetic_prepared(tmp_path / "prep", [4, 2], (1, 16, 16), d, d, max_length=16, k_max=1)
    lock = _plant_lock(tmp_path / "ext", age_s=3600)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"train.num_workers": 1, "loss.k": 1, "prepare.k_max": 1,
                                                       "optim.max_steps": 1})
    t0 = time.time()
    with pytest.raises(RuntimeError, match="rm " + str(lock)):
        train_local(cfg, tmp_path / "prep", tmp_path / "run")
    assert time.time() - t0 < 60  # no hang
    assert lock.exists()  # reported, not removed behind the user's back


def test_a_build_in_progress_is_waited_for(tmp_path, monkeypatch):
    from pogdiff_dist.train.engine import check_op_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = _plant_lock(tmp_path / "ext", age_s=0)

    def build():  # another process compiling: files change, then the lock goes
        for i in range(6):
            (lock.parent / f"part{i}.o").write_text("x")
            time.sleep(0.2)
        lock.unlink()

    worker = threading.Thread(target=build)
    t0 = time.time()
    worker.start()
    check_op_build_lock(stale_after_s=0.6, poll_s=0.05)
    worker.join()
    assert not lock.exists() and time.time() - t0 >= 1.0  # returned once the build released the lock
