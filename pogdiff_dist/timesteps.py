"""Noise levels for flow-matching training: s in (0, 1), x_t = (1 - s) x0 + s eps.

Two stages, as practitioners use them (SD3 paper, Sec. 3.1; diffusers' ``training_utils``):

1. a *density* over s: ``uniform``, ``logit_normal`` (s = sigmoid(n), n ~ N(mean, std); SD3's
   default mean 0, std 1), ``mode`` (mode_scale) or ``cosmap``;
2. a *shift* towards noise: fixed, s' = shift s / (1 + (shift - 1) s) (SD3 ships shift 3.0), or
   resolution-dependent as Flux does: mu grows linearly with the image sequence length and
   s' = exp(mu) / (exp(mu) + 1 / s - 1), the fixed shift with shift = exp(mu).

The first three densities draw exactly as ``compute_density_for_timestep_sampling`` does (same
torch calls, so the same values for the same generator); ``cosmap`` (which that function lacks)
is the SD3 paper's inverse-CDF map t = 1 - 1 / (tan(pi u / 2) + 1), whose density is what
``compute_loss_weighting_for_sd3("cosmap")`` weights by. s stays continuous: diffusers' scripts
floor u onto the scheduler's 1000-step grid (a difference of at most 1 / 1000 in u).

Every draw takes a ``torch.Generator`` and runs where it lives: nothing here reads a device
tensor on the host (it is called inside a GPU training step). The image sequence length for
the dynamic shift is a Python int, known from shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEMES = ("uniform", "logit_normal", "mode", "cosmap")


def sample_density(n: int, scheme: str, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1] [n] float32, drawn from the named density (before any shift)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(n,), device=device,
                                          generator=generator))
    u = torch.rand(size=(n,), device=device, generator=generator)
    if scheme == "uniform":
        return u
    if scheme == "mode":  # SD3 paper Eq. 20: f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "cosmap":  # SD3 paper Eq. 21: density 2 / (pi (1 - 2 t + 2 t^2))
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    raise ValueError(f"timestep sampling scheme must be one of {list(SCHEMES)}, got {scheme!r}")


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = shift s / (1 + (shift - 1) s): more weight on high noise for shift > 1 (SD3: 3.0)."""
    return shift * s / (1 + (shift - 1) * s)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu, linear in the image sequence length through (base_seq_len, base_shift) and
    (max_seq_len, max_shift): diffusers' ``calculate_shift`` (Flux pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def exponential_time_shift(s: torch.Tensor, mu: float, sigma: float = 1.0) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1 / s - 1) ** sigma): the scheduler's ``time_shift`` ("exponential").
    With sigma = 1 (as the scheduler calls it) this is :func:`shift_sigmas` with shift = exp(mu)."""
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** sigma)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Tokens the transformer sees for one latent: (H / p) (W / p) (Flux packs 2 x 2 patches)."""
    return (latent_height // patch_size) * (latent_width // patch_size)


@dataclass(frozen=True)
class TimestepSampling:
    """How a flow-matching step draws s: a density, then a shift (module docstring).

    ``shift`` is a fixed shift (1.0: none); ``dynamic_shift`` replaces it by exp(mu(image
    sequence length)) with the four Flux constants. :meth:`from_scheduler_config` reads what a
    model's own ``FlowMatchEulerDiscreteScheduler`` config says (SD3: shift 3.0; Flux: dynamic).
    """

    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"timestep sampling scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.dynamic_shift and self.max_seq_len <= self.base_seq_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must exceed base_seq_len ({self.base_seq_len})")

    @classmethod
    def from_scheduler_config(cls, config, **overrides) -> TimestepSampling:
        """The shift a model's flow-matching scheduler applies at inference, so training sees the
        noise levels sampling will visit; ``overrides`` set the density (and may replace the shift)."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        kw = {"shift": float(get("shift", 1.0)), "dynamic_shift": bool(get("use_dynamic_shifting", False))}
        if kw["dynamic_shift"]:
            kw |= {"base_shift": float(get("base_shift", 0.5)), "max_shift": float(get("max_shift", 1.15)),
                   "base_seq_len": int(get("base_image_seq_len", 256)), "max_seq_len": int(get("max_image_seq_len", 4096))}
        return cls(**(kw | overrides))

    def mu(self, seq_len: int) -> float:
        return flux_mu(seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               seq_len: int | None = None) -> torch.Tensor:
        """s [n] float32 on ``device``. ``seq_len``: the image sequence length (needed only with
        ``dynamic_shift``; see :func:`image_seq_len`)."""
        u = sample_density(n, self.scheme, generator, device, self.logit_mean, self.logit_std, self.mode_scale)
        if self.dynamic_shift:
            if seq_len is None:
                raise ValueError("dynamic_shift needs the image sequence length (seq_len)")
            return exponential_time_shift(u, self.mu(seq_len))
        return u if self.shift == 1.0 else shift_sigmas(u, self.shift)
