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

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers.training_utils import compute_snr

from pogdiff_dist.data.shards import Batch, HostBatch
from pogdiff_dist.devices import to_device
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
from pogdiff_dist.syncs import host_side

Stats = dict[str, "torch.Tensor | float"]


@dataclass
class StepPlan:
    """What a step decides on the host, before its batch reaches the device (see the module
    docstring). Tensors are CPU tensors until :meth:`to_device`; ``host_stats`` are floats."""

    dropped: torch.Tensor  # [B] bool: caption replaced by the empty caption's states
    active: torch.Tensor  # [A] long: rows that run the second-condition pass (y' or CBDM's y_other)
    psi: torch.Tensor | None = None  # [B] float32 (PoGDiff): 0 where no y' pass runs
    nbr: torch.Tensor | None = None  # [B] long (PoGDiff): the neighbour drawn, j ~ Cat(w)
    other: torch.Tensor | None = None  # [B] long (CBDM): the row whose condition is y'
    nbr_tokens: np.ndarray | None = None  # [A, L] the active rows' neighbour caption token ids (host)
    nbr_len: np.ndarray | None = None  # [A]
    host_stats: dict | None = None

    @property
    def num_active(self) -> int:
        return len(self.active)

    def to_device(self, device) -> StepPlan:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("dropped", "active", "psi", "nbr", "other"):
            if moved[name] is not None:
                moved[name] = to_device(moved[name], device)
        return StepPlan(**moved)


@dataclass
class Draws:
    """What every method shares: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the caption
    states with dropped captions replaced by the empty caption's, the regression target in the
    model's parametrization (eps, or v for v_prediction) and the min-SNR weight of the
    denoising term (ones when ``loss.snr_gamma`` is off)."""

    batch: Batch
    plan: StepPlan
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
        and ``loss.psi_den_source=identity_count`` (the manifest's ``train_counts``). ``uncond``:
        the empty caption's states, in the precision the shards store y in (so a dropped caption
        and a stored one differ only by what they say)."""
        self.cfg = loss_cfg
        self.scheduler = noise_scheduler
        if device is not None:  # every tensor the device half reads lives where the batch does
            noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
            uncond = uncond.to(device)
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
        return self.scheduler.config.prediction_type

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
        b, device = len(batch), batch.x0.device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        eps = torch.randn(batch.x0.shape, generator=generator, device=device)
        if self.cfg.noise_offset:  # a per-sample, per-channel shift of the noise (diffusers --noise_offset)
            eps = eps + self.cfg.noise_offset * torch.randn((b, eps.shape[1], 1, 1), generator=generator,
                                                            device=device)
        x_t = self.scheduler.add_noise(batch.x0, eps, t)
        y = batch.y.to(torch.float32)
        y = torch.where(plan.dropped[:, None, None], self.uncond.to(y)[None].expand_as(y), y)
        ac = self.scheduler.alphas_cumprod
        target = eps if self.prediction_type == "epsilon" else velocity(eps, batch.x0, t, ac)
        snr_weight = torch.ones(b, device=device)
        if self.cfg.snr_gamma is not None:
            snr_weight = min_snr_weights(compute_snr(self.scheduler, t), self.cfg.snr_gamma, self.prediction_type)
        return Draws(batch, plan, t, eps, x_t, y, plan.dropped, target, snr_weight)

    def denoise(self, pred: torch.Tensor, d: Draws) -> torch.Tensor:
        """The (min-SNR weighted) denoising term |pred - target|^2, [B]."""
        return d.snr_weight * vanilla_loss(pred, d.target)

    def eps(self, unet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps_theta(x, t, y): the one place inputs are cast to the compute dtype."""
        return unet(x.to(self.dtype), t, encoder_hidden_states=y.to(self.dtype)).sample

    def dual_forward(self, unet, d: Draws, y_other: torch.Tensor | None,
                     grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """eps(x_t, y) for every row, and the second prediction for every row: eps(x_t[a], y_other)
        on the plan's active rows a, ``pred.detach()`` elsewhere (a zero difference: no term).
        One UNet call on [x_t; x_t[a]] when the second half needs gradient, else that half
        without autograd. Whether a pass runs is the plan's (host) decision."""
        rows = d.plan.active
        if not d.plan.num_active:
            pred = self.eps(unet, d.x_t, d.t, d.y)
            return pred, pred.detach()
        if grad:
            out = self.eps(unet, torch.cat([d.x_t, d.x_t[rows]]), torch.cat([d.t, d.t[rows]]),
                           torch.cat([d.y.to(self.dtype), y_other.to(self.dtype)]))
            pred, second = out[:len(d)], out[len(d):]
        else:
            pred = self.eps(unet, d.x_t, d.t, d.y)
            with torch.no_grad():
                second = self.eps(unet, d.x_t[rows], d.t[rows], y_other)
        return pred, pred.detach().index_put((rows,), second)


# ----------------------------------------------------------------------------- the methods: (loss [B], stats)


def _vanilla(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    loss = step.denoise(step.eps(unet, d.x_t, d.t, d.y), d)
    return loss, {"loss_denoise": loss.mean().detach(), "loss_pog": 0.0}


def _pogdiff(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """Eq. 13 with the plan's neighbour and psi (Eq. 8-12, drawn on the host)."""
    plan = d.plan
    y_nb = step.nbr_states(plan.nbr_tokens, plan.nbr_len, d.x_t.device) if plan.num_active else None
    pred, pred_nb = step.dual_forward(unet, d, y_nb, grad=step.cfg.neighbor_grad == "full")
    loss, denoise, pog = pogdiff_loss(pred, pred_nb, d.target, plan.psi, denoise_weight=d.snr_weight)
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": (plan.psi * pog).mean().detach(),
                  "text_cache_hit_rate": step.nbr_states.hit_rate}


def _cbdm(step: DualConditionStep, unet, d: Draws, generator) -> tuple[torch.Tensor, Stats]:
    """CBDM: h = eps(x_t, y) and h' = eps(x_t, y') from one UNet call on [x_t; x_t], both with autograd.

    Data path: y' of sample i is the (pre-dropout) condition of another row j != i of
    the same shuffled micro-batch, j uniform among the other rows (drawn in the plan). With
    a uniformly shuffled stream this is a uniform draw from the dataset (CBDM's fine-tuning
    choice) that reuses already-encoded hidden states: no extra text-encoder pass. Rows
    whose caption was dropped (no condition to align) skip the y' half, as do all rows of a
    single-sample batch.
    """
    num_t, tau = step.scheduler.config.num_train_timesteps, step.cfg.cbdm_tau
    rows = d.plan.active
    pred, pred_other = step.dual_forward(unet, d, d.batch.y[d.plan.other[rows]])
    loss, denoise, reg = cbdm_loss(pred, pred_other, d.target, d.t, num_t, tau, denoise_weight=d.snr_weight)
    return loss, {"loss_denoise": denoise.mean().detach(), "loss_pog": reg.mean().detach()}


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
