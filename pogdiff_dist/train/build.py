"""The parts a :class:`~pogdiff_dist.train.trainer.Trainer` holds, each built by a function
that can be called (and tested) alone, from the config sections it needs.

Order matters in one place only: the denoiser is built after ``torch.manual_seed(train.seed)``,
so every rank starts from identical weights.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from pogdiff_dist.data.sampling import SamplingPlan
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.families.spec import get_family
from pogdiff_dist.models import STATE_DTYPE, ModelSpec, add_lora, build_noise_scheduler, build_unet, load_text_encoder
from pogdiff_dist.storage import Store
from pogdiff_dist.train.engine import Engine
from pogdiff_dist.train.step import DualConditionStep
from pogdiff_dist.train.stream import EpochStream


def setup_device(device: torch.device, train_cfg) -> None:
    """This process's device settings: its CUDA device and TF32 as configured, or on CPU a
    thread count that never oversubscribes the worker's CPUs."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(int(train_cfg.cpus_per_worker), os.cpu_count() or 1)))
    else:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = train_cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = train_cfg.allow_tf32


def build_text_encoder(manifest: Manifest, max_length: int, device: torch.device):
    """The frozen caption encoder for y', and the empty caption's states [L, D] and pooled
    vector [P] (None for a family without one) that a dropped caption is replaced by (SDXL's
    pipeline feeds zeros there, ``force_zeros_for_empty_prompt``: so does its training).

    Built here, never handed to DeepSpeed, so ZeRO-3 does not partition it. It runs in fp32, as
    prepare did for y, and the empty caption's states are kept at the shards' precision, as
    y' is (:class:`~pogdiff_dist.models.CaptionStateCache`): identical captions give identical
    conditions."""
    text = load_text_encoder(manifest.text_encoder_dir, manifest.tokenizer_dir, max_length).to(device)
    hidden, pooled = (x[0].to(STATE_DTYPE).float() for x in text.encode([""]))
    family = getattr(text, "family", None)
    if family is not None and family.uncond == "zeros":
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    return text, hidden, pooled if family is not None else None


def build_step(cfg, manifest: Manifest, prepared_dir: str, text, uncond: torch.Tensor,
               uncond_pooled: torch.Tensor | None, device: torch.device) -> DualConditionStep:
    """The objective (``loss``) with the model's noise schedule, the dataset's ELBOs (for psi_den's
    normaliser) and identity counts, caption dropout and the y' cache."""
    elbo = torch.from_numpy(np.load(io.BytesIO(Store(prepared_dir).read_bytes(manifest.elbo_file))))
    return DualConditionStep(cfg.loss, build_noise_scheduler(cfg.model), text, uncond, elbo,
                             cfg.train.caption_dropout, cfg.train.text_cache_mib, device=device,
                             identity_counts=torch.tensor(manifest.train_counts), family=family_of_manifest(manifest),
                             uncond_pooled=uncond_pooled)


def family_of_manifest(manifest: Manifest):
    """The SDXL / SD3 / Flux family the shards were prepared for, None for SD 1.x and pixels."""
    return get_family(manifest.family) if manifest.family else None


def model_spec(manifest: Manifest) -> ModelSpec:
    return ModelSpec(manifest.latent_shape[0], manifest.latent_shape[1], manifest.text_shape[1])


def build_denoiser(model_cfg, train_cfg, spec: ModelSpec) -> tuple[torch.nn.Module, list[str]]:
    """The trainable denoiser (LoRA adapters added when ``model.lora_rank``; gradient
    checkpointing as configured), seeded so every rank builds the same weights, and the
    attention processors it uses."""
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    unet = build_unet(model_cfg, spec)
    if model_cfg.lora_rank:
        add_lora(unet, model_cfg)
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, sorted({type(p).__name__ for p in unet.attn_processors.values()})


def build_engine(unet: torch.nn.Module, cfg, world: int, device: torch.device) -> Engine:
    engine = Engine(unet, cfg.optim, cfg.train, world, device)
    if cfg.train.compile:
        engine.ds.compile()
    return engine


def build_stream(cfg, manifest: Manifest, prepared_dir: str, rank: int, world: int) -> EpochStream:
    """This rank's epochs: its share of the shards, the sampling plan (``data.sampling`` and the
    dataset's folder repeats), the shuffle and the batches."""
    sampling = SamplingPlan(manifest.train_counts, cfg.data.sampling, cfg.data.sampling_alpha, cfg.train.seed,
                            manifest.repeats())
    return EpochStream(manifest, prepared_dir, rank, world, sampling, seed=cfg.train.seed,
                       shuffle_buffer=cfg.train.shuffle_buffer, batch_size=cfg.optim.batch_size,
                       on_bad=cfg.data.on_bad)


def generators(device: torch.device, seed: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """(device generator: t, eps; host generator: the step plan's dropout, neighbour and CBDM
    draws), seeded per rank."""
    return (torch.Generator(device=device).manual_seed(seed * 1000 + rank),
            torch.Generator().manual_seed(seed * 1000 + rank + 10**6))
