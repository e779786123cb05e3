"""Shared fixtures: one local Ray cluster per session, a tiny prepared dataset."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """The fast tier (``-m "not integration"``) starts no Ray: a test that needs the local
    cluster (directly or through ``prepared``) must be marked ``integration``."""
    unmarked = [item.nodeid for item in items
                if "ray_local" in getattr(item, "fixturenames", ()) and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError(f"tests using a Ray cluster without the integration marker: {unmarked}")


@pytest.fixture(scope="module")
def ray_local():
    """A local cluster per test module, shut down after it: a cluster left running
    starves the job-submit test's head of its job agent on this 2-core machine."""
    import ray

    from pogdiff_dist.config import RayConfig
    from pogdiff_dist.runtime import init_ray

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


@pytest.fixture(scope="module")
def prepared(ray_local, tiny_cfg):
    from pogdiff_dist.prepare.pipeline import run_prepare

    return run_prepare(tiny_cfg)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A prepared dataset in the shard format, written without Ray: 16 samples of identities
    6, 6, 2, 2 (4 steps per epoch at batch 4 with one worker), 1 x 16 x 16 latents."""
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir

    d = bundled_text_encoder_dir()
    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic_prepared(out, [6, 6, 2, 2], (1, 16, 16), d, d, max_length=16, k_max=4, samples_per_shard=8)
    return out


def synthetic_cfg(**overrides):
    """configs/tiny.yaml fitted to the ``synthetic`` dataset, one worker, the paper's literal
    PoGDiff (what these tests were written against), plus ``overrides``."""
    from pogdiff_dist.config import PAPER_POGDIFF, load_config

    base = {**PAPER_POGDIFF, "train.num_workers": 1, "loss.k": 4, "prepare.k_max": 4, "train.caption_dropout": 0.1,
            "loss.den_temperature": 20.0, "train.validate_every": 0}
    return load_config(REPO / "configs" / "tiny.yaml", {**base, **overrides})


def make_tiny_sd(root):
    """A Stable Diffusion v1.5-layout directory with tiny random models, built from configs
    and saved with save_pretrained (unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pogdiff_dist.models import bundled_text_encoder_dir

    torch_seed = 0
    import torch

    torch.manual_seed(torch_seed)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(root / "text_encoder")
    AutoTokenizer.from_pretrained(str(bundled_text_encoder_dir())).save_pretrained(root / "tokenizer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=16).save_pretrained(root / "vae")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32,
                         block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(root / "scheduler")
    # model_index.json, as a downloaded Stable Diffusion directory has: a loadable pipeline too
    from diffusers import StableDiffusionPipeline

    parts = {name: cls.from_pretrained(str(root / name)) for name, cls in (
        ("vae", AutoencoderKL), ("text_encoder", BertModel), ("tokenizer", AutoTokenizer),
        ("unet", UNet2DConditionModel), ("scheduler", DDPMScheduler))}
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and proxied artifacts, all under a temp dir."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - the server writes to it until the fixture ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)  # polling for readiness, not papering over a race
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def cluster_and_outliers():
    """300 points in a tight cluster and 5 far outliers [305, 8]: the density tests' data."""
    import numpy as np

    rng = np.random.default_rng(0)
    cluster = rng.normal(0.0, 0.1, size=(300, 8))
    outliers = rng.normal(0.0, 1.0, size=(5, 8)) + 10.0 * rng.choice([-1, 1], size=(5, 8))
    return np.concatenate([cluster, outliers]).astype(np.float32)
