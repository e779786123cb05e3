"""One training step's forward: host-side draws, noise, the dual-condition UNet call, the loss.

Knows nothing about distribution: ``unet`` is any callable with the diffusers UNet
signature (a bare ``UNet2DConditionModel`` or a DeepSpeed engine wrapping one).

A step has two halves. :meth:`DualConditionStep.plan` runs on the host, on the host batch
(numpy), with a host generator: which captions are dropped, each sample's neighbour and psi,
which rows run the second-condition pass, CBDM's partner rows. Every choice that sets a
tensor's shape is made there, so the device half never has to tell the host a size (a
boolean mask's ``nonzero`` on a GPU waits for the GPU). The device half draws t and eps
with the device generator (:class:`Draws`: every method the same x_t for a seed), then
:data:`METHODS` maps ``loss.method`` to a function returning the per-sample loss [B] and
its stats. All UNet calls go through :meth:`DualConditionStep.eps` (the one place inputs are
cast to the compute dtype) and the two-condition ones through :meth:`DualConditionStep.dual_forward`.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from pogdiff_dist.config.sections import DDPM_KEYS, FLOW_KEYS, LossConfig
from pogdiff_dist.data.shards import Batch, HostBatch
from pogdiff_dist.families.denoiser import predict
from pogdiff_dist.families.text import Conditioning
from pogdiff_dist.losses import (
    identity_count_density,
    identity_weights,
    log_density_normaliser,
    min_snr_weights,
    neighbour_weights,
    psi_weights,
    vanilla_loss,
    velocity,
)
from pogdiff_dist.losses_flow import flow_loss_weights, flow_noisy, flow_velocity
from pogdiff_dist.models import CaptionStateCache
from pogdiff_dist.syncs import host_side
from pogdiff_dist.timesteps import TimestepSampling, image_seq_len
from pogdiff_dist.train.draws import Draws, StepPlan
from pogdiff_dist.train.methods import METHODS

__all__ = ["METHODS", "Draws", "DualConditionStep", "StepPlan", "check_family_settings"]


def check_family_settings(loss_cfg, family) -> None:
    """A loss setting that does not apply to the model's family is an error naming it: the
    flow-matching keys (``loss.timestep_sampling``...) for a DDPM family, min-SNR for a flow one."""
    default = LossConfig()
    flow = family is not None and family.objective == "flow"
    unused = DDPM_KEYS if flow else FLOW_KEYS
    changed = [k for k in unused if getattr(loss_cfg, k) != getattr(default, k)]
    if changed:
        kind = "a flow-matching" if flow else "a DDPM"
        name = family.name if family is not None else "pixel-space"
        raise ValueError(f"{', '.join(f'loss.{k}' for k in changed)} does not apply to {kind} model ({name}): "
                         f"leave it at its default")


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
                 device: torch.device | str | None = None, identity_counts: torch.Tensor | None = None,
                 family=None, uncond_pooled: torch.Tensor | None = None):
        """``identity_counts`` [C]: training images per identity id, for ``loss.identity_weight``
        and ``loss.psi_den_source=identity_count`` (the manifest's ``train_counts``). ``uncond``
        (and ``uncond_pooled`` for SDXL / SD3 / Flux): the empty caption's states, in the
        precision the shards store y in (so a dropped caption and a stored one differ only by
        what they say). ``family``: SDXL / SD3 / Flux (their denoiser calls and, for SD3 / Flux,
        the flow-matching objective); None for SD 1.x/2.x and pixel-space models."""
        check_family_settings(loss_cfg, family)
        self.cfg = loss_cfg
        self.scheduler = noise_scheduler
        self.family = family
        self.flow = family is not None and family.objective == "flow"
        if self.flow:
            overrides = {k: getattr(loss_cfg, k) for k in ("logit_mean", "logit_std", "mode_scale")}
            overrides["scheme"] = loss_cfg.timestep_sampling
            if loss_cfg.flow_shift is not None:
                overrides.update(shift=loss_cfg.flow_shift, dynamic_shift=False)
            self.sampling = TimestepSampling.from_scheduler_config(noise_scheduler.config, **overrides)
        if device is not None:  # every tensor the device half reads lives where the batch does
            if not self.flow:
                noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
            uncond = uncond.to(device)
            uncond_pooled = None if uncond_pooled is None else uncond_pooled.to(device)
        self.uncond_pooled = uncond_pooled
        self.text_encoder = text_encoder
        # y' = the neighbour's caption through the frozen encoder: each distinct caption once.
        self.nbr_states = CaptionStateCache(text_encoder, text_cache_mib)
        self.uncond = uncond  # [L, D] hidden states of the empty caption
        self.caption_dropout = caption_dropout
        # host copies (CPU) for the plan; the identity weight also on the device for the loss
        self.log_norm, self.counts, self.id_weight = None, None, None
        needs_counts = loss_cfg.identity_weight != "none" or (
            loss_cfg.method == "pogdiff" and loss_cfg.psi_den_source == "identity_count")
        if needs_counts:
            if identity_counts is None:
                raise ValueError("loss.identity_weight / loss.psi_den_source=identity_count need the identity counts "
                                 "(the manifest's train_counts)")
            self.counts = torch.as_tensor(identity_counts).cpu()
            self.id_weight = identity_weights(self.counts, loss_cfg.identity_weight,
                                              loss_cfg.identity_weight_alpha).to(device or "cpu")
        if loss_cfg.method == "pogdiff" and loss_cfg.psi_den_source == "identity_count":
            every = torch.repeat_interleave(torch.arange(len(self.counts)), self.counts.long())
            self.log_norm = log_density_normaliser(identity_count_density(self.counts, every), loss_cfg.den_temperature)
        elif loss_cfg.method == "pogdiff":
            assert all_elbo is not None, "pogdiff needs the dataset's ELBOs to normalise psi_den"
            self.log_norm = log_density_normaliser(all_elbo.cpu(), loss_cfg.den_temperature)
        self.dtype = torch.float32

    def __call__(self, unet, batch: Batch, generator: torch.Generator, dtype=torch.float32,
                 plan: StepPlan | None = None, host_generator: torch.Generator | None = None):
        """(mean loss, stats) for one micro-batch on the device. Stats are detached 0-d tensors
        (or floats), read only when a window is logged. ``plan``: the host half's draws for this
        batch (:meth:`plan`); without one it is drawn here from the batch with ``host_generator``
        (default: a CPU generator seeded like ``generator``), as tests and benchmarks do."""
        self.dtype = dtype
        if plan is None:
            host_generator = host_generator or torch.Generator().manual_seed(generator.initial_seed())
            plan = self.plan(HostBatch.from_batch(batch), host_generator).to_device(batch.x0.device)
        d = self.draw(batch, plan, generator)
        loss, stats = METHODS[self.cfg.method](self, unet, d, generator)
        stats.update(plan.host_stats or {})
        if self.id_weight is not None:  # loss.identity_weight: every method's per-sample loss, one place
            w = self.id_weight[batch.identity]
            loss = loss * w
            stats["identity_weight_mean"] = w.mean().detach()
        return loss.mean(), stats

    @property
    def prediction_type(self) -> str:
        return "flow" if self.flow else self.scheduler.config.prediction_type

    @host_side
    def plan(self, batch: HostBatch, generator: torch.Generator) -> StepPlan:
        """The host half of a step (module docstring): caption dropout, then the method's own
        draws, all with the host ``generator``, on the host batch."""
        b = len(batch)
        dropped = torch.rand(b, generator=generator) < self.caption_dropout
        if self.cfg.method == "pogdiff":
            return self._plan_pogdiff(batch, dropped, generator)
        if self.cfg.method == "cbdm":
            other = torch.zeros(b, dtype=torch.long)
            if b > 1:
                other = (torch.arange(b) + torch.randint(1, b, (b,), generator=generator)) % b
            # t = 0 rows have CBDM weight t / T * tau = 0: they run the pass and add nothing
            active = ((~dropped) & (b > 1) & (self.cfg.cbdm_tau > 0)).nonzero().squeeze(1)
            return StepPlan(dropped, active, other=other, host_stats={"cbdm_active_frac": len(active) / b})
        return StepPlan(dropped, torch.zeros(0, dtype=torch.long))

    def _plan_pogdiff(self, batch: HostBatch, dropped: torch.Tensor, generator: torch.Generator) -> StepPlan:
        """Eq. 8-12 on the host: one neighbour j ~ Cat(w) over the first k, psi = psi_img * psi_den."""
        cfg, b = self.cfg, len(batch)
        sim, same = torch.from_numpy(batch.nbr_sim), torch.from_numpy(batch.nbr_same)
        j = torch.multinomial(neighbour_weights(sim, cfg.k), 1, generator=generator).squeeze(1)
        rows = torch.arange(b)
        # psi_den's input: the caption's ELBO (Eq. 11) or log n_id (loss.psi_den_source=identity_count)
        if cfg.psi_den_source == "identity_count":
            density = identity_count_density(self.counts, torch.from_numpy(batch.identity))
        else:
            density = torch.from_numpy(batch.elbo)
        psi = psi_weights(sim[rows, j], same[rows, j], density, self.log_norm, a1=cfg.a1, a2=cfg.a2, a3=cfg.a3,
                          den_temperature=cfg.den_temperature, use_psi_img=cfg.use_psi_img,
                          use_psi_den=cfg.use_psi_den, psi_cap=cfg.psi_cap)
        psi = torch.where(dropped, torch.zeros_like(psi), psi)
        active = (psi > 0).nonzero().squeeze(1)
        picked = j[active].numpy()
        return StepPlan(dropped, active, psi=psi, nbr=j,
                        nbr_tokens=batch.nbr_tokens[active.numpy(), picked], nbr_len=batch.nbr_len[active.numpy(), picked],
                        host_stats={"psi_mean": float(psi.mean()), "psi_max": float(psi.max()),
                                    "psi_zero_frac": float((psi == 0).float().mean()),
                                    "psi": psi})  # per sample, on the host: the trainer's PsiRecord

    def draw(self, batch: Batch, plan: StepPlan, generator: torch.Generator) -> Draws:
        """t (or s) and eps on the device generator, in that order, then x_t, the target, the
        weight, and the dropped captions replaced by the empty caption's states."""
        b, device = len(batch), batch.x0.device
        if self.flow:
            t = self.sampling.sample(b, generator, device, seq_len=image_seq_len(*batch.x0.shape[-2:]))
        else:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        eps = torch.randn(batch.x0.shape, generator=generator, device=device)
        if self.cfg.noise_offset:  # a per-sample, per-channel shift of the noise (diffusers --noise_offset)
            eps = eps + self.cfg.noise_offset * torch.randn((b, eps.shape[1], 1, 1), generator=generator,
                                                            device=device)
        y = batch.y.to(torch.float32)
        y = torch.where(plan.dropped[:, None, None], self.uncond.to(y)[None].expand_as(y), y)
        pooled = None
        if self.family is not None and self.family.pooled:
            if batch.y_pooled is None:
                raise ValueError(f"{self.family.name} reads a pooled caption vector but the shards hold none: "
                                 f"re-prepare with this model")
            pooled = batch.y_pooled.to(torch.float32)
            pooled = torch.where(plan.dropped[:, None], self.uncond_pooled.to(pooled)[None].expand_as(pooled), pooled)
        if self.flow:
            x_t, target = flow_noisy(batch.x0, eps, t), flow_velocity(eps, batch.x0)
            return Draws(batch, plan, t, eps, x_t, y, plan.dropped, target,
                         flow_loss_weights(t, self.cfg.flow_weighting), pooled)
        x_t = self.scheduler.add_noise(batch.x0, eps, t)
        ac = self.scheduler.alphas_cumprod
        target = eps if self.prediction_type == "epsilon" else velocity(eps, batch.x0, t, ac)
        snr_weight = torch.ones(b, device=device)
        if self.cfg.snr_gamma is not None:
            snr_weight = min_snr_weights(compute_snr(self.scheduler, t), self.cfg.snr_gamma, self.prediction_type)
        return Draws(batch, plan, t, eps, x_t, y, plan.dropped, target, snr_weight, pooled)

    def denoise(self, pred: torch.Tensor, d: Draws) -> torch.Tensor:
        """The (min-SNR weighted) denoising term |pred - target|^2, [B]."""
        return d.snr_weight * vanilla_loss(pred, d.target)

    def eps(self, unet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
            pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction at (x, t) under caption states y (and a pooled vector for
        SDXL / SD3 / Flux, called as its pipeline calls it): the one place inputs are cast to the
        compute dtype."""
        if self.family is None:
            return unet(x.to(self.dtype), t, encoder_hidden_states=y.to(self.dtype)).sample
        return predict(self.family, unet, x, t, Conditioning(y, pooled), dtype=self.dtype)

    def dual_forward(self, unet, d: Draws, y_other: torch.Tensor | None, pooled_other: torch.Tensor | None = None,
                     grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """eps(x_t, y) for every row, and the second prediction for every row: eps(x_t[a], y_other)
        on the plan's active rows a, ``pred.detach()`` elsewhere (a zero difference: no term).
        One UNet call on [x_t; x_t[a]] when the second half needs gradient, else that half
        without autograd. Whether a pass runs is the plan's (host) decision."""
        rows = d.plan.active
        if not d.plan.num_active:
            pred = self.eps(unet, d.x_t, d.t, d.y, d.pooled)
            return pred, pred.detach()
        if grad:
            pooled = None if d.pooled is None else torch.cat([d.pooled, pooled_other.to(d.pooled)])
            out = self.eps(unet, torch.cat([d.x_t, d.x_t[rows]]), torch.cat([d.t, d.t[rows]]),
                           torch.cat([d.y.to(self.dtype), y_other.to(self.dtype)]), pooled)
            pred, second = out[:len(d)], out[len(d):]
        else:
            pred = self.eps(unet, d.x_t, d.t, d.y, d.pooled)
            with torch.no_grad():
                second = self.eps(unet, d.x_t[rows], d.t[rows], y_other, pooled_other)
        return pred, pred.detach().index_put((rows,), second)


