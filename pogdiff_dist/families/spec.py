"""What each model family is, as data: components, caption encoders and their token limits,
latent layout, objective, schedulers, LoRA targets, export class. Detection from a pretrained
directory's ``model_index.json``.

Sources: diffusers 0.42 pipelines (``encode_prompt`` of StableDiffusion[XL|3]Pipeline and
FluxPipeline) and its DreamBooth LoRA examples (``train_dreambooth_lora_{sdxl,sd3,flux}.py``)
for the training input, target and LoRA target modules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class EncoderSpec:
    """One frozen caption encoder and what the denoiser reads from it.

    ``hidden``: which hidden states the denoiser attends to: ``"last"`` (the final layer's
    output), ``"penultimate"`` (``hidden_states[-2]``, as SDXL and SD3 take from CLIP), or None.
    ``pooled``: ``"text_embeds"`` (CLIPTextModelWithProjection's projected EOS state),
    ``"pooler_output"`` (CLIPTextModel's EOS state, unprojected) or None. Every pipeline here
    runs its encoders without an attention mask, on ids padded to ``max_length``.
    """

    tokenizer: str  # component folder of the tokenizer
    encoder: str  # component folder of the model
    model_class: str  # transformers class name
    max_length: int
    hidden: str | None
    pooled: str | None


@dataclass(frozen=True)
class Family:
    """A model family (see the table in docs/OBJECTIVES.md).

    ``objective``: ``"ddpm"`` (the UNet predicts eps or v per its scheduler's ``prediction_type``;
    integer t) or ``"flow"`` (the transformer predicts v = eps - x0 at s in (0, 1)).
    ``timestep_scale``: the denoiser's timestep input is s * timestep_scale for a flow family
    (SD3 takes s * 1000; Flux takes s and multiplies by 1000 itself). ``guidance``: the embedded
    guidance a guidance-distilled transformer is trained with (Flux-dev; diffusers' default 3.5),
    passed only when its config has ``guidance_embeds``. ``uncond``: what the pipeline feeds as
    the unconditional input at inference: ``"empty"`` (the empty caption's states), ``"zeros"``
    (SDXL's ``force_zeros_for_empty_prompt``: zero hidden and pooled states) or ``"none"`` (Flux:
    no classifier-free guidance by default, the guidance is embedded).
    """

    name: str
    pipeline_class: str  # model_index.json's _class_name, and the export's pipeline class
    denoiser: str  # "unet" | "transformer": its component folder
    denoiser_class: str
    encoders: tuple[EncoderSpec, ...]
    objective: str
    train_scheduler_class: str
    sample_scheduler_class: str
    latent_channels: int
    packed: bool  # Flux: 2 x 2 latent patches packed into tokens
    lora_targets: tuple[str, ...]
    pooled: bool  # the denoiser takes a pooled caption vector
    time_ids: bool = False  # SDXL's micro-conditioning (original size, crop, target size)
    timestep_scale: float = 1.0
    guidance: float | None = None
    uncond: str = "empty"

    @property
    def components(self) -> tuple[str, ...]:
        """The component folders a pretrained directory of this family must hold."""
        folders = [self.denoiser, "vae"]
        for e in self.encoders:
            folders += [e.encoder, e.tokenizer]
        return (*folders, "scheduler")

    def with_max_length(self, encoder: str, max_length: int) -> Family:
        """This family with another token limit for one encoder (e.g. T5's 512 -> 256)."""
        if encoder not in {e.encoder for e in self.encoders}:
            raise ValueError(f"{self.name} has no encoder {encoder!r} (has {[e.encoder for e in self.encoders]})")
        encoders = tuple(dataclasses.replace(e, max_length=max_length) if e.encoder == encoder else e
                         for e in self.encoders)
        return dataclasses.replace(self, encoders=encoders)


_ATTN = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' SD / SDXL LoRA examples
_JOINT_ATTN = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")  # train_dreambooth_lora_sd3.py default
_FLUX = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
         "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
         "ff_context.net.2")  # train_dreambooth_lora_flux.py default

FAMILIES: dict[str, Family] = {
    "sd": Family(
        name="sd", pipeline_class="StableDiffusionPipeline", denoiser="unet", denoiser_class="UNet2DConditionModel",
        encoders=(EncoderSpec("tokenizer", "text_encoder", "CLIPTextModel", CLIP_MAX_LENGTH, "last", None),),
        objective="ddpm", train_scheduler_class="DDPMScheduler", sample_scheduler_class="DDIMScheduler",
        latent_channels=4, packed=False, lora_targets=_ATTN, pooled=False),
    "sdxl": Family(
        name="sdxl", pipeline_class="StableDiffusionXLPipeline", denoiser="unet", denoiser_class="UNet2DConditionModel",
        encoders=(EncoderSpec("tokenizer", "text_encoder", "CLIPTextModel", CLIP_MAX_LENGTH, "penultimate", None),
                  EncoderSpec("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection", CLIP_MAX_LENGTH,
                              "penultimate", "text_embeds")),
        objective="ddpm", train_scheduler_class="DDPMScheduler", sample_scheduler_class="EulerDiscreteScheduler",
        latent_channels=4, packed=False, lora_targets=_ATTN, pooled=True, time_ids=True, uncond="zeros"),
    "sd3": Family(
        name="sd3", pipeline_class="StableDiffusion3Pipeline", denoiser="transformer",
        denoiser_class="SD3Transformer2DModel",
        encoders=(EncoderSpec("tokenizer", "text_encoder", "CLIPTextModelWithProjection", CLIP_MAX_LENGTH,
                              "penultimate", "text_embeds"),
                  EncoderSpec("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection", CLIP_MAX_LENGTH,
                              "penultimate", "text_embeds"),
                  EncoderSpec("tokenizer_3", "text_encoder_3", "T5EncoderModel", 256, "last", None)),
        objective="flow", train_scheduler_class="FlowMatchEulerDiscreteScheduler",
        sample_scheduler_class="FlowMatchEulerDiscreteScheduler", latent_channels=16, packed=False,
        lora_targets=_JOINT_ATTN, pooled=True, timestep_scale=1000.0),
    "flux": Family(
        name="flux", pipeline_class="FluxPipeline", denoiser="transformer", denoiser_class="FluxTransformer2DModel",
        encoders=(EncoderSpec("tokenizer", "text_encoder", "CLIPTextModel", CLIP_MAX_LENGTH, None, "pooler_output"),
                  EncoderSpec("tokenizer_2", "text_encoder_2", "T5EncoderModel", 512, "last", None)),
        objective="flow", train_scheduler_class="FlowMatchEulerDiscreteScheduler",
        sample_scheduler_class="FlowMatchEulerDiscreteScheduler", latent_channels=16, packed=True,
        lora_targets=_FLUX, pooled=True, timestep_scale=1.0, guidance=3.5, uncond="none"),
}
_BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect_family(pretrained: str | Path) -> Family:
    """The family of a diffusers pipeline directory, from its model_index.json ``_class_name``."""
    index = Path(pretrained) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{pretrained} has no model_index.json: not a diffusers pipeline directory")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in _BY_PIPELINE:
        raise ValueError(f"{index}: _class_name {name!r} is not a supported model family "
                         f"(supported: {sorted(_BY_PIPELINE)})")
    return _BY_PIPELINE[name]


def check_components(family: Family, pretrained: str | Path) -> Path:
    """``pretrained`` holds every component folder ``family`` needs; name the missing ones."""
    root = Path(pretrained)
    missing = [c for c in family.components if not (root / c).is_dir()]
    if missing:
        raise ValueError(f"{root} is missing component folder(s) {missing} of a {family.pipeline_class} "
                         f"(expected {list(family.components)})")
    return root
