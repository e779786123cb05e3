"""Identity-balanced sampling (data.sampling), per-identity loss weights (loss.identity_weight)
and psi_den from identity counts (loss.psi_den_source=identity_count): against hand
computations, over many epochs, through a restart, and in the Trainer's epoch accounting."""

import numpy as np
import pytest
import torch
from conftest import REPO

from pogdiff_dist.data.sampling import SamplingPlan, epoch_counts, expected_repeats, identity_shares, resample

COUNTS = np.array([30, 30, 30, 2, 2, 2, 2, 2, 2, 2])  # Digits-IT2I / Faces-IT2I M
IDENTITY = np.repeat(np.arange(len(COUNTS)), COUNTS)  # sample index -> identity
INDEX = np.arange(len(IDENTITY))


@pytest.mark.parametrize("mode, alpha", [("balanced", 0.0), ("power", 0.5), ("power", 0.0), ("uniform", 1.0)])
def test_identity_shares_over_many_epochs_match_the_target(mode, alpha):
    target = {"balanced": np.full(10, 0.1), "uniform": COUNTS / COUNTS.sum(),
              "power": COUNTS ** alpha / (COUNTS ** alpha).sum()}[mode]
    np.testing.assert_allclose(identity_shares(COUNTS, mode, alpha), target, rtol=1e-12)
    lam = expected_repeats(COUNTS, mode, alpha)
    np.testing.assert_allclose((lam * COUNTS).sum(), COUNTS.sum())  # an epoch keeps its expected size N
    epochs = 400
    rows = np.zeros(10)
    for e in range(epochs):
        k = epoch_counts(INDEX, IDENTITY, lam, seed=3, epoch=e)
        assert set(np.unique(k - np.floor(lam[IDENTITY]))) <= {0, 1}  # stochastic rounding of lambda
        rows += np.bincount(IDENTITY, weights=k, minlength=10)
    share = rows / rows.sum()
    # each sample's count is floor(l) + Bernoulli(frac(l)): identity c's rows vary by n_c p (1 - p) per epoch
    frac = lam - np.floor(lam)
    std = np.sqrt(epochs * COUNTS * frac * (1 - frac)) / (epochs * COUNTS.sum())
    assert np.all(np.abs(share - target) <= 5 * std + 1e-3), (share, target, std)
    if mode == "uniform":
        assert (rows == epochs * COUNTS).all()  # every sample exactly once per epoch


def test_the_plan_is_a_pure_function_of_seed_epoch_and_sample():
    lam = expected_repeats(COUNTS, "balanced")
    a = epoch_counts(INDEX, IDENTITY, lam, seed=0, epoch=5)
    np.testing.assert_array_equal(a, epoch_counts(INDEX, IDENTITY, lam, seed=0, epoch=5))  # a restart
    # any split of the samples over ranks gives each sample the same count
    perm = np.random.default_rng(0).permutation(len(INDEX))
    np.testing.assert_array_equal(epoch_counts(INDEX[perm], IDENTITY[perm], lam, 0, 5), a[perm])
    assert not np.array_equal(a, epoch_counts(INDEX, IDENTITY, lam, seed=0, epoch=6))
    assert not np.array_equal(a, epoch_counts(INDEX, IDENTITY, lam, seed=1, epoch=5))


def test_resample_repeats_rows_per_the_plan_and_is_deterministic():
    plan = SamplingPlan(list(COUNTS), "balanced", 0.0, seed=0)

    def stream():  # two numpy column batches, as Ray Data delivers them
        for part in np.array_split(INDEX, 2):
            meta = np.empty(len(part), dtype=object)
            meta[:] = [{"index": int(i), "identity_id": int(IDENTITY[i])} for i in part]
            yield {"__key__": np.array([f"{i:04d}" for i in part]), "meta.json": meta}

    out = list(resample(stream(), plan, epoch=2, batch_size=8, buffer=32, seed=7))
    got = np.array([m["index"] for b in out for m in b["meta.json"]])
    want = plan.counts(INDEX, IDENTITY, 2)
    np.testing.assert_array_equal(np.bincount(got, minlength=len(INDEX)), want)
    assert all(len(b["__key__"]) == 8 for b in out[:-1])
    again = np.array([m["index"] for b in resample(stream(), plan, 2, 8, 32, 7) for m in b["meta.json"]])
    np.testing.assert_array_equal(got, again)  # the same stream after a restart
    assert not np.array_equal(got, np.sort(got))  # shuffled: repeats are spread


def test_identity_weights_average_to_one_and_match_the_power_law():
    counts = torch.tensor(COUNTS)
    from pogdiff_dist.losses import identity_weights

    for mode, alpha in (("inverse", 0.0), ("power", 0.5), ("power", 0.25)):
        w = identity_weights(counts, mode, alpha).double()
        per_sample = w[torch.from_numpy(IDENTITY)]
        assert per_sample.mean().item() == pytest.approx(1.0, rel=1e-6)
        raw = COUNTS.astype(float) ** (alpha - 1)  # by hand
        np.testing.assert_allclose(w.numpy(), raw / (raw[IDENTITY].mean()), rtol=1e-6)
    assert torch.equal(identity_weights(counts, "none"), torch.ones(10))


def test_identity_count_psi_den_against_a_hand_computation():
    from pogdiff_dist.losses import identity_count_density, log_density_normaliser, psi_weights

    counts = torch.tensor(COUNTS)
    every = torch.from_numpy(IDENTITY)
    ident = torch.tensor([0, 3, 9, 1])
    sim, same = torch.tensor([0.9, 0.5, 0.7, 0.8]), torch.tensor([1, 0, 0, 1])
    for temperature in (1.0, 2.0):
        log_norm = log_density_normaliser(identity_count_density(counts, every), temperature)
        psi = psi_weights(sim, same, identity_count_density(counts, ident), log_norm, a1=1.0, a2=2.0, a3=0.5,
                          den_temperature=temperature)
        n = COUNTS.astype(float)
        den = n ** (-1 / temperature) / np.mean(n[IDENTITY] ** (-1 / temperature)) / 0.5  # mean over samples = 1/a3
        want = np.array([0.9 ** 1, 0.5 ** 3, 0.7 ** 3, 0.8 ** 1]) * den[[0, 3, 9, 1]]
        np.testing.assert_allclose(psi.numpy(), want, rtol=1e-5)


def test_the_step_weights_every_methods_per_sample_loss():
    """loss.identity_weight=inverse: the step's loss is the mean of w_id * per-sample loss."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pogdiff_dist.config import LossConfig
    from pogdiff_dist.data.shards import Batch, HostBatch
    from pogdiff_dist.losses import identity_weights
    from pogdiff_dist.train.step import METHODS, DualConditionStep

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, cross_attention_dim=8,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=2, norm_num_groups=4)
    sched = DDPMScheduler(num_train_timesteps=100)
    b = 4
    batch = Batch(x0=torch.randn(b, 1, 8, 8), y=torch.randn(b, 4, 8), nbr_tokens=torch.zeros(b, 1, 4, dtype=torch.long),
                  nbr_len=torch.ones(b, 1, dtype=torch.long), nbr_sim=torch.ones(b, 1), nbr_same=torch.ones(b, 1),
                  elbo=torch.zeros(b, dtype=torch.float64), index=torch.arange(b), identity=torch.tensor([0, 0, 3, 9]))
    for method in ("vanilla", "diffrop", "t2h"):
        cfg = LossConfig(method=method, k=1, identity_weight="inverse")
        step = DualConditionStep(cfg, sched, None, torch.zeros(4, 8), None, identity_counts=torch.tensor(COUNTS))
        loss, stats = step(unet, batch, torch.Generator().manual_seed(1))
        plain = DualConditionStep(LossConfig(method=method, k=1), sched, None, torch.zeros(4, 8), None)
        g = torch.Generator().manual_seed(1)
        plan = plain.plan(HostBatch.from_batch(batch), torch.Generator().manual_seed(1))
        per_sample, _ = METHODS[method](plain, unet, plain.draw(batch, plan, g), g)
        w = identity_weights(torch.tensor(COUNTS), "inverse")[batch.identity]
        assert loss.item() == pytest.approx((w * per_sample).mean().item(), rel=1e-5), method
        assert float(stats["identity_weight_mean"]) == pytest.approx(w.mean().item())
    with pytest.raises(ValueError, match="identity counts"):
        DualConditionStep(LossConfig(identity_weight="inverse"), sched, None, torch.zeros(4, 8), torch.zeros(3))


def test_balanced_sampling_in_the_trainer_reports_repeats(tmp_path):
    """Two epochs of the Trainer (one process) with data.sampling=balanced on an imbalanced
    synthetic set: the epoch accounting shows the repeats and the per-identity rows."""
    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir
    from pogdiff_dist.train.local import train_local

    d = bundled_text_encoder_dir()
    counts = [12, 2, 2]  # 16 samples
    build_synthetic_prepared(tmp_path / "prep", counts, (1, 16, 16), d, d, max_length=16, k_max=1)
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "train.num_workers": 1, "loss.k": 1, "prepare.k_max": 1, "data.sampling": "balanced", "optim.max_steps": 14,
        "optim.batch_size": 4, "train.checkpoint_every": 100, "train.log_every": 100})
    trainer, _ = train_local(cfg, tmp_path / "prep", tmp_path / "run")
    epochs = trainer.state.epochs
    assert len(epochs) >= 2
    lam = expected_repeats(counts, "balanced")  # 16/3/12 for the majority, 16/3/2 for the minority
    for e in epochs:
        ids = np.array(e["identity_rows"])
        assert ids.sum() == e["epoch_rows"] and e["epoch_repeats"] == e["epoch_rows"] - e["epoch_unique_samples"]
        assert e["epoch_repeats"] > 0 and e["epoch_seen_twice"] >= 4  # every minority sample, 2-3 times
        want = np.floor(lam * np.array(counts))
        assert np.all(ids >= want - np.array(counts)) and np.all(np.abs(ids - 16 / 3) <= np.array(counts))
    assert epochs[0]["identity_rows"] != epochs[1]["identity_rows"] or epochs[0] != epochs[1]
