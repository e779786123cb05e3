"""v-prediction for every method, min-SNR-gamma weights and noise offset, against hand-written
references; the prediction type from the scheduler, and a clear error for one we do not train."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pogdiff_dist.config import PAPER_POGDIFF, LossConfig, ModelConfig
from pogdiff_dist.data.shards import Batch, HostBatch
from pogdiff_dist.losses import (
    ddpm_posterior_mean,
    diffrop_overlap,
    eps_from_v,
    min_snr_weights,
    per_sample_mse,
    t2h_targets,
    velocity,
)
from pogdiff_dist.train.step import METHODS, DualConditionStep

# the paper's literal psi (these tests were written against it; the code defaults are the recipe)
PAPER_LOSS = {k.removeprefix("loss."): v for k, v in PAPER_POGDIFF.items() if k.startswith("loss.") and k != "loss.k"}

B = 4


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, cross_attention_dim=8,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=2, norm_num_groups=4)


def batch():
    g = torch.Generator().manual_seed(3)
    return Batch(x0=torch.randn(B, 1, 8, 8, generator=g), y=torch.randn(B, 4, 8, generator=g),
                 nbr_tokens=torch.zeros(B, 1, 4, dtype=torch.long), nbr_len=torch.ones(B, 1, dtype=torch.long),
                 nbr_sim=torch.full((B, 1), 0.9), nbr_same=torch.ones(B, 1), elbo=torch.linspace(-3, 0, B).double(),
                 index=torch.arange(B), identity=torch.tensor([0, 0, 1, 2]))


def text_encoder():
    """A real (tiny, random) BERT for y': the step encodes neighbour captions with it."""
    from transformers import BertConfig, BertModel

    from pogdiff_dist.models import TextEncoder

    torch.manual_seed(1)
    bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                vocab_size=50))
    return TextEncoder.from_parts(bert, tokenizer=None, max_length=4)


def step_for(method, prediction="v_prediction", **loss):
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction)
    return DualConditionStep(LossConfig(method=method, k=1, **{**PAPER_LOSS, **loss}), sched, text_encoder(), torch.zeros(4, 8),
                             torch.zeros(10).double() if method == "pogdiff" else None)


def draws(step, seed):
    """The step's host plan and device draws for ``batch()``, from seeded generators: (draws, generator)."""
    b = batch()
    plan = step.plan(HostBatch.from_batch(b), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    return step.draw(b, plan, g), g


def run(step, unet, method, seed=1):
    """(per-sample loss, stats, the draws the step made) with a replayable generator."""
    d, g = draws(step, seed)
    loss, stats = METHODS[method](step, unet, d, g)
    return loss, {**stats, **(d.plan.host_stats or {})}, d


def test_the_v_target_and_its_inverse(unet):
    ac = DDPMScheduler(num_train_timesteps=100).alphas_cumprod
    t, eps, x0 = torch.tensor([0, 10, 50, 99]), torch.randn(B, 1, 8, 8), torch.randn(B, 1, 8, 8)
    a = ac[t].view(-1, 1, 1, 1)
    v = velocity(eps, x0, t, ac)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(v, DDPMScheduler(num_train_timesteps=100).get_velocity(x0, eps, t))  # diffusers'
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(eps_from_v(v, x_t, t, ac), eps, atol=1e-5, rtol=1e-5)


def test_vanilla_and_cbdm_regress_v(unet):
    for method in ("vanilla", "cbdm"):
        step = step_for(method)
        loss, stats, d = run(step, unet, method)
        with torch.no_grad():
            pred = unet(d.x_t, d.t, encoder_hidden_states=d.y).sample
        a = step.scheduler.alphas_cumprod[d.t].view(-1, 1, 1, 1)
        v = a.sqrt() * d.eps - (1 - a).sqrt() * d.batch.x0
        torch.testing.assert_close(float(stats["loss_denoise"]), per_sample_mse(pred, v).mean().item(),
                                   rtol=1e-5, atol=1e-6)
        if method == "vanilla":
            torch.testing.assert_close(loss.detach(), per_sample_mse(pred, v), rtol=1e-5, atol=1e-6)


def test_pogdiff_v_denoises_against_v_and_its_pog_term_is_in_output_space(unet):
    v_step, e_step = step_for("pogdiff", use_psi_den=False), step_for("pogdiff", "epsilon", use_psi_den=False)
    v_loss, v_stats, d = run(v_step, unet, "pogdiff")
    _, e_stats, _ = run(e_step, unet, "pogdiff")
    with torch.no_grad():
        pred = unet(d.x_t, d.t, encoder_hidden_states=d.y).sample
    a = v_step.scheduler.alphas_cumprod[d.t].view(-1, 1, 1, 1)
    v = a.sqrt() * d.eps - (1 - a).sqrt() * d.batch.x0
    assert float(v_stats["loss_denoise"]) == pytest.approx(per_sample_mse(pred, v).mean().item(), rel=1e-5)
    assert float(e_stats["loss_denoise"]) == pytest.approx(per_sample_mse(pred, d.eps).mean().item(), rel=1e-5)
    # the same draws give the same two predictions: psi |eps(y) - eps(y')|^2 does not depend on the target
    assert float(v_stats["loss_pog"]) == pytest.approx(float(e_stats["loss_pog"]), rel=1e-5)
    assert float(v_stats["loss_pog"]) > 0
    torch.testing.assert_close(v_loss.mean(), torch.tensor(float(v_stats["loss_denoise"]) + float(v_stats["loss_pog"])))


def test_t2h_v_target_is_the_transferred_samples_velocity(unet):
    step = step_for("t2h")
    loss, _, d = run(step, unet, "t2h")
    _, g = draws(step, 1)  # replay the draws up to T2H's own
    ac = step.scheduler.alphas_cumprod
    eps_t, j, moved = t2h_targets(d.batch.x0, d.x_t, d.eps, d.t, ac, d.batch.elbo, g)
    a = ac[d.t].view(-1, 1, 1, 1)
    x0_src = torch.stack([d.batch.x0[j[i]] if moved[i] else d.batch.x0[i] for i in range(B)])
    v_target = a.sqrt() * eps_t - (1 - a).sqrt() * x0_src  # by hand
    with torch.no_grad():
        pred = unet(d.x_t, d.t, encoder_hidden_states=d.y).sample
    torch.testing.assert_close(loss.detach(), per_sample_mse(pred, v_target), rtol=1e-5, atol=1e-6)


def test_diffrop_v_takes_the_posterior_mean_of_the_implied_noise(unet):
    step = step_for("diffrop")
    loss, stats, d = run(step, unet, "diffrop")
    ac = step.scheduler.alphas_cumprod
    with torch.no_grad():
        pred = unet(d.x_t, d.t, encoder_hidden_states=d.y).sample
    a = ac[d.t].view(-1, 1, 1, 1)
    eps_pred = a.sqrt() * pred + (1 - a).sqrt() * d.x_t  # by hand
    mu = ddpm_posterior_mean(d.x_t, eps_pred, d.t, ac)
    overlap = diffrop_overlap(mu, d.batch.identity, d.t, 100, 1.0, 5.0, ~d.dropped)
    v = a.sqrt() * d.eps - (1 - a).sqrt() * d.batch.x0
    torch.testing.assert_close(loss.detach(), per_sample_mse(pred, v) + overlap, rtol=1e-5, atol=1e-6)
    assert float(stats["loss_pog"]) > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_against_compute_snr(unet, prediction):
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction)
    t = torch.arange(0, 100, 7)
    snr = compute_snr(sched, t)
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(snr, a / (1 - a))  # SNR = abar / (1 - abar)
    w = min_snr_weights(snr, 5.0, prediction)
    want = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction == "v_prediction" else snr)
    torch.testing.assert_close(w, want)
    assert (w <= 1 + 1e-6).all() and w[-1] == pytest.approx(1.0 if prediction == "epsilon" else snr[-1] / (snr[-1] + 1))
    # in the step: the denoising term is weighted per sample, the other terms are not
    step = DualConditionStep(LossConfig(method="vanilla", snr_gamma=5.0), sched, None, torch.zeros(4, 8), None)
    plain = DualConditionStep(LossConfig(method="vanilla"), sched, None, torch.zeros(4, 8), None)
    (lw, _, d), (lp, _, _) = run(step, unet, "vanilla"), run(plain, unet, "vanilla")
    torch.testing.assert_close(lw, min_snr_weights(compute_snr(sched, d.t), 5.0, prediction) * lp)


def test_noise_offset_shifts_each_channel_of_the_noise(unet):
    off, plain = step_for("vanilla", "epsilon", noise_offset=0.1), step_for("vanilla", "epsilon")
    (d_off, _), (d_plain, _) = draws(off, 4), draws(plain, 4)
    shift = d_off.eps - d_plain.eps  # the same base noise, plus a constant per sample and channel
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))
    assert 0 < shift.abs().mean() < 0.5 and torch.equal(d_off.t, d_plain.t)


def test_prediction_type_comes_from_the_scheduler_and_others_are_refused(tmp_path):
    from pogdiff_dist.models import build_noise_scheduler

    assert build_noise_scheduler(ModelConfig()).config.prediction_type == "epsilon"
    assert build_noise_scheduler(ModelConfig(prediction_type="v_prediction")).config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="model.prediction_type"):
        ModelConfig(prediction_type="sample")
    root = tmp_path / "sd"
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (root / part).mkdir(parents=True)
    DDPMScheduler(num_train_timesteps=10, prediction_type="v_prediction").save_pretrained(root / "scheduler")
    assert build_noise_scheduler(ModelConfig(pretrained=str(root))).config.prediction_type == "v_prediction"
    assert build_noise_scheduler(ModelConfig(pretrained=str(root), prediction_type="epsilon")).config.prediction_type \
        == "epsilon"
    DDPMScheduler(num_train_timesteps=10, prediction_type="sample").save_pretrained(root / "scheduler")
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type is 'sample'"):
        build_noise_scheduler(ModelConfig(pretrained=str(root)))


def test_a_v_prediction_model_trains_exports_and_samples(tmp_path):
    """The Trainer in one process with model.prediction_type=v_prediction: the export's scheduler
    keeps it, and DDIM sampling with it runs."""
    from conftest import REPO

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir
    from pogdiff_dist.pipeline import PoGDiffPipeline
    from pogdiff_dist.train.local import train_local

    d = bundled_text_encoder_dir()
    build_synthetic_prepared(tmp_path / "prep", [6, 2], (1, 16, 16), d, d, max_length=16, k_max=2)
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "train.num_workers": 1, "loss.k": 2, "prepare.k_max": 2, "model.prediction_type": "v_prediction",
        "loss.snr_gamma": 5.0, "loss.noise_offset": 0.05, "optim.max_steps": 3})
    trainer, _ = train_local(cfg, tmp_path / "prep", tmp_path / "run")
    assert trainer.state.step == 3 and math.isfinite(trainer.state.last["loss"])
    pipe = PoGDiffPipeline.from_pretrained(str(tmp_path / "run" / "model"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe(["An image of Person A."], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 16, 16, 1)
