"""Training objectives as pure tensor math: one loss value per sample.

Weights such as psi plug in at one place, and every function can be checked against
a hand-written loop on CPU. Equation numbers refer to the PoGDiff papers (METHOD.md).
"""

from __future__ import annotations

import torch


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
        log_den = -elbo.double() / den_temperature - log_norm
        psi = psi * (log_den.exp() / a3).float()
    if psi_cap is not None:
        psi = psi.clamp(max=psi_cap)
    return psi


def pogdiff_loss(
    eps_pred: torch.Tensor, eps_pred_neighbour: torch.Tensor, eps: torch.Tensor, psi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PoGDiff per-sample loss (Eq. 13 / Algorithm 1), returning (total, denoise, pog) each [B].

    total_i = |eps_theta(x_t, y) - eps|^2 + psi_i |eps_theta(x_t, y) - eps_theta(x_t, y')|^2

    Whether the y' branch receives gradient is decided by the caller: pass a tensor
    computed under ``torch.no_grad()`` for ``neighbor_grad = "stop"``.
    """
    denoise = per_sample_mse(eps_pred, eps)
    pog = per_sample_mse(eps_pred, eps_pred_neighbour)
    return denoise + psi * pog, denoise, pog
