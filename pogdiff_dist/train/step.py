"""One training step's forward: noise, the dual-condition UNet call, the loss.

Knows nothing about distribution: ``unet`` is any callable with the diffusers UNet
signature (a bare ``UNet2DConditionModel`` or a DeepSpeed engine wrapping one).

Every method draws the same t, eps and caption dropout first (:class:`Draws`), so a seed
gives every method the same x_t; then :data:`METHODS` maps ``loss.method`` to a function
returning the per-sample loss [B] and its stats. All UNet calls go through
:meth:`DualConditionStep.eps` (the one place inputs are cast to the compute dtype) and
the two-condition ones through :meth:`DualConditionStep.dual_forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_snr

from pogdiff_dist.data.shards import Batch
from pogdiff_dist.losses import (
    cbdm_loss,
    ddpm_posterior_mean,
    diffrop_overlap,
    eps_from_v,
    identity_count_density,
    identity_weights,
    log_density_normaliser,
    min_snr_weights,
    neighbour_weights,
    pogdiff_loss,
    psi_weights,
    t2h_loss,
    t2h_targets,
    vanilla_loss,
    velocity,
)
from pogdiff_dist.models import CaptionStateCache

Stats = dict[str, "torch.Tensor | float"]


@dataclass
class Draws:
    """What every method shares: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the caption
    states with dropped captions replaced by the empty caption's, the regression target in the
    model's parametrization (eps, or v for v_prediction) and the min-SNR weight of the
    denoising term (ones when ``loss.snr_gamma`` is off)."""

    batch: Batch
    t: torch.Tensor  # [B]
    eps: torch.Tensor  # [B, C, H, W]
    x_t: torch.Tensor  # [B, C, H, W]
    y: torch.Tensor  # [B, L, D] float32, after caption dropout
    dropped: torch.Tensor  # [B] bool
    target: torch.Tensor  # [B, C, H, W] eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0
    snr_weight: torch.Tensor  # [B]

    def __len__(self) -> int:
        return len(self.t)


class DualConditionStep:
    """Computes the loss of one micro-batch for the configured method.

    PoGDiff's two predictions eps(x_t, y) and eps(x_t, y') come from one UNet call on
    [x_t; x_t] with conditions [y; y'] (``neighbor_grad="full"``), or from a y pass with
    autograd plus a y' pass without it (``"stop"``): batching the y' half and detaching
    would still pay its backward. Samples with psi = 0 (or a dropped caption) skip y'.

    The baselines (METHOD.md "Baselines"): CBDM (one [x_t; x_t] call with [y; y']), T2H
    (one call, calibrated targets) and DiffROP (one call, pair penalty). Every method
    reports ``loss_denoise`` (|eps_theta(x_t, y) - eps|^2) and ``loss_pog`` (the rest of
    the objective, so loss = loss_denoise + loss_pog).
    """

    def __init__(self, loss_cfg, noise_scheduler, text_encoder, uncond: torch.Tensor,
                 all_elbo: torch.Tensor | None, caption_dropout: float = 0.0, text_cache_mib: float = 0.0,
                 device: torch.device | str | None = None, identity_counts: torch.Tensor | None = None):
        """``identity_counts`` [C]: training images per identity id, for ``loss.identity_weight``
        and ``loss.psi_den_source=identity_count`` (the manifest's ``train_counts``)."""
        self.cfg = loss_cfg
        self.scheduler = noise_scheduler
        if device is not None:  # every tensor the step reads lives where the batch does
            noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
            uncond = uncond.to(device)
        self.text_encoder = text_encoder
        # y' = the neighbour's caption through the frozen encoder: each distinct caption once.
        self.nbr_states = CaptionStateCache(text_encoder, text_cache_mib)
        self.uncond = uncond  # [L, D] hidden states of the empty caption
        self.caption_dropout = caption_dropout
        self.log_norm, self.counts, self.id_weight = None, None, None
        needs_counts = loss_cfg.identity_weight != "none" or (
            loss_cfg.method == "pogdiff" and loss_cfg.psi_den_source == "identity_count")
        if needs_counts:
            if identity_counts is None:
                raise ValueError("loss.identity_weight / loss.psi_den_source=identity_count need the identity counts "
                                 "(the manifest's train_counts)")
            self.counts = torch.as_tensor(identity_counts).to(device or "cpu")
            self.id_weight = identity_weights(self.counts, loss_cfg.identity_weight, loss_cfg.identity_weight_alpha)
        if loss_cfg.method == "pogdiff" and loss_cfg.psi_den_source == "identity_count":
            every = torch.repeat_interleave(torch.arange(len(self.counts), device=self.counts.device), self.counts.long())
            self.log_norm = log_density_normaliser(identity_count_density(self.counts, every), loss_cfg.den_temperature)
        elif loss_cfg.method == "pogdiff":
            assert all_elbo is not None, "pogdiff needs the dataset's ELBOs to normalise psi_den"
            self.log_norm = log_density_normaliser(all_elbo, loss_cfg.den_temperature)
            if device is not None:
                self.log_norm = self.log_norm.to(device)
        self.dtype = torch.float32

    def __call__(self, unet, batch: Batch, generator: torch.Generator, dtype=torch.float32):
        """(mean loss, stats) for one micro-batch. Stats are detached 0-d tensors (or floats),
        read only when a window is logged, so a GPU step is not synchronised for each of them."""
        self.dtype = dtype
        d = self.draw(batch, generator)
        loss, stats = METHODS[self.cfg.method](self, unet, d, generator)
        if self.id_weight is not None:  # loss.identity_weight: every method's per-sample loss, one place
            w = self.id_weight[batch.identity]
            loss = loss * w
            stats["identity_weight_mean"] = w.mean().detach()
        return loss.mean(), stats

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def draw(self, batch: Batch, generator: torch.Generator) -> Draws:
        b, device = len(batch), batch.x0.device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        eps = torch.randn(batch.x0.shape, generator=generator, device=device)
        if self.cfg.noise_offset:  # a per-sample, per-channel shift of the noise (diffusers --noise_offset)
            eps = eps + self.cfg.noise_offset * torch.randn((b, eps.shape[1], 1, 1), generator=generator,
                                                            device=device)
        x_t = self.scheduler.add_noise(batch.x0, eps, t)
        y = batch.y.to(torch.float32)
        dropped = torch.rand(b, generator=generator, device=device) < self.caption_dropout
        y = torch.where(dropped[:, None, None], self.uncond.to(y)[None].expand_as(y), y)
        ac = self.scheduler.alphas_cumprod
        target = eps if self.prediction_type == "epsilon" else velocity(eps, batch.x0, t, ac)
        snr_weight = torch.ones(b, device=device)
        if self.cfg.snr_gamma is not None:
            snr_weight = min_snr_weights(compute_snr(self.scheduler, t), self.cfg.snr_gamma, self.prediction_type)
        return Draws(batch, t, eps, x_t, y, dropped, target, snr_weight)

    def denoise(self, pred: torch.Tensor, d: Draws) -> torch.Tensor:
        """The (min-SNR weighted) denoising term |pred - target|^2, [B]."""
        return d.snr_weight * vanilla_loss(pred, d.target)

    def eps(self, unet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps_theta(x, t, y): the one place inputs are cast to the compute dtype."""
        return unet(x.to(self.dtype), t, encoder_hidden_states=y.to(self.dtype)).sample

    def dual_forward(self, unet, d: Draws, rows: torch.Tensor, y_other: torch.Tensor | None,
                     grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps(x_t, y) for every row, and eps(x_t[rows], y_other) for ``rows``: one UNet call on
        [x_t; x_t[rows]] when the second half needs gradient, else that half without autograd."""
        if not rows.numel():
            return self.eps(unet, d.x_t, d.t, d.y), None
        if grad:
            out = self.eps(unet, torch.cat([d.x_t, d.x_t[rows]]), torch.cat([d.t, d.t[rows]]),
                           torch.cat([d.y.to(self.dtype), y_other.to(self.dtype)]))
            return out[:len(d)], out[len(d):]
        pred = self.eps(unet, d.x_t, d.t, d.y)
        with torch.no_grad():
            return pred, self.eps(unet, d.x_t[rows], d.t[rows], y_other)


# ----------------------------------------------------------------------------- the methods: (loss [B], stats)


def _vanilla(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    loss = step.denoise(step.eps(unet, d.x_t, d.t, d.y), d)
    return loss, {"loss_denoise": loss.mean().detach(), "loss_pog": 0.0}


def _pogdiff(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """Eq. 8-13: one neighbour j ~ Cat(w) over the first k, psi = psi_img * psi_den."""
    cfg, batch, b = step.cfg, d.batch, len(d)
    w = neighbour_weights(batch.nbr_sim, cfg.k)
    j = torch.multinomial(w, 1, generator=generator).squeeze(1)
    rows = torch.arange(b, device=j.device)
    # psi_den's input: the caption's ELBO (Eq. 11) or log n_id (loss.psi_den_source=identity_count)
    by_count = step.cfg.psi_den_source == "identity_count"
    density = identity_count_density(step.counts, batch.identity) if by_count else batch.elbo
    psi = psi_weights(
        batch.nbr_sim[rows, j], batch.nbr_same[rows, j], density, step.log_norm,
        a1=cfg.a1, a2=cfg.a2, a3=cfg.a3, den_temperature=cfg.den_temperature,
        use_psi_img=cfg.use_psi_img, use_psi_den=cfg.use_psi_den, psi_cap=cfg.psi_cap,
    )
    psi = torch.where(d.dropped, torch.zeros_like(psi), psi)
    active = (psi > 0).nonzero().squeeze(1)
    y_nb = None
    if active.numel():
        y_nb = step.nbr_states(batch.nbr_tokens[active, j[active]], batch.nbr_len[active, j[active]])
    pred, pred_nb = step.dual_forward(unet, d, active, y_nb, grad=cfg.neighbor_grad == "full")
    denoise = step.denoise(pred, d)
    pog = torch.zeros_like(denoise)
    if active.numel():  # the PoG term compares the two predictions, in the model's parametrization
        _, _, pog_act = pogdiff_loss(pred[active], pred_nb, d.target[active], psi[active])
        pog = pog.index_put((active,), pog_act)
    return denoise + psi * pog, {
        "loss_denoise": denoise.mean().detach(), "loss_pog": (psi * pog).mean().detach(),
        "psi_mean": psi.mean().detach(), "psi_max": psi.max().detach(),
        "psi_zero_frac": (psi == 0).float().mean().detach(), "text_cache_hit_rate": step.nbr_states.hit_rate,
        "psi": psi.detach()}  # per sample: the trainer's PsiRecord, not a logged mean


def _cbdm(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """CBDM: h = eps(x_t, y) and h' = eps(x_t, y') from one UNet call on [x_t; x_t], both with autograd.

    Data path: y' of sample i is the (pre-dropout) condition of another row j != i of
    the same shuffled micro-batch, j uniform among the other rows. With a uniformly
    shuffled stream this is a uniform draw from the dataset (CBDM's fine-tuning
    choice) that reuses already-encoded hidden states: no extra text-encoder pass.
    Rows whose caption was dropped (no condition to align) or with weight t / T * tau
    = 0 skip the y' half, as do all rows of a single-sample batch.
    """
    b, device = len(d), d.x_t.device
    num_t, tau = step.scheduler.config.num_train_timesteps, step.cfg.cbdm_tau
    other = torch.zeros(b, dtype=torch.long, device=device)
    if b > 1:
        other = (torch.arange(b, device=device) + torch.randint(1, b, (b,), generator=generator, device=device)) % b
    active = ((~d.dropped) & (d.t > 0) & (b > 1) & (tau > 0)).nonzero().squeeze(1)
    pred, pred_other = step.dual_forward(unet, d, active, d.batch.y[other[active]])
    denoise = step.denoise(pred, d)
    reg = torch.zeros_like(denoise)
    if active.numel():
        _, _, reg_act = cbdm_loss(pred[active], pred_other, d.target[active], d.t[active], num_t, tau)
        reg = reg.index_put((active,), reg_act)
    return denoise + reg, {"loss_denoise": denoise.mean().detach(), "loss_pog": reg.mean().detach(),
                           "cbdm_active_frac": active.numel() / b}


def _t2h(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """T2H: targets recalibrated towards denser-captioned batch samples (no gradient), then one UNet call.

    The selection looks only at images (x_t, x0) and stored ELBOs, so it is applied
    to dropped-caption rows too, as T2H also calibrates unconditional training.
    """
    ac = step.scheduler.alphas_cumprod
    target, j, transferred = t2h_targets(d.batch.x0, d.x_t, d.eps, d.t, ac, d.batch.elbo, generator)
    if step.prediction_type == "v_prediction":  # eps~ maps x0_j to x_t: its v is against x0_j
        x0_src = torch.where(transferred.view(-1, *[1] * (d.x_t.ndim - 1)), d.batch.x0[j], d.batch.x0)
        target = velocity(target, x0_src, d.t, ac)
    loss, denoise, calibration = t2h_loss(step.eps(unet, d.x_t, d.t, d.y), d.target, target)
    loss, denoise, calibration = (d.snr_weight * x for x in (loss, denoise, calibration))
    rows = torch.arange(len(d), device=j.device)
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": calibration.mean().detach(),
                  "t2h_other_frac": (j != rows).float().mean().detach(),  # drew another sample
                  "t2h_accept_frac": transferred.float().mean().detach()}  # ... and passed the density rule


def _diffrop(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """DiffROP: one UNet call; the overlap penalty pairs this micro-batch's samples of different identities.

    Dropped-caption rows are left out of every pair: their prediction is unconditional,
    so pushing it away from another identity's would not separate identities.
    """
    ids = d.batch.identity
    if ids is None:
        raise ValueError("loss.method='diffrop' needs batch.identity (identity_id from the shards' meta.json); "
                         "the batch has none")
    valid = ~d.dropped
    ac = step.scheduler.alphas_cumprod
    pred = step.eps(unet, d.x_t, d.t, d.y)
    eps_pred = pred if step.prediction_type == "epsilon" else eps_from_v(pred, d.x_t, d.t, ac)
    mu = ddpm_posterior_mean(d.x_t, eps_pred, d.t, ac)  # DiffROP's overlap acts on the posterior means
    overlap = diffrop_overlap(mu, ids, d.t, step.scheduler.config.num_train_timesteps, step.cfg.diffrop_tau,
                              step.cfg.diffrop_decay, valid)
    denoise = step.denoise(pred, d)
    loss = denoise + overlap
    has_partner = ((ids[:, None] != ids[None, :]) & valid[None, :]).any(1) & valid
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": overlap.mean().detach(),
                  "diffrop_partner_frac": has_partner.float().mean().detach()}


METHODS: dict[str, Callable[[DualConditionStep, object, Draws, torch.Generator], tuple[torch.Tensor, Stats]]] = {
    "vanilla": _vanilla, "pogdiff": _pogdiff, "cbdm": _cbdm, "t2h": _t2h, "diffrop": _diffrop}
