"""How each family's denoiser is called in training, from a batch of noisy latents, times and
caption conditions (as the diffusers pipelines and DreamBooth LoRA examples call them).

- sd:   unet(x, t, encoder_hidden_states=hidden)
- sdxl: unet(x, t, encoder_hidden_states=hidden,
             added_cond_kwargs={"text_embeds": pooled, "time_ids": [orig_h, orig_w, crop_top, crop_left, h, w]})
- sd3:  transformer(hidden_states=x, timestep=1000 s, encoder_hidden_states=hidden, pooled_projections=pooled)
- flux: transformer(hidden_states=pack(x), timestep=s, guidance=3.5 (if guidance_embeds),
                    pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=0 [L, 3],
                    img_ids=(0, row, col) [(H / 2)(W / 2), 3]), then unpacked
Every prediction comes back as [B, C, H, W], like the latents.
"""

from __future__ import annotations

import torch

from pogdiff_dist.families.latents import latent_image_ids, pack_latents, text_ids, unpack_latents
from pogdiff_dist.families.spec import Family
from pogdiff_dist.families.text import Conditioning


def model_config(model):
    """The diffusers config of a bare model or of a wrapper holding it as ``.module``. The wrapped
    model's comes first: a DeepSpeed engine has a ``config`` of its own (DeepSpeed's)."""
    return getattr(model, "module", model).config


def sdxl_time_ids(batch_size: int, original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                  target_size: tuple[int, int] | None = None, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning [B, 6] = original (h, w) + crop top-left (top, left) + target (h, w),
    in pixels (``_get_add_time_ids`` / the SDXL training script's ``compute_time_ids``). Without a
    target size the image was not resized: target = original. Per-sample sizes: build rows and
    ``torch.cat`` them."""
    target_size = target_size or original_size
    row = torch.tensor([[*original_size, *crop_top_left, *target_size]], device=device, dtype=dtype)
    return row.expand(batch_size, 6)


def model_timestep(family: Family, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser's ``timestep`` receives: the integer t (ddpm), or s * timestep_scale (flow)."""
    return t if family.objective == "ddpm" else t.float() * family.timestep_scale


def call_kwargs(family: Family, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *,
                time_ids: torch.Tensor | None = None, guidance: float | None = None) -> dict:
    """The keyword arguments of one denoiser call on latents ``x`` [B, C, H, W] at ``t`` [B]
    (integer t for ddpm families, s in (0, 1) for flow families).

    ``time_ids`` (SDXL) [B, 6]: default :func:`sdxl_time_ids` for an uncropped image the latent's
    size times 8 (the real VAEs' factor). ``guidance`` (Flux): the embedded guidance value, None
    for a transformer without ``guidance_embeds`` (see :func:`predict`, which decides).
    """
    b, _, h, w = x.shape
    if len(cond) != b or len(t) != b:
        raise ValueError(f"{b} latents, {len(t)} timesteps and {len(cond)} conditions: one of each per sample")
    if family.pooled and cond.pooled is None:
        raise ValueError(f"{family.name} conditions on a pooled caption vector: the conditioning has none")
    timestep = model_timestep(family, t)
    if family.name == "sd":
        return {"sample": x, "timestep": timestep, "encoder_hidden_states": cond.hidden}
    if family.name == "sdxl":
        if time_ids is None:
            time_ids = sdxl_time_ids(b, (h * 8, w * 8), device=x.device, dtype=x.dtype)
        return {"sample": x, "timestep": timestep, "encoder_hidden_states": cond.hidden,
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids.to(x.device, x.dtype)}}
    if family.name == "sd3":
        return {"hidden_states": x, "timestep": timestep, "encoder_hidden_states": cond.hidden,
                "pooled_projections": cond.pooled}
    if family.name == "flux":
        g = None if guidance is None else torch.full((b,), float(guidance), device=x.device, dtype=torch.float32)
        return {"hidden_states": pack_latents(x), "timestep": timestep, "guidance": g,
                "pooled_projections": cond.pooled, "encoder_hidden_states": cond.hidden,
                "txt_ids": text_ids(cond.hidden.shape[1], x.device, x.dtype),
                "img_ids": latent_image_ids(h, w, x.device, x.dtype)}
    raise ValueError(f"no denoiser call for family {family.name!r}")


def predict(family: Family, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *,
            time_ids: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The denoiser's prediction [B, C, H, W] (eps or v for ddpm families per the scheduler,
    v = eps - x0 for flow families). ``dtype``: the compute dtype the latents and conditions are
    cast to (the one place, as ``DualConditionStep.eps`` does); Flux's guidance is
    ``family.guidance`` when the transformer was distilled with it (``guidance_embeds``)."""
    if dtype is not None:
        x, cond = x.to(dtype), cond.to(dtype=dtype)
    guidance = family.guidance if model_config(model).get("guidance_embeds", False) else None
    out = model(**call_kwargs(family, x, t, cond, time_ids=time_ids, guidance=guidance)).sample
    return unpack_latents(out, x.shape[2], x.shape[3]) if family.packed else out
