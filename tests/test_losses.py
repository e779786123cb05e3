"""Loss math (METHOD.md Eq. 8, 9, 11, 12, 13) checked against hand-written per-sample loops."""

import math

import numpy as np
import pytest
import torch

from pogdiff_dist.losses import (
    log_density_normaliser,
    neighbour_weights,
    per_sample_mse,
    pogdiff_loss,
    psi_weights,
    vanilla_loss,
)


def _logmeanexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values) / len(values))


def _naive_psi(sim, same, elbo_i, all_elbo, *, a1, a2, a3, T=1.0, img=True, den=True, cap=None):
    psi = 1.0
    if img:
        psi *= max(0.0, sim) ** (a1 + (0.0 if same else a2))
    if den:
        lme = _logmeanexp([-e / T for e in all_elbo])
        psi *= math.exp(-elbo_i / T - lme) / a3
    if cap is not None:
        psi = min(psi, cap)
    return psi


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    n_all = 40
    all_elbo = torch.randn(n_all, generator=g, dtype=torch.float64) * 2.0 + 5.0
    b = 12
    idx = torch.arange(b)
    sim = torch.rand(b, generator=g) * 2.0 - 0.6  # ~30 % negative
    sim[0], sim[1] = -0.3, 0.0
    same = (torch.rand(b, generator=g) < 0.5).long()
    same[2], same[3] = 1, 0
    sim[2] = sim[3] = 0.7
    return sim, same, all_elbo[idx], all_elbo


# ----------------------------------------------------------------------------- mse


def test_per_sample_mse_and_vanilla_match_loop():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    got = per_sample_mse(a, b)
    assert got.shape == (3,)
    for i in range(3):
        want = sum(float(x) ** 2 for x in (a[i] - b[i]).flatten()) / 40
        assert got[i].item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(vanilla_loss(a, b), got)


# ----------------------------------------------------------------------------- psi


@pytest.mark.parametrize("a1,a2,a3", [(1.0, 1.0, 1.0), (2.0, 0.5, 3.0), (0.5, 3.0, 0.25)])
def test_psi_matches_naive_loop(data, a1, a2, a3):
    sim, same, elbo, all_elbo = data
    log_norm = log_density_normaliser(all_elbo, 1.0)
    psi = psi_weights(sim, same, elbo, log_norm, a1=a1, a2=a2, a3=a3)
    assert psi.shape == sim.shape
    for i in range(len(sim)):
        want = _naive_psi(sim[i].item(), bool(same[i]), elbo[i].item(), all_elbo.tolist(), a1=a1, a2=a2, a3=a3)
        assert psi[i].item() == pytest.approx(want, rel=1e-5, abs=1e-12)
    # negative and zero similarity -> psi_img = 0 -> psi = 0
    assert psi[0].item() == 0.0 and psi[1].item() == 0.0
    assert torch.all(psi[sim <= 0] == 0)
    assert torch.all(psi[sim > 0] > 0)


def test_psi_img_exponent_same_vs_different_identity():
    sim = torch.tensor([0.5, 0.5, 0.9, 0.9])
    same = torch.tensor([1, 0, 1, 0])
    elbo = torch.zeros(4)
    psi = psi_weights(sim, same, elbo, 0.0, a1=2.0, a2=3.0, a3=1.0, use_psi_den=False)
    assert psi.tolist() == pytest.approx([0.5**2, 0.5**5, 0.9**2, 0.9**5], rel=1e-6)
    # a cross-identity neighbour is always down-weighted relative to a same-identity one
    assert psi[1] < psi[0] and psi[3] < psi[2]


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_psi_den_matches_formula_and_averages_to_one_over_a3(data, T):
    _, _, _, all_elbo = data
    a3 = 2.5
    n = len(all_elbo)
    log_norm = log_density_normaliser(all_elbo, T)
    # normaliser == logmeanexp(-elbo / T) computed with numpy
    x = -all_elbo.numpy() / T
    assert log_norm.item() == pytest.approx(np.log(np.mean(np.exp(x))), rel=1e-10)
    psi = psi_weights(torch.ones(n), torch.ones(n), all_elbo, log_norm, a1=1.0, a2=1.0, a3=a3,
                      den_temperature=T, use_psi_img=False)
    lme = _logmeanexp(list(x))
    for i in range(n):
        assert psi[i].item() == pytest.approx(math.exp(x[i] - lme) / a3, rel=1e-5)
    assert psi.double().mean().item() == pytest.approx(1.0 / a3, rel=1e-5)
    # lower ELBO -> larger psi_den (monotone)
    order = torch.argsort(all_elbo)
    assert torch.all(psi[order][:-1] >= psi[order][1:])


def test_higher_temperature_compresses_psi_den_range(data):
    _, _, _, all_elbo = data
    n = len(all_elbo)
    ranges = []
    for T in (1.0, 3.0):
        psi = psi_weights(torch.ones(n), torch.ones(n), all_elbo, log_density_normaliser(all_elbo, T),
                          a1=1.0, a2=1.0, a3=1.0, den_temperature=T, use_psi_img=False)
        ranges.append((psi.max() / psi.min()).item())
    assert ranges[1] < ranges[0]
    assert ranges[1] == pytest.approx(ranges[0] ** (1 / 3), rel=1e-4)


def test_ablations(data):
    sim, same, elbo, all_elbo = data
    ln = log_density_normaliser(all_elbo, 1.0)
    kw = {"a1": 1.5, "a2": 0.7, "a3": 2.0}
    full = psi_weights(sim, same, elbo, ln, **kw)
    no_img = psi_weights(sim, same, elbo, ln, use_psi_img=False, **kw)
    no_den = psi_weights(sim, same, elbo, ln, use_psi_den=False, **kw)
    neither = psi_weights(sim, same, elbo, ln, use_psi_img=False, use_psi_den=False, **kw)
    for i in range(len(sim)):
        den = _naive_psi(0, True, elbo[i].item(), all_elbo.tolist(), img=False, **kw)
        img = _naive_psi(sim[i].item(), bool(same[i]), 0, [0.0], den=False, **kw)
        assert no_img[i].item() == pytest.approx(den, rel=1e-5)
        assert no_den[i].item() == pytest.approx(img, rel=1e-5, abs=1e-12)
    torch.testing.assert_close(full, no_img * no_den, rtol=1e-5, atol=1e-12)
    assert torch.all(neither == 1.0)
    # psi_den off: psi ignores the ELBO entirely
    shifted = psi_weights(sim, same, elbo + 7.0, ln, use_psi_den=False, **kw)
    assert torch.equal(shifted, no_den)


def test_psi_cap_clamps(data):
    sim, same, elbo, all_elbo = data
    ln = log_density_normaliser(all_elbo, 1.0)
    kw = {"a1": 0.5, "a2": 0.5, "a3": 0.1}
    raw = psi_weights(sim, same, elbo, ln, **kw)
    cap = float(raw.max()) / 2
    assert (raw > cap).any() and (raw < cap).any()
    capped = psi_weights(sim, same, elbo, ln, psi_cap=cap, **kw)
    assert capped.max().item() == pytest.approx(cap, rel=1e-6)
    torch.testing.assert_close(capped, torch.minimum(raw, torch.tensor(cap)))
    assert torch.equal(capped[raw < cap], raw[raw < cap])


# ----------------------------------------------------------------------------- neighbour weights


def test_neighbour_weights_match_loop_and_only_first_k_used():
    sims = torch.tensor([
        [0.9, 0.5, -0.2, 0.8, 0.7],
        [0.3, 0.3, 0.3, 0.3, 0.3],
        [-0.1, -0.5, 0.0, 0.9, 0.9],  # first 3 all non-positive -> uniform
        [0.0, 0.6, -0.4, 0.1, 0.1],
    ])
    k = 3
    w = neighbour_weights(sims, k)
    assert w.shape == (4, k)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    for i in range(4):
        row = [max(0.0, float(s)) for s in sims[i, :k]]
        tot = sum(row)
        want = [r / tot for r in row] if tot > 0 else [1.0 / k] * k
        assert w[i].tolist() == pytest.approx(want, rel=1e-6)
    assert w[0, 2].item() == 0.0  # negative similarity clipped
    assert w[2].tolist() == pytest.approx([1 / 3] * 3)
    # changing neighbours beyond k leaves the weights unchanged
    sims2 = sims.clone()
    sims2[:, k:] = torch.tensor([5.0, -5.0])
    assert torch.equal(neighbour_weights(sims2, k), w)


def test_neighbour_weights_random_rows_sum_to_one():
    g = torch.Generator().manual_seed(3)
    sims = torch.rand(50, 10, generator=g) * 2 - 1
    sims[7] = -torch.rand(10, generator=g)
    w = neighbour_weights(sims, 6)
    torch.testing.assert_close(w.sum(1), torch.ones(50))
    assert torch.all(w >= 0)
    nonuniform = (sims[:, :6].clamp(min=0).sum(1) > 0)
    assert torch.all(w[nonuniform][sims[nonuniform][:, :6] <= 0] == 0)
    assert w[7].tolist() == pytest.approx([1 / 6] * 6)


# ----------------------------------------------------------------------------- pogdiff loss


def test_pogdiff_loss_matches_loop():
    g = torch.Generator().manual_seed(5)
    b = 6
    eps_pred = torch.randn(b, 2, 3, 3, generator=g)
    eps_nb = torch.randn(b, 2, 3, 3, generator=g)
    eps = torch.randn(b, 2, 3, 3, generator=g)
    psi = torch.tensor([0.0, 0.3, 1.0, 2.5, 0.0, 7.0])
    total, denoise, pog = pogdiff_loss(eps_pred, eps_nb, eps, psi)
    for i in range(b):
        d = float(((eps_pred[i] - eps[i]) ** 2).sum()) / 18
        p = float(((eps_pred[i] - eps_nb[i]) ** 2).sum()) / 18
        assert denoise[i].item() == pytest.approx(d, rel=1e-5)
        assert pog[i].item() == pytest.approx(p, rel=1e-5)
        assert total[i].item() == pytest.approx(d + psi[i].item() * p, rel=1e-5)
    assert torch.equal(total[psi == 0], denoise[psi == 0])


# ----------------------------------------------------------------------------- gradient structure

DX, DY, B = 5, 3, 4


def _setup(psi_values):
    torch.manual_seed(11)
    lin = torch.nn.Linear(DX + DY, DX)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, DX, generator=g)
    y = torch.randn(B, DY, generator=g)
    y_nb = torch.randn(B, DY, generator=g)
    eps = torch.randn(B, DX, generator=g)
    return lin, x, y, y_nb, eps, torch.tensor(psi_values)


def _grads(lin, x, y, y_nb, eps, psi, mode):
    lin.zero_grad()
    y_nb = y_nb.clone().requires_grad_(True)
    pred = lin(torch.cat([x, y], 1))
    if mode == "full":
        pred_nb = lin(torch.cat([x, y_nb], 1))
    else:
        with torch.no_grad():
            pred_nb = lin(torch.cat([x, y_nb], 1))
    total, _, _ = pogdiff_loss(pred, pred_nb, eps, psi)
    total.mean().backward()
    return lin.weight.grad.clone(), lin.bias.grad.clone(), y_nb.grad


def _hand_grads(lin, x, y, y_nb, eps, psi, full):
    W, b = lin.weight.detach(), lin.bias.detach()
    z, zn = torch.cat([x, y], 1), torch.cat([x, y_nb], 1)
    pred, pred_nb = z @ W.T + b, zn @ W.T + b
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    gy = torch.zeros_like(y_nb)
    for i in range(B):
        r, q = pred[i] - eps[i], pred[i] - pred_nb[i]
        c = 2.0 / DX / B
        gW += c * torch.outer(r + psi[i] * q, z[i])
        gb += c * (r + psi[i] * q)
        if full:
            gW -= c * psi[i] * torch.outer(q, zn[i])
            gb -= c * psi[i] * q
            gy[i] = -c * psi[i] * (W[:, DX:].T @ q)
    return gW, gb, gy


def test_stop_gradient_equals_fixed_target_reference():
    lin, x, y, y_nb, eps, psi = _setup([0.5, 1.0, 0.0, 2.0])
    gW, gb, gy = _grads(lin, x, y, y_nb, eps, psi, "stop")
    assert gy is None
    # reference 1: autograd on denoise + psi * |f(x, y) - const|^2 with const a plain tensor
    const = lin(torch.cat([x, y_nb], 1)).detach()
    lin.zero_grad()
    pred = lin(torch.cat([x, y], 1))
    ref = ((pred - eps) ** 2).mean(1) + psi * ((pred - const) ** 2).mean(1)
    ref.mean().backward()
    torch.testing.assert_close(gW, lin.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb, lin.bias.grad, rtol=1e-5, atol=1e-7)
    # reference 2: closed form
    hW, hb, _ = _hand_grads(lin, x, y, y_nb, eps, psi, full=False)
    torch.testing.assert_close(gW, hW, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, hb, rtol=1e-4, atol=1e-6)


def test_full_gradient_matches_closed_form_and_reaches_neighbour_input():
    lin, x, y, y_nb, eps, psi = _setup([0.5, 1.0, 0.0, 2.0])
    gW, gb, gy = _grads(lin, x, y, y_nb, eps, psi, "full")
    hW, hb, hy = _hand_grads(lin, x, y, y_nb, eps, psi, full=True)
    torch.testing.assert_close(gW, hW, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, hb, rtol=1e-4, atol=1e-6)
    assert gy is not None
    torch.testing.assert_close(gy, hy, rtol=1e-4, atol=1e-6)
    assert torch.all(gy[2] == 0)  # psi = 0 row: no gradient to its neighbour condition
    assert gy[[0, 1, 3]].abs().sum(1).min() > 0


def test_full_and_stop_differ_iff_psi_positive():
    lin, x, y, y_nb, eps, psi = _setup([0.5, 1.0, 0.3, 2.0])
    fW, fb, _ = _grads(lin, x, y, y_nb, eps, psi, "full")
    sW, sb, _ = _grads(lin, x, y, y_nb, eps, psi, "stop")
    assert (fW - sW).abs().max() > 1e-3
    assert (fb - sb).abs().max() > 1e-3

    zero = torch.zeros(B)
    fW0, fb0, gy0 = _grads(lin, x, y, y_nb, eps, zero, "full")
    sW0, sb0, _ = _grads(lin, x, y, y_nb, eps, zero, "stop")
    assert torch.equal(fW0, sW0) and torch.equal(fb0, sb0)
    assert torch.all(gy0 == 0)
    # psi = 0 -> exactly the vanilla gradient
    lin.zero_grad()
    vanilla_loss(lin(torch.cat([x, y], 1)), eps).mean().backward()
    torch.testing.assert_close(fW0, lin.weight.grad)
    torch.testing.assert_close(fb0, lin.bias.grad)
