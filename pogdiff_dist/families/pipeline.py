"""An SDXL / SD3 / Flux export as the project samples from it: the stock diffusers pipeline
(what any tool loads from the export), called the way :class:`pogdiff_dist.pipeline.PoGDiffPipeline`
is called (prompts -> uint8 images), at the size the model was trained at.

The export is the family's own pipeline class written with ``save_pretrained``; beside it,
``pogdiff.json`` records the training resolution (Flux's pipeline otherwise samples at its
default 128 latent cells a side, whatever the model was trained on). A LoRA export is the
adapter in diffusers' LoRA format, which ``pipeline.load_lora_weights`` loads onto the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.families.spec import Family, detect_family

EXPORT_INFO = "pogdiff.json"  # {"family", "resolution"} beside the export's model_index.json
LORA_PREFIX = {"unet": "unet_lora_layers", "transformer": "transformer_lora_layers"}  # save_lora_weights' argument


def export_family_pipeline(out_dir: str | Path, family: Family, pretrained: str | Path, denoiser: torch.nn.Module,
                           resolution: int) -> Path:
    """The pretrained ``family`` pipeline with ``denoiser`` in place of its own, saved (safetensors)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pretrained), **{family.denoiser: denoiser})
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    (Path(out_dir) / EXPORT_INFO).write_text(json.dumps({"family": family.name, "resolution": resolution}))
    return Path(out_dir)


def save_family_lora(lora_dir: str | Path, family: Family, layers: dict[str, torch.Tensor]) -> Path:
    """The adapter alone in diffusers' LoRA format (``<Pipeline>.save_lora_weights``)."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_class)
    cls.save_lora_weights(str(lora_dir), **{LORA_PREFIX[family.denoiser]: layers}, safe_serialization=True)
    return Path(lora_dir)


class FamilyPipeline:
    """The stock pipeline, called as ``PoGDiffPipeline`` is: ``(prompts, num_inference_steps,
    guidance_scale, num_images_per_prompt, generator) -> uint8 [N, H, W, C]`` (prompt-major).
    For Flux, ``guidance_scale`` is the embedded guidance of a guidance-distilled transformer."""

    def __init__(self, pipe, family: Family, resolution: int | None = None):
        self.pipe, self.family, self.resolution = pipe, family, resolution

    def __getattr__(self, name):  # the pipeline's components (vae, unet / transformer, scheduler...)
        return getattr(self.pipe, name)

    @torch.no_grad()
    def __call__(self, prompts: list[str], num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None) -> np.ndarray:
        size = {} if self.resolution is None else {"height": self.resolution, "width": self.resolution}
        out = self.pipe(prompt=list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        num_images_per_prompt=num_images_per_prompt, generator=generator, output_type="np", **size)
        return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)

    def to(self, device) -> FamilyPipeline:
        self.pipe.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)


def load_family_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                         lora_dir: str | Path | None = None) -> FamilyPipeline:
    """An SDXL / SD3 / Flux export (or a stock directory of one) as a :class:`FamilyPipeline`;
    ``lora_dir``: an adapter loaded onto it with the pipeline's own ``load_lora_weights``."""
    from diffusers import DiffusionPipeline

    model_dir = Path(model_dir)
    family = detect_family(model_dir)
    info = model_dir / EXPORT_INFO
    resolution = json.loads(info.read_text()).get("resolution") if info.is_file() else None
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return FamilyPipeline(pipe, family, resolution)
