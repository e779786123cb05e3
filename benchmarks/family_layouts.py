"""Pretrained-directory layouts of SDXL, SD3 and a Flux-class model at their real denoiser sizes,
random weights, for the GPU acceptance check (``gpu_check.py --family``); nothing downloaded.

The denoisers and VAEs are built from the published configs (values copied from each model's
``unet|transformer/config.json`` and ``vae/config.json``: stabilityai/stable-diffusion-xl-base-1.0,
stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev), which ship no
weights here. The caption encoders keep their real widths (so the denoiser reads real shapes:
SDXL 77 x 2048 + pooled 1280, SD3 333 x 4096 + pooled 2048, Flux 512 x 4096 + pooled 768) with one
layer each: their states are precomputed by prepare, and training runs them only for y' (cached);
the timed work is the denoiser's. Tokenizers are the offline character-level ones of
:mod:`pogdiff_dist.families.tiny`. ``--tiny`` layouts are that module's tiny pipelines.
"""

from __future__ import annotations

from pathlib import Path

import torch

SDXL_UNET = {  # stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 2,
    "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0,
}
SD3_TRANSFORMER = {  # stable-diffusion-3-medium-diffusers transformer/config.json
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}
FLUX_TRANSFORMER = {  # FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024}
VAES = {  # vae/config.json of each model
    "sdxl": {**_VAE, "latent_channels": 4, "scaling_factor": 0.13025},
    "sd3": {**_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "flux": {**_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
             "use_quant_conv": False, "use_post_quant_conv": False},
}
# Published parameter counts of the denoisers (the configs above, counted on the meta device).
DENOISER_PARAMS = {"sdxl": 2_567_463_684, "sd3": 2_028_328_000, "flux": 11_901_408_320}
LATENT = {"sdxl": (4, 128, 128), "sd3": (16, 128, 128), "flux": (16, 128, 128)}  # 1024 x 1024 images
TINY_LATENT = {"sdxl": (4, 8, 8), "sd3": (16, 8, 8), "flux": (16, 8, 8)}


def _clip(vocab: int, hidden: int, heads: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pogdiff_dist.families.tiny import CLIP_BOS, CLIP_EOS

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection or hidden,
                         hidden_act="gelu", bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 XXL's widths (d_model 4096, 64 heads of 64, gated-GELU FFN 10240), one layer
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0))


def denoiser(family: str):
    """The family's denoiser from its published config (on the current default device)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls, cfg = {"sdxl": (UNet2DConditionModel, SDXL_UNET), "sd3": (SD3Transformer2DModel, SD3_TRANSFORMER),
                "flux": (FluxTransformer2DModel, FLUX_TRANSFORMER)}[family]
    return cls(**cfg)


def build_full(family: str, device: torch.device | str = "cpu"):
    """The family's pipeline: real denoiser and VAE, real-width two-layer caption encoders; the
    models built on ``device`` ("meta" to count them), tokenizers and schedulers on the host."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
    )

    from pogdiff_dist.families.tiny import _ddpm_scheduler_kwargs, clip_tokenizer, flux_scheduler, t5_tokenizer

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer() if family != "flux" else t5_tokenizer(), t5_tokenizer()
    with torch.device(device):
        vae, net = AutoencoderKL(**VAES[family]), denoiser(family)
        if family == "sdxl":
            encoders = {"text_encoder": _clip(len(tok), 768, 12, None), "text_encoder_2": _clip(len(tok2), 1280, 20, 1280)}
        elif family == "sd3":
            encoders = {"text_encoder": _clip(len(tok), 768, 12, 768), "text_encoder_2": _clip(len(tok2), 1280, 20, 1280),
                        "text_encoder_3": _t5(len(tok3))}
        else:
            encoders = {"text_encoder": _clip(len(tok), 768, 12, None), "text_encoder_2": _t5(len(tok2))}
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, tokenizer=tok, tokenizer_2=tok2, unet=net, **encoders,
            scheduler=EulerDiscreteScheduler(**_ddpm_scheduler_kwargs(), timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    if family == "sd3":
        return StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        tokenizer=tok, tokenizer_2=tok2, tokenizer_3=tok3, **encoders)
    return FluxPipeline(scheduler=flux_scheduler(), vae=vae, tokenizer=tok, tokenizer_2=tok2, transformer=net,
                        **encoders)


def make_family_layout(family: str, root: Path, tiny: bool, device: torch.device | str = "cpu") -> Path:
    """A pretrained directory of ``family`` under ``root``: the tiny test pipeline, or the real
    sizes (built on ``device``, saved in bf16: random weights lose nothing and the layout's disk
    halves; training loads them into fp32 masters)."""
    from pogdiff_dist.families.tiny import build_tiny

    if tiny:
        return build_tiny(family, root)
    torch.manual_seed(0)
    pipe = build_full(family, device)
    pipe.to(torch.bfloat16).save_pretrained(str(root), safe_serialization=True)
    del pipe
    return Path(root)


def layout_param_counts(family: str, tiny: bool) -> dict[str, int]:
    """Parameters of each model component of the layout (the real sizes counted on the meta device)."""
    from pogdiff_dist.families.tiny import BUILDERS

    pipe = BUILDERS[family]() if tiny else build_full(family, "meta")  # tiny: built for real, it is small
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def lora_params(family: str, tiny: bool, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA adapter on the family's targets (peft's matching: a
    module whose name is a target or ends with ``.<target>``; A and B: rank x (in + out))."""
    from pogdiff_dist.families.spec import get_family
    from pogdiff_dist.families.tiny import BUILDERS

    targets = get_family(family).lora_targets
    if tiny:
        net = getattr(BUILDERS[family](), get_family(family).denoiser)
    else:
        with torch.device("meta"):
            net = denoiser(family)
    return sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
