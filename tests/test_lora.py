"""LoRA (model.lora_rank): only the adapter trains, it resumes, and its export loads onto a
stock StableDiffusionPipeline with load_lora_weights and changes the output; the merged
export equals base + adapter. The Trainer in one process on a tiny Stable Diffusion layout."""

import pytest
import torch
from conftest import REPO, make_tiny_sd


@pytest.fixture(scope="module")
def sd_and_prepared(tmp_path_factory):
    from pogdiff_dist.data.synthetic import build_synthetic_prepared

    root = tmp_path_factory.mktemp("lora")
    sd = make_tiny_sd(root / "sd")
    build_synthetic_prepared(root / "prep", [6, 6, 2, 2], (4, 8, 8), sd / "text_encoder", sd / "tokenizer",
                             max_length=16, k_max=3, samples_per_shard=8, vae_dir=sd / "vae")
    return sd, root / "prep"


def _cfg(sd, **overrides):
    from pogdiff_dist.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", {
        "model.pretrained": str(sd), "model.lora_rank": 4, "train.num_workers": 1, "loss.k": 3, "prepare.k_max": 3,
        "optim.lr": 5e-3, "train.checkpoint_every": 2, "train.ema": True, "train.ema_decay": 0.5, **overrides})


def test_lora_trains_only_the_adapter_resumes_and_exports(sd_and_prepared, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pogdiff_dist.train.local import train_local

    sd, prepared = sd_and_prepared
    base = UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    first, _ = train_local(_cfg(sd, **{"optim.max_steps": 2}), prepared, tmp_path / "run")
    trainable = dict(first.engine.trainable())
    assert trainable and all("lora_" in n for n in trainable)  # DeepSpeed got the adapter alone
    n_all = sum(p.numel() for p in first.engine.module.parameters())
    assert sum(p.numel() for p in trainable.values()) < 0.2 * n_all
    trainer, _ = train_local(_cfg(sd, **{"optim.max_steps": 4}), prepared, tmp_path / "run", resume=True)
    assert trainer.state.step == 4

    live = dict(trainer.engine.module.named_parameters())
    changed = 0
    for name, p in base.named_parameters():  # the frozen base: bit-identical after training
        key = next(k for k in live if k.replace(".base_layer", "") == name)
        torch.testing.assert_close(live[key].detach(), p.detach(), rtol=0, atol=0, msg=name)
    for name, p in live.items():
        if "lora_B" in name:
            changed += int(p.detach().abs().sum() > 0)  # B starts at zero: trained adapters moved it
    assert changed > 0

    # the LoRA export, onto a stock StableDiffusionPipeline of the base model
    lora = tmp_path / "run" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    parts = dict(StableDiffusionPipeline.from_pretrained(str(tmp_path / "run" / "model")).components)
    parts["unet"] = UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    stock = StableDiffusionPipeline(**parts)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 32)
    with torch.no_grad():
        before = stock.unet(x, t, encoder_hidden_states=y).sample
        stock.load_lora_weights(str(lora))
        after = stock.unet(x, t, encoder_hidden_states=y).sample
        merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "run" / "model")).unet
        fused = merged(x, t, encoder_hidden_states=y).sample
    assert (after - before).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(fused, after, rtol=1e-4, atol=1e-5)  # the merged export is base + adapter
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain UNet

    # jobs/evaluate.py --lora: the adapter onto the base its run's config names, the same UNet as the merged export
    from pogdiff_dist.config import save_config
    from pogdiff_dist.evaluation.evaluate import resolve_source
    from pogdiff_dist.pipeline import load_pipeline

    with pytest.raises(ValueError, match="pass --model BASE_PIPELINE_DIR"):
        resolve_source(lora=str(lora), prepared=str(prepared))
    save_config(_cfg(sd), tmp_path / "run" / "config.yaml")
    source = resolve_source(lora=str(lora), prepared=str(prepared))
    assert source.model_dir == sd and source.lora_dir == lora
    with torch.no_grad():
        adapted = load_pipeline(source.model_dir, lora_dir=source.lora_dir).unet(x, t, encoder_hidden_states=y).sample
    torch.testing.assert_close(adapted, fused, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a LoRA export"):
        resolve_source(lora=str(tmp_path / "run" / "model"), prepared=str(prepared))
