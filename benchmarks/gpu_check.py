"""GPU acceptance check: the project's Trainer, without Ray, on a Stable Diffusion v1.5 UNet,
or (``--family sdxl|sd3|flux``) an SDXL UNet, an SD3 or a Flux-class transformer at their real
sizes (:mod:`family_layouts`: published configs, random weights, 1024 x 1024 latents), each
trained as its configs/<family>.yaml says: full fine-tuning where it fits one card (SD v1.5,
SDXL, SD3), LoRA for Flux (``FAMILY_LORA``).

What it runs (one process, world size 1, DeepSpeed ZeRO-2, bf16, EMA, as configs/sd15.yaml):

1. an SD v1.5-layout directory made on the spot: the UNet from SD v1.5's exact config with
   random weights (no weights travel), CLIP ViT-L/14's text tower (random), a word-level
   tokenizer, SD's VAE (random) and scheduler, all saved with ``save_pretrained`` and loaded
   back by the training code with ``from_pretrained``;
2. a prepared dataset in the project's shard format written on the spot
   (:mod:`pogdiff_dist.data.synthetic`: 64 x 64 x 4 latents, 77 x 768 caption states from
   that text tower, exact k-NN with torch and the density VAE on the device);
3. vanilla, PoGDiff ``stop``, PoGDiff ``full`` and PoGDiff ``full`` through a rank-8 LoRA
   for a few steps each, timed side by side, with FLOPs of one step from
   ``torch.utils.flop_counter``, MFU against the card's dense bf16 peak
   (:func:`pogdiff_dist.devices.bf16_peak`; an unknown card gets no MFU), and each one's
   trainable parameters and optimiser-state bytes (LoRA against full fine-tuning);
4. one checkpoint and a resume: a run to step 5 saves at step 3, a new Trainer loads it (the
   checkpoint is deleted once loaded) and trains steps 4-5 again;
5. the resumed run's export, loaded back with diffusers, and a short DDIM sample on the device.

Timing. ``train.log_every`` is the timed window (``--window`` steps): the Trainer brings a
window's losses to the host once, at its end, and the tracker notes the time of each such
log, so a window's wall time covers exactly its steps and the measurement adds no device ->
host sync of its own. The step's own cross-rank agreement (``agree_to_step``: one small
all-reduce and host sync per micro-batch) is part of what training costs and stays in the
figure. Windows that begin before ``--warmup`` steps are not timed.

Disk. The timed runs write no checkpoint (``Trainer.fit(read, final_checkpoint=False)``);
the resume check writes exactly one, moved (not copied) into place and deleted once loaded,
before the export exists. :func:`disk_plan` gives the bytes of each stage from the parameter
counts; the run stops before training when the disk cannot hold the plan's peak, and the
plan for the full-size SD v1.5 layout must stay under 20 GB.

It writes one JSON (images/s per method, stop/vanilla and full/vanilla step-time ratios,
MFU, peak GPU memory, the disk plan, what was checked), rewritten after every stage so a
late failure keeps the figures measured before it (``completed`` lists the stages, ``error``
says what stopped it). On a CPU machine ``--device cpu --tiny`` runs the same code paths
with SD's block layout at a few-thousandth of the size (a test does).

    bash scripts/gpu_check.sh                              # GPU machine: results/gpu_check.json
    bash scripts/gpu_check.sh --family flux --batch-size 1 # results/gpu_check_flux.json
    bash scripts/gpu_check.sh --device cpu --tiny --precision fp32 --out /tmp/gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(BENCH), str(BENCH.parent)) if p not in sys.path]

import torch
from family_layouts import LATENT, TINY_LATENT, layout_param_counts, lora_params, make_family_layout
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
METHODS = {"vanilla": {"loss.method": "vanilla"},
           "stop": {"loss.method": "pogdiff", "loss.neighbor_grad": "stop"},
           "full": {"loss.method": "pogdiff", "loss.neighbor_grad": "full"},
           # the same objective through a rank-8 LoRA on the attention projections (model.lora_rank)
           "full_lora8": {"loss.method": "pogdiff", "loss.neighbor_grad": "full", "model.lora_rank": 8}}
COUNTS = [24, 16, 8, 8, 4, 2, 2]  # 64 samples; imbalanced, as the method expects
# The LoRA rank every method of a family trains with in the check (0: full fine-tuning).
FAMILY_LORA = {"sd": 0, "sdxl": 0, "sd3": 0, "flux": 16}
FAMILY_CONFIG = {"sd": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
SD15_DISK_PEAK_MAX = 20e9  # bytes: what the full-size check may need on top of the code and its packages
RESUME_STEPS, RESUME_AT = 5, 3
TINY_T5_LENGTH = 12  # model.max_length of the tiny SD3 / Flux pipelines (their T5 token limit)


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
    CLIPTextModel(CLIPTextConfig(**text_config(tiny))).save_pretrained(root / "text_encoder")
    AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)).save_pretrained(root / "vae")
    UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).save_pretrained(root / "unet")
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def text_config(tiny: bool) -> dict:
    return {**(TINY_TEXT if tiny else SD15_TEXT), "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}


# ----------------------------------------------------------------------------- disk plan


def param_counts(tiny: bool) -> dict[str, int]:
    """Parameters of the layout's UNet, text encoder and VAE, counted on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config(tiny))),
                  "vae": AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def disk_plan(params: dict[str, int], precision: str, ema: bool, samples: int, latent: tuple[int, ...],
              text: tuple[int, ...], trainable: int | None = None, layout_bytes_per_param: int = 4) -> dict:
    """Bytes on disk at each stage of the check, from parameter counts.

    The one checkpoint (DeepSpeed ZeRO-2, world size 1) holds, per UNet parameter: the module
    in the compute dtype (2 bytes bf16, 4 fp32), ZeRO's fp32 master copy (4), Adam's two fp32
    moments (8) and, with EMA, its fp32 shadow (4): 18 bytes in bf16. The layout the check
    makes and the export it writes each hold the UNet, text encoder and VAE in fp32 (4 bytes
    each). The shards hold fp32 latents and fp16 caption states per sample.

    Stages: the timed runs (layout + shards), the checkpoint (it is deleted once loaded, before
    the export is written) and the export. The peak is the largest; it assumes the checkpoint's
    temporary folder is on the same filesystem as the run (gpu_check points ``TMPDIR`` there).
    The denoiser is ``params["unet"]`` or ``params["transformer"]``; ``trainable`` (a LoRA run's
    adapter): only those parameters have masters, moments and EMA, the module holds them all.
    ``layout_bytes_per_param``: 2 for a layout saved in bf16 (:mod:`family_layouts`).
    """
    per_param = {"module": 2 if precision == "bf16" else 4, "fp32_master": 4, "adam_moments_fp32": 8,
                 "ema_fp32": 4 if ema else 0}
    denoiser = params["unet"] if "unet" in params else params["transformer"]
    trainable = denoiser if trainable is None else trainable
    layout = layout_bytes_per_param * sum(params.values())
    shards = samples * (4 * math.prod(latent) + 2 * math.prod(text))
    checkpoint = denoiser * per_param["module"] + trainable * (sum(per_param.values()) - per_param["module"])
    export = 4 * sum(params.values())
    stages = {"timed_runs": layout + shards, "checkpoint": layout + shards + checkpoint,
              "export": layout + shards + export}
    peak_stage = max(stages, key=stages.get)
    return {"params": params, "checkpoint_bytes_per_unet_param": per_param, "layout_bytes": layout,
            "shard_bytes": shards, "checkpoint_bytes": checkpoint, "export_bytes": export, "stages": stages,
            "peak_stage": peak_stage, "peak_bytes": stages[peak_stage]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- timing


class WindowClock:
    """The tracker of a timed run: the time of each log of a window's means (``train.log_every``
    = the window). Other logs (epochs, peaks) are kept for their values, not timed."""

    def __init__(self):
        self.marks, self.logs = [], []

    def log(self, step, metrics):
        if "loss" in metrics:
            self.marks.append((step, time.perf_counter()))
        self.logs.append((step, dict(metrics)))

    def log_image(self, step, key, image):
        pass

    def window_step_seconds(self, window: int, start: int) -> list[float]:
        """Seconds per step of every whole window that begins at or after step ``start``."""
        return [(t1 - t0) / window for (s0, t0), (s1, t1) in zip(self.marks, self.marks[1:])
                if s0 >= start and s1 - s0 == window]

    def series(self, key) -> list:
        return [m[key] for _, m in self.logs if key in m]

    def by_step(self, key) -> dict[int, float]:
        return {s: m[key] for s, m in self.logs if key in m}


def timed_windows(steps: int, warmup: int, window: int) -> int:
    """How many whole windows a run of ``steps`` times: logs at multiples of ``window``; a
    window from log ``a`` to ``a + window`` counts when ``a >= warmup``."""
    return sum(1 for a in range(window, steps - window + 1, window) if a >= warmup)


def no_checkpoint(metrics: dict, checkpoint_dir: Path) -> None:
    raise AssertionError("a timed run writes no checkpoint (see disk_plan)")


def run_method(cfg, prepared: Path, device: torch.device, window: int, warmup: int) -> dict:
    """Train ``cfg.optim.max_steps`` steps with the Trainer, no checkpoint; time the windows
    after ``warmup``; count one step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from pogdiff_dist.train.local import read_local
    from pogdiff_dist.train.trainer import Trainer

    clock = WindowClock()
    trainer = Trainer(cfg, prepared, device, 0, 1, report=no_checkpoint, tracker=clock, run_dir=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    read = read_local()
    # the first step (warm-up, not timed) runs under the FLOP counter: forward, backward, optimiser
    with FlopCounterMode(display=False) as counter:
        trainer._train_step(next(iter(trainer.stream(read, 0))).batch)
    t0 = time.perf_counter()
    trainer.fit(read, final_checkpoint=False)
    wall = time.perf_counter() - t0
    times = clock.window_step_seconds(window, warmup)
    med = statistics.median(times)
    row = {"steps": cfg.optim.max_steps, "window": window, "timed_windows": len(times),
           "timed_steps": len(times) * window, "median_step_s": med, "window_step_s": times,
           "images_per_s": cfg.optim.batch_size / med, "flops_per_step": float(counter.get_total_flops()),
           "loss": clock.series("loss"), "psi_zero_frac": clock.series("psi_zero_frac"), "wall_s": wall,
           "attention": trainer.attention,
           "trainable_params": sum(p.numel() for _, p in trainer.engine.trainable()),
           "optimizer_state_mib": trainer.engine.optimizer_state_bytes() / 2**20}
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del trainer
    release(device)
    return row


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios_of(methods: dict) -> dict:
    """Step-time ratios of the methods that ran (``--methods`` may leave some out)."""
    t = {k: m["median_step_s"] for k, m in methods.items()}
    out = {f"{k}_over_vanilla_step_time": t[k] / t["vanilla"] for k in ("stop", "full") if k in t and "vanilla" in t}
    if "full" in t and "full_lora8" in t:
        lora, full = methods["full_lora8"], methods["full"]
        out.update(lora_over_full_step_time=t["full_lora8"] / t["full"],
                   lora_over_full_optimizer_state=lora["optimizer_state_mib"] / full["optimizer_state_mib"],
                   lora_over_full_peak_gpu_memory=(lora["peak_gpu_mib"] / full["peak_gpu_mib"]
                                                   if "peak_gpu_mib" in lora else None))
    return out


# ----------------------------------------------------------------------------- resume + export


def resume_check(base, prepared: Path, run_dir: Path, device: torch.device, latent: tuple, family: str = "sd") -> dict:
    """One checkpoint and one resume, then the export: a run to step 5 that saves at step 3 (no
    final checkpoint); a new Trainer loads that checkpoint, which is then deleted, and trains
    steps 4-5 again (their losses against the first run's); its export is loaded back with
    diffusers and samples on the device."""
    import diffusers
    from diffusers import DiffusionPipeline

    from pogdiff_dist.families.spec import get_family
    from pogdiff_dist.pipeline import load_pipeline
    from pogdiff_dist.train.local import LocalCheckpoints, read_local
    from pogdiff_dist.train.trainer import Trainer

    cfg = base.with_overrides({**METHODS["full"], "optim.max_steps": RESUME_STEPS,
                               "train.checkpoint_every": RESUME_AT, "train.log_every": 1})
    checkpoints = LocalCheckpoints(run_dir / "checkpoints", keep=1)
    first_log, resumed_log = WindowClock(), WindowClock()
    first = Trainer(cfg, prepared, device, 0, 1, report=checkpoints, tracker=first_log, run_dir=None)
    first.fit(read_local(), final_checkpoint=False)
    first_steps, saved = first.state.step, checkpoints.all()
    del first
    release(device)
    checkpoint_bytes = folder_bytes(saved[-1])
    resumed = Trainer(cfg, prepared, device, 0, 1, report=checkpoints, tracker=resumed_log, run_dir=run_dir)
    resumed.load(saved[-1])
    shutil.rmtree(saved[-1])  # loaded: the disk never holds the checkpoint next to the export
    resumed.fit(read_local(), final_checkpoint=False)
    resumed_steps = resumed.state.step
    del resumed
    release(device)

    model_dir = run_dir / "model"
    spec = get_family(family)
    unet = getattr(diffusers, spec.denoiser_class).from_pretrained(str(model_dir / spec.denoiser))
    want_class = "StableDiffusionPipeline" if family == "sd" else spec.pipeline_class
    exported_as = type(DiffusionPipeline.from_pretrained(str(model_dir))).__name__  # the generic loader
    pipe = load_pipeline(model_dir, device)
    t0 = time.perf_counter()
    images = pipe(["An image of Person F."], num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    sample_s = time.perf_counter() - t0
    first_loss, resumed_loss = first_log.by_step("loss"), resumed_log.by_step("loss")
    again = sorted(set(first_loss) & set(resumed_loss))
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    checks = {
        "first_run_steps": first_steps, "checkpoint_steps": [m["step"] for m in checkpoints.metrics],
        "resumed_from_step": resumed_log.series("resumed_from_step"), "resumed_run_steps": resumed_steps,
        "checkpoints_left": [c.name for c in checkpoints.all()],
        "checkpoint_bytes_measured": checkpoint_bytes, "export_bytes_measured": folder_bytes(model_dir),
        "resumed_losses_finite": all(map(math.isfinite, resumed_loss.values())),
        "resumed_steps_compared": again,
        "resume_loss_max_abs_diff": max((abs(first_loss[s] - resumed_loss[s]) for s in again), default=None),
        "export_unet_params": sum(p.numel() for p in unet.parameters()),
        "export_loads_with_diffusers": exported_as, "export_class_expected": want_class,
        "sample_shape": list(images.shape), "sample_std": float(images.std()), "sample_s": sample_s,
        "sample_grid": str(run_dir / "samples.png"),
    }
    checks["passed"] = bool(
        exported_as == want_class and first_steps == RESUME_STEPS
        and checks["checkpoint_steps"] == [RESUME_AT] and checks["resumed_from_step"] == [RESUME_AT]
        and resumed_steps == RESUME_STEPS and not checks["checkpoints_left"] and checks["resumed_losses_finite"]
        and images.shape[1] == vae_scale * latent[1] and images.std() > 0)
    return checks


# ----------------------------------------------------------------------------- main


def card_peak(device: torch.device, override: float | None) -> tuple[float | None, str | None, str]:
    """(dense bf16 TFLOP/s, the peak table's entry, where the number comes from)."""
    from pogdiff_dist.devices import bf16_peak

    if override:
        return override, None, "--peak-tflops"
    if device.type != "cuda":
        return None, None, "cpu: no MFU"
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak(name)
    if peak is None:
        return None, None, f"{name}: not in the peak table (pogdiff_dist/devices.py): no MFU; pass --peak-tflops"
    return peak.bf16_tflops, peak.card, peak.source


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default: the current CUDA device) or cpu")
    p.add_argument("--family", choices=sorted(FAMILY_LORA), default="sd",
                   help="sd: SD v1.5 (default); sdxl, sd3, flux: their real denoisers (family_layouts.py)")
    p.add_argument("--tiny", action="store_true", help="the family's block layout at a tiny size (SD: 16 x 16 x 4 "
                   "latents; SDXL / SD3 / Flux: the test pipelines of pogdiff_dist.families.tiny, 8 x 8 latents)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="micro-batch (default: 8, the paper's, for SD v1.5; 4 for SDXL and SD3 and 1 for Flux at "
                        "1024 x 1024: starting points, not measured limits)")
    p.add_argument("--steps", type=int, default=20, help="steps per method (the first is FLOP-counted)")
    p.add_argument("--window", type=int, default=4, help="steps per timed window (train.log_every)")
    p.add_argument("--warmup", type=int, default=4, help="windows that begin before this step are not timed")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all; Flux trains LoRA in every "
                        f"method, so full_lora8 is left out)")
    p.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile inside the engine)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="train.precision (configs/sd15.yaml: bf16; fp32 keeps a CPU check fast)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by card name)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_check.json)")
    args = p.parse_args()
    if args.batch_size is None:
        args.batch_size = {"sd": 8, "sdxl": 4, "sd3": 4, "flux": 1}[args.family]
    if args.methods is None:
        args.methods = ",".join(m for m in METHODS if not (FAMILY_LORA[args.family] and m == "full_lora8"))
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    if timed_windows(args.steps, args.warmup, args.window) < 1:
        p.error(f"--steps {args.steps} leaves no whole window of {args.window} steps after --warmup {args.warmup}")
    return args


def main() -> None:
    args = parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                 "use --device cpu --tiny to check the code paths on CPU")
    from pogdiff_dist.devices import resolve_device

    device = resolve_device(args.device)  # cuda -> cuda:<current>, once, for everything below

    from _common import write_result

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.synthetic import POSES, build_synthetic_prepared, synthetic_identities
    from pogdiff_dist.train.engine import init_single_process

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(work / "tmp")  # checkpoints are written here, then moved (renamed) into the run
    family, sd = args.family, args.family == "sd"
    name = "gpu_check" if sd else f"gpu_check_{family}"
    out = args.out or (None if device.type == "cuda" and not args.tiny else str(work / f"{name}.json"))
    if sd:
        latent, text = ((4, 16, 16), (77, TINY_TEXT["hidden_size"])) if args.tiny else ((4, 64, 64), (77, 768))
    else:  # the caption states' shape comes from the family's encoders (the manifest says it)
        latent, text = (TINY_LATENT if args.tiny else LATENT)[family], None
    vae_scale = (2 if args.tiny else 8)
    peak, peak_card, peak_source = card_peak(device, args.peak_tflops)
    layout_dir = work / ("sd15" if sd else family)
    family_keys = {} if sd else {
        "data.resolution": vae_scale * latent[1], "model.lora_rank": FAMILY_LORA[family],
        **({"model.max_length": TINY_T5_LENGTH} if args.tiny else {})}
    base = load_config(BENCH.parent / "configs" / f"{FAMILY_CONFIG[family]}.yaml", {
        **family_keys, "model.pretrained": str(layout_dir), "model.image_encoder": "pixels",
        "prepare.out_dir": str(work / "prepared"), "prepare.k_max": 5, "loss.k": 5,
        "optim.batch_size": args.batch_size, "optim.grad_accum": 1, "optim.warmup_steps": 1,
        "train.use_gpu": device.type == "cuda", "train.log_every": args.window, "train.checkpoint_every": 10**6,
        "train.validate_every": 0, "train.caption_dropout": 0.0, "loss.use_psi_den": False,
        "train.cpus_per_worker": min(8, os.cpu_count() or 1), "train.compile": args.compile,
        "train.precision": args.precision, "train.shuffle_buffer": 0, "train.sample_steps": 10,
        "train.samples_per_prompt": 2})
    # psi_den off and no caption dropout: every sample with a positively similar neighbour runs
    # the y' pass, so the timed PoGDiff steps are the method's full cost (psi_zero_frac says how many did not)
    t = base.train
    if sd:
        plan = disk_plan(param_counts(args.tiny), t.precision, t.ema, sum(COUNTS), latent, text)
    else:  # shards: the caption states' bytes bounded by one token row per max_length (small next to the models)
        counts = layout_param_counts(family, args.tiny)
        plan = disk_plan(counts, t.precision, t.ema, sum(COUNTS), latent, (base.model.max_length + 77, 4096),
                         trainable=lora_params(family, args.tiny, base.model.lora_rank) if base.model.lora_rank else None,
                         layout_bytes_per_param=4 if args.tiny else 2)
    plan_sd15 = disk_plan(param_counts(tiny=False), "bf16", True, sum(COUNTS), (4, 64, 64), (77, 768))
    free = shutil.disk_usage(work).free
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "family": family, "lora_rank": base.model.lora_rank, "tiny": args.tiny, "batch_size": args.batch_size, "latent": list(latent), "text": list(text) if text else None,
        "precision": t.precision, "zero_stage": t.zero_stage, "ema": t.ema, "compile": args.compile,
        "steps": args.steps, "window": args.window, "warmup": args.warmup,
        "peak_tflops": peak, "peak_card": peak_card, "peak_source": peak_source,
        "disk_plan": plan, "disk_free_bytes": free, "disk_plan_sd15": plan_sd15,
        "methods": {}, "targets": {"vanilla_mfu_min": 0.40, "stop_over_vanilla_max": 1.40, "full_over_vanilla_max": 2.0},
        "checks": {"sd15_disk_peak_bytes": plan_sd15["peak_bytes"],
                   "sd15_disk_peak_under_20gb": plan_sd15["peak_bytes"] < SD15_DISK_PEAK_MAX},
        "completed": [],
    }

    def save(stage: str) -> None:
        result["completed"].append(stage)
        result["total_s"] = time.perf_counter() - t_start
        write_result(name, result, out)

    print(f"[gpu_check] {result['device']}: peak {peak or 'n/a'} TFLOP/s ({peak_source}); disk plan peak "
          f"{plan['peak_bytes'] / 1e9:.2f} GB at the {plan['peak_stage']} stage, {free / 1e9:.0f} GB free; "
          f"full-size SD v1.5: {plan_sd15['peak_bytes'] / 1e9:.2f} GB", flush=True)
    resume_fits = plan["peak_bytes"] <= free
    if plan["stages"]["timed_runs"] > free or (sd and not resume_fits):
        result["error"] = f"the disk plan needs {plan['peak_bytes'] / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
        save("plan")
        sys.exit(f"gpu_check: {result['error']} in {work}")
    try:
        init_single_process(device)
        if sd:
            words = [w for n in synthetic_identities(COUNTS) for w in f"An image of {n}".split()] + \
                [w.strip(",.") for pose in POSES for w in pose.split()]
            layout = make_sd_layout(layout_dir, args.tiny, words)
            encoder, tokenizer = layout / "text_encoder", layout / "tokenizer"
        else:  # the family's encoders read the pretrained directory itself
            layout = encoder = tokenizer = make_family_layout(family, layout_dir, args.tiny, device)
        release(device)
        t0 = time.perf_counter()
        # exact k-NN with torch on every device: the GPU machine has no FAISS
        manifest = build_synthetic_prepared(work / "prepared", COUNTS, latent, encoder, tokenizer,
                                            max_length=77 if sd else base.model.max_length, k_max=5,
                                            samples_per_shard=16, device=device, vae_dir=layout / "vae",
                                            knn_backend="torch")
        result["prepare_s"] = time.perf_counter() - t0
        if sd:
            assert list(manifest.text_shape) == list(text), (manifest.text_shape, text)
        text = tuple(manifest.text_shape)
        result["text"] = list(text)
        print(f"[gpu_check] layout + prepared shards ({manifest.num_samples} samples, latents {latent}, text "
              f"{text}) in {time.perf_counter() - t_start:.0f}s", flush=True)
        save("prepared")

        methods = result["methods"]
        for name in args.methods:
            cfg = base.with_overrides({**METHODS[name], "optim.max_steps": args.steps})
            m = methods[name] = run_method(cfg, work / "prepared", device, args.window, args.warmup)
            m["mfu"] = m["flops_per_step"] / m["median_step_s"] / (peak * 1e12) if peak else None
            result.update(ratios_of(methods))
            result["peak_gpu_mib"] = max((r.get("peak_gpu_mib", 0.0) for r in methods.values()), default=None)
            save(name)
            mfu = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
            print(f"[gpu_check] {name}: {m['images_per_s']:.1f} images/s, step {m['median_step_s'] * 1e3:.1f} ms "
                  f"({m['timed_steps']} steps timed), {m['flops_per_step'] / 1e12:.2f} TFLOP/step, MFU {mfu}", flush=True)

        checks = result["checks"]
        if resume_fits:
            resume = resume_check(base, work / "prepared", work / "resume", device, latent, family)
            passed = resume.pop("passed") and checks["sd15_disk_peak_under_20gb"]
            checks.update(resume, checkpoint_bytes_planned=plan["checkpoint_bytes"],
                          export_bytes_planned=plan["export_bytes"], passed=bool(passed))
            save("resume_and_export")
        else:  # said, not skipped silently: the timings stand, the resume + export was not run
            checks.update(passed=bool(checks["sd15_disk_peak_under_20gb"] and result["methods"]),
                          resume_and_export=f"not run: the disk plan needs {plan['peak_bytes'] / 1e9:.1f} GB "
                                            f"({plan['peak_stage']}), {free / 1e9:.1f} GB free")
            print(f"[gpu_check] resume and export {checks['resume_and_export']}", flush=True)
            save("timings_only")
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["total_s"] = time.perf_counter() - t_start
        write_result(name, result, out)
        raise
    if not checks["passed"]:
        sys.exit(f"gpu_check: a check failed: {checks}")
    resumed = checks.get("resume_loss_max_abs_diff")
    print(f"[gpu_check] {', '.join(f'{k} {v:.2f}x' for k, v in ratios_of(result['methods']).items() if v is not None)}; "
          f"peak GPU memory {result['peak_gpu_mib'] or 0:.0f} MiB; resume loss diff "
          f"{'not run' if resumed is None else f'{resumed:.2e}'}; done in {result['total_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
