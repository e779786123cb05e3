"""The training objectives for flow-matching models (SD3, Flux class): pure tensor math, one
loss value per sample [B], the velocity counterparts of :mod:`pogdiff_dist.losses`.

Rectified flow: x_t = (1 - s) x0 + s eps, s in (0, 1) (diffusers' "sigma"); the model predicts
the velocity v_theta(x_t, s, y) ~ v = eps - x0. At a fixed x_t a velocity v fixes both other
parametrizations: x0 = x_t - s v and eps = x_t + (1 - s) v. So two velocity predictions differ
by (1 - s)(v - v') in epsilon and by -s (v - v') in x0; and a velocity error e_v is an epsilon
error (1 - s) e_v and an x0 error -s e_v. docs/OBJECTIVES.md derives each form below.

s plays the role of t / T wherever an epsilon form weights by time (CBDM, DiffROP).
"""

from __future__ import annotations

import math

import torch

from pogdiff_dist.losses import cbdm_loss, diffrop_overlap, per_sample_mse, pogdiff_loss

WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
_S_MIN = 1e-6  # T2H divides by s; below this the batch posterior is one-hot on the sample itself


def _col(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """s [B] as [B, 1, ...] to broadcast against ``like``."""
    return s.view(-1, *[1] * (like.ndim - 1))


def flow_noisy(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s eps (float32)."""
    s = _col(s.float(), x0)
    return (1 - s) * x0.float() + s * eps.float()


def flow_velocity(eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The regression target v = eps - x0 = d x_t / d s."""
    return eps.float() - x0.float()


def flow_x0(x_t: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The clean sample a velocity implies at x_t: x0 = x_t - s v."""
    return x_t.float() - _col(s.float(), x_t) * v.float()


def flow_eps(x_t: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The noise a velocity implies at x_t: eps = x_t + (1 - s) v."""
    return x_t.float() + (1 - _col(s.float(), x_t)) * v.float()


def flow_loss_weights(s: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample weight w(s) [B] of the denoising term, as SD3 training weights it (diffusers'
    ``compute_loss_weighting_for_sd3``): ``none`` 1, ``sigma_sqrt`` s^-2, ``cosmap``
    2 / (pi (1 - 2 s + 2 s^2)) (uniform s weighted like cosmap-sampled s)."""
    s = s.float()
    if scheme == "none":
        return torch.ones_like(s)
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    raise ValueError(f"flow loss weighting must be one of {list(WEIGHTINGS)}, got {scheme!r}")


def flow_vanilla_loss(v_pred: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """w(s) |v_theta(x_t, y) - (eps - x0)|^2 per sample [B] (w = 1 when None)."""
    loss = per_sample_mse(v_pred, v)
    return loss if weight is None else weight * loss


def flow_pogdiff_loss(
    v_pred: torch.Tensor, v_pred_neighbour: torch.Tensor, v: torch.Tensor, psi: torch.Tensor,
    denoise_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PoGDiff (Eq. 13) for a velocity model, returning (total, denoise, pog) each [B]:

        total_i = w_i |v_theta(x_t, y) - v|^2 + psi_i |v_theta(x_t, y) - v_theta(x_t, y')|^2

    The PoG term is kept in velocity units, psi unchanged. In epsilon units both terms carry the
    same factor (1 - s)^2 (an epsilon error is (1 - s) times the velocity error, and so is an
    epsilon difference), so this total is Eq. 13 divided by (1 - s)^2: psi weighs the PoG term
    against the denoising term exactly as the paper does, at every s. The other candidate,
    psi (1 - s)^2 |v - v'|^2, is Eq. 13's PoG term verbatim, but next to the flow's velocity
    denoising term it shrinks psi by (1 - s)^2 (to nothing at high noise). ``w`` (a loss
    weighting, :func:`flow_loss_weights`) scales the denoising term only, as min-SNR does in
    the epsilon form; gradient through the y' half and rows without one: as :func:`pogdiff_loss`.
    """
    return pogdiff_loss(v_pred, v_pred_neighbour, v, psi, denoise_weight=denoise_weight)


def flow_cbdm_loss(
    v_pred: torch.Tensor, v_pred_other: torch.Tensor, v: torch.Tensor, s: torch.Tensor, tau: float,
    denoise_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CBDM with velocities in place of noises and s in place of t / T, returning (total, denoise, reg):

        total_i = w_i |h - v|^2 + s_i tau ( |h - sg(h')|^2 + 1/4 |sg(h) - h'|^2 ),  h = v_theta(x_t, y)

    The regulariser is between two predictions at one x_t, like PoGDiff's term, so it keeps
    velocity units for the same reason (see :func:`flow_pogdiff_loss`). Stop-gradients as in
    :func:`pogdiff_dist.losses.cbdm_loss`, which computes it with T = 1.
    """
    return cbdm_loss(v_pred, v_pred_other, v, s.float(), 1, tau, denoise_weight=denoise_weight)


def flow_t2h_select_probs(x_t: torch.Tensor, x0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """T2H's batch posterior for a flow, p(j | i) over the minibatch [B, B], float64:

        p(j | i) = softmax_j( -|x_t,i - (1 - s_i) x0_j|^2 / (2 s_i^2) )

    q(x_t | x0_j) = N((1 - s) x0_j, s^2 I), so with a uniform prior over the batch's clean
    samples this is the exact posterior of x_t,i (the Gaussian's normaliser depends on s_i
    alone and cancels). s is clamped to 1e-6: there the posterior is one-hot on i anyway.
    """
    s = s.double().clamp(min=_S_MIN)
    # |x_t,i - (1 - s_i) x0_j|^2 via the Gram form: memory O(B^2), not O(B^2 D)
    c = (1 - s)[:, None]
    a, b = x_t.double().flatten(1), x0.double().flatten(1)
    d = (a.pow(2).sum(1)[:, None] - 2 * c * (a @ b.T) + c**2 * b.pow(2).sum(1)[None, :]).clamp(min=0)
    return torch.softmax(-d / (2 * s[:, None] ** 2), dim=1)


@torch.no_grad()
def flow_t2h_targets(
    x0: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor, s: torch.Tensor, elbo: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T2H calibrated velocity targets, returning (target, j, transferred) as
    :func:`pogdiff_dist.losses.t2h_targets` does: j ~ :func:`flow_t2h_select_probs`, accepted
    when elbo_j >= elbo_i (the denser caption), and then

        v~_i = (x_t,i - x0_j) / s_i,

    the velocity along which x0_j reaches the same x_t (x0_j + s v~ = x_t; equivalently the
    noise eps~ = x0_j + v~ gives (1 - s) x0_j + s eps~ = x_t). Fixed targets: no gradient.
    """
    probs = flow_t2h_select_probs(x_t, x0, s)
    j = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    rows = torch.arange(len(j), device=j.device)
    transferred = (j != rows) & (elbo[j] >= elbo)
    sc = _col(s.float().clamp(min=_S_MIN), x_t)
    v_tilde = (x_t.float() - x0[j].float()) / sc
    target = torch.where(_col(transferred, x_t), v_tilde.to(v.dtype), v)
    return target, j, transferred


def flow_diffrop_loss(
    v_pred: torch.Tensor, v: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor, identity: torch.Tensor,
    tau: float, decay: float, valid: torch.Tensor | None = None, denoise_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffROP for a velocity model, returning (total, denoise, overlap) each [B]:

        total_i = w_i |v_theta - v|^2 + tau exp(-decay s_i) mean_{j: id_j != id_i} 1 / (1 + d_ij)
        d_ij = mean over elements of (x0_hat_i - x0_hat_j)^2,  x0_hat = x_t - s v_theta

    The pair term acts on the flow's x0 prediction, where the epsilon form uses the DDPM
    posterior mean mu_theta. mu_theta is an affine mix of x_t and x0_hat whose only model-
    dependent part is x0_hat; a flow has no posterior step of its own (its Euler step
    x_t - ds v depends on the sampler's step size), while x0_hat = E[x0 | x_t, y] under the
    model is step-free and in data units at every s. Pair attribution, norm scale and
    ``valid`` as in :func:`pogdiff_dist.losses.diffrop_overlap` (called with T = 1, t = s).
    """
    denoise = flow_vanilla_loss(v_pred, v, denoise_weight)
    overlap = diffrop_overlap(flow_x0(x_t, v_pred, s), identity, s.float(), 1, tau, decay, valid)
    return denoise + overlap, denoise, overlap


__all__ = [
    "WEIGHTINGS", "flow_cbdm_loss", "flow_diffrop_loss", "flow_eps", "flow_loss_weights",
    "flow_noisy", "flow_pogdiff_loss", "flow_t2h_select_probs", "flow_t2h_targets", "flow_vanilla_loss",
    "flow_velocity", "flow_x0",
]
