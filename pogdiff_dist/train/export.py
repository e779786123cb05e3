"""The model a run leaves behind, written by rank 0 after ``fit``.

The weights are the fp32 master weights (or their EMA) gathered by the engine, loaded into a
denoiser built afresh from its source at fp32: the frozen base of a LoRA run is read from
disk at full precision, never the compute-dtype copy DeepSpeed trained beside the adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.families.latents import vae_scale_factor
from pogdiff_dist.families.pipeline import export_family_pipeline, save_family_lora
from pogdiff_dist.families.spec import get_family
from pogdiff_dist.models import (
    LatentCodec,
    ModelSpec,
    TextEncoder,
    add_lora,
    build_noise_scheduler,
    build_unet,
    lora_state_dict,
)
from pogdiff_dist.pipeline import export_pipeline, load_pipeline
from pogdiff_dist.train.diagnostics import PLOTS_DIR, PsiRecord, sample_grid, write_plots

MODEL_DIR, SAMPLES, LORA_DIR = "model", "samples.png", "lora"


def denoiser_from_masters(cfg, spec: ModelSpec, masters: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh fp32 denoiser (LoRA adapter added when ``model.lora_rank``) holding ``masters``
    (the trainable parameters by name) and its source's weights everywhere else."""
    unet = build_unet(cfg.model, spec)
    if cfg.model.lora_rank:
        add_lora(unet, cfg.model)
    missing, unexpected = unet.load_state_dict(masters, strict=False)
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    if unexpected or set(masters) != trained:
        raise RuntimeError(f"the engine's trainable parameters do not match the rebuilt denoiser's: unexpected "
                           f"{sorted(unexpected)[:5]}, not trained here {sorted(trained - set(masters))[:5]}")
    assert not trained & set(missing)
    return unet


def export_run(cfg, manifest: Manifest, spec: ModelSpec, masters: dict[str, torch.Tensor], run_store,
               device: torch.device, psi: PsiRecord | None, prepared: str) -> Path:
    """The diffusers pipeline in ``run_dir/model`` (a ``StableDiffusionPipeline`` for a model
    fine-tuned from a Stable Diffusion layout, ``PoGDiffPipeline`` for a pixel-space one), with
    LoRA also the adapter alone in diffusers' LoRA format in ``run_dir/lora`` (the pipeline then
    holds the merged weights), the sample grid in ``run_dir/samples.png`` and the plots; uploaded
    when the run folder is in object storage."""
    run_dir = run_store.local
    unet = denoiser_from_masters(cfg, spec, masters)
    family = get_family(manifest.family) if manifest.family else None
    if family is not None:
        model_dir = _export_family(run_dir, cfg, manifest, family, unet)
    else:
        model_dir = _export_single_encoder(run_dir, cfg, manifest, unet)
    pipe = load_pipeline(model_dir, device)
    sample_grid(pipe, manifest, cfg, run_dir / SAMPLES)
    write_plots(run_dir / PLOTS_DIR, manifest, psi, cfg.loss, prepared)
    for part in (MODEL_DIR, SAMPLES, PLOTS_DIR, *([LORA_DIR] if cfg.model.lora_rank else [])):
        run_store.upload(part)
    return model_dir


def _export_family(run_dir: Path, cfg, manifest: Manifest, family, denoiser) -> Path:
    """SDXL / SD3 / Flux: the family's own pipeline class around the trained denoiser (merged,
    with LoRA, whose adapter also goes to ``run_dir/lora`` in diffusers' LoRA format)."""
    if cfg.model.lora_rank:
        lora_dir = run_dir / LORA_DIR
        shutil.rmtree(lora_dir, ignore_errors=True)
        save_family_lora(lora_dir, family, lora_state_dict(denoiser))
        denoiser.fuse_lora()
        denoiser.unload_lora()
    model_dir = run_dir / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)
    resolution = manifest.latent_shape[-1] * vae_scale_factor(LatentCodec(manifest.vae_dir).vae.config)
    return export_family_pipeline(model_dir, family, manifest.text_encoder_dir, denoiser, resolution)


def _export_single_encoder(run_dir: Path, cfg, manifest: Manifest, unet) -> Path:
    """SD 1.x/2.x (a ``StableDiffusionPipeline``) or a pixel-space model (``PoGDiffPipeline``)."""
    m = manifest
    if cfg.model.lora_rank:
        from diffusers import StableDiffusionPipeline

        lora_dir = run_dir / LORA_DIR
        shutil.rmtree(lora_dir, ignore_errors=True)
        StableDiffusionPipeline.save_lora_weights(str(lora_dir), unet_lora_layers=lora_state_dict(unet),
                                                  safe_serialization=True)
        unet.fuse_lora()  # the adapter folded into the fp32 base weights: a plain UNet for the pipeline
        unet.unload_lora()
    text = TextEncoder(m.text_encoder_dir, m.tokenizer_dir, cfg.model.max_length)
    vae = LatentCodec(m.vae_dir).vae if m.vae_dir else None
    model_dir = run_dir / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)
    export_pipeline(model_dir, unet, build_noise_scheduler(cfg.model), text, vae)
    return model_dir
