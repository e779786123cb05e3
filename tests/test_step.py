"""DualConditionStep: UNet call structure, neighbour/psi handling and the loss value (CPU, tiny UNet)."""

import pytest
import torch

from pogdiff_dist.config import PAPER_POGDIFF, LossConfig, ModelConfig
from pogdiff_dist.data.shards import Batch
from pogdiff_dist.losses import log_density_normaliser
from pogdiff_dist.models import ModelSpec, TextEncoder, build_noise_scheduler, build_unet, bundled_text_encoder_dir
from pogdiff_dist.train.step import DualConditionStep

# the paper's literal psi (these tests were written against it; the code defaults are the recipe)
PAPER_LOSS = {k.removeprefix("loss."): v for k, v in PAPER_POGDIFF.items() if k.startswith("loss.") and k != "loss.k"}

B, K, L = 4, 3, 8
CAPTIONS = ["a red digit three", "a blue seven", "digit zero on grey", "a small green one"]
NBR_CAPTIONS = [
    ["a red digit eight", "a red five", "three in red"],
    ["blue digit one", "a blue nine", "seven, blue"],
    ["zero on a grey background", "grey six", "a grey eight"],
    ["green seven", "a small green four", "one in green"],
]


@pytest.fixture(scope="module")
def text_encoder():
    d = bundled_text_encoder_dir()
    return TextEncoder(d, d, max_length=L)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = build_unet(ModelConfig(unet="tiny"), ModelSpec(1, 16, 384))
    return m.eval()  # no dropout in the preset, but keep forward deterministic


@pytest.fixture(scope="module")
def scheduler():
    return build_noise_scheduler(ModelConfig())


@pytest.fixture(scope="module")
def uncond(text_encoder):
    return text_encoder.encode([""])[0][0]


@pytest.fixture(scope="module")
def all_elbo():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, generator=g, dtype=torch.float64) + 4.0


def make_batch(text_encoder, all_elbo, sims):
    g = torch.Generator().manual_seed(2)
    y, _ = text_encoder.encode(CAPTIONS)
    flat = [c for row in NBR_CAPTIONS for c in row]
    ids, lens = text_encoder.tokenize(flat)
    return Batch(
        x0=torch.rand(B, 1, 16, 16, generator=g) * 2 - 1,
        y=y,
        nbr_tokens=torch.from_numpy(ids).reshape(B, K, L),
        nbr_len=torch.from_numpy(lens).reshape(B, K),
        nbr_sim=torch.as_tensor(sims, dtype=torch.float32),
        nbr_same=torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]]),
        elbo=all_elbo[:B].float(),
        index=torch.arange(B),
    )


class CountingUNet:
    def __init__(self, unet):
        self.unet = unet
        self.calls = []

    def __call__(self, x, t, encoder_hidden_states):
        self.calls.append({"n": x.shape[0], "grad": torch.is_grad_enabled(), "x": x.detach().clone(), "t": t.clone(),
                               "y": encoder_hidden_states.detach().clone()})
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


POSITIVE = [[0.9, 0.8, 0.7], [0.6, 0.5, 0.4], [0.95, 0.3, 0.2], [0.5, 0.45, 0.1]]
# rows 1 and 3 have no positive neighbour -> psi_img = 0 for any draw
HALF = [[0.9, 0.8, 0.7], [-0.1, -0.2, -0.3], [0.95, 0.3, 0.2], [0.0, -0.5, -0.6]]
NONE = [[-0.1, -0.2, -0.3]] * 4
# exactly one positive neighbour per row -> the draw is deterministic (j = 0)
ONE_POS = [[0.8, -0.1, -0.2], [0.5, -0.3, -0.4], [0.9, 0.0, -0.1], [0.3, -0.2, -0.5]]


def run_step(unet, scheduler, text_encoder, uncond, all_elbo, sims, seed=0, dropout=0.0, **loss_kw):
    cfg = LossConfig(k=K, **{**PAPER_LOSS, **loss_kw})
    step = DualConditionStep(cfg, scheduler, text_encoder, uncond, all_elbo, caption_dropout=dropout)
    wrapped = CountingUNet(unet)
    loss, stats = step(wrapped, make_batch(text_encoder, all_elbo, sims), torch.Generator().manual_seed(seed))
    # stats are read at log time: detached 0-d tensors (no GPU sync per step) or floats; PoGDiff's
    # per-sample psi goes to the trainer's PsiRecord (the run's psi histogram), not a logged mean
    psi = stats.pop("psi", None)
    if psi is not None:
        assert psi.shape == (len(sims),) and not psi.requires_grad
        assert float(psi.mean()) == pytest.approx(float(stats["psi_mean"]))
    assert all(isinstance(v, float) or (v.ndim == 0 and not v.requires_grad) for v in stats.values()), stats
    return loss, {k: float(v) for k, v in stats.items()}, wrapped.calls


@pytest.fixture
def env(unet, scheduler, text_encoder, uncond, all_elbo):
    def go(sims, **kw):
        return run_step(unet, scheduler, text_encoder, uncond, all_elbo, sims, **kw)
    return go


def test_vanilla_one_call(env):
    loss, stats, calls = env(POSITIVE, method="vanilla")
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True)]
    assert loss.ndim == 0 and loss.requires_grad
    assert stats["loss_denoise"] == pytest.approx(loss.item(), rel=1e-6)
    assert stats["loss_pog"] == 0.0


def test_full_all_active_single_call_of_2b(env):
    loss, stats, calls = env(POSITIVE, neighbor_grad="full")
    assert [(c["n"], c["grad"]) for c in calls] == [(2 * B, True)]
    # the y' half uses the same x_t and t as the y half
    c = calls[0]
    assert torch.equal(c["x"][:B], c["x"][B:]) and torch.equal(c["t"][:B], c["t"][B:])
    assert stats["psi_zero_frac"] == 0.0 and stats["psi_mean"] > 0
    assert loss.item() == pytest.approx(stats["loss_denoise"] + stats["loss_pog"], rel=1e-5)
    assert stats["loss_pog"] > 0


def test_stop_all_active_two_calls(env):
    _, stats, calls = env(POSITIVE, neighbor_grad="stop")
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True), (B, False)]
    assert torch.equal(calls[0]["x"], calls[1]["x"]) and torch.equal(calls[0]["t"], calls[1]["t"])
    assert stats["psi_zero_frac"] == 0.0


@pytest.mark.parametrize("grad", ["full", "stop"])
def test_inactive_rows_skip_neighbour_pass(env, grad):
    _loss, stats, calls = env(HALF, neighbor_grad=grad, use_psi_den=False)
    active = [0, 2]
    if grad == "full":
        assert [(c["n"], c["grad"]) for c in calls] == [(B + 2, True)]
        x, t = calls[0]["x"], calls[0]["t"]
        assert torch.equal(x[B:], x[active]) and torch.equal(t[B:], t[active])
    else:
        assert [(c["n"], c["grad"]) for c in calls] == [(B, True), (2, False)]
        assert torch.equal(calls[1]["x"], calls[0]["x"][active])
        assert torch.equal(calls[1]["t"], calls[0]["t"][active])
    assert stats["psi_zero_frac"] == pytest.approx(0.5)
    assert stats["psi_max"] > 0


@pytest.mark.parametrize("grad", ["full", "stop"])
def test_all_psi_zero_is_vanilla(env, grad):
    loss, stats, calls = env(NONE, neighbor_grad=grad, use_psi_den=False, seed=7)
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True)]
    assert stats["psi_zero_frac"] == 1.0 and stats["psi_max"] == 0.0 and stats["loss_pog"] == 0.0
    # step.py draws t, eps, dropout before the neighbour draw, so the same seed gives the same x_t, t
    v_loss, v_stats, v_calls = env(NONE, method="vanilla", seed=7)
    assert torch.equal(calls[0]["x"], v_calls[0]["x"]) and torch.equal(calls[0]["t"], v_calls[0]["t"])
    assert loss.item() == v_loss.item()
    assert stats["loss_denoise"] == v_stats["loss_denoise"]


def test_loss_matches_reference_recomputation(env, unet, scheduler, text_encoder, all_elbo):
    a1, a2, a3 = 1.0, 2.0, 0.5
    loss, stats, calls = env(ONE_POS, neighbor_grad="full", a1=a1, a2=a2, a3=a3, seed=3)
    batch = make_batch(text_encoder, all_elbo, ONE_POS)

    # re-draw t and eps in step.py's order
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    x_t = scheduler.add_noise(batch.x0, eps, t)
    assert torch.equal(t, calls[0]["t"][:B])
    torch.testing.assert_close(x_t, calls[0]["x"][:B])

    # j = 0 for every row (its only positive neighbour): psi by hand
    ln = log_density_normaliser(all_elbo, 1.0).item()
    psi = []
    for i in range(B):
        s, same = float(batch.nbr_sim[i, 0]), int(batch.nbr_same[i, 0])
        psi.append(s ** (a1 + a2 * (1 - same)) * float(torch.exp(-batch.elbo[i].double() - ln)) / a3)
    psi = torch.tensor(psi)
    assert stats["psi_mean"] == pytest.approx(psi.mean().item(), rel=1e-5)
    assert stats["psi_max"] == pytest.approx(psi.max().item(), rel=1e-5)

    with torch.no_grad():
        y_nb, _ = text_encoder.encode_ids(batch.nbr_tokens[:, 0], batch.nbr_len[:, 0])
        y_nb = y_nb.half().float()  # at the precision the shards store y in
        assert torch.equal(calls[0]["y"][B:], y_nb)
        pred = unet(x_t, t, encoder_hidden_states=batch.y).sample
        pred_nb = unet(x_t, t, encoder_hidden_states=y_nb).sample
    total = 0.0
    for i in range(B):
        d = ((pred[i] - eps[i]) ** 2).mean().item()
        p = ((pred[i] - pred_nb[i]) ** 2).mean().item()
        total += d + psi[i].item() * p
    assert loss.item() == pytest.approx(total / B, rel=1e-4)

    # stop-gradient gives the same forward value
    loss_stop, _, _ = env(ONE_POS, neighbor_grad="stop", a1=a1, a2=a2, a3=a3, seed=3)
    assert loss_stop.item() == pytest.approx(loss.item(), rel=1e-4)


def test_full_and_stop_gradients_differ(env, unet):
    def grads(mode, sims, **kw):
        unet.zero_grad()
        loss, _, _ = env(sims, neighbor_grad=mode, seed=5, **kw)
        loss.backward()
        out = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
        unet.zero_grad()
        return out

    gf, gs = grads("full", POSITIVE, a3=0.2), grads("stop", POSITIVE, a3=0.2)
    assert gf.shape == gs.shape
    assert (gf - gs).abs().max() > 1e-6 * gf.abs().max() + 1e-9
    z_full, z_stop = grads("full", NONE, use_psi_den=False), grads("stop", NONE, use_psi_den=False)
    assert torch.equal(z_full, z_stop)


def test_caption_dropout_zeroes_psi(env, uncond):
    loss, stats, calls = env(POSITIVE, neighbor_grad="full", dropout=0.999, seed=1)
    assert [(c["n"], c["grad"]) for c in calls] == [(B, True)]
    # every caption was replaced by the empty caption's hidden states
    for i in range(B):
        torch.testing.assert_close(calls[0]["y"][i], uncond)
    assert stats["psi_zero_frac"] == 1.0 and stats["psi_mean"] == 0.0 and stats["loss_pog"] == 0.0
    assert loss.item() == pytest.approx(stats["loss_denoise"], rel=1e-6)


def test_stats_keys(env):
    _, stats, _ = env(POSITIVE)
    assert set(stats) == {"loss_denoise", "loss_pog", "psi_mean", "psi_max", "psi_zero_frac", "text_cache_hit_rate"}
    assert all(isinstance(v, float) for v in stats.values())


class CountingEncoder:
    """The real text encoder, recording how many caption rows each call encodes."""

    def __init__(self, encoder):
        self.encoder, self.rows = encoder, []
        self.device = encoder.device

    def encode_ids(self, ids, lengths):
        self.rows.append(ids.shape[0])
        return self.encoder.encode_ids(ids, lengths)


def test_caption_cache_matches_the_encoder_and_encodes_each_distinct_caption_once(text_encoder):
    from pogdiff_dist.models import CaptionStateCache

    captions = ["a red three", "a blue seven", "a red three", "grey zero", "a blue seven", "a red three"]
    ids, lens = (torch.from_numpy(a) for a in text_encoder.tokenize(captions))
    direct, _ = text_encoder.encode_ids(ids, lens)
    counting = CountingEncoder(text_encoder)
    cache = CaptionStateCache(counting, max_mib=1.0)
    out, pooled = cache(ids, lens)
    assert pooled is None  # one encoder: no pooled vector for the denoiser
    assert torch.equal(out, direct.half().float())  # y' at the shards' precision of y
    assert counting.rows == [3]  # three distinct captions in the batch
    again, _ = cache(ids[[3, 0]], lens[[3, 0]])
    assert counting.rows == [3] and torch.equal(again, direct[[3, 0]].half().float())
    assert cache.lookups == 8 and cache.hits == 2 and cache.hit_rate == 0.25
    # entry = L x D fp16 = 8 x 384 x 2 bytes; 1 MiB holds 170 of them
    assert cache.capacity == 2**20 // (L * 384 * 2)


def test_caption_cache_evicts_least_recently_used_and_zero_mib_keeps_nothing(text_encoder):
    from pogdiff_dist.models import CaptionStateCache

    ids, lens = (torch.from_numpy(a) for a in text_encoder.tokenize(["one", "two", "three"]))
    counting = CountingEncoder(text_encoder)
    cache = CaptionStateCache(counting, max_mib=2 * L * 384 * 2 / 2**20)  # room for exactly 2 captions
    cache(ids[:2], lens[:2])
    cache(ids[:1], lens[:1])  # "one" is now the most recent
    cache(ids[2:], lens[2:])  # adds "three", evicts "two"
    assert cache.capacity == 2 and len(cache._cache) == 2
    cache(ids[:1], lens[:1])
    cache(ids[1:2], lens[1:2])
    assert counting.rows == [2, 1, 1]  # "one" hit; "two" had been evicted
    off = CaptionStateCache(CountingEncoder(text_encoder), max_mib=0)
    off(ids, lens)
    off(ids, lens)
    assert off.encoder.rows == [3, 3] and off.hits == 0


def test_step_reports_cache_hits_and_gives_the_same_loss_with_and_without_cache(unet, scheduler, text_encoder,
                                                                                uncond, all_elbo):
    batch = make_batch(text_encoder, all_elbo, POSITIVE)
    cfg = LossConfig(k=K, **PAPER_LOSS)
    cached = DualConditionStep(cfg, scheduler, text_encoder, uncond, all_elbo, text_cache_mib=16)
    plain = DualConditionStep(cfg, scheduler, text_encoder, uncond, all_elbo, text_cache_mib=0)
    losses = []
    for step in (cached, cached, plain):
        loss, stats = step(unet, batch, torch.Generator().manual_seed(5))
        losses.append(loss.item())
    assert stats["text_cache_hit_rate"] == 0.0
    assert cached.nbr_states.hit_rate == 0.5  # the second step found all four y' cached
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)
