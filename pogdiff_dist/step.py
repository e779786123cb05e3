"""One training step's forward: noise, the dual-condition UNet call, the loss.

Knows nothing about distribution: ``unet`` is any callable with the diffusers UNet
signature (a bare ``UNet2DConditionModel`` or a DeepSpeed engine wrapping one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pogdiff_dist.losses import log_density_normaliser, neighbour_weights, pogdiff_loss, psi_weights, vanilla_loss


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

    def to(self, device) -> "Batch":
        return Batch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})

    def __len__(self) -> int:
        return self.x0.shape[0]


class DualConditionStep:
    """Computes the loss of one micro-batch for the configured method.

    PoGDiff's two predictions eps(x_t, y) and eps(x_t, y') come from one UNet call on
    [x_t; x_t] with conditions [y; y'] (``neighbor_grad="full"``), or from a y pass with
    autograd plus a y' pass without it (``"stop"``): batching the y' half and detaching
    would still pay its backward. Samples with psi = 0 (or a dropped caption) skip y'.
    """

    def __init__(self, loss_cfg, noise_scheduler, text_encoder, uncond: torch.Tensor,
                 all_elbo: torch.Tensor | None, caption_dropout: float = 0.0):
        self.cfg = loss_cfg
        self.scheduler = noise_scheduler
        self.text_encoder = text_encoder
        self.uncond = uncond  # [L, D] hidden states of the empty caption
        self.caption_dropout = caption_dropout
        self.log_norm = None
        if loss_cfg.method == "pogdiff":
            assert all_elbo is not None, "pogdiff needs the dataset's ELBOs to normalise psi_den"
            self.log_norm = log_density_normaliser(all_elbo, loss_cfg.den_temperature)

    def __call__(self, unet, batch: Batch, generator: torch.Generator, dtype=torch.float32):
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
            stats.update(loss_denoise=loss.mean().item(), loss_pog=0.0)
            return loss.mean(), stats

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
            y_nb, _ = self.text_encoder.encode_ids(batch.nbr_tokens[active, j[active]], batch.nbr_len[active, j[active]])
            y_nb = y_nb.to(dtype)
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
            loss_denoise=denoise.mean().item(),
            loss_pog=(psi * pog).mean().item(),
            psi_mean=psi.mean().item(),
            psi_max=psi.max().item(),
            psi_zero_frac=(psi == 0).float().mean().item(),
        )
        return loss.mean(), stats
