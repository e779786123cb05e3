"""Baselines (METHOD.md "Baselines"): CBDM, T2H and DiffROP against hand-written loops, where
their stop-gradients sit, and one DualConditionStep per method on a tiny real UNet (CPU)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from pogdiff_dist.config import LossConfig, ModelConfig
from pogdiff_dist.data.shards import Batch
from pogdiff_dist.losses import (
    cbdm_loss,
    ddpm_posterior_mean,
    diffrop_overlap,
    t2h_loss,
    t2h_select_probs,
    t2h_targets,
)
from pogdiff_dist.models import ModelSpec, build_noise_scheduler, build_unet
from pogdiff_dist.train.step import DualConditionStep

T = 1000


def _mse(a, b):
    """Naive mean square over all elements of one sample."""
    return sum(float(x) ** 2 for x in (a - b).detach().flatten()) / a.numel()


def _cosine_alphas_cumprod():
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod


# ----------------------------------------------------------------------------- CBDM


def test_cbdm_matches_loop():
    g = torch.Generator().manual_seed(0)
    h, h2, eps = (torch.randn(5, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 250, 500, 999])
    tau = 0.7
    total, denoise, reg = cbdm_loss(h, h2, eps, t, T, tau)
    assert total.shape == denoise.shape == reg.shape == (5,)
    for i in range(5):
        d = _mse(h[i], eps[i])
        r = t[i].item() / T * tau * (_mse(h[i], h2[i]) + 0.25 * _mse(h[i], h2[i]))
        assert denoise[i].item() == pytest.approx(d, rel=1e-5)
        assert reg[i].item() == pytest.approx(r, rel=1e-5, abs=1e-12)
        assert total[i].item() == pytest.approx(d + r, rel=1e-5)
    assert reg[0].item() == 0.0  # t = 0: no regulariser
    assert reg[4].item() > 0


def test_cbdm_stop_gradients():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 2, 4, 4, generator=g).requires_grad_()
    h2 = torch.randn(3, 2, 4, 4, generator=g).requires_grad_()
    eps = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([100, 600, 900])
    tau, n = 1.3, h[0].numel()
    w = (t.float() / T * tau).view(-1, 1, 1, 1)
    total, _denoise, reg = cbdm_loss(h, h2, eps, t, T, tau)

    # the regulariser alone: |h - sg(h')|^2 moves only h, 1/4 |sg(h) - h'|^2 only h'
    g_h, g_h2 = torch.autograd.grad(reg.sum(), (h, h2), retain_graph=True)
    torch.testing.assert_close(g_h, w * 2 * (h - h2).detach() / n)
    torch.testing.assert_close(g_h2, w * 0.25 * 2 * (h2 - h).detach() / n)
    # without stop-gradients both would be 2.5 w (h - h') / n in size: make sure that is not what we got
    assert not torch.allclose(g_h, w * 2.5 * (h - h2).detach() / n)

    # the full loss adds the denoising gradient on h only
    g_h, g_h2 = torch.autograd.grad(total.sum(), (h, h2))
    torch.testing.assert_close(g_h, 2 * (h - eps).detach() / n + w * 2 * (h - h2).detach() / n)
    torch.testing.assert_close(g_h2, w * 0.5 * (h2 - h).detach() / n)


# ----------------------------------------------------------------------------- T2H


def _naive_t2h_probs(x_t, x0, t, ac):
    b = x_t.shape[0]
    out = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        abar = float(ac[t[i]])
        s2 = 1.0 / abar - 1.0
        logits = [-sum(float(v) ** 2 for v in (x_t[i].double() / math.sqrt(abar) - x0[j].double()).flatten()) / (2 * s2)
                  for j in range(b)]
        m = max(logits)
        z = sum(math.exp(l - m) for l in logits)
        for j in range(b):
            out[i, j] = math.exp(logits[j] - m) / z
    return out


def _noisy(x0, eps, t, ac):
    abar = ac[t].float().view(-1, *[1] * (x0.ndim - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def test_t2h_probs_match_loop():
    g = torch.Generator().manual_seed(2)
    ac = _cosine_alphas_cumprod()
    x0 = torch.randn(5, 1, 2, 2, generator=g)
    eps = torch.randn(5, 1, 2, 2, generator=g)
    t = torch.tensor([10, 300, 600, 800, 990])
    x_t = _noisy(x0, eps, t, ac)
    probs = t2h_select_probs(x_t, x0, t, ac)
    want = _naive_t2h_probs(x_t, x0, t, ac)
    torch.testing.assert_close(probs, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=torch.float64))
    # the test must exercise a spread distribution, not only one-hot rows
    assert probs[4].max() < 0.9 and probs[0, 0] > 0.999


def test_t2h_abar_to_one_picks_self():
    g = torch.Generator().manual_seed(3)
    b = 6
    ac = torch.full((T,), 1.0 - 1e-6, dtype=torch.float64)
    x0 = torch.randn(b, 1, 4, 4, generator=g)
    eps = torch.randn(b, 1, 4, 4, generator=g)
    t = torch.zeros(b, dtype=torch.long)
    x_t = _noisy(x0, eps, t, ac)
    elbo = torch.arange(b, dtype=torch.float64).flip(0)  # every j != i of lower index would be accepted
    probs = t2h_select_probs(x_t, x0, t, ac)
    assert torch.all(probs.diagonal() > 1 - 1e-12)
    for seed in range(5):
        target, j, transferred = t2h_targets(x0, x_t, eps, t, ac, elbo, torch.Generator().manual_seed(seed))
        assert torch.equal(j, torch.arange(b))
        assert not transferred.any()
        assert torch.equal(target, eps)


def test_t2h_density_rule_and_target_formula():
    g = torch.Generator().manual_seed(4)
    b = 6
    ac = _cosine_alphas_cumprod()
    x0 = torch.randn(b, 1, 2, 2, generator=g) * 0.3
    eps = torch.randn(b, 1, 2, 2, generator=g)
    t = torch.tensor([950, 960, 970, 980, 990, 940])  # spread selection: transfers are frequent
    x_t = _noisy(x0, eps, t, ac)
    elbo = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, -1.0], dtype=torch.float64)  # higher ELBO = denser caption
    gen = torch.Generator().manual_seed(0)
    n_accept = n_reject = n_tie = 0
    for _ in range(200):
        target, j, transferred = t2h_targets(x0, x_t, eps, t, ac, elbo, gen)
        for i in range(b):
            jj = int(j[i])
            want = jj != i and elbo[jj] >= elbo[i]
            assert bool(transferred[i]) == want
            if want:
                abar = float(ac[t[i]])
                ref = (x_t[i] - math.sqrt(abar) * x0[jj]) / math.sqrt(1 - abar)
                torch.testing.assert_close(target[i], ref, rtol=1e-5, atol=1e-5)
                n_accept += 1
                n_tie += bool(elbo[jj] == elbo[i])
            else:
                assert torch.equal(target[i], eps[i])
                n_reject += jj != i
        assert not transferred[4]  # the densest caption never moves to a sparser one
    assert n_accept > 50 and n_reject > 50 and n_tie > 0


def test_t2h_draws_follow_probs():
    g = torch.Generator().manual_seed(5)
    b, copies = 4, 250
    ac = torch.full((T,), 0.5, dtype=torch.float64)  # sigma^2 = 1
    x0 = torch.randn(b, 1, 2, 2, generator=g) * 0.5
    eps = torch.randn(b, 1, 2, 2, generator=g)
    t = torch.zeros(b, dtype=torch.long)
    x_t = _noisy(x0, eps, t, ac)
    probs = t2h_select_probs(x_t, x0, t, ac)
    assert probs.min() > 0.02  # a non-trivial distribution
    # A batch of `copies` copies of each sample: the chance of drawing any copy of image k is
    # the 4-sample softmax's p(k | i), and every copy of row i draws independently.
    rep = lambda x: x.repeat(copies, *[1] * (x.ndim - 1))  # row r holds sample r % b
    counts = torch.zeros(b, b)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        _, j, _ = t2h_targets(rep(x0), rep(x_t), rep(eps), rep(t), ac, torch.zeros(b * copies), gen)
        counts.index_put_((torch.arange(b * copies) % b, j % b), torch.ones(b * copies), accumulate=True)
    n = 4 * copies
    assert (counts / n - probs.float()).abs().max() < 0.05


def test_t2h_loss_and_no_gradient_through_targets():
    g = torch.Generator().manual_seed(6)
    ac = _cosine_alphas_cumprod()
    x0 = torch.randn(4, 1, 2, 2, generator=g).requires_grad_()
    eps = torch.randn(4, 1, 2, 2, generator=g)
    t = torch.tensor([980, 985, 990, 995])
    x_t = _noisy(x0, eps, t, ac)
    target, _, transferred = t2h_targets(x0, x_t, eps, t, ac, torch.zeros(4), torch.Generator().manual_seed(0))
    assert not target.requires_grad and transferred.any()
    pred = torch.randn(4, 1, 2, 2, generator=g).requires_grad_()
    total, denoise, calibration = t2h_loss(pred, eps, target)
    for i in range(4):
        assert total[i].item() == pytest.approx(_mse(pred[i], target[i]), rel=1e-5)
        assert denoise[i].item() == pytest.approx(_mse(pred[i], eps[i]), rel=1e-5)
    torch.testing.assert_close(calibration, total - denoise)
    assert torch.all(calibration[~transferred] == 0) and torch.all(calibration[transferred] != 0)
    (g_pred,) = torch.autograd.grad(total.sum(), pred)
    torch.testing.assert_close(g_pred, 2 * (pred - target).detach() / 4)


# ----------------------------------------------------------------------------- DiffROP


def test_posterior_mean_matches_ddpm():
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    ac, betas, alphas = sched.alphas_cumprod, sched.betas, sched.alphas
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(4, 1, 3, 3, generator=g)
    e = torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 1, 400, 900])
    x_t = _noisy(x0, torch.randn(4, 1, 3, 3, generator=g), t, ac)
    mu = ddpm_posterior_mean(x_t, e, t, ac)
    for i in range(4):
        ti = int(t[i])
        want = (x_t[i] - float(betas[ti]) / math.sqrt(1 - float(ac[ti])) * e[i]) / math.sqrt(float(alphas[ti]))
        torch.testing.assert_close(mu[i], want, rtol=1e-5, atol=1e-5)
        if ti >= 1:  # the same mean written as q(x_{t-1} | x_t, x0_hat)'s mean
            abar, abar_prev, beta, alpha = float(ac[ti]), float(ac[ti - 1]), float(betas[ti]), float(alphas[ti])
            x0_hat = (x_t[i] - math.sqrt(1 - abar) * e[i]) / math.sqrt(abar)
            post = (math.sqrt(abar_prev) * beta / (1 - abar) * x0_hat
                    + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x_t[i])
            torch.testing.assert_close(mu[i], post, rtol=1e-4, atol=1e-4)


def _naive_overlap(mu, ids, t, tau, decay, valid=None):
    b = mu.shape[0]
    valid = [True] * b if valid is None else [bool(v) for v in valid]
    out = []
    for i in range(b):
        partners = [j for j in range(b) if ids[j] != ids[i] and valid[i] and valid[j]]
        if not partners:
            out.append(0.0)
            continue
        tau_t = tau * math.exp(-decay * int(t[i]) / T)
        out.append(tau_t * sum(1.0 / (1.0 + _mse(mu[i], mu[j])) for j in partners) / len(partners))
    return torch.tensor(out)


def test_diffrop_overlap_matches_loop():
    g = torch.Generator().manual_seed(8)
    mu = torch.randn(6, 2, 3, 3, generator=g)
    mu[3] = mu[2] + 0.1 * torch.randn(2, 3, 3, generator=g)  # a close cross-identity pair: 1 / (1 + d) near 1
    ids = torch.tensor([0, 0, 1, 2, 1, 0])
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    got = diffrop_overlap(mu, ids, t, T, 0.8, 3.0)
    torch.testing.assert_close(got, _naive_overlap(mu, ids, t, 0.8, 3.0), rtol=1e-5, atol=1e-7)
    valid = torch.tensor([True, True, False, True, True, True])
    got = diffrop_overlap(mu, ids, t, T, 0.8, 3.0, valid=valid)
    torch.testing.assert_close(got, _naive_overlap(mu, ids, t, 0.8, 3.0, valid), rtol=1e-5, atol=1e-7)
    assert got[2].item() == 0.0


def test_diffrop_only_different_identities_contribute():
    g = torch.Generator().manual_seed(9)
    mu = torch.randn(5, 1, 4, 4, generator=g).requires_grad_()
    t = torch.tensor([10, 20, 30, 40, 50])
    same = diffrop_overlap(mu, torch.zeros(5, dtype=torch.long), t, T, 1.0, 1.0)
    assert torch.equal(same, torch.zeros(5))

    ids = torch.tensor([0, 0, 1, 1, 2])
    out = diffrop_overlap(mu, ids, t, T, 1.0, 1.0)
    (grad,) = torch.autograd.grad(out[0], mu)
    # sample 0's term sees itself and identities 1, 2 -- never sample 1 (its own identity)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    for j in (0, 2, 3, 4):
        assert grad[j].abs().max() > 0
    # no stop-gradient: the pair term pushes both means (gradients on i and on its partners sum to zero)
    torch.testing.assert_close(grad.sum(0), torch.zeros_like(grad[0]), atol=1e-7, rtol=0)
    # moving a same-identity sample leaves sample 0's term unchanged, moving a partner does not
    moved = mu.detach().clone()
    moved[1] += 1.0
    assert diffrop_overlap(moved, ids, t, T, 1.0, 1.0)[0].item() == pytest.approx(out[0].item(), rel=1e-6)
    moved[2] += 1.0
    assert diffrop_overlap(moved, ids, t, T, 1.0, 1.0)[0].item() != pytest.approx(out[0].item(), rel=1e-3)


def test_diffrop_tau_decays_with_t():
    g = torch.Generator().manual_seed(10)
    mu = torch.randn(4, 1, 3, 3, generator=g)
    ids = torch.tensor([0, 1, 2, 0])
    decay, tau = 4.0, 0.5
    base = diffrop_overlap(mu, ids, torch.zeros(4, dtype=torch.long), T, tau, decay)
    assert torch.all(base > 0)
    for step in (100, 500, 999):
        at = diffrop_overlap(mu, ids, torch.full((4,), step), T, tau, decay)
        torch.testing.assert_close(at / base, torch.full((4,), math.exp(-decay * step / T)), rtol=1e-5, atol=0)
    no_decay = diffrop_overlap(mu, ids, torch.full((4,), 999), T, tau, 0.0)
    torch.testing.assert_close(no_decay, base)


def test_diffrop_overlap_of_the_posterior_means_reaches_every_prediction():
    """The step's composition (ddpm_posterior_mean then diffrop_overlap) against the naive
    pair loop, with the gradient reaching every sample's prediction (no stop-gradient)."""
    g = torch.Generator().manual_seed(11)
    ac = _cosine_alphas_cumprod()
    x_t = torch.randn(4, 1, 3, 3, generator=g)
    pred = torch.randn(4, 1, 3, 3, generator=g).requires_grad_()
    t = torch.tensor([5, 50, 500, 700])
    ids = torch.tensor([0, 1, 0, 1])
    overlap = diffrop_overlap(ddpm_posterior_mean(x_t, pred, t, ac), ids, t, T, 1.0, 2.0)
    mu = ddpm_posterior_mean(x_t, pred.detach(), t, ac)
    torch.testing.assert_close(overlap, _naive_overlap(mu, ids, t, 1.0, 2.0), rtol=1e-5, atol=1e-7)
    (g_pred,) = torch.autograd.grad(overlap.sum(), pred)
    assert all(g_pred[i].abs().max() > 0 for i in range(4))


# ----------------------------------------------------------------------------- DualConditionStep

B, L, D = 4, 6, 32


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(ModelConfig(unet="tiny"), ModelSpec(1, 16, D)).eval()


@pytest.fixture(scope="module")
def scheduler():
    return build_noise_scheduler(ModelConfig())


def make_batch(identity=(0, 1, 0, 2), near=False):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(B, 1, 16, 16, generator=g) * 2 - 1
    if near:  # near-identical images: T2H's selection spreads at moderate t
        x0 = x0[:1] + 0.05 * torch.randn(B, 1, 16, 16, generator=g)
    return Batch(
        x0=x0,
        y=torch.randn(B, L, D, generator=g),
        nbr_tokens=torch.zeros(B, 1, L, dtype=torch.long),
        nbr_len=torch.ones(B, 1, dtype=torch.long),
        nbr_sim=torch.ones(B, 1),
        nbr_same=torch.zeros(B, 1, dtype=torch.long),
        elbo=torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64),
        index=torch.arange(B),
        identity=None if identity is None else torch.tensor(identity),
    )


UNCOND = torch.randn(L, D, generator=torch.Generator().manual_seed(3))


class CountingUNet:
    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, t, encoder_hidden_states):
        self.calls.append({"n": x.shape[0], "grad": torch.is_grad_enabled(), "t": t.clone(),
                               "y": encoder_hidden_states.detach().clone()})
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def run(unet, scheduler, method, seed=0, batch=None, dropout=0.0, **loss_kw):
    step = DualConditionStep(LossConfig(method=method, k=1, **loss_kw), scheduler, None, UNCOND, None,
                             caption_dropout=dropout)
    wrapped = CountingUNet(unet)
    loss, stats = step(wrapped, batch if batch is not None else make_batch(), torch.Generator().manual_seed(seed))
    # stats are read at log time: detached 0-d tensors (no GPU sync per step) or floats
    assert all(isinstance(v, float) or (v.ndim == 0 and not v.requires_grad) for v in stats.values()), stats
    return loss, {k: float(v) for k, v in stats.items()}, wrapped.calls


def redraw(scheduler, batch, seed):
    """t, eps and x_t in step.py's order on the device generator; returns that generator for the
    method's own device draws (T2H). The host plan's draws (dropout, CBDM's partner) come from a
    second generator seeded alike: see ``host_redraw``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    x_t = scheduler.add_noise(batch.x0, eps, t)
    return t, eps, x_t, g


def host_redraw(seed):
    """The host generator after the plan's dropout draw (step.py's order)."""
    hg = torch.Generator().manual_seed(seed)
    torch.rand(B, generator=hg)
    return hg


def unet_grads(unet, loss):
    unet.zero_grad()
    loss.backward()
    out = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in unet.parameters()])
    unet.zero_grad()
    return out


METHODS = ["cbdm", "t2h", "diffrop"]


@pytest.mark.parametrize("method", METHODS)
def test_step_finite_grads_and_reproducible(unet, scheduler, method):
    batch = make_batch(near=True)
    loss, stats, _ = run(unet, scheduler, method, seed=5, batch=batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert {"loss_denoise", "loss_pog"} <= set(stats) and all(isinstance(v, float) for v in stats.values())
    assert loss.item() == pytest.approx(stats["loss_denoise"] + stats["loss_pog"], rel=1e-5)
    grads = unet_grads(unet, loss)
    assert torch.isfinite(grads).all() and grads.abs().max() > 0

    loss2, stats2, _ = run(unet, scheduler, method, seed=5, batch=batch)
    assert loss2.item() == loss.item() and stats2 == stats
    assert torch.equal(unet_grads(unet, loss2), grads)
    loss3, _, _ = run(unet, scheduler, method, seed=6, batch=batch)
    assert loss3.item() != loss.item()

    # the baseline's extra term changes the update relative to vanilla on the same x_t
    v_loss, v_stats, _ = run(unet, scheduler, "vanilla", seed=5, batch=batch)
    assert v_stats["loss_denoise"] == pytest.approx(stats["loss_denoise"], rel=1e-5)
    assert stats["loss_pog"] != 0.0
    assert (unet_grads(unet, v_loss) - grads).abs().max() > 1e-6 * grads.abs().max()


def test_step_cbdm_matches_reference(unet, scheduler):
    seed, tau = 6, 1.5
    batch = make_batch()
    loss, stats, calls = run(unet, scheduler, "cbdm", seed=seed, cbdm_tau=tau)
    t, eps, x_t, _ = redraw(scheduler, batch, seed)
    other = (torch.arange(B) + torch.randint(1, B, (B,), generator=host_redraw(seed))) % B
    assert torch.all(other != torch.arange(B)) and torch.all(t > 0)
    # one UNet call of 2B rows with autograd; the y' half is the other row's condition
    assert [(c["n"], c["grad"]) for c in calls] == [(2 * B, True)]
    assert torch.equal(calls[0]["t"], torch.cat([t, t]))
    torch.testing.assert_close(calls[0]["y"][B:], batch.y[other])
    assert stats["cbdm_active_frac"] == 1.0

    # reference: two separate UNet calls, the stop-gradients written out with detach
    h = unet(x_t, t, encoder_hidden_states=batch.y).sample
    h2 = unet(x_t, t, encoder_hidden_states=batch.y[other]).sample
    ref = []
    for i in range(B):
        w = t[i].item() / T * tau
        ref.append(((h[i] - eps[i]) ** 2).mean()
                   + w * (((h[i] - h2[i].detach()) ** 2).mean() + 0.25 * ((h[i].detach() - h2[i]) ** 2).mean()))
    ref = torch.stack(ref).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["loss_pog"] > 0
    torch.testing.assert_close(unet_grads(unet, loss), unet_grads(unet, ref), rtol=1e-3, atol=1e-6)


def test_step_cbdm_dropped_rows_skip_y_prime(unet, scheduler):
    loss, stats, calls = run(unet, scheduler, "cbdm", seed=1, dropout=0.999)
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True)]
    assert stats["cbdm_active_frac"] == 0.0 and stats["loss_pog"] == 0.0
    assert loss.item() == pytest.approx(stats["loss_denoise"], rel=1e-6)


def test_step_t2h_matches_reference(unet, scheduler):
    seed = 2
    batch = make_batch(near=True)
    loss, stats, calls = run(unet, scheduler, "t2h", seed=seed, batch=batch)
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True)]
    t, eps, x_t, g = redraw(scheduler, batch, seed)
    target, j, transferred = t2h_targets(batch.x0, x_t, eps, t, scheduler.alphas_cumprod, batch.elbo, g)
    assert transferred.any()  # this seed exercises a calibrated target
    assert stats["t2h_accept_frac"] == transferred.float().mean().item()
    assert stats["t2h_other_frac"] == (j != torch.arange(B)).float().mean().item()
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=batch.y).sample
    ref = sum(_mse(pred[i], target[i]) for i in range(B)) / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["loss_pog"] != 0.0


def test_step_diffrop_matches_reference(unet, scheduler):
    seed = 3
    batch = make_batch(identity=(0, 1, 0, 2))
    loss, stats, calls = run(unet, scheduler, "diffrop", seed=seed, batch=batch, diffrop_tau=2.0, diffrop_decay=1.0)
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True)]
    t, eps, x_t, _ = redraw(scheduler, batch, seed)
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=batch.y).sample
    ac = scheduler.alphas_cumprod
    mu = []
    for i in range(B):
        ti = int(t[i])
        alpha = float(ac[ti] / (ac[ti - 1] if ti > 0 else 1.0))
        mu.append((x_t[i] - (1 - alpha) / math.sqrt(1 - float(ac[ti])) * pred[i]) / math.sqrt(alpha))
    overlap = _naive_overlap(torch.stack(mu), batch.identity, t, 2.0, 1.0)
    ref = sum(_mse(pred[i], eps[i]) + float(overlap[i]) for i in range(B)) / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["loss_pog"] == pytest.approx(overlap.mean().item(), rel=1e-5)
    assert stats["diffrop_partner_frac"] == 1.0


def test_step_diffrop_needs_identity_and_different_identities(unet, scheduler):
    with pytest.raises(ValueError, match="identity"):
        run(unet, scheduler, "diffrop", batch=make_batch(identity=None))
    # one identity in the batch: no pair, the step is vanilla on the same x_t
    loss, stats, _ = run(unet, scheduler, "diffrop", seed=2, batch=make_batch(identity=(5, 5, 5, 5)))
    v_loss, _v_stats, _ = run(unet, scheduler, "vanilla", seed=2)
    assert stats["loss_pog"] == 0.0 and stats["diffrop_partner_frac"] == 0.0
    assert loss.item() == v_loss.item()
    # dropped captions take no part in pairs
    _, stats, _ = run(unet, scheduler, "diffrop", seed=1, dropout=0.999)
    assert stats["loss_pog"] == 0.0 and stats["diffrop_partner_frac"] == 0.0
