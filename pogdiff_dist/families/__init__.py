"""Model families (SD 1.x/2.x, SDXL, SD3, Flux): what each one is (:mod:`.spec`), how captions
become its conditioning (:mod:`.text`), its latent layout (:mod:`.latents`) and how its denoiser
is called (:mod:`.denoiser`). Tiny random models of each for tests: :mod:`.tiny`."""

from pogdiff_dist.families.denoiser import call_kwargs, model_timestep, predict, sdxl_time_ids
from pogdiff_dist.families.spec import FAMILIES, EncoderSpec, Family, check_components, detect_family, get_family
from pogdiff_dist.families.text import CaptionEncoder, Conditioning

__all__ = [
    "FAMILIES", "CaptionEncoder", "Conditioning", "EncoderSpec", "Family", "call_kwargs", "check_components",
    "detect_family", "get_family", "model_timestep", "predict", "sdxl_time_ids",
]
