"""Where evaluation computes, checked on the CPU with the inputs a GPU run gives it: generation
in the run's compute dtype and TF32 setting."""

import numpy as np
import pytest
import torch

from pogdiff_dist.evaluation import generate as G

# ---- generation: device, dtype, TF32 -----------------------------------------------------------

def test_generation_decisions_for_a_gpu_run(tmp_path):
    assert G.task_device(1.0) == "cuda" and G.task_device(0) == "cpu"
    assert G.generation_dtype("cuda", "bf16") is torch.bfloat16
    assert G.generation_dtype(torch.device("cuda", 0), "fp32") is torch.float32
    assert G.generation_dtype("cpu", "bf16") is torch.float32  # fp32 on the CPU whatever the precision
    assert G.generation_tf32("cuda", True) is True and G.generation_tf32("cuda:0", False) is False
    assert G.generation_tf32("cpu", True) is False
    # the run folder's config.yaml says how it trained; an unknown run gets the training defaults
    (tmp_path / "config.yaml").write_text("train:\n  precision: bf16\n  allow_tf32: false\n  use_gpu: true\n")
    assert G.run_precision(tmp_path) == G.RunPrecision("bf16", False)
    assert G.run_precision(tmp_path / "nothing") == G.run_precision(None) == G.RunPrecision("fp32", True)


class _FakePipe:
    """Records the TF32 flags in force while it samples."""

    def __init__(self):
        self.flags = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, num_images_per_prompt, generator):
        self.flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return np.zeros((num_images_per_prompt, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(("gpus", "run", "device", "dtype", "tf32"), [
    (1.0, G.RunPrecision("bf16", True), "cuda", torch.bfloat16, True),
    (1.0, G.RunPrecision("fp32", False), "cuda", torch.float32, False),
    (1.0, G.RunPrecision("fp32", True), "cuda", torch.float32, True),
    (0.0, G.RunPrecision("bf16", True), "cpu", torch.float32, False),
])
def test_generation_actor_loads_the_pipeline_as_the_run_computed(monkeypatch, gpus, run, device, dtype, tf32):
    """The actor, built as Ray builds it, asks for its pipeline on the device of its GPU count in
    the run's dtype, and samples with the run's TF32 (restored afterwards)."""
    from pogdiff_dist.config import EvalConfig

    loads, pipe = [], _FakePipe()
    monkeypatch.setattr(G, "load_pipeline", lambda model_dir, dev, lora_dir, dtype: loads.append((dev, dtype)) or pipe)
    threads, before = torch.get_num_threads(), (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        actor = G.IdentityGenerator("model", EvalConfig(num_images=2, steps=1).to_dict(), 1, gpus, None, run)
        name, images, _ = actor.generate("Ione Vasquez")
    finally:
        torch.set_num_threads(threads)
    assert loads == [(device, dtype)] and name == "Ione Vasquez" and images.shape == (2, 8, 8, 3)
    assert pipe.flags == [(tf32, tf32)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bf16_pipeline_keeps_the_sampler_in_fp32(tmp_path):
    """A Stable Diffusion layout loaded in bf16 (what a bf16 run's GPU actor loads) samples: the
    UNet and VAE weights are bf16, the DDIM state and the guided noise prediction fp32, and the
    images stay close to the fp32 pipeline's from the same seed (same initial noise)."""
    from conftest import make_tiny_sd

    from pogdiff_dist.config import EvalConfig

    model = make_tiny_sd(tmp_path / "sd")
    cfg = EvalConfig(num_images=2, steps=3)
    pipe32 = G.load_pipeline(model, "cpu")
    pipe16 = G.load_pipeline(model, "cpu", dtype=G.generation_dtype("cuda", "bf16"))
    assert pipe16.unet.dtype == pipe16.vae.dtype == pipe16.text_encoder.dtype == torch.bfloat16
    assert pipe32.unet.dtype == torch.float32
    seen = []
    step = pipe16.scheduler.step
    pipe16.scheduler.step = lambda eps, t, x, **kw: seen.append((eps.dtype, x.dtype)) or step(eps, t, x, **kw)
    a, b = G.generate_identity(pipe32, "Ione Vasquez", cfg), G.generate_identity(pipe16, "Ione Vasquez", cfg)
    assert seen == [(torch.float32, torch.float32)] * 3
    assert a.shape == b.shape == (2, 16, 16, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 4  # bf16 rounding, not other noise
