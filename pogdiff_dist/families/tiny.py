"""Tiny random models of every family, built from configs and saved as diffusers pipeline
directories that ``DiffusionPipeline.from_pretrained`` loads (for tests and device checks;
nothing is downloaded).

The shapes keep each family's structure, scaled down: SDXL's two CLIPs of different widths
(so a wrong concatenation order fails), SD3's CLIP + CLIP + T5 with the CLIP features padded
to T5's width, Flux's CLIP pooled + T5 states with 64-feature packed tokens. Latents are 16
channels for SD3 / Flux (4 for SD / SDXL), with each family's real VAE scaling and shift.
The VAEs have two blocks: 16 x 16 images <-> 8 x 8 latents.

Tokenizers are built offline: CLIP's byte-level BPE over the 256 byte symbols (each with and
without the end-of-word suffix, no merges: one token per character) and T5's Unigram over
ASCII characters (with and without the word-start marker), wrapped as ``CLIPTokenizer`` /
``T5Tokenizer`` so the stock pipelines load them.

    python -m pogdiff_dist.families.tiny --family flux --out /tmp/tiny-flux
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch

CLIP_BOS, CLIP_EOS = 0, 1  # <|startoftext|>, <|endoftext|> (also the padding token, as in SD's CLIP)
IMAGE_SIZE = 16  # pixels; the tiny VAEs downsample by 2: 8 x 8 latents
VAE_FACTORS = {"sd": (0.18215, None), "sdxl": (0.13025, None), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


# ----------------------------------------------------------------------------- tokenizers


def clip_tokenizer():
    """A CLIP tokenizer (lower-cased byte-level BPE, ``</w>`` word ends) over single characters."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": CLIP_BOS, "<|endoftext|>": CLIP_EOS}
    for suffix in ("", "</w>"):
        vocab |= {c + suffix: len(vocab) + i for i, c in enumerate(alphabet)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A T5 tokenizer (Unigram; <pad> 0, </s> 1, <unk> 2 as T5's) over ASCII characters."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ----------------------------------------------------------------------------- models


def _clip(vocab_size: int, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))


def _vae(family: str, latent_channels: int):
    from diffusers import AutoencoderKL

    scale, shift = VAE_FACTORS[family]
    flow = family in ("sd3", "flux")  # SD3 / Flux VAEs have no quant convs
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=scale, shift_factor=shift,
                         use_quant_conv=not flow, use_post_quant_conv=not flow)


def _unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
                                cross_attention_dim=cross_attention_dim, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=4, norm_num_groups=8, **extra)


def _ddpm_scheduler_kwargs() -> dict:
    """The Stable Diffusion / SDXL training schedule (scaled-linear betas, 1000 steps, epsilon)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "steps_offset": 1}


def build_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = clip_tokenizer()
    return StableDiffusionPipeline(vae=_vae("sd", 4), text_encoder=_clip(len(tok), 32), tokenizer=tok,
                                   unet=_unet(32), scheduler=DDIMScheduler(**_ddpm_scheduler_kwargs(),
                                                                           clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl():
    """CLIP-L (hidden 16) + OpenCLIP-G with projection (hidden 24): cross-attention 40; the added
    embedding reads 6 time ids x 8 + the 24-d pooled vector."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    unet = _unet(16 + 24, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 24, use_linear_projection=True)
    scheduler = EulerDiscreteScheduler(**_ddpm_scheduler_kwargs(), timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae("sdxl", 4), text_encoder=_clip(len(tok), 16),
                                     text_encoder_2=_clip(len(tok2), 24, projection=24), tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_sd3():
    """CLIP-L (16) + CLIP-G (24) with projections + T5 (48): joint attention 48, pooled 16 + 24 = 40.
    Two joint blocks: the last one is context-pre-only (no context output / feed-forward)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
                                        pos_embed_max_size=8)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae("sd3", 16), text_encoder=_clip(len(tok), 16, projection=16),
                                    tokenizer=tok, text_encoder_2=_clip(len(tok2), 24, projection=24),
                                    tokenizer_2=tok2, text_encoder_3=_t5(len(tok3), 48), tokenizer_3=tok3)


def build_flux():
    """CLIP-L (16, pooled) + T5 (48): joint attention 48, pooled 16; 2 x 2 x 16 = 64 packed features;
    guidance-distilled (``guidance_embeds``) like Flux-dev; Flux's dynamic shift in the scheduler."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=flux_scheduler(), vae=_vae("flux", 16), text_encoder=_clip(len(tok), 16),
                        tokenizer=tok, text_encoder_2=_t5(len(tok2), 48), tokenizer_2=tok2, transformer=transformer)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random ``family`` pipeline saved (safetensors) under ``out_dir``; returns ``out_dir``."""
    if family not in BUILDERS:
        raise ValueError(f"no tiny model for family {family!r}: one of {sorted(BUILDERS)}")
    torch.manual_seed(seed)
    pipe = BUILDERS[family]()
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny(args.family, args.out, args.seed)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{args.family}: {out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
