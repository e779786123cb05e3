"""Flow-matching objectives (docs/OBJECTIVES.md) against hand-written loops: the velocity
target and its reparametrizations, SD3's loss weightings, vanilla, PoGDiff (and why its PoG
term keeps velocity units), CBDM, T2H (the exact batch posterior, the calibrated target) and
DiffROP on the x0 prediction."""

import math

import pytest
import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from pogdiff_dist.losses import pogdiff_loss
from pogdiff_dist.losses_flow import (
    flow_cbdm_loss,
    flow_diffrop_loss,
    flow_eps,
    flow_loss_weights,
    flow_noisy,
    flow_pogdiff_loss,
    flow_t2h_select_probs,
    flow_t2h_targets,
    flow_vanilla_loss,
    flow_velocity,
    flow_x0,
)


def _mse(a, b):
    return sum(float(x) ** 2 for x in (a - b).detach().flatten()) / a.numel()


def _draw(b=5, shape=(2, 3, 3), seed=0, s=None):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g)
    eps = torch.randn(b, *shape, generator=g)
    s = torch.rand(b, generator=g) * 0.98 + 0.01 if s is None else torch.as_tensor(s, dtype=torch.float32)
    return x0, eps, s, flow_noisy(x0, eps, s)


# ----------------------------------------------------------------------------- parametrizations


def test_noisy_velocity_and_implied_x0_eps_match_loop():
    x0, eps, s, x_t = _draw()
    v = flow_velocity(eps, x0)
    for i in range(len(s)):
        si = float(s[i])
        for xt, a, e in zip(x_t[i].flatten(), x0[i].flatten(), eps[i].flatten()):
            assert float(xt) == pytest.approx((1 - si) * float(a) + si * float(e), abs=1e-6)
    torch.testing.assert_close(v, eps - x0)
    # the true velocity implies the true x0 and eps at x_t
    torch.testing.assert_close(flow_x0(x_t, v, s), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow_eps(x_t, v, s), eps, atol=1e-5, rtol=0)
    # two velocities differ by (1 - s) dv in eps and by -s dv in x0 at one x_t
    dv = torch.randn_like(v)
    col = s.view(-1, 1, 1, 1)
    torch.testing.assert_close(flow_eps(x_t, v + dv, s) - flow_eps(x_t, v, s), (1 - col) * dv, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow_x0(x_t, v + dv, s) - flow_x0(x_t, v, s), -col * dv, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(scheme):
    s = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(flow_loss_weights(s, scheme), compute_loss_weighting_for_sd3(scheme, s))


def test_unknown_weighting_is_an_error():
    with pytest.raises(ValueError, match="sigma_sqrt"):
        flow_loss_weights(torch.rand(3), "logit_normal")


def test_vanilla_matches_loop():
    x0, eps, s, _ = _draw(seed=1)
    v = flow_velocity(eps, x0)
    pred = torch.randn_like(v)
    w = flow_loss_weights(s, "cosmap")
    got = flow_vanilla_loss(pred, v, w)
    for i in range(len(s)):
        assert got[i].item() == pytest.approx(float(w[i]) * _mse(pred[i], v[i]), rel=1e-5)
    torch.testing.assert_close(flow_vanilla_loss(pred, v), got / w)


# ----------------------------------------------------------------------------- PoGDiff


def test_pogdiff_matches_loop():
    x0, eps, s, _ = _draw(b=6, seed=2)
    v = flow_velocity(eps, x0)
    pred, pred_nb = torch.randn_like(v), torch.randn_like(v)
    psi = torch.tensor([0.0, 0.3, 1.0, 2.5, 0.0, 7.0])
    w = flow_loss_weights(s, "sigma_sqrt")
    total, denoise, pog = flow_pogdiff_loss(pred, pred_nb, v, psi, denoise_weight=w)
    for i in range(6):
        d, p = float(w[i]) * _mse(pred[i], v[i]), _mse(pred[i], pred_nb[i])
        assert denoise[i].item() == pytest.approx(d, rel=1e-5)
        assert pog[i].item() == pytest.approx(p, rel=1e-5)  # velocity units, psi unchanged
        assert total[i].item() == pytest.approx(d + float(psi[i]) * p, rel=1e-5)


def test_pogdiff_velocity_form_is_eq13_over_one_minus_s_squared():
    """Why the PoG term keeps velocity units: converted to epsilon predictions at the same x_t,
    the whole flow objective is Eq. 13's epsilon objective divided by (1 - s)^2, so psi weighs
    the two terms as the paper does at every s. The literal (1 - s)^2-scaled term would not."""
    x0, eps, s, x_t = _draw(b=6, seed=3, s=[0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    v = flow_velocity(eps, x0)
    pred, pred_nb = v + 0.3 * torch.randn_like(v), v + 0.5 * torch.randn_like(v)
    psi = torch.tensor([0.5, 1.0, 2.0, 0.7, 3.0, 1.5])
    flow_total, flow_den, flow_pog = flow_pogdiff_loss(pred, pred_nb, v, psi)
    eps_total, eps_den, eps_pog = pogdiff_loss(flow_eps(x_t, pred, s), flow_eps(x_t, pred_nb, s), eps, psi)
    torch.testing.assert_close(eps_total, (1 - s) ** 2 * flow_total, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flow_pog / flow_den, eps_pog / eps_den, rtol=1e-4, atol=0)
    literal = flow_den + psi * (1 - s) ** 2 * flow_pog  # the other candidate: psi shrinks with s
    assert not torch.allclose(literal * (1 - s) ** 2, eps_total, rtol=1e-2)


# ----------------------------------------------------------------------------- CBDM


def test_cbdm_matches_loop_with_s_as_t_over_T():
    x0, eps, s, _ = _draw(seed=4, s=[0.0, 0.1, 0.5, 0.9, 1.0])
    v = flow_velocity(eps, x0)
    h, h2 = torch.randn_like(v), torch.randn_like(v)
    tau = 0.7
    total, denoise, reg = flow_cbdm_loss(h, h2, v, s, tau)
    for i in range(5):
        d = _mse(h[i], v[i])
        r = float(s[i]) * tau * 1.25 * _mse(h[i], h2[i])
        assert denoise[i].item() == pytest.approx(d, rel=1e-5)
        assert reg[i].item() == pytest.approx(r, rel=1e-5, abs=1e-12)
        assert total[i].item() == pytest.approx(d + r, rel=1e-5)
    assert reg[0].item() == 0.0


def test_cbdm_stop_gradients():
    x0, eps, s, _ = _draw(b=3, seed=5, s=[0.2, 0.5, 0.8])
    v = flow_velocity(eps, x0)
    h = torch.randn_like(v).requires_grad_()
    h2 = torch.randn_like(v).requires_grad_()
    tau, n = 1.3, v[0].numel()
    w = (s * tau).view(-1, 1, 1, 1)
    _, _, reg = flow_cbdm_loss(h, h2, v, s, tau)
    g_h, g_h2 = torch.autograd.grad(reg.sum(), (h, h2))
    torch.testing.assert_close(g_h, w * 2 * (h - h2).detach() / n)  # |h - sg(h')|^2 moves h
    torch.testing.assert_close(g_h2, w * 0.5 * (h2 - h).detach() / n)  # 1/4 |sg(h) - h'|^2 moves h'


# ----------------------------------------------------------------------------- T2H


def _naive_probs(x_t, x0, s):
    b = len(s)
    out = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        si = float(s[i])
        logits = [-sum(float(a) ** 2 for a in (x_t[i].double() - (1 - si) * x0[j].double()).flatten()) / (2 * si**2)
                  for j in range(b)]
        m = max(logits)
        z = sum(math.exp(lg - m) for lg in logits)
        for j in range(b):
            out[i, j] = math.exp(logits[j] - m) / z
    return out


def test_t2h_probs_match_loop_and_are_the_exact_batch_posterior():
    x0, _, s, x_t = _draw(b=5, shape=(1, 2, 2), seed=6, s=[0.05, 0.3, 0.6, 0.85, 0.97])
    probs = flow_t2h_select_probs(x_t, x0, s)
    torch.testing.assert_close(probs, _naive_probs(x_t, x0, s), rtol=1e-6, atol=1e-9)
    # Bayes with a uniform prior over the batch: p(j | x_t,i) = q(x_t,i | x0_j) / sum_k q(x_t,i | x0_k),
    # q(x_t | x0) = N((1 - s) x0, s^2 I) -- the full Gaussian density, normaliser included
    for i in range(5):
        si = float(s[i])
        lik = torch.stack([torch.distributions.Normal((1 - si) * x0[j].double(), si).log_prob(x_t[i].double()).sum()
                           for j in range(5)])
        torch.testing.assert_close(probs[i], torch.softmax(lik, 0), rtol=1e-6, atol=1e-9)
    assert probs[0, 0] > 0.999 and probs[4].max() < 0.9  # one-hot at low noise, spread at high noise


def test_t2h_target_maps_x0_j_to_the_same_x_t_and_follows_the_density_rule():
    x0, eps, s, x_t = _draw(b=6, shape=(1, 2, 2), seed=7, s=[0.9, 0.92, 0.94, 0.96, 0.98, 0.88])
    x0 = x0 * 0.3
    x_t = flow_noisy(x0, eps, s)
    v = flow_velocity(eps, x0)
    elbo = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, -1.0], dtype=torch.float64)  # higher ELBO = denser caption
    gen = torch.Generator().manual_seed(0)
    n_accept = n_reject = 0
    for _ in range(100):
        target, j, transferred = flow_t2h_targets(x0, x_t, v, s, elbo, gen)
        for i in range(6):
            jj, si = int(j[i]), float(s[i])
            assert bool(transferred[i]) == (jj != i and bool(elbo[jj] >= elbo[i]))
            if transferred[i]:
                torch.testing.assert_close(target[i], (x_t[i] - x0[jj]) / si, rtol=1e-5, atol=1e-5)
                # v~ moves x0_j to x_t: x0_j + s v~ = x_t, i.e. noise eps~ = x0_j + v~ noises x0_j into x_t
                torch.testing.assert_close(x0[jj] + si * target[i], x_t[i], rtol=1e-5, atol=1e-5)
                noisy = flow_noisy(x0[jj:jj + 1], x0[jj:jj + 1] + target[i:i + 1], s[i:i + 1])
                torch.testing.assert_close(noisy[0], x_t[i], rtol=1e-5, atol=1e-5)
                n_accept += 1
            else:
                assert torch.equal(target[i], v[i])
                n_reject += jj != i
        assert not transferred[4]  # the densest caption never moves to a sparser one
    assert n_accept > 30 and n_reject > 30


def test_t2h_low_noise_picks_self_even_at_s_zero():
    x0, eps, _, _ = _draw(b=6, seed=8)
    for s_val in (1e-4, 0.0):
        s = torch.full((6,), s_val)
        x_t = flow_noisy(x0, eps, s)
        v = flow_velocity(eps, x0)
        probs = flow_t2h_select_probs(x_t, x0, s)
        assert torch.all(probs.diagonal() > 1 - 1e-12)
        target, j, transferred = flow_t2h_targets(x0, x_t, v, s, torch.arange(6.0).flip(0),
                                                  torch.Generator().manual_seed(0))
        assert torch.equal(j, torch.arange(6)) and not transferred.any() and torch.equal(target, v)


def test_t2h_draws_follow_probs():
    x0, eps, _, _ = _draw(b=4, shape=(1, 2, 2), seed=9)
    s = torch.full((4,), 0.7)
    x0 = 0.5 * x0
    x_t = flow_noisy(x0, eps, s)
    probs = flow_t2h_select_probs(x_t, x0, s)
    assert probs.min() > 0.02
    copies = 250
    rep = lambda x: x.repeat(copies, *[1] * (x.ndim - 1))  # row r holds sample r % 4
    counts = torch.zeros(4, 4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        _, j, _ = flow_t2h_targets(rep(x0), rep(x_t), rep(eps), rep(s), torch.zeros(4 * copies), gen)
        counts.index_put_((torch.arange(4 * copies) % 4, j % 4), torch.ones(4 * copies), accumulate=True)
    assert (counts / (4 * copies) - probs.float()).abs().max() < 0.05


def test_t2h_targets_carry_no_gradient():
    x0, eps, s, _ = _draw(b=4, seed=10, s=[0.95, 0.96, 0.97, 0.98])
    x0 = x0.requires_grad_()
    x_t = flow_noisy(x0, eps, s)
    target, _, _ = flow_t2h_targets(x0, x_t, flow_velocity(eps, x0), s, torch.zeros(4), torch.Generator())
    assert not target.requires_grad


# ----------------------------------------------------------------------------- DiffROP


def test_diffrop_acts_on_x0_prediction_and_matches_loop():
    x0, eps, s, x_t = _draw(b=5, seed=11, s=[0.1, 0.3, 0.5, 0.7, 0.9])
    v = flow_velocity(eps, x0)
    pred = (v + 0.5 * torch.randn_like(v)).requires_grad_()
    ids = torch.tensor([0, 1, 0, 2, 1])
    tau, decay = 0.8, 2.0
    total, denoise, overlap = flow_diffrop_loss(pred, v, x_t, s, ids, tau, decay)
    x0_hat = (x_t - s.view(-1, 1, 1, 1) * pred).detach()
    for i in range(5):
        partners = [j for j in range(5) if ids[j] != ids[i]]
        want = tau * math.exp(-decay * float(s[i])) * sum(1 / (1 + _mse(x0_hat[i], x0_hat[j]))
                                                          for j in partners) / len(partners)
        assert overlap[i].item() == pytest.approx(want, rel=1e-5)
        assert denoise[i].item() == pytest.approx(_mse(pred[i], v[i]), rel=1e-5)
    torch.testing.assert_close(total, denoise + overlap)
    (g,) = torch.autograd.grad(overlap.sum(), pred)
    assert all(g[i].abs().max() > 0 for i in range(5))
    valid = torch.tensor([True, True, False, True, True])
    _, _, masked = flow_diffrop_loss(pred, v, x_t, s, ids, tau, decay, valid=valid)
    assert masked[2].item() == 0.0
