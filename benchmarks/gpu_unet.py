"""GPU throughput of the dual-condition step with Stable Diffusion v1.5's UNet.

The UNet is built from SD v1.5's exact ``unet/config.json`` (859.5M parameters) with random
weights, and y' is encoded by a text model with SD v1.5's CLIP ViT-L/14 text config (also
random): no download. Each training step is the project's ``DualConditionStep`` (noise,
psi, neighbour draw, y' encoding, UNet call(s), loss) + backward + optimiser step on
64x64x4 latents with a 77x768 caption context, in bf16 with fused attention (SDPA) and
channels_last, optionally torch.compile'd. Reports images/s for vanilla, PoGDiff stop
and full at several batch sizes, and MFU = counted FLOPs (torch's FlopCounterMode, backward
included) / step time / ``--peak-tflops`` (default: H100 SXM bf16 dense, 989 TFLOP/s).

The plain module (torch.autocast(bf16), fused AdamW): what the levers give outside the
engine. The project's Trainer with DeepSpeed ZeRO-2, as training runs it, is measured by
``scripts/gpu_check.sh`` (benchmarks/gpu_check.py).

Goals (issue 5): vanilla >= 40% MFU on an H100; PoGDiff stop >= 0.72x vanilla images/s.

Without a CUDA device the GPU run exits with a message. What can be checked on CPU:

    .venv/bin/python benchmarks/gpu_unet.py --count-only              # params + FLOPs/image (meta device)
    .venv/bin/python benchmarks/gpu_unet.py --device cpu --tiny --dtype fp32 --steps 3 --threads 1  # code paths

On a GPU machine:

    .venv/bin/python benchmarks/gpu_unet.py --batch-sizes 8 16 32 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(BENCH), str(BENCH.parent)) if p not in sys.path]

import torch

# Stable Diffusion v1.5 unet/config.json (runwayml/stable-diffusion-v1-5), verbatim values.
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280), "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
# SD v1.5 text_encoder/config.json (CLIP ViT-L/14 text tower).
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD15_SHAPES = {"latent": (4, 64, 64), "ctx": (77, 768)}

# Same block layout, a few thousand times cheaper: for checking the code paths on CPU.
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "cross_attention_dim": 32,
             "norm_num_groups": 8, "sample_size": 16}
TINY_TEXT = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32, "bos_token_id": 0,
                 "eos_token_id": 2}
TINY_SHAPES = {"latent": (4, 16, 16), "ctx": (77, 32)}

K = 5
CASES = ("vanilla", "stop", "full")
H100_BF16_DENSE_TFLOPS = 989.0


def no_cuda_exit(what: str) -> None:
    print(f"{what}: no CUDA device (torch.cuda.is_available() is False on this machine). This benchmark "
          "measures GPU throughput and needs one; use --count-only, or --device cpu --tiny to check the code "
          "paths on CPU.", file=sys.stderr)
    sys.exit(2)


def build_models(tiny: bool, device: str = "cpu"):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    from pogdiff_dist.models import TextEncoder

    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        clip = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else SD15_TEXT)))
    unet.set_attn_processor(AttnProcessor2_0())  # fused scaled_dot_product_attention
    text = TextEncoder.from_parts(clip, tokenizer=None, max_length=77)  # encode_ids needs no tokenizer
    return unet, text, DDPMScheduler(**SD15_SCHEDULER)


def make_batch(b: int, tiny: bool, vocab: int, device, zero_frac: float = 0.0):
    """A micro-batch with psi = 0.9 for all but the first round(f * b) samples (psi = 0)."""
    from pogdiff_dist.data.shards import Batch, HostBatch

    shapes = TINY_SHAPES if tiny else SD15_SHAPES
    g = torch.Generator().manual_seed(1)
    sim = torch.full((b, K), 0.9)
    sim[: round(zero_frac * b)] = 0.0
    length = shapes["ctx"][0]
    host = Batch(x0=torch.randn(b, *shapes["latent"], generator=g), y=torch.randn(b, *shapes["ctx"], generator=g),
                 nbr_tokens=torch.randint(1, vocab, (b, K, length), generator=g),
                 nbr_len=torch.full((b, K), length), nbr_sim=sim, nbr_same=torch.ones(b, K, dtype=torch.uint8),
                 elbo=torch.zeros(b, dtype=torch.float64), index=torch.arange(b))
    return HostBatch.from_batch(host).to_device(device)


def steppers(scheduler, text, ctx, device):
    from pogdiff_dist.config import LossConfig
    from pogdiff_dist.train.step import DualConditionStep

    uncond, elbo = torch.zeros(*ctx, device=device), torch.zeros(100)

    def make(method, grad="full"):
        return DualConditionStep(LossConfig(method=method, neighbor_grad=grad, k=K), scheduler, text, uncond, elbo,
                                 caption_dropout=0.0)

    return {"vanilla": make("vanilla"), "stop": make("pogdiff", "stop"), "full": make("pogdiff", "full")}


def count_flops(fn) -> float:
    """FLOPs of one call of ``fn`` (a whole training step: matmuls, convolutions, attention;
    elementwise and optimiser arithmetic are not counted, as is usual for MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cases(run_step: dict, device: str, warmup: int, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of each case; cases interleaved in rounds of ``steps`` // 3 steps."""
    for fn in run_step.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in run_step}
    rounds = 3
    for _ in range(rounds):
        for name, fn in run_step.items():
            for _ in range(max(1, steps // rounds)):
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def summarise(b: int, times: dict, flops: dict, peak_tflops: float, extra: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": b, "median_step_s": med,
        "images_per_s": {k: b / v for k, v in med.items()},
        "ratio_to_vanilla_images_per_s": {k: med["vanilla"] / v for k, v in med.items()},
        "flops_per_step": flops, "tflops_achieved": {k: flops[k] / med[k] / 1e12 for k in med},
        "mfu": {k: flops[k] / med[k] / 1e12 / peak_tflops for k in med}, **extra,
    }


def run_torch(args) -> list[dict]:
    """Plain module: autocast bf16 (fp32 master weights), fused AdamW, channels_last, SDPA."""
    device = args.device
    unet, text, scheduler = build_models(args.tiny, device)
    text.model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    model = torch.compile(unet) if args.compile else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device == "cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def autocast():
        return torch.autocast(device_type=device, dtype=dtype, enabled=args.dtype == "bf16")

    ctx = (TINY_SHAPES if args.tiny else SD15_SHAPES)["ctx"]
    steps = steppers(scheduler, text, ctx, device)
    vocab = text.model.config.vocab_size
    rows = []
    for b in args.batch_sizes:
        batch = make_batch(b, args.tiny, vocab, device)
        if args.channels_last:
            batch.x0 = batch.x0.contiguous(memory_format=torch.channels_last)

        def runner(step, m, batch=batch):
            def fn():
                with autocast():
                    loss, _ = step(m, batch, torch.Generator(device=device).manual_seed(0))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return fn

        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            flops = {k: count_flops(runner(s, unet)) for k, s in steps.items()}  # eager, before any compile
            times = time_cases({k: runner(s, model) for k, s in steps.items()}, device, args.warmup, args.steps)
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "oom": True})
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"batch {b}: out of memory", flush=True)
            continue
        extra = {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30} if device == "cuda" else {}
        rows.append(summarise(b, times, flops, args.peak_tflops, extra))
        report(rows[-1])
    return rows


def report(row: dict) -> None:
    print(f"batch {row['batch']}: " + "  ".join(
        f"{k} {row['images_per_s'][k]:.1f} img/s ({row['ratio_to_vanilla_images_per_s'][k]:.2f}x, "
        f"MFU {row['mfu'][k]:.1%})" for k in CASES), flush=True)


def count_only(args) -> dict:
    """Parameters and FLOPs per image of the SD v1.5 step, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, text, _ = build_models(tiny=False, device="meta")
    params = {"unet": sum(p.numel() for p in unet.parameters()),
              "text_encoder": sum(p.numel() for p in text.model.parameters())}
    x = torch.empty(1, *SD15_SHAPES["latent"], device="meta")
    y = torch.empty(1, *SD15_SHAPES["ctx"], device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as c:
            fn()
        return float(c.get_total_flops())

    fwd = flops(lambda: unet(x, t, encoder_hidden_states=y))
    fwd_bwd = flops(lambda: unet(x, t, encoder_hidden_states=y).sample.pow(2).mean().backward())
    text_fwd = flops(lambda: text.model(input_ids=ids))
    per_image = {"vanilla": fwd_bwd, "stop": fwd_bwd + fwd + text_fwd, "full": 2 * fwd_bwd + text_fwd}
    return {
        "params": params, "unet_fwd_flops_per_image": fwd, "unet_fwd_bwd_flops_per_image": fwd_bwd,
        "text_encode_flops_per_caption": text_fwd, "step_flops_per_image": per_image,
        "flop_ratio_to_vanilla": {k: v / per_image["vanilla"] for k, v in per_image.items()},
        "ideal_images_per_s_at_peak": {k: args.peak_tflops * 1e12 / v for k, v in per_image.items()},
        "images_per_s_at_40pct_mfu": {k: 0.4 * args.peak_tflops * 1e12 / v for k, v in per_image.items()},
        "peak_tflops": args.peak_tflops,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=(8, 16, 32))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the card's dense bf16 peak for MFU (H100 SXM: 989; A100: 312; H200: 989)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per case (in 3 interleaved rounds)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet/text model with SD's layout (code-path check)")
    p.add_argument("--count-only", action="store_true", help="params and FLOPs/image of the SD config, no GPU")
    p.add_argument("--out", default=None, help="JSON path (default: results/gpu_unet.json on a real GPU run)")
    args = p.parse_args()

    from _common import write_result

    if args.count_only:
        r = count_only(args)
        print(f"SD v1.5 UNet: {r['params']['unet'] / 1e6:.1f}M params; CLIP text: {r['params']['text_encoder'] / 1e6:.1f}M")
        print(f"UNet forward {r['unet_fwd_flops_per_image'] / 1e9:.0f} GFLOP/image, forward+backward "
              f"{r['unet_fwd_bwd_flops_per_image'] / 1e9:.0f}; y' text encoding {r['text_encode_flops_per_caption'] / 1e9:.1f}")
        print("step FLOPs vs vanilla: " + ", ".join(f"{k} {v:.3f}x" for k, v in r["flop_ratio_to_vanilla"].items()))
        write_result("sd15_flops", {"config": vars(args), **r}, args.out)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        no_cuda_exit("gpu_unet.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = run_torch(args)
    result = {"config": vars(args), "rows": rows}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    if args.out or (args.device == "cuda" and not args.tiny):
        write_result("gpu_unet", result, args.out)


if __name__ == "__main__":
    main()
