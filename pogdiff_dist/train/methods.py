"""The training objectives as one step computes them: ``loss.method`` -> a function
``(step, unet, draws, generator) -> (loss [B], stats)`` (METHOD.md: PoGDiff and its baselines).

``step`` is the :class:`~pogdiff_dist.train.step.DualConditionStep` (its ``eps``,
``dual_forward``, ``denoise``, neighbour-state cache and config). Every method reports
``loss_denoise`` (the weighted |pred - target|^2) and ``loss_pog`` (the rest of its objective,
so loss = loss_denoise + loss_pog). For a flow-matching family the same objectives act on
velocities (docs/OBJECTIVES.md): PoGDiff's term between v(x_t, y) and v(x_t, y') with psi
unchanged, CBDM's weight s instead of t / T, T2H's calibrated velocity, DiffROP on x0 = x_t - s v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pogdiff_dist.losses import (
    cbdm_loss,
    ddpm_posterior_mean,
    diffrop_overlap,
    eps_from_v,
    pogdiff_loss,
    t2h_loss,
    t2h_targets,
    velocity,
)
from pogdiff_dist.losses_flow import flow_t2h_targets, flow_x0
from pogdiff_dist.train.draws import Draws, Stats


def _vanilla(step, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    loss = step.denoise(step.eps(unet, d.x_t, d.t, d.y, d.pooled), d)
    return loss, {"loss_denoise": loss.mean().detach(), "loss_pog": 0.0}


def _pogdiff(step, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """Eq. 13 with the plan's neighbour and psi (Eq. 8-12, drawn on the host)."""
    plan = d.plan
    y_nb = step.nbr_states(plan.nbr_tokens, plan.nbr_len, d.x_t.device) if plan.num_active else (None, None)
    pred, pred_nb = step.dual_forward(unet, d, *y_nb, grad=step.cfg.neighbor_grad == "full")
    loss, denoise, pog = pogdiff_loss(pred, pred_nb, d.target, plan.psi, denoise_weight=d.snr_weight)
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": (plan.psi * pog).mean().detach(),
                  "text_cache_hit_rate": step.nbr_states.hit_rate}


def _cbdm(step, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """CBDM: h = eps(x_t, y) and h' = eps(x_t, y') from one UNet call on [x_t; x_t], both with autograd.

    Data path: y' of sample i is the (pre-dropout) condition of another row j != i of
    the same shuffled micro-batch, j uniform among the other rows (drawn in the plan). With
    a uniformly shuffled stream this is a uniform draw from the dataset (CBDM's fine-tuning
    choice) that reuses already-encoded hidden states: no extra text-encoder pass. Rows
    whose caption was dropped (no condition to align) skip the y' half, as do all rows of a
    single-sample batch. A flow family weighs the regulariser by s (t / T of a DDPM).
    """
    num_t = 1 if step.flow else step.scheduler.config.num_train_timesteps
    rows = d.plan.active
    other = d.plan.other[rows]
    pooled = d.batch.y_pooled[other] if d.pooled is not None else None
    pred, pred_other = step.dual_forward(unet, d, d.batch.y[other], pooled)
    loss, denoise, reg = cbdm_loss(pred, pred_other, d.target, d.t, num_t, step.cfg.cbdm_tau,
                                   denoise_weight=d.snr_weight)
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": reg.mean().detach()}


def _t2h(step, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """T2H: targets recalibrated towards denser-captioned batch samples (no gradient), then one UNet call.

    The selection looks only at images (x_t, x0) and stored ELBOs, so it is applied
    to dropped-caption rows too, as T2H also calibrates unconditional training.
    """
    if step.flow:
        target, j, transferred = flow_t2h_targets(d.batch.x0, d.x_t, d.target, d.t, d.batch.elbo, generator)
    else:
        ac = step.scheduler.alphas_cumprod
        target, j, transferred = t2h_targets(d.batch.x0, d.x_t, d.eps, d.t, ac, d.batch.elbo, generator)
        if step.prediction_type == "v_prediction":  # eps~ maps x0_j to x_t: its v is against x0_j
            x0_src = torch.where(transferred.view(-1, *[1] * (d.x_t.ndim - 1)), d.batch.x0[j], d.batch.x0)
            target = velocity(target, x0_src, d.t, ac)
    loss, denoise, calibration = t2h_loss(step.eps(unet, d.x_t, d.t, d.y, d.pooled), d.target, target)
    loss, denoise, calibration = (d.snr_weight * x for x in (loss, denoise, calibration))
    rows = torch.arange(len(d), device=j.device)
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": calibration.mean().detach(),
                  "t2h_other_frac": (j != rows).float().mean().detach(),  # drew another sample
                  "t2h_accept_frac": transferred.float().mean().detach()}  # ... and passed the density rule


def _diffrop(step, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """DiffROP: one UNet call; the overlap penalty pairs this micro-batch's samples of different identities.

    Dropped-caption rows are left out of every pair: their prediction is unconditional,
    so pushing it away from another identity's would not separate identities. A DDPM family
    compares posterior means, a flow family x0 predictions.
    """
    ids = d.batch.identity
    if ids is None:
        raise ValueError("loss.method='diffrop' needs batch.identity (identity_id from the shards' meta.json); "
                         "the batch has none")
    valid = ~d.dropped
    pred = step.eps(unet, d.x_t, d.t, d.y, d.pooled)
    if step.flow:
        overlap = diffrop_overlap(flow_x0(d.x_t, pred, d.t), ids, d.t.float(), 1, step.cfg.diffrop_tau,
                                  step.cfg.diffrop_decay, valid)
    else:
        ac = step.scheduler.alphas_cumprod
        eps_pred = pred if step.prediction_type == "epsilon" else eps_from_v(pred, d.x_t, d.t, ac)
        mu = ddpm_posterior_mean(d.x_t, eps_pred, d.t, ac)  # DiffROP's overlap acts on the posterior means
        overlap = diffrop_overlap(mu, ids, d.t, step.scheduler.config.num_train_timesteps, step.cfg.diffrop_tau,
                                  step.cfg.diffrop_decay, valid)
    denoise = step.denoise(pred, d)
    has_partner = ((ids[:, None] != ids[None, :]) & valid[None, :]).any(1) & valid
    return denoise + overlap, {"loss_denoise": denoise.mean().detach(), "loss_pog": overlap.mean().detach(),
                               "diffrop_partner_frac": has_partner.float().mean().detach()}


METHODS: dict[str, Callable[..., tuple[torch.Tensor, Stats]]] = {
    "vanilla": _vanilla, "pogdiff": _pogdiff, "cbdm": _cbdm, "t2h": _t2h, "diffrop": _diffrop}
