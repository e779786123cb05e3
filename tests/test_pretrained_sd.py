"""The Stable Diffusion path: a local SD-layout directory (tiny models saved with
save_pretrained) -> VAE latents at prepare -> fine-tune its UNet -> export with the VAE."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd

pytestmark = pytest.mark.integration


def test_missing_component_is_named(tmp_path):
    from pogdiff_dist.models import check_pretrained_dir

    sd = make_tiny_sd(tmp_path / "sd")
    import shutil

    shutil.rmtree(sd / "vae")
    with pytest.raises(ValueError, match=r"missing component folder\(s\) \['vae'\]"):
        check_pretrained_dir(sd)


def test_finetune_pretrained_sd_layout(ray_local, tmp_path):
    from conftest import REPO
    from diffusers import AutoencoderKL

    from pogdiff_dist.config import load_config
    from pogdiff_dist.pipeline import load_pipeline
    from pogdiff_dist.train.driver import run_train

    sd = make_tiny_sd(tmp_path / "sd")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "model.pretrained": str(sd), "data.channels": 3, "optim.max_steps": 3, "train.name": "sd",
        "optim.warmup_steps": 1, "train.zero_stage": 1, "train.ema": True, "train.ema_decay": 0.5,
        "prepare.out_dir": str(tmp_path / "prepared"), "train.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    })
    out = run_train(cfg)
    assert out.metrics["final_step"] == 3

    # prepare stored VAE latents (4 x 8 x 8 for 16 x 16 RGB), not pixels
    from pogdiff_dist.data.shards import Manifest

    m = Manifest.load(cfg.prepare.out_dir)
    assert m.latent_shape == [4, 8, 8] and m.text_shape == [16, 32] and m.vae_dir.endswith("vae")

    # a standard Stable Diffusion directory: the generic loader and the SD pipeline class load it
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    generic = DiffusionPipeline.from_pretrained(str(out.model_dir))
    assert type(generic) is StableDiffusionPipeline and generic.safety_checker is None
    assert type(StableDiffusionPipeline.from_pretrained(str(out.model_dir))) is StableDiffusionPipeline
    assert generic.tokenizer.model_max_length == cfg.model.max_length  # captions cut where training cut them
    pipe = load_pipeline(out.model_dir)
    assert isinstance(pipe.vae, AutoencoderKL)
    img = pipe(["An image of Alice Moreau."], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 16, 16, 3) and img.dtype == np.uint8

    # EMA on: each rank's checkpoint holds the EMA of its own fp32 master partition, and the
    # export is the EMA, not the last weights (the module's state in the same checkpoint);
    # the closed form of the average is tests/test_gpu_path.py's
    ckpts = sorted(p for p in out.run_dir.glob("checkpoint_*") if p.is_dir())
    assert sorted(p.name for p in ckpts[-1].glob("ema_rank*.safetensors")) == \
        [f"ema_rank{r}.safetensors" for r in range(cfg.train.num_workers)]
    module = torch.load(next(ckpts[-1].rglob("mp_rank_00_model_states.pt")), map_location="cpu",
                        weights_only=False)["module"]
    exported = {n: p.detach() for n, p in pipe.unet.named_parameters()}
    last = {n.removeprefix("unet."): v.float() for n, v in module.items()}
    assert set(exported) <= set(last)
    assert any(not torch.equal(exported[n], last[n]) for n in exported)  # averaged, not the last step


def test_sd15_config_prepares_trains_bf16_and_exports(ray_local, tmp_path):
    """configs/sd15.yaml as shipped (bf16, ZeRO-2, EMA, 77 tokens... ), with only its paths and
    sizes overridden to the tiny SD layout and this CPU machine."""
    from conftest import REPO

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.shards import Manifest
    from pogdiff_dist.pipeline import load_pipeline
    from pogdiff_dist.train.driver import run_train

    sd = make_tiny_sd(tmp_path / "sd")
    cfg = load_config(REPO / "configs" / "sd15.yaml", {
        "model.pretrained": str(sd), "model.image_encoder": "pixels", "data.dataset": "digits-it2i:S",
        "data.resolution": 16, "data.heldout_per_identity": 2, "prepare.out_dir": str(tmp_path / "prepared"),
        "prepare.k_max": 5, "prepare.density_epochs": 5, "prepare.num_encoders": 2, "loss.k": 5,
        "optim.batch_size": 4, "optim.grad_accum": 2, "optim.max_steps": 2, "optim.warmup_steps": 1,
        "train.use_gpu": False, "train.num_workers": 2, "train.cpus_per_worker": 1, "train.checkpoint_every": 1,
        "train.sample_steps": 2, "train.samples_per_prompt": 1, "train.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    })
    assert (cfg.train.precision, cfg.train.zero_stage, cfg.train.ema, cfg.model.max_length) == ("bf16", 2, True, 77)
    out = run_train(cfg)
    assert out.metrics["final_step"] == 2 and out.metrics["final_loss"] > 0
    m = Manifest.load(cfg.prepare.out_dir)
    assert m.latent_shape == [4, 8, 8] and m.text_shape == [77, 32]  # VAE latents, 77-token captions
    pipe = load_pipeline(out.model_dir)
    assert pipe.unet.dtype == torch.float32  # exported from the fp32 EMA weights, not the bf16 compute copy
    img = pipe(["An image of Alice Moreau."], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 16, 16, 3) and img.std() > 0
