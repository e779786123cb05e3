"""Training objectives as pure tensor math: one loss value per sample.

Weights such as psi plug in at one place, and every function can be checked against
a hand-written loop on CPU. Equation numbers refer to the PoGDiff papers (METHOD.md).
"""

from __future__ import annotations

import torch


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod.to(like.device, torch.float32)[t].view(-1, *[1] * (like.ndim - 1))


def velocity(eps: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022; diffusers' get_velocity)."""
    abar = _abar(alphas_cumprod, t, eps)
    return abar.sqrt() * eps.float() - (1 - abar).sqrt() * x0.float()


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t: the noise a v-prediction implies."""
    abar = _abar(alphas_cumprod, t, v)
    return abar.sqrt() * v.float() + (1 - abar).sqrt() * x_t.float()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v_prediction (diffusers' train_text_to_image)."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1 if prediction_type == "v_prediction" else snr)


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(|a - b|^2) over all but the batch dimension -> [B]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def vanilla_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Standard epsilon-prediction loss, [B]."""
    return per_sample_mse(eps_pred, eps)


def neighbour_weights(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Sampling weights w_j = max(s_j, 0) / sum max(s, 0) over the first k neighbours (Eq. 8).

    A row whose clipped similarities are all zero gets uniform weights: its psi_img is
    zero for any draw, so the draw only has to be valid.
    """
    s = sims[:, :k].float().clamp(min=0)
    total = s.sum(1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / s.shape[1])
    return torch.where(total > 0, s / total.clamp(min=1e-12), uniform)


def log_density_normaliser(elbo: torch.Tensor, temperature: float) -> torch.Tensor:
    """logmeanexp_j(-ELBO_j / T) over the whole dataset (a scalar)."""
    x = -elbo.double() / temperature
    return torch.logsumexp(x, 0) - torch.log(torch.tensor(float(x.numel()), dtype=torch.float64))


def psi_den(elbo: torch.Tensor, log_norm: torch.Tensor | float, a3: float,
            den_temperature: float = 1.0) -> torch.Tensor:
    """psi_den = exp(-ELBO_i / T - logmeanexp_j(-ELBO_j / T)) / a3 (Eq. 11, self-normalised), float64."""
    return (-elbo.double() / den_temperature - log_norm).exp() / a3


def identity_weights(counts: torch.Tensor, mode: str, alpha: float = 0.5) -> torch.Tensor:
    """Per-identity loss weight [C] for ``loss.identity_weight``: 1 (``none``), 1 / n_c
    (``inverse``), n_c ** (alpha - 1) (``power``), normalised so the mean over the training
    samples (identity c counted n_c times) is 1: sum_c n_c w_c / sum_c n_c = 1."""
    n = counts.double()
    if mode == "none":
        w = torch.ones_like(n)
    elif mode in ("inverse", "power"):
        w = n.clamp(min=1) ** ((0.0 if mode == "inverse" else alpha) - 1.0)
    else:
        raise ValueError(f"loss.identity_weight must be none, inverse or power, got {mode!r}")
    return (w * n.sum() / (n * w).sum()).float()


def identity_count_density(counts: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """What ``loss.psi_den_source=identity_count`` puts where Eq. 11 has the ELBO: log n_id
    per sample, so psi_den = exp(-log n / T - logmeanexp(-log n / T)) / a3 = n^(-1/T) / mean(n^(-1/T)) / a3."""
    return counts.double().clamp(min=1).log()[identity]


def psi_weights(
    sim: torch.Tensor,
    same_identity: torch.Tensor,
    elbo: torch.Tensor,
    log_norm: torch.Tensor | float,
    *,
    a1: float,
    a2: float,
    a3: float,
    den_temperature: float = 1.0,
    use_psi_img: bool = True,
    use_psi_den: bool = True,
    psi_cap: float | None = None,
) -> torch.Tensor:
    """psi = psi_img * psi_den (Eq. 9, 11, 12), per sample [B].

    psi_img = max(0, s) ** (a1 + a2 * [id_i != id_j])                 (Eq. 9)
    psi_den = exp(-ELBO_i / T - logmeanexp_j(-ELBO_j / T)) / a3       (Eq. 11, self-normalised)

    Self-normalising only rescales a3 (METHOD.md): with T = 1, psi_den is Eq. 11 times a
    dataset constant and averages to 1/a3. T > 1 and ``psi_cap`` are documented
    departures that compress psi's dynamic range; both are off by default.
    """
    psi = torch.ones_like(sim, dtype=torch.float32)
    if use_psi_img:
        exponent = a1 + a2 * (1.0 - same_identity.float())
        s = sim.float()
        # max(0, s) ** e, with a non-positive similarity giving 0 even when e == 0
        psi = psi * torch.where(s > 0, s.clamp(min=1e-12).pow(exponent), torch.zeros_like(s))
    if use_psi_den:
        psi = psi * psi_den(elbo, log_norm, a3, den_temperature).float()
    if psi_cap is not None:
        psi = psi.clamp(max=psi_cap)
    return psi


def pogdiff_loss(
    eps_pred: torch.Tensor, eps_pred_neighbour: torch.Tensor, eps: torch.Tensor, psi: torch.Tensor,
    denoise_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PoGDiff per-sample loss (Eq. 13 / Algorithm 1), returning (total, denoise, pog) each [B].

    total_i = w_i |eps_theta(x_t, y) - eps|^2 + psi_i |eps_theta(x_t, y) - eps_theta(x_t, y')|^2

    ``w`` is a per-sample weight of the denoising term (min-SNR; 1 when None); ``denoise`` is
    the weighted term. Whether the y' branch receives gradient is decided by the caller: pass
    a tensor computed under ``torch.no_grad()`` for ``neighbor_grad = "stop"``; a row whose
    y' pass was skipped (psi = 0) passes ``eps_pred.detach()`` there (its pog term is 0).
    """
    denoise = per_sample_mse(eps_pred, eps)
    if denoise_weight is not None:
        denoise = denoise_weight * denoise
    pog = per_sample_mse(eps_pred, eps_pred_neighbour)
    return denoise + psi * pog, denoise, pog


# ----------------------------------------------------------------------------- baselines (METHOD.md "Baselines")


def cbdm_loss(
    eps_pred: torch.Tensor, eps_pred_other: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
    num_train_timesteps: int, tau: float, denoise_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CBDM per-sample loss (Qin et al., CVPR 2023), returning (total, denoise, reg) each [B].

    total_i = |h - eps|^2 + (t_i / T) tau ( |h - sg(h')|^2 + 1/4 |sg(h) - h'|^2 )

    with h = eps_theta(x_t, y), h' = eps_theta(x_t, y') and sg = ``detach``. The stop-gradients
    split the regulariser: its first term moves only h (towards the other condition's
    prediction), the 1/4 term only h' (towards h). ``reg`` is the weighted regulariser, so
    total = denoise + reg; its forward value is (t / T) tau (5 / 4) |h - h'|^2. Both
    predictions must carry autograd for the two halves to act. ``denoise_weight``: as in
    :func:`pogdiff_loss`; a row without a y' pass passes ``eps_pred.detach()`` as h' (reg 0).
    """
    denoise = per_sample_mse(eps_pred, eps)
    if denoise_weight is not None:
        denoise = denoise_weight * denoise
    weight = t.float() / num_train_timesteps * tau
    reg = weight * (per_sample_mse(eps_pred, eps_pred_other.detach())
                    + 0.25 * per_sample_mse(eps_pred.detach(), eps_pred_other))
    return denoise + reg, denoise, reg


def _pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 summed over elements, [B, B'], via the Gram form (memory O(B B'), not O(B B' D))."""
    a, b = a.flatten(1), b.flatten(1)
    d = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp(min=0)


def t2h_select_probs(
    x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """T2H's selection distribution p(j | i) over the minibatch (Eq. 8 of T2H), [B, B], float64.

    p(j | i) = softmax_j( -|x_t,i / sqrt(abar_t_i) - x0_j|^2 / (2 sigma_t_i^2) ),  sigma^2 = 1 / abar - 1

    i.e. the posterior over the batch's clean samples of the VE-scaled noisy sample (a
    Gaussian kernel, so the norm is the full sum over elements). Computed in float64: near
    t = 0 the logits are ~1e8 in magnitude and the one-hot on j = i must survive rounding.
    """
    abar = alphas_cumprod.to(x_t.device, torch.float64)[t]
    scale = abar.sqrt().view(-1, *[1] * (x_t.ndim - 1))
    sigma2 = 1.0 / abar - 1.0
    logits = -_pairwise_sq_dist(x_t.double() / scale, x0.double()) / (2.0 * sigma2[:, None])
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def t2h_targets(
    x0: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
    elbo: torch.Tensor, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T2H calibrated targets (Algorithm 1 of T2H, ICLR 2024), returning (target, j, transferred).

    For each i draw j ~ p(j | i) (``t2h_select_probs``). The transfer is accepted only if
    the density of j's condition is at least that of i's: PoGDiff's adaptation compares the
    captions' text densities instead of class frequencies q(y). ``elbo`` is the text-density
    VAE's ELBO, a lower bound on log p(y), so *higher ELBO = denser caption* and the rule is
    elbo_j >= elbo_i. An accepted transfer replaces the noise target by

        eps~_i = (x_t,i - sqrt(abar_t) x0_j) / sqrt(1 - abar_t),

    the noise that would map x0_j to the same x_t; otherwise (and for j = i) it stays eps_i.
    Everything here is a fixed target: no gradient flows through the selection or eps~.
    target [B, ...] (eps's dtype), j [B] long, transferred [B] bool (j != i and accepted).
    """
    probs = t2h_select_probs(x_t, x0, t, alphas_cumprod)
    j = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    rows = torch.arange(len(j), device=j.device)
    transferred = (j != rows) & (elbo[j] >= elbo)
    abar = alphas_cumprod.to(x_t.device, torch.float32)[t].view(-1, *[1] * (x_t.ndim - 1))
    eps_tilde = (x_t.float() - abar.sqrt() * x0[j].float()) / (1.0 - abar).sqrt()
    target = torch.where(transferred.view(-1, *[1] * (x_t.ndim - 1)), eps_tilde.to(eps.dtype), eps)
    return target, j, transferred


def t2h_loss(
    eps_pred: torch.Tensor, eps: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T2H per-sample loss |eps_theta(x_t, y_i) - eps~_i|^2, returning (total, denoise, calibration) each [B].

    ``denoise`` is the plain loss against the sampled noise eps (comparable across methods)
    and ``calibration = total - denoise`` what the transferred targets change (zero for
    rows that kept eps_i, of either sign otherwise). ``target`` comes from ``t2h_targets``.
    """
    total = per_sample_mse(eps_pred, target)
    denoise = per_sample_mse(eps_pred, eps)
    return total, denoise, total - denoise


def ddpm_posterior_mean(
    x_t: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps_pred) / sqrt(alpha_t) (DDPM; Eq. 9 of DiffROP).

    alpha_t = abar_t / abar_{t-1} (abar_{-1} = 1), beta_t = 1 - alpha_t; float32.
    """
    abar = alphas_cumprod.to(x_t.device, torch.float32)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    alpha = (abar / abar_prev)[t]
    shape = (-1, *[1] * (x_t.ndim - 1))
    beta = (1.0 - alpha).view(shape)
    return (x_t.float() - beta / (1.0 - abar[t]).sqrt().view(shape) * eps_pred.float()) / alpha.sqrt().view(shape)


def diffrop_overlap(
    mu: torch.Tensor, identity: torch.Tensor, t: torch.Tensor, num_train_timesteps: int, tau: float, decay: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiffROP's overlap penalty per sample (reciprocal hinge form, Algorithm 1 of DiffROP), [B].

    overlap_i = tau(t_i) * mean_{j : id_j != id_i} 1 / (1 + d_ij),   tau(t) = tau exp(-decay t / T)
    d_ij = mean over elements of (mu_i - mu_j)^2

    Two decisions METHOD.md leaves open:
    - Attribution: sample i gets the *mean* over its different-identity partners (Algorithm
      1 sums), so the weight tau does not grow with the micro-batch size or with how many
      identities a batch happens to mix. Each unordered pair thus appears in two samples'
      terms, weighted by tau(t_i) and tau(t_j) respectively. A sample with no partner
      (or excluded by ``valid``) gets 0.
    - Norm scale: d_ij is a mean over elements, like ``per_sample_mse``. The paper's sum
      would be ~C H W times larger, making 1 / (1 + d) ~ 0 for any real latent; the mean
      keeps tau's meaning independent of resolution.
    No stop-gradient: the penalty pushes both mu_i and mu_j apart. ``valid`` [B] bool
    removes samples from all pairs (as themselves and as partners).
    """
    d = _pairwise_sq_dist(mu.float(), mu.float()) / mu[0].numel()
    pair = identity[:, None] != identity[None, :]
    if valid is not None:
        pair = pair & valid[:, None] & valid[None, :]
    n_partners = pair.sum(1)
    recip = torch.where(pair, 1.0 / (1.0 + d), torch.zeros_like(d))
    mean_recip = recip.sum(1) / n_partners.clamp(min=1)
    tau_t = tau * torch.exp(-decay * t.float() / num_train_timesteps)
    return tau_t * mean_recip
