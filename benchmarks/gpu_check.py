"""GPU acceptance check: the project's Trainer, without Ray, on a Stable Diffusion v1.5 UNet.

What it runs (one process, world size 1, DeepSpeed ZeRO-2, bf16, as configs/sd15.yaml):

1. an SD v1.5-layout directory made on the spot: the UNet from SD v1.5's exact config with
   random weights (no weights travel), CLIP ViT-L/14's text tower (random), a word-level
   tokenizer, SD's VAE (random) and scheduler, all saved with ``save_pretrained`` and loaded
   back by the training code with ``from_pretrained``;
2. a prepared dataset in the project's shard format written on the spot
   (:mod:`pogdiff_dist.data.synthetic`: 64 x 64 x 4 latents, 77 x 768 caption states from
   that text tower, exact k-NN and the density VAE on the device);
3. vanilla, PoGDiff ``stop``, PoGDiff ``full`` and PoGDiff ``full`` through a rank-8 LoRA
   for a few steps each, timed side by side, with FLOPs of one step from
   ``torch.utils.flop_counter``, MFU against the card's dense bf16 peak, and each one's
   trainable parameters and optimiser-state bytes (LoRA against full fine-tuning);
4. a checkpoint and a resume (the resumed run continues at the checkpoint's step);
5. the export, loaded back with diffusers, and a short DDIM sample on the device.

It writes one JSON (images/s per method, stop/vanilla and full/vanilla step-time ratios,
MFU, peak GPU memory, what was checked). On a CPU machine ``--device cpu --tiny`` runs the
same code paths with SD's block layout at a few-thousandth of the size (a test does).

    bash scripts/gpu_check.sh                              # GPU test machine: results/gpu_check.json
    bash scripts/gpu_check.sh --device cpu --tiny --out /tmp/gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(BENCH), str(BENCH.parent)) if p not in sys.path]

import torch
from gpu_unet import SD15_TEXT, SD15_UNET, TINY_TEXT, TINY_UNET

# SD v1.5 vae/config.json and scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), verbatim values
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215, "act_fn": "silu"}
TINY_VAE = {**SD15_VAE, "block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 32}
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                      "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
# Dense bf16 peaks (TFLOP/s) of the cards a GPU check may land on, by a substring of the device name
BF16_DENSE_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
METHODS = {"vanilla": {"loss.method": "vanilla"},
           "stop": {"loss.method": "pogdiff", "loss.neighbor_grad": "stop"},
           "full": {"loss.method": "pogdiff", "loss.neighbor_grad": "full"},
           # the same objective through a rank-8 LoRA on the attention projections (model.lora_rank)
           "full_lora8": {"loss.method": "pogdiff", "loss.neighbor_grad": "full", "model.lora_rank": 8}}
COUNTS = [24, 16, 8, 8, 4, 2, 2]  # 64 samples; imbalanced, as the method expects


def make_sd_layout(root: Path, tiny: bool, words: list[str]) -> Path:
    """An SD v1.5-layout directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/) of random models."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            model_max_length=77).save_pretrained(root / "tokenizer")
    text = {**(TINY_TEXT if tiny else SD15_TEXT), "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(root / "text_encoder")
    AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)).save_pretrained(root / "vae")
    UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).save_pretrained(root / "unet")
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu: no MFU"
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_DENSE_PEAK.items():
        if key in name:
            return value, name
    return None, f"{name}: unknown peak (pass --peak-tflops)"


class StepClock:
    """A tracker (the Trainer logs every step with log_every=1) that timestamps each step's log.
    The log reads the step's loss on the host, so the GPU has finished the step when it is called."""

    def __init__(self):
        self.times, self.logs = [], []

    def log(self, step, metrics):
        if "loss" in metrics:
            self.times.append((step, time.perf_counter()))
        self.logs.append((step, dict(metrics)))

    def log_image(self, step, key, image):
        pass

    def step_seconds(self, skip: int) -> list[float]:
        t = [b - a for (_, a), (_, b) in zip(self.times, self.times[1:])]
        return t[skip:]

    def series(self, key):
        return [m[key] for _, m in self.logs if key in m]


def run_method(name: str, cfg, prepared: Path, work: Path, device: torch.device, warmup: int) -> dict:
    """Train ``cfg.optim.max_steps`` steps with the Trainer; time the steps after ``warmup``; count one step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from pogdiff_dist.train.local import LocalCheckpoints, read_local
    from pogdiff_dist.train.trainer import Trainer

    clock = StepClock()
    trainer = Trainer(cfg, prepared, device, 0, 1, report=LocalCheckpoints(work / name, keep=1), tracker=clock,
                      run_dir=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    read = read_local()
    # the first step (a warm-up step, not timed) runs under the FLOP counter: forward, backward, optimiser
    with FlopCounterMode(display=False) as counter:
        trainer._train_step(next(iter(trainer.stream(read, 0))).batch)
    t0 = time.perf_counter()
    trainer.fit(read)
    wall = time.perf_counter() - t0
    times = clock.step_seconds(warmup)
    med = statistics.median(times)
    row = {"steps": cfg.optim.max_steps, "timed_steps": len(times), "median_step_s": med,
           "step_s": times, "images_per_s": cfg.optim.batch_size / med, "flops_per_step": float(counter.get_total_flops()),
           "loss": clock.series("loss"), "psi_zero_frac": clock.series("psi_zero_frac"), "wall_s": wall,
           "attention": trainer.attention,
           "trainable_params": sum(p.numel() for _, p in trainer.engine.trainable()),
           "optimizer_state_mib": trainer.engine.optimizer_state_bytes() / 2**20}
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="SD's block layout at a tiny size: 16 x 16 x 4 latents")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch (the paper's 8)")
    p.add_argument("--steps", type=int, default=12,
                   help="steps per method: the first (FLOP-counted) and the next --warmup are not timed")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile inside the engine)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="train.precision (configs/sd15.yaml: bf16; fp32 keeps a CPU check fast)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by card name)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_check.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                 "use --device cpu --tiny to check the code paths on CPU")

    from _common import write_result
    from diffusers import UNet2DConditionModel

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.synthetic import POSES, build_synthetic_prepared, synthetic_identities
    from pogdiff_dist.pipeline import load_pipeline
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import train_local

    t_start = time.perf_counter()
    init_single_process(device)
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    words = [w for n in synthetic_identities(COUNTS) for w in f"An image of {n}".split()] + \
        [w.strip(",.") for pose in POSES for w in pose.split()]
    layout = make_sd_layout(work / "sd15", args.tiny, words)
    latent = (4, 16, 16) if args.tiny else (4, 64, 64)
    t0 = time.perf_counter()
    manifest = build_synthetic_prepared(work / "prepared", COUNTS, latent, layout / "text_encoder",
                                        layout / "tokenizer", max_length=77, k_max=5, samples_per_shard=16,
                                        device=device, vae_dir=layout / "vae")
    prepare_s = time.perf_counter() - t0
    print(f"[gpu_check] layout + prepared shards ({manifest.num_samples} samples, latents {latent}, text "
          f"{manifest.text_shape}) in {time.perf_counter() - t_start:.0f}s", flush=True)

    base = load_config(BENCH.parent / "configs" / "sd15.yaml", {
        "model.pretrained": str(layout), "model.image_encoder": "pixels", "prepare.out_dir": str(work / "prepared"),
        "prepare.k_max": 5, "loss.k": 5, "optim.batch_size": args.batch_size, "optim.grad_accum": 1,
        "optim.warmup_steps": 1, "train.use_gpu": device.type == "cuda", "train.log_every": 1,
        "train.checkpoint_every": 10**6, "train.caption_dropout": 0.0, "loss.use_psi_den": False,
        "train.cpus_per_worker": min(8, os.cpu_count() or 1), "train.compile": args.compile, "train.precision": args.precision, "train.shuffle_buffer": 0, "train.sample_steps": 10,
        "train.samples_per_prompt": 2})
    # psi_den off and no caption dropout: every sample with a positively similar neighbour runs
    # the y' pass, so the timed PoGDiff steps are the method's full cost (psi_zero_frac says how many did not)
    methods = {}
    for name, overrides in METHODS.items():
        cfg = base.with_overrides({**overrides, "optim.max_steps": args.steps})
        methods[name] = run_method(name, cfg, work / "prepared", work, device, args.warmup)
        m = methods[name]
        print(f"[gpu_check] {name}: {m['images_per_s']:.1f} images/s, step {m['median_step_s'] * 1e3:.1f} ms, "
              f"{m['flops_per_step'] / 1e12:.2f} TFLOP/step", flush=True)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    for m in methods.values():
        m["mfu"] = m["flops_per_step"] / m["median_step_s"] / (peak * 1e12) if peak else None
    vanilla_s = methods["vanilla"]["median_step_s"]
    ratios = {f"{k}_over_vanilla_step_time": methods[k]["median_step_s"] / vanilla_s for k in ("stop", "full")}
    lora, full_ft = methods["full_lora8"], methods["full"]
    ratios.update(lora_over_full_step_time=lora["median_step_s"] / full_ft["median_step_s"],
                  lora_over_full_optimizer_state=lora["optimizer_state_mib"] / full_ft["optimizer_state_mib"],
                  lora_over_full_peak_gpu_memory=(lora["peak_gpu_mib"] / full_ft["peak_gpu_mib"]
                                                  if "peak_gpu_mib" in lora else None))

    # checkpoint at step 3, resume to step 5 with a new Trainer, export, load back with diffusers, sample
    run_dir = work / "resume"
    full = base.with_overrides({**METHODS["full"], "train.checkpoint_every": 3})
    first, _ = train_local(full.with_overrides({"optim.max_steps": 3}), work / "prepared", run_dir, device)
    resume_log = StepClock()
    resumed, checkpoints = train_local(full.with_overrides({"optim.max_steps": 5}), work / "prepared", run_dir,
                                       device, resume=True, tracker=resume_log)
    from diffusers import DiffusionPipeline

    unet = UNet2DConditionModel.from_pretrained(str(run_dir / "model" / "unet"))
    exported_as = type(DiffusionPipeline.from_pretrained(str(run_dir / "model"))).__name__  # the generic loader
    pipe = load_pipeline(run_dir / "model", device)
    t0 = time.perf_counter()
    images = pipe(["An image of Person F."], num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    sample_s = time.perf_counter() - t0
    checks = {
        "first_run_steps": first.state.step, "resumed_from_step": resume_log.series("resumed_from_step"),
        "resumed_run_steps": resumed.state.step, "checkpoints": [c.name for c in checkpoints.all()],
        "resumed_losses_finite": all(map(math.isfinite, resume_log.series("loss"))),
        "export_unet_params": sum(p.numel() for p in unet.parameters()),
        "export_loads_with_diffusers": exported_as,
        "sample_shape": list(images.shape), "sample_std": float(images.std()), "sample_s": sample_s,
        "sample_grid": str(run_dir / "samples.png"),
    }
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    ok = (exported_as == "StableDiffusionPipeline" and first.state.step == 3 and checks["resumed_from_step"] == [3] and resumed.state.step == 5
          and checks["resumed_losses_finite"] and images.shape[1] == vae_scale * latent[1] and images.std() > 0)
    ok = bool(ok)
    checks["passed"] = ok
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": args.tiny, "batch_size": args.batch_size, "latent": list(latent), "text": manifest.text_shape,
        "precision": base.train.precision, "zero_stage": base.train.zero_stage, "ema": base.train.ema,
        "compile": args.compile, "peak_tflops": peak, "peak_source": peak_source,
        "methods": methods, **ratios, "targets": {"vanilla_mfu_min": 0.40, "stop_over_vanilla_max": 1.40,
                                                  "full_over_vanilla_max": 2.0},
        "peak_gpu_mib": max((m.get("peak_gpu_mib", 0.0) for m in methods.values()), default=None),
        "checks": checks, "prepare_s": prepare_s, "total_s": time.perf_counter() - t_start,
    }
    out = args.out or (None if device.type == "cuda" and not args.tiny else str(work / "gpu_check.json"))
    write_result("gpu_check", result, out)
    if not ok:
        sys.exit(f"gpu_check: a check failed: {checks}")
    mfu = methods["vanilla"]["mfu"]
    print(f"[gpu_check] stop/vanilla {ratios['stop_over_vanilla_step_time']:.2f}x, full/vanilla "
          f"{ratios['full_over_vanilla_step_time']:.2f}x, vanilla MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, "
          f"peak GPU memory {result['peak_gpu_mib'] or 0:.0f} MiB; LoRA-8/full: step time "
          f"{ratios['lora_over_full_step_time']:.2f}x, optimiser state {ratios['lora_over_full_optimizer_state']:.3f}x; "
          f"done in {result['total_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
