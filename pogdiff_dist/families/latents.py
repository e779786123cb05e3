"""VAE latents as each family's denoiser sees them: scaling / shift, and Flux's 2 x 2 packing.

Training latents are z = (vae_mean - shift_factor) * scaling_factor (SD / SDXL have no shift:
0.18215 / 0.13025; SD3 1.5305, shift 0.0609; Flux 0.3611, shift 0.1159), and the pipelines
decode vae_latent = z / scaling_factor + shift_factor. Flux's transformer reads a latent
[B, C, H, W] as (H / 2)(W / 2) tokens of 4 C features (``FluxPipeline._pack_latents``), with
position ids (0, row, col) per token and all-zero ids for the text tokens.
"""

from __future__ import annotations

import torch


def vae_factors(vae_config) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE config; a missing / null shift is 0."""
    get = vae_config.get if hasattr(vae_config, "get") else lambda k, d=None: getattr(vae_config, k, d)
    return float(get("scaling_factor")), float(get("shift_factor", None) or 0.0)


def to_latents(vae_mean: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """The denoiser's latent space: (z - shift) * scale."""
    return (vae_mean - shift_factor) * scaling_factor


def from_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """Back to what the VAE decoder reads: z / scale + shift (the pipelines' decode)."""
    return latents / scaling_factor + shift_factor


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell along a side: 2 ** (number of VAE blocks - 1) (8 for the real VAEs)."""
    get = vae_config.get if hasattr(vae_config, "get") else lambda k, d=None: getattr(vae_config, k, d)
    return 2 ** (len(get("block_out_channels")) - 1)


def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2 x 2 latent patches: latent height and width must be even, got {h} x {w}")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H / 2)(W / 2), 4 C], as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    _check_even(h, w)
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H / 2)(W / 2), 4 C] -> [B, C, H, W] for latent ``height`` x ``width``: the inverse of
    :func:`pack_latents` (``FluxPipeline._unpack_latents`` takes pixel sizes instead)."""
    b, n, d = x.shape
    _check_even(height, width)
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"packed latents {tuple(x.shape)} do not fit a {height} x {width} latent")
    x = x.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids [(H / 2)(W / 2), 3] = (0, row, col) of the packed tokens of a latent
    ``height`` x ``width`` (``FluxPipeline._prepare_latent_image_ids(..., H // 2, W // 2, ...)``)."""
    _check_even(height, width)
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flux's text-token position ids [L, 3]: all zero."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
