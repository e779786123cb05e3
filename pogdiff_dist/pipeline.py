"""The exported model: a diffusers pipeline directory (safetensors) that generates images.

:func:`export_pipeline` writes, for a model fine-tuned from a Stable Diffusion layout, a plain
``StableDiffusionPipeline`` directory (``DiffusionPipeline.from_pretrained`` and
``StableDiffusionPipeline.from_pretrained`` load it, as any tool or hub does); for a
pixel-space model (no VAE) a ``PoGDiffPipeline``, this project's class. :func:`load_pipeline`
loads either (and a LoRA adapter on top) as a ``PoGDiffPipeline``, whose sampling encodes
captions exactly as training did (:class:`pogdiff_dist.models.TextEncoder`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pogdiff_dist.families.pipeline import load_family_pipeline
from pogdiff_dist.families.spec import FAMILIES
from pogdiff_dist.models import TextEncoder

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
FAMILY_PIPELINES = {f.pipeline_class for f in FAMILIES.values() if f.name != "sd"}


class PoGDiffPipeline(DiffusionPipeline):
    _optional_components = ["vae"]  # noqa: RUF012 - diffusers reads this class attribute as a list

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, max_length: int = 77):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(max_length=max_length)

    def _text(self) -> TextEncoder:
        return TextEncoder.from_parts(self.text_encoder, self.tokenizer, self.config.max_length)

    @torch.no_grad()
    def __call__(self, prompts: list[str], num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None) -> np.ndarray:
        """uint8 images [len(prompts) * num_images_per_prompt, H, W, C] (prompt-major).

        Runs on the UNet's device, the networks in their dtype (``load_pipeline(d, "cuda",
        dtype=torch.bfloat16)``). The initial noise is drawn in fp32 with ``generator`` (a CPU
        generator keeps a seed's images the same on every device and dtype), and the sampler's
        state ``x`` and the guided noise prediction stay fp32 whatever the networks' dtype, so
        the DDIM updates are not rounded to bf16 step after step."""
        text = self._text()
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        cond, _ = text.encode(prompts)
        uncond, _ = text.encode([""] * len(prompts))
        dtype, device = self.unet.dtype, self.unet.device
        size = self.unet.config.sample_size
        x = randn_tensor((len(prompts), self.unet.config.in_channels, size, size), generator=generator,
                         device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        context = torch.cat([uncond, cond]).to(dtype)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self.unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context).sample.float()
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return img


def export_pipeline(out_dir: str | Path, unet, train_scheduler, text_encoder: TextEncoder, vae=None) -> Path:
    """Write a loadable diffusers directory (safetensors weights, a DDIM scheduler)."""
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    if vae is not None:  # a latent (Stable Diffusion) model: the standard pipeline directory
        from diffusers import StableDiffusionPipeline

        tokenizer = text_encoder.tokenizer
        tokenizer.model_max_length = text_encoder.max_length  # captions are cut where training cut them
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.model, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = PoGDiffPipeline(unet=unet, scheduler=scheduler, text_encoder=text_encoder.model,
                               tokenizer=text_encoder.tokenizer, vae=None, max_length=text_encoder.max_length)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def load_pipeline(model_dir: str | Path, device: str | torch.device = "cpu", lora_dir: str | Path | None = None,
                  dtype: torch.dtype = torch.float32):
    """What :func:`export_pipeline` wrote (or a stock Stable Diffusion directory), as a
    ``PoGDiffPipeline`` on ``device`` with its weights in ``dtype`` (whatever the files hold);
    ``lora_dir``: a LoRA adapter in diffusers' format (``runs/<name>/lora``) loaded onto its UNet."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{model_dir} is not an exported model (no model_index.json); jobs/train.py writes "
                         f"one to runs/<name>/model")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name in FAMILY_PIPELINES:  # SDXL, SD3, Flux: the stock pipeline, called the same way
        pipe = load_family_pipeline(model_dir, dtype, lora_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    if class_name == PoGDiffPipeline.__name__:
        pipe = PoGDiffPipeline.from_pretrained(str(model_dir), torch_dtype=dtype)
    else:
        sd = DiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype)
        pipe = PoGDiffPipeline(unet=sd.unet, scheduler=sd.scheduler, text_encoder=sd.text_encoder,
                               tokenizer=sd.tokenizer, vae=getattr(sd, "vae", None),
                               max_length=min(sd.tokenizer.model_max_length, 512))  # some tokenizers say 1e30
    if lora_dir is not None:
        pipe.unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_WEIGHTS)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)  # dtype at loading: diffusers warns about casting a loaded model with to()


def image_grid(images: np.ndarray, rows: int, labels: list[str] | None = None, scale: int = 3) -> Image.Image:
    """Tile [N, H, W, C] uint8 images into a grid (one row per prompt), with row labels."""
    from PIL import ImageDraw

    n, h, w, c = images.shape
    cols = int(np.ceil(n / rows))
    label_w = 160 if labels else 0
    grid = Image.new("RGB", (label_w + cols * w * scale, rows * h * scale), "white")
    for i, im in enumerate(images):
        tile = Image.fromarray(im[..., 0] if c == 1 else im).convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (label_w + (i % cols) * w * scale, (i // cols) * h * scale))
    if labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(labels):
            draw.text((4, r * h * scale + 4), text, fill="black")
    return grid
