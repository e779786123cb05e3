"""Tiny random models of every family (pogdiff_dist.families.tiny) through the family interface:
each directory loads with DiffusionPipeline.from_pretrained into its pipeline class and samples a
1-step image on CPU; captions encode exactly as the pipeline's encode_prompt; the denoiser call
gives the pipeline's own prediction; the LoRA targets exist; and encode -> denoiser call -> loss
runs one forward + backward for every method (a plain torch loop), with finite loss and grads.
Captions are compared up to float rounding: the pipelines encode with autograd on."""

import time

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from pogdiff_dist.families import CaptionEncoder, check_components, detect_family, get_family, predict, sdxl_time_ids
from pogdiff_dist.families.latents import pack_latents, unpack_latents, vae_factors
from pogdiff_dist.families.tiny import VAE_FACTORS, build_tiny
from pogdiff_dist.losses import (
    cbdm_loss,
    ddpm_posterior_mean,
    diffrop_overlap,
    pogdiff_loss,
    t2h_loss,
    t2h_targets,
    vanilla_loss,
)
from pogdiff_dist.losses_flow import (
    flow_cbdm_loss,
    flow_diffrop_loss,
    flow_loss_weights,
    flow_noisy,
    flow_pogdiff_loss,
    flow_t2h_targets,
    flow_velocity,
)
from pogdiff_dist.timesteps import TimestepSampling, image_seq_len

NAMES = ["sd", "sdxl", "sd3", "flux"]
METHODS = ["vanilla", "pogdiff", "cbdm", "t2h", "diffrop"]
T5_LENGTH = 32  # the T5 token limit in these tests (512 / 256 by default): short sequences, fast steps
PROMPT = "An image of Alice Moreau."
CAPTIONS = ["An image of Alice Moreau.", "An image of Bob Stone.", "Alice, smiling, outdoors.", "Bob in a red coat."]


def _family(name):
    family = get_family(name)
    t5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}.get(name)
    return family.with_max_length(t5, T5_LENGTH) if t5 else family


def _pipe_kwargs(family):
    kw = {"height": 16, "width": 16, "num_inference_steps": 1, "output_type": "np",
          "generator": torch.Generator().manual_seed(0)}
    return kw | ({"max_sequence_length": T5_LENGTH} if family.objective == "flow" else {})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    t0 = time.perf_counter()
    dirs = {name: build_tiny(name, root / name) for name in NAMES}
    print(f"built {NAMES} in {time.perf_counter() - t0:.1f} s; sizes (MiB): "
          + ", ".join(f"{n} {sum(p.stat().st_size for p in d.rglob('*') if p.is_file()) / 2**20:.2f}"
                      for n, d in dirs.items()))
    return dirs


@pytest.fixture(scope="module")
def pipes(tiny):
    out = {}
    for name, d in tiny.items():
        pipe = DiffusionPipeline.from_pretrained(str(d))
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


@pytest.mark.parametrize("name", NAMES)
def test_tiny_loads_as_its_pipeline_and_samples_one_step(tiny, pipes, name):
    family = detect_family(tiny[name])
    assert family.name == name and check_components(family, tiny[name]) == tiny[name]
    pipe = pipes[name]
    assert type(pipe).__name__ == family.pipeline_class
    assert type(getattr(pipe, family.denoiser)).__name__ == family.denoiser_class
    assert type(pipe.scheduler).__name__ == family.sample_scheduler_class
    assert [type(getattr(pipe, e.encoder)).__name__ for e in family.encoders] == [e.model_class for e in family.encoders]
    assert pipe.vae.config.latent_channels == family.latent_channels
    scale, shift = VAE_FACTORS[name]
    assert vae_factors(pipe.vae.config) == (scale, shift or 0.0)
    images = pipe(PROMPT, **_pipe_kwargs(family)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("name", NAMES)
def test_captions_encode_as_the_pipeline_does(tiny, pipes, name):
    family, pipe = _family(name), pipes[name]
    cond = CaptionEncoder.from_pretrained(family, tiny[name]).encode(CAPTIONS)
    if name == "sd":
        hidden, pooled = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)[0], None
    elif name == "sdxl":
        hidden, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    elif name == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_LENGTH)
    else:
        hidden, pooled, _ = pipe.encode_prompt(CAPTIONS, None, device="cpu", max_sequence_length=T5_LENGTH)
    # equal up to float rounding (the pipeline encodes with autograd on: another kernel path)
    torch.testing.assert_close(cond.hidden, hidden.detach(), rtol=1e-5, atol=1e-5)
    assert (cond.pooled is None) == (pooled is None)
    if pooled is not None:
        torch.testing.assert_close(cond.pooled, pooled.detach(), rtol=1e-5, atol=1e-5)
    want_len = {"sd": 77, "sdxl": 77, "sd3": 77 + T5_LENGTH, "flux": T5_LENGTH}[name]
    assert cond.hidden.shape[:2] == (4, want_len)


@pytest.mark.parametrize("name", NAMES)
def test_denoiser_call_gives_the_pipelines_prediction(pipes, name):
    """Capture the pipeline's own denoiser call (guidance off: one conditional pass) and
    recompute it through :func:`predict` from the same latent, time and caption."""
    family, pipe = _family(name), pipes[name]
    model = getattr(pipe, family.denoiser)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, out=output[0] if isinstance(output, tuple) else output.sample)

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        # guidance_scale 1 turns classifier-free guidance off; Flux's guidance_scale is its embedded
        # guidance instead (its CFG, true_cfg_scale, is off by default)
        pipe(PROMPT, **_pipe_kwargs(family) | ({} if name == "flux" else {"guidance_scale": 1.0}))
    finally:
        handle.remove()
    kw, out = seen["kwargs"], seen["out"]
    cond = CaptionEncoder.from_pipeline(family, pipe).encode([PROMPT])
    time_ids = None
    if family.objective == "ddpm":
        x, t = seen["args"][0], seen["args"][1].expand(1)
        if name == "sdxl":  # uncropped 16 x 16 image: original = target = (16, 16)
            time_ids = sdxl_time_ids(1, (16, 16))
            torch.testing.assert_close(kw["added_cond_kwargs"]["time_ids"], time_ids)
    elif name == "sd3":
        x, t = kw["hidden_states"], kw["timestep"] / 1000  # the pipeline passes 1000 s
    else:
        x, t = unpack_latents(kw["hidden_states"], 8, 8), kw["timestep"]  # the pipeline passes s
        torch.testing.assert_close(kw["guidance"], torch.full((1,), 3.5))  # Flux-dev's embedded guidance
        out = unpack_latents(out, 8, 8)
    with torch.no_grad():
        ours = predict(family, model, x, t, cond, time_ids=time_ids)
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_exist_and_attach(tiny, name):
    from peft import LoraConfig

    family = get_family(name)
    model = getattr(diffusers, family.denoiser_class).from_pretrained(str(tiny[name] / family.denoiser))
    names = [n for n, _ in model.named_modules()]
    for target in family.lora_targets:  # peft's rule: the module's name is the target or ends with "." + it
        assert any(n == target or n.endswith("." + target) for n in names), f"{name}: no module matches {target}"
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                 target_modules=list(family.lora_targets)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for target in family.lora_targets:
        assert any(f".{target}.lora_A" in f".{n}" for n in trainable), f"{name}: {target} got no adapter"


# ----------------------------------------------------------------------------- every method, one step


@pytest.fixture(scope="module")
def parts(tiny):
    out = {}
    for name, d in tiny.items():
        family = _family(name)
        model = getattr(diffusers, family.denoiser_class).from_pretrained(str(d / family.denoiser))
        scheduler = getattr(diffusers, family.train_scheduler_class).from_pretrained(str(d), subfolder="scheduler")
        out[name] = (family, model.train(), CaptionEncoder.from_pretrained(family, d), scheduler)
    return out


def one_step_loss(family, model, encoder, scheduler, method, seed=0):
    """A training step's forward for ``method``, written out: draws, the (dual-condition)
    denoiser call through the family interface, the per-sample loss [B]."""
    g = torch.Generator().manual_seed(seed)
    b, flow = len(CAPTIONS), family.objective == "flow"
    x0 = torch.randn(b, family.latent_channels, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    identity, elbo, psi = torch.tensor([0, 1, 0, 1]), torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 0.5, 2.0, 0.0])
    if flow:
        sampling = TimestepSampling.from_scheduler_config(scheduler.config)
        t = sampling.sample(b, g, seq_len=image_seq_len(8, 8))
        x_t, target = flow_noisy(x0, eps, t), flow_velocity(eps, x0)
        weight = flow_loss_weights(t, "none")
    else:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        x_t, target, weight = scheduler.add_noise(x0, eps, t), eps, None
    cond = encoder.encode(CAPTIONS)
    if method in ("pogdiff", "cbdm"):  # one call on [x_t; x_t] with [y; y']
        other = encoder.encode(CAPTIONS[2:] + CAPTIONS[:2])
        out = predict(family, model, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(other))
        pred, pred2 = out[:b], out[b:]
        assert (pred - pred2).abs().amax() > 0  # the second half saw other captions
    else:
        pred = predict(family, model, x_t, t, cond)
    if method == "vanilla":
        return vanilla_loss(pred, target) * (1 if weight is None else weight)
    if method == "pogdiff":
        return (flow_pogdiff_loss if flow else pogdiff_loss)(pred, pred2, target, psi, weight)[0]
    if method == "cbdm":
        return (flow_cbdm_loss(pred, pred2, target, t, 1.0, weight) if flow
                else cbdm_loss(pred, pred2, target, t, scheduler.config.num_train_timesteps, 1.0))[0]
    if method == "t2h":
        calibrated = (flow_t2h_targets(x0, x_t, target, t, elbo, g) if flow
                      else t2h_targets(x0, x_t, eps, t, scheduler.alphas_cumprod, elbo, g))[0]
        return t2h_loss(pred, target, calibrated)[0]
    if flow:
        return flow_diffrop_loss(pred, target, x_t, t, identity, 1.0, 1.0, denoise_weight=weight)[0]
    mu = ddpm_posterior_mean(x_t, pred, t, scheduler.alphas_cumprod)
    return vanilla_loss(pred, eps) + diffrop_overlap(mu, identity, t, scheduler.config.num_train_timesteps, 1.0, 1.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_forward_and_backward(parts, name, method):
    family, model, encoder, scheduler = parts[name]
    model.zero_grad(set_to_none=True)
    loss = one_step_loss(family, model, encoder, scheduler, method)
    assert loss.shape == (len(CAPTIONS),) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0


def test_packed_prediction_layout_matches_latents(parts):
    """Flux's transformer works on packed tokens; predict hands back the latent layout."""
    family, model, encoder, _ = parts["flux"]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = predict(family, model, x, torch.tensor([0.3, 0.7]), encoder.encode(CAPTIONS[:2]))
    assert out.shape == x.shape
    assert pack_latents(out).shape == (2, 16, 64)


def test_tiny_cli_writes_a_detectable_directory(tmp_path, capsys):
    from pogdiff_dist.families.tiny import main

    main(["--family", "sd3", "--out", str(tmp_path / "sd3")])
    out = capsys.readouterr().out
    assert out.startswith("sd3: ") and out.rstrip().endswith("MiB)")
    assert detect_family(tmp_path / "sd3").name == "sd3"
