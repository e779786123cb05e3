"""Failure injection on a real local cluster with 2 DeepSpeed workers: a worker process
killed mid-run, the driver killed mid-run, non-finite losses. What was lost is checked
through MLflow's metric history and the run's metrics.json (target: nothing)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration


def _warmup_lr(cfg, step: int) -> float:
    """DeepSpeed WarmupLR (linear) after ``step`` optimiser steps, as the worker logs it."""
    return cfg.optim.lr * min(step - 1, cfg.optim.warmup_steps) / cfg.optim.warmup_steps


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _train_worker_pids() -> list[int]:
    """PIDs of this cluster's live Ray Train worker actors (the GCS actor table, read directly:
    no round trip through the dashboard's state API)."""
    from ray._private import state

    table = state.state.actor_table(None)
    return [a["Pid"] for a in table.values()
            if a["State"] == "ALIVE" and a["ActorClassName"].endswith("RayTrainWorker") and a["Pid"]]


def _committed_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (a checkpoint directory appears before every rank
    has reported into it; a kill before registration rightly restarts from the previous one)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def test_killed_worker_restarts_from_checkpoint(ray_local, tiny_cfg, prepared):
    from pogdiff_dist.train.driver import run_train

    # 32 samples / (2 workers x batch 4) = 4 steps per epoch; checkpoints every 6 land mid-epoch.
    # Enough steps that the kill lands well before the end.
    cfg = tiny_cfg.with_overrides({"data.sampling": "uniform", "optim.max_steps": 40, "train.checkpoint_every": 6,
                                   "train.max_failures": 2,
                                   "train.name": "kill-worker"})
    run_dir = Path(cfg.train.storage_path) / cfg.train.name
    killed: list[int] = []

    def kill_one_worker_after_first_checkpoint():
        deadline = time.time() + 900
        while time.time() < deadline:
            pids = _train_worker_pids()
            if pids and _committed_checkpoints(run_dir):
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    out = run_train(cfg)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert out.metrics["final_step"] == 40

    resumed = _history(out.tracking_uri, out.run_id, "resumed_from_step")
    assert len(resumed) >= 1
    first_resume = int(resumed[0][1])
    assert first_resume >= 6 and first_resume % 6 == 0  # from a checkpoint, not from step 0
    # the loss curve continues: every step 1..40 logged, and nothing after the restart re-logs steps <= checkpoint
    loss = _history(out.tracking_uri, out.run_id, "loss")
    assert {s for s, _ in loss} == set(range(1, 41))
    times_logged = {s: sum(1 for t, _ in loss if t == s) for s in range(1, 41)}
    assert all(times_logged[s] == 1 for s in range(1, first_resume + 1))  # not redone: no restart from 0
    # optimiser and schedule state came back: lr continues the uninterrupted warmup exactly
    lr_at_resume = _history(out.tracking_uri, out.run_id, "resumed_lr")[0][1]
    assert lr_at_resume == pytest.approx(_warmup_lr(cfg, first_resume), rel=1e-6)  # what step first_resume logged
    for step, value in _history(out.tracking_uri, out.run_id, "lr"):
        assert value == pytest.approx(_warmup_lr(cfg, step), rel=1e-6), step
    # data position, exact: the interrupted epoch resumes where each rank's checkpoint left it
    # (the checkpoint at step 6 is mid-epoch), so every epoch, that one included, trains each
    # sample exactly once and none twice across the restart
    epochs = json.loads((out.run_dir / "metrics.json").read_text())["epochs"]
    assert len(epochs) >= 2 and [e["epoch"] for e in epochs] == list(range(len(epochs)))
    assert first_resume % 4, first_resume  # a mid-epoch resume: the case that used to repeat rows
    n = prepared.num_samples
    for e in epochs:
        assert e["epoch_samples"] == e["epoch_unique_samples"] == n and e["epoch_seen_twice"] == 0, e
        assert e["epoch_repeated_after_resume"] == 0 and e["epoch_not_delivered"] == 0, (e, first_resume)


def test_killed_driver_resumes_same_run(ray_local, tiny_cfg, prepared):
    """SIGKILL the driver (and its local Ray) mid-run, then `jobs/train.py --resume`."""
    cfg = tiny_cfg.with_overrides({"optim.max_steps": 12, "train.checkpoint_every": 3, "train.name": "kill-driver"})
    cfg_path = Path(cfg.train.storage_path).parent / "kill-driver.yaml"
    from pogdiff_dist.config import save_config

    save_config(cfg, cfg_path)
    run_dir = Path(cfg.train.storage_path) / cfg.train.name
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), str(cfg_path)]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.time() + 900
    while not _committed_checkpoints(run_dir):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 15 minutes"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local cluster it started
    driver.wait(timeout=60)
    state = json.loads((run_dir / "pogdiff_run.json").read_text())

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                             check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final_step"] == 12
    uri = state["tracking_uri"]
    first_resume = int(_history(uri, state["run_id"], "resumed_from_step")[0][1])
    assert first_resume >= 3 and first_resume % 3 == 0
    assert {s for s, _ in _history(uri, state["run_id"], "loss")} == set(range(1, 13))
    for step, value in _history(uri, state["run_id"], "lr"):
        assert value == pytest.approx(_warmup_lr(cfg, step), rel=1e-6), step
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).get_run(state["run_id"]).info.status == "FINISHED"


def test_nonfinite_loss_is_skipped_counted_or_raised(ray_local, tiny_cfg, prepared):
    """A tiny a3 overflows psi = psi_img * psi_den / a3 past float32 for the four densest-
    weighted captions, so steps that draw them have a non-finite loss. With
    on_nonfinite=skip they are skipped and counted and the run still reaches max_steps;
    with raise the run stops with an error naming step, rank and samples."""
    import numpy as np
    import torch

    from pogdiff_dist.losses import log_density_normaliser
    from pogdiff_dist.train.driver import run_train

    elbo = torch.from_numpy(np.load(Path(tiny_cfg.prepare.out_dir) / "elbo.npy"))
    log_den = (-elbo.double() - log_density_normaliser(elbo, 1.0)).sort(descending=True).values
    a3 = float(torch.exp((log_den[3] + log_den[4]) / 2)) / torch.finfo(torch.float32).max
    from pogdiff_dist.config import PAPER_POGDIFF

    # the paper's psi_den (the caption ELBO at T = 1), which the a3 above is computed from
    paper = {k: v for k, v in PAPER_POGDIFF.items() if k not in ("loss.k", "loss.a3")}
    cfg = tiny_cfg.with_overrides({**paper, "loss.a3": a3, "train.caption_dropout": 0.0, "optim.max_steps": 12,
                                   "train.max_nonfinite": 1000, "train.name": "nonfinite"})
    out = run_train(cfg)
    assert out.metrics["final_step"] == 12
    skipped = out.metrics["nonfinite_skipped"]
    assert skipped >= 1
    assert _history(out.tracking_uri, out.run_id, "nonfinite_skipped")[-1][1] == skipped
    losses = [v for _, v in _history(out.tracking_uri, out.run_id, "loss")]
    assert len(losses) == 12 and all(np.isfinite(losses))  # only finite losses were stepped

    with pytest.raises(Exception, match=r"non-finite loss at step \d+ on this rank \(samples \["):
        run_train(cfg.with_overrides({"train.on_nonfinite": "raise", "train.name": "nonfinite-raise"}))


def _tamper(shard: Path, marker: Path) -> str:
    """Put a NaN into the first sample's latent, as a broken encoder would, and record the
    new shard in prepare's stage marker (so only the sample-level check can catch it)."""
    import io
    import tarfile

    import numpy as np

    from pogdiff_dist.data.shard_files import file_digest

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(".latent.npy"))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == target:
                a = np.load(io.BytesIO(data))
                a.flat[0] = np.nan
                buf = io.BytesIO()
                np.save(buf, a)
                data = buf.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    info = json.loads(marker.read_text())
    info["shard_bytes"][shard.name] = shard.stat().st_size
    info["shard_sha256"][shard.name] = file_digest(shard)
    marker.write_text(json.dumps(info))
    return target.rsplit(".latent.npy", 1)[0]


def test_bad_sample_skipped_and_every_epoch_accounted_for(ray_local, tiny_cfg, prepared):
    from pogdiff_dist.train.driver import run_train

    out_dir = Path(tiny_cfg.prepare.out_dir)
    shard, marker = out_dir / "shards" / prepared.shards[0], out_dir / "stages" / "shards.json"
    saved = shard.read_bytes(), marker.read_text()
    try:
        key = _tamper(shard, marker)
        # uniform sampling: every sample once an epoch, so an epoch's rows are countable by hand
        cfg = tiny_cfg.with_overrides({"data.on_bad": "skip", "optim.max_steps": 9, "train.name": "skip-bad",
                                       "data.sampling": "uniform"})
        out = run_train(cfg)
        epochs = json.loads((out.run_dir / "metrics.json").read_text())["epochs"]
        n = prepared.num_samples
        assert len(epochs) == 2  # 31 samples over 2 workers in batches of 4: 4 steps per epoch
        for e in epochs:
            assert e["epoch_rows"] == n and e["epoch_not_delivered"] == 0
            assert e["epoch_skipped_bad"] == 1
            assert e["epoch_samples"] == e["epoch_unique_samples"] == n - 1  # the dataset minus the skip
            assert e["epoch_seen_twice"] == 0 and e["epoch_repeated_after_resume"] == 0
        history = _history(out.tracking_uri, out.run_id, "epoch_skipped_bad")
        assert [v for _, v in history] == [1.0, 1.0]

        with pytest.raises(Exception, match=re.escape(f"sample {key}: field latent.npy holds NaN or Inf")):
            run_train(cfg.with_overrides({"data.on_bad": "raise", "train.name": "raise-bad"}))
    finally:
        shard.write_bytes(saved[0])
        marker.write_text(saved[1])
