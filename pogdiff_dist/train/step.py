"""One training step's forward: noise, the dual-condition UNet call, the loss.

Knows nothing about distribution: ``unet`` is any callable with the diffusers UNet
signature (a bare ``UNet2DConditionModel`` or a DeepSpeed engine wrapping one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pogdiff_dist.losses import (
    cbdm_loss,
    diffrop_loss,
    log_density_normaliser,
    neighbour_weights,
    pogdiff_loss,
    psi_weights,
    t2h_loss,
    t2h_targets,
    vanilla_loss,
)
from pogdiff_dist.models import CaptionStateCache


@dataclass
class Batch:
    """A collated micro-batch (see ``pogdiff_dist.data.shards`` for the on-disk fields)."""

    x0: torch.Tensor  # [B, C, H, W] latents or pixels
    y: torch.Tensor  # [B, L, D] caption hidden states
    nbr_tokens: torch.Tensor  # [B, K, L] neighbours' caption token ids
    nbr_len: torch.Tensor  # [B, K]
    nbr_sim: torch.Tensor  # [B, K] cosine similarity, descending
    nbr_same: torch.Tensor  # [B, K] 1 where the neighbour has the same identity
    elbo: torch.Tensor  # [B] text-density ELBO of the sample's caption
    index: torch.Tensor  # [B] dataset index
    identity: torch.Tensor | None = None  # [B] identity id (DiffROP pairs samples of different identities)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})

    def pin_memory(self) -> "Batch":
        return Batch(**{k: None if v is None else v.pin_memory() for k, v in vars(self).items()})

    def __len__(self) -> int:
        return self.x0.shape[0]


class DualConditionStep:
    """Computes the loss of one micro-batch for the configured method.

    PoGDiff's two predictions eps(x_t, y) and eps(x_t, y') come from one UNet call on
    [x_t; x_t] with conditions [y; y'] (``neighbor_grad="full"``), or from a y pass with
    autograd plus a y' pass without it (``"stop"``): batching the y' half and detaching
    would still pay its backward. Samples with psi = 0 (or a dropped caption) skip y'.

    The baselines (METHOD.md "Baselines") share the same draws of t, eps and caption
    dropout, so a seed gives every method the same x_t: CBDM (one [x_t; x_t] call with
    [y; y']), T2H (one call, calibrated targets) and DiffROP (one call, pair penalty).
    Every method reports ``loss_denoise`` (|eps_theta(x_t, y) - eps|^2) and ``loss_pog``
    (the rest of the objective, so loss = loss_denoise + loss_pog).
    """

    def __init__(self, loss_cfg, noise_scheduler, text_encoder, uncond: torch.Tensor,
                 all_elbo: torch.Tensor | None, caption_dropout: float = 0.0, text_cache_mib: float = 0.0,
                 device: torch.device | str | None = None):
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
        self.log_norm = None
        if loss_cfg.method == "pogdiff":
            assert all_elbo is not None, "pogdiff needs the dataset's ELBOs to normalise psi_den"
            self.log_norm = log_density_normaliser(all_elbo, loss_cfg.den_temperature)
            if device is not None:
                self.log_norm = self.log_norm.to(device)

    def __call__(self, unet, batch: Batch, generator: torch.Generator, dtype=torch.float32):
        """(mean loss, stats) for one micro-batch. Stats are detached 0-d tensors (or floats),
        read only when a window is logged, so a GPU step is not synchronised for each of them."""
        b = len(batch)
        device = batch.x0.device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        eps = torch.randn(batch.x0.shape, generator=generator, device=device)
        x_t = self.scheduler.add_noise(batch.x0, eps, t)
        y = batch.y.to(torch.float32)
        dropped = torch.rand(b, generator=generator, device=device) < self.caption_dropout
        y = torch.where(dropped[:, None, None], self.uncond.to(y)[None].expand_as(y), y)

        stats: dict[str, float] = {}
        if self.cfg.method == "vanilla":
            pred = unet(x_t.to(dtype), t, encoder_hidden_states=y.to(dtype)).sample
            loss = vanilla_loss(pred, eps)
            stats.update(loss_denoise=loss.mean().detach(), loss_pog=0.0)
            return loss.mean(), stats
        if self.cfg.method == "cbdm":
            return self._cbdm(unet, batch, generator, dtype, x_t, t, eps, y, dropped)
        if self.cfg.method == "t2h":
            return self._t2h(unet, batch, generator, dtype, x_t, t, eps, y)
        if self.cfg.method == "diffrop":
            return self._diffrop(unet, batch, dtype, x_t, t, eps, y, dropped)
        assert self.cfg.method == "pogdiff", self.cfg.method

        # Draw one neighbour per sample from Cat(w) over the first k (Eq. 8).
        w = neighbour_weights(batch.nbr_sim, self.cfg.k)
        j = torch.multinomial(w, 1, generator=generator).squeeze(1)
        rows = torch.arange(b, device=device)
        psi = psi_weights(
            batch.nbr_sim[rows, j], batch.nbr_same[rows, j], batch.elbo, self.log_norm,
            a1=self.cfg.a1, a2=self.cfg.a2, a3=self.cfg.a3, den_temperature=self.cfg.den_temperature,
            use_psi_img=self.cfg.use_psi_img, use_psi_den=self.cfg.use_psi_den, psi_cap=self.cfg.psi_cap,
        )
        psi = torch.where(dropped, torch.zeros_like(psi), psi)
        active = (psi > 0).nonzero().squeeze(1)
        n_act = active.numel()

        pred_nb = None
        if n_act:
            y_nb = self.nbr_states(batch.nbr_tokens[active, j[active]], batch.nbr_len[active, j[active]]).to(dtype)
        if n_act and self.cfg.neighbor_grad == "full":
            out = unet(torch.cat([x_t, x_t[active]]).to(dtype), torch.cat([t, t[active]]),
                       encoder_hidden_states=torch.cat([y.to(dtype), y_nb])).sample
            pred, pred_nb = out[:b], out[b:]
        else:
            pred = unet(x_t.to(dtype), t, encoder_hidden_states=y.to(dtype)).sample
            if n_act:
                with torch.no_grad():
                    pred_nb = unet(x_t[active].to(dtype), t[active], encoder_hidden_states=y_nb).sample

        denoise = vanilla_loss(pred, eps)
        pog = torch.zeros_like(denoise)
        if n_act:
            _, _, pog_act = pogdiff_loss(pred[active], pred_nb, eps[active], psi[active])
            pog = pog.index_put((active,), pog_act)
        loss = denoise + psi * pog
        stats.update(
            loss_denoise=denoise.mean().detach(),
            loss_pog=(psi * pog).mean().detach(),
            psi_mean=psi.mean().detach(),
            psi_max=psi.max().detach(),
            psi_zero_frac=(psi == 0).float().mean().detach(),
            text_cache_hit_rate=self.nbr_states.hit_rate,
        )
        return loss.mean(), stats

    def _cbdm(self, unet, batch, generator, dtype, x_t, t, eps, y, dropped):
        """CBDM: h = eps(x_t, y) and h' = eps(x_t, y') from one UNet call on [x_t; x_t], both with autograd.

        Data path: y' of sample i is the (pre-dropout) condition of another row j != i of
        the same shuffled micro-batch, j uniform among the other rows. With a uniformly
        shuffled stream this is a uniform draw from the dataset (CBDM's fine-tuning
        choice) that reuses already-encoded hidden states: no extra text-encoder pass.
        Rows whose caption was dropped (no condition to align) or with weight t / T * tau
        = 0 skip the y' half, as do all rows of a single-sample batch.
        """
        b, device = len(batch), batch.x0.device
        num_t = self.scheduler.config.num_train_timesteps
        other = torch.zeros(b, dtype=torch.long, device=device)
        if b > 1:
            other = (torch.arange(b, device=device) + torch.randint(1, b, (b,), generator=generator, device=device)) % b
        active = ((~dropped) & (t > 0) & (b > 1) & (self.cfg.cbdm_tau > 0)).nonzero().squeeze(1)
        n_act = active.numel()
        if n_act:
            y_other = batch.y[other[active]].to(dtype)
            out = unet(torch.cat([x_t, x_t[active]]).to(dtype), torch.cat([t, t[active]]),
                       encoder_hidden_states=torch.cat([y.to(dtype), y_other])).sample
            pred, pred_other = out[:b], out[b:]
        else:
            pred = unet(x_t.to(dtype), t, encoder_hidden_states=y.to(dtype)).sample
        denoise = vanilla_loss(pred, eps)
        reg = torch.zeros_like(denoise)
        if n_act:
            _, _, reg_act = cbdm_loss(pred[active], pred_other, eps[active], t[active], num_t, self.cfg.cbdm_tau)
            reg = reg.index_put((active,), reg_act)
        loss = denoise + reg
        stats = dict(loss_denoise=denoise.mean().detach(), loss_pog=reg.mean().detach(), cbdm_active_frac=n_act / b)
        return loss.mean(), stats

    def _t2h(self, unet, batch, generator, dtype, x_t, t, eps, y):
        """T2H: targets recalibrated towards denser-captioned batch samples (no gradient), then one UNet call.

        The selection looks only at images (x_t, x0) and stored ELBOs, so it is applied
        to dropped-caption rows too, as T2H also calibrates unconditional training.
        """
        target, j, transferred = t2h_targets(
            batch.x0, x_t, eps, t, self.scheduler.alphas_cumprod, batch.elbo, generator)
        pred = unet(x_t.to(dtype), t, encoder_hidden_states=y.to(dtype)).sample
        loss, denoise, calibration = t2h_loss(pred, eps, target)
        rows = torch.arange(len(batch), device=j.device)
        stats = dict(
            loss_denoise=denoise.mean().detach(),
            loss_pog=calibration.mean().detach(),
            t2h_other_frac=(j != rows).float().mean().detach(),  # drew another sample
            t2h_accept_frac=transferred.float().mean().detach(),  # ... and passed the density rule
        )
        return loss.mean(), stats

    def _diffrop(self, unet, batch, dtype, x_t, t, eps, y, dropped):
        """DiffROP: one UNet call; the overlap penalty pairs this micro-batch's samples of different identities.

        Dropped-caption rows are left out of every pair: their prediction is unconditional,
        so pushing it away from another identity's would not separate identities.
        """
        if batch.identity is None:
            raise ValueError("loss.method='diffrop' needs batch.identity (identity_id from the shards' meta.json); "
                             "the batch has none")
        pred = unet(x_t.to(dtype), t, encoder_hidden_states=y.to(dtype)).sample
        valid = ~dropped
        loss, denoise, overlap = diffrop_loss(
            pred, eps, x_t, t, batch.identity, self.scheduler.alphas_cumprod, self.scheduler.config.num_train_timesteps,
            self.cfg.diffrop_tau, self.cfg.diffrop_decay, valid=valid,
        )
        ids = batch.identity
        has_partner = ((ids[:, None] != ids[None, :]) & valid[None, :]).any(1) & valid
        stats = dict(loss_denoise=denoise.mean().detach(), loss_pog=overlap.mean().detach(),
                     diffrop_partner_frac=has_partner.float().mean().detach())
        return loss.mean(), stats
