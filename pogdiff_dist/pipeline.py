"""The exported model: a diffusers ``DiffusionPipeline`` (safetensors) that generates images.

``PoGDiffPipeline.from_pretrained(dir)`` loads what :func:`export_pipeline` writes: the
fine-tuned UNet, a DDIM scheduler, the frozen text encoder and tokenizer, and the VAE for
latent models (none for the pixel-space default). Captions are encoded exactly as in
training (:class:`pogdiff_dist.models.TextEncoder`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pogdiff_dist.models import TextEncoder


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

        Runs on the UNet's device (``pipe.to("cuda")``). The initial noise is drawn with
        ``generator`` (a CPU generator keeps a seed's images the same on every device)."""
        text = self._text()
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        cond, _ = text.encode(prompts)
        uncond, _ = text.encode([""] * len(prompts))
        dtype, device = self.unet.dtype, self.unet.device
        size = self.unet.config.sample_size
        x = randn_tensor((len(prompts), self.unet.config.in_channels, size, size), generator=generator,
                         device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        context = torch.cat([uncond, cond]).to(dtype)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return img


def export_pipeline(out_dir: str | Path, unet, train_scheduler, text_encoder: TextEncoder, vae=None) -> Path:
    """Write a loadable diffusers directory (safetensors weights)."""
    pipe = PoGDiffPipeline(unet=unet, scheduler=DDIMScheduler.from_config(train_scheduler.config),
                           text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer, vae=vae,
                           max_length=text_encoder.max_length)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


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
