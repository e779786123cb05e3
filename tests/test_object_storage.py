"""Object storage, against a real S3-compatible server (moto's) started here on 127.0.0.1:
stores, shard verification and bucket errors (fast tier), then prepare into a bucket, train
from it, checkpoint into it, kill the driver and resume from it (integration), with a second
local training running on this machine at the same time."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(extra_env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)  # moto's own page: no auth
            return proc, url
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "moto server did not start"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server and credentials in the standard AWS environment variables (the
    provider chain pyarrow, Ray Data and Ray Train resolve), with a bucket ``pogdiff``."""
    proc, url = _start_moto()
    env = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
           "AWS_SECRET_ACCESS_KEY": "pogdiff-test-secret-" + secrets.token_hex(12),
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setenv("POGDIFF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))  # local mirrors of the bucket
        fs = pafs.S3FileSystem(endpoint_override=url.removeprefix("http://"), scheme="http",
                               allow_bucket_creation=True)
        fs.create_dir("pogdiff")
        yield {"url": url, "env": env, "fs": fs}
    proc.terminate()
    proc.wait(timeout=30)


def test_store_and_shard_checks_on_a_bucket(s3, tmp_path):
    """A prepared folder copied into the bucket reads back the same through Store and
    Manifest, passes verify_shards, and a truncated shard object is named by its URI."""
    from pogdiff_dist.data.shard_files import shard_row_counts, verify_shards
    from pogdiff_dist.data.shards import Manifest
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir
    from pogdiff_dist.storage import Store

    local, d = tmp_path / "prep", bundled_text_encoder_dir()
    build_synthetic_prepared(local, [6, 2], (1, 8, 8), d, d, max_length=16, k_max=3, samples_per_shard=3)
    pafs.copy_files(str(local), "pogdiff/prep", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3["fs"])
    store = Store("s3://pogdiff/prep")
    assert store.remote and store.list_files("shards", suffix=".tar") == sorted(p.name for p in
                                                                                (local / "shards").glob("*.tar"))
    m = Manifest.load("s3://pogdiff/prep")
    assert m == Manifest.load(local) and len(m.shards) == 3
    verify_shards("s3://pogdiff/prep/shards", m)
    # rows counted from the tar stream in the bucket, as for a manifest without shard_rows
    m_old = Manifest(**{**m.__dict__, "shard_rows": {}})
    assert shard_row_counts(m_old, "s3://pogdiff/prep") == [3, 3, 2]

    first = m.shards[0]
    data = store.read_bytes("shards", first)
    store.write_bytes(data[:-512], "shards", first)
    with pytest.raises(ValueError, match=f"shard s3://pogdiff/prep/shards/{first} is {len(data) - 512} bytes"):
        verify_shards("s3://pogdiff/prep/shards", m)
    # a file and a folder round-trip through the local mirror
    (store.local / "d").mkdir(parents=True)
    (store.local / "d" / "x.txt").write_text("hello")
    store.upload("d")
    (store.local / "d" / "x.txt").unlink()
    assert store.download("d").joinpath("x.txt").read_text() == "hello" and store.read_text("d", "x.txt") == "hello"


def test_missing_or_refused_bucket_is_a_clear_error_before_any_work(s3, tmp_path):
    from pogdiff_dist.config import load_config
    from pogdiff_dist.storage import check_storage

    cfg = load_config(REPO / "configs" / "tiny.yaml", {"prepare.out_dir": "s3://no-such-bucket/prepared",
                                                       "train.storage_path": str(tmp_path / "runs")})
    with pytest.raises(ValueError, match=r"prepare.out_dir='s3://no-such-bucket/prepared': bucket 'no-such-bucket' "
                                         r"does not exist"):
        check_storage(cfg)
    # the CLI says the same and exits as a usage error, before prepare starts
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), str(REPO / "configs" / "tiny.yaml"),
                          "--set", "prepare.out_dir=s3://no-such-bucket/prepared",
                          "--set", f"train.storage_path={tmp_path / 'runs'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2 and "bucket 'no-such-bucket' does not exist" in out.stderr, out.stderr[-2000:]
    assert "[prepare]" not in out.stdout and not (tmp_path / "runs").exists()

    # a server that checks credentials, and ours are unknown to it: the bucket refuses access
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="locked")  # the one unauthenticated action
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", url)
            locked = cfg.with_overrides({"prepare.out_dir": "s3://locked/prepared"})
            with pytest.raises(ValueError, match=r"prepare.out_dir='s3://locked/prepared': cannot write there "
                                                 r"\(.*ACCESS_DENIED.*\); check the credentials"):
                check_storage(locked)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _committed_checkpoints(fs, path: str) -> int:
    try:
        with fs.open_input_stream(f"{path}/checkpoint_manager_snapshot.json") as f:
            return len(json.loads(f.read())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.mark.integration
def test_prepare_train_kill_and_resume_in_a_bucket_next_to_another_training(s3, tmp_path):
    """jobs/train.py with prepare.out_dir and train.storage_path in the bucket: killed (with its
    local Ray) after its first checkpoint, then --resume. Meanwhile a second, plain local
    training runs on this machine with its own local cluster. Both finish correctly; neither
    connects to the other's cluster; the credentials appear in no output, config or MLflow
    field; the shards are streamed from the bucket, never copied to local disk."""
    fs = s3["fs"]
    cache = tmp_path / "cache"
    # Ray's socket paths must stay short (107 bytes): its temp dir under /tmp, not under tmp_path
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    env = {**os.environ, "RAY_ADDRESS": "", "POGDIFF_CACHE_DIR": str(cache), "RAY_TMPDIR": str(ray_tmp)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), str(REPO / "configs" / "tiny.yaml"),
           "--set", "prepare.out_dir=s3://pogdiff/prepared", "--set", "train.storage_path=s3://pogdiff/runs",
           "--set", f"tracking.tracking_uri={uri}", "--set", "optim.max_steps=12", "--set", "train.checkpoint_every=3",
           "--set", "train.name=s3run", "--set", "data.sampling=uniform"]  # every sample once an epoch: counted below
    other_dir = tmp_path / "other"
    other = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), str(REPO / "configs" / "tiny.yaml"),
                              "--set", f"prepare.out_dir={other_dir / 'prepared'}",
                              "--set", f"train.storage_path={other_dir / 'runs'}",
                              "--set", f"tracking.tracking_uri=sqlite:///{other_dir / 'mlflow.db'}",
                              "--set", "optim.max_steps=8", "--set", "data.sampling=uniform"],  # rows counted below
                             cwd=tmp_path, env={k: v for k, v in env.items() if not k.startswith("AWS_")},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        deadline = time.time() + 900
        while not _committed_checkpoints(fs, "pogdiff/runs/s3run"):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint in the bucket within 15 minutes"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local cluster it started
        first_out = first.communicate(timeout=60)[0]
        resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=900, check=False)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        other_out = other.communicate(timeout=900)[0]
    finally:
        for p in (other,):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert other.returncode == 0, other_out[-3000:]
    said = first_out + resumed.stdout + resumed.stderr + other_out
    assert "Found multiple active Ray instances" not in said and "InvalidAuthToken" not in said

    # the second training: its own results, untouched by the first
    other_metrics = json.loads((other_dir / "runs" / "tiny" / "metrics.json").read_text())
    assert other_metrics["final_step"] == 8
    assert all(e["epoch_seen_twice"] == 0 and e["epoch_samples"] == 32 for e in other_metrics["epochs"])

    # prepare's outputs and stage markers are in the bucket; the resumed run found every stage done
    from pogdiff_dist.storage import Store

    prep = Store("s3://pogdiff/prepared")
    manifest = json.loads(prep.read_text("manifest.json"))
    assert prep.list_files("shards", suffix=".tar") == manifest["shards"] and len(manifest["shards"]) >= 2
    assert prep.list_files("stages") == ["density.json", "encode.json", "neighbours.json", "shards.json"]
    for stage in ("encode", "neighbours", "density", "shards"):
        assert f"[prepare] {stage}: up to date" in resumed.stdout, resumed.stdout[-3000:]
    assert not list(cache.rglob("*.tar")) and not list(cache.rglob("*.parquet"))  # streamed, not staged

    # the run, its checkpoints and its export are in the bucket, and training resumed exactly
    run = Store("s3://pogdiff/runs/s3run")
    metrics = json.loads(run.read_text("metrics.json"))
    assert metrics["final_step"] == 12
    assert run.is_file("model", "model_index.json") and run.is_file("samples.png")
    assert [i for i in fs.get_file_info(pafs.FileSelector("pogdiff/runs/s3run"))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    state = json.loads(run.read_text("pogdiff_run.json"))
    first_resume = int(_history(uri, state["run_id"], "resumed_from_step")[0][1])
    assert first_resume >= 3 and first_resume % 3 == 0
    assert {s for s, _ in _history(uri, state["run_id"], "loss")} == set(range(1, 13))
    for e in metrics["epochs"]:
        assert e["epoch_samples"] == e["epoch_unique_samples"] == 32 and e["epoch_seen_twice"] == 0, e
        assert e["epoch_repeated_after_resume"] == 0, e

    # jobs/evaluate.py --mlflow-run finds the bucket's export and manifest from the run's tags
    from pogdiff_dist.evaluation.evaluate import resolve_source

    source = resolve_source(None, None, state["run_id"], uri, None)
    assert (source.model_dir / "model_index.json").is_file() and (source.run_dir / "config.yaml").is_file()
    assert json.loads((source.prepared_dir / "manifest.json").read_text()) == manifest

    # the credentials reached no output, saved config, marker, manifest, MLflow field or Ray log
    from mlflow.tracking import MlflowClient

    mlrun = MlflowClient(uri).get_run(state["run_id"])
    recorded = [said, run.read_text("config.yaml"), json.dumps(manifest),
                *(prep.read_text("stages", s) for s in prep.list_files("stages")),
                json.dumps(mlrun.data.params), json.dumps(mlrun.data.tags)]
    assert mlrun.data.tags["pogdiff.run_dir"] == "s3://pogdiff/runs/s3run"
    recorded += [p.read_text(errors="ignore") for p in ray_tmp.rglob("*") if p.is_file() and p.suffix in
                 (".log", ".out", ".err", ".json", ".txt")]
    for secret in (s3["env"]["AWS_SECRET_ACCESS_KEY"], s3["env"]["AWS_ACCESS_KEY_ID"]):
        assert not [i for i, text in enumerate(recorded) if secret in text]
