"""Loading a family's parts from a pretrained directory (or a run's export), all with
``from_pretrained`` on local paths: the family of a directory, its denoiser, its training
noise schedule.

Stable Diffusion 1.x/2.x directories (``StableDiffusionPipeline``, or the bare SD layout
without a ``model_index.json``) and the pixel-space models keep the single-encoder path of
:mod:`pogdiff_dist.models`; :func:`multi_encoder_family` is None for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pogdiff_dist.families.spec import Family, detect_family, get_family


def family_of(pretrained: str | Path | None) -> Family | None:
    """The family of ``pretrained`` (None for a pixel-space model: no pretrained directory). A
    directory without ``model_index.json`` is read as the Stable Diffusion layout."""
    if pretrained is None:
        return None
    root = Path(pretrained)
    if not (root / "model_index.json").is_file():
        return get_family("sd")
    return detect_family(root)


def multi_encoder_family(pretrained: str | Path | None) -> Family | None:
    """SDXL, SD3 or Flux (the families :class:`~pogdiff_dist.families.text.CaptionEncoder`
    encodes for); None for SD 1.x/2.x and pixel-space models."""
    family = family_of(pretrained)
    return family if family is not None and family.name != "sd" else None


def denoiser_dir(family: Family, source: str | Path) -> Path:
    """The denoiser folder in ``source``: a pipeline directory (its ``unet/`` or ``transformer/``)
    or the denoiser's own folder (holding ``config.json``)."""
    source = Path(source)
    if (source / family.denoiser / "config.json").is_file():
        return source / family.denoiser
    if (source / "config.json").is_file():
        return source
    raise ValueError(f"{source} holds no {family.denoiser_class} (neither {family.denoiser}/config.json nor "
                     f"config.json)")


def load_denoiser(family: Family, source: str | Path) -> torch.nn.Module:
    """The family's denoiser from ``source`` (see :func:`denoiser_dir`), fp32 master weights
    whatever the file holds (the engine casts for bf16)."""
    import diffusers

    cls = getattr(diffusers, family.denoiser_class)
    return cls.from_pretrained(str(denoiser_dir(family, source)), torch_dtype=torch.float32)


def flow_scheduler(pretrained: str | Path):
    """The family's own flow-matching scheduler (its shift settings are the training sampling's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(Path(pretrained) / "scheduler"))


def export_class_name(model_dir: str | Path) -> str | None:
    index = Path(model_dir) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None
