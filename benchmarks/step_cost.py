"""Step cost of the dual-condition pass, side by side in one process (CPU or GPU).

Times forward+backward of one micro-batch for: vanilla; PoGDiff full as one batched 2B
UNet call; full as two separate calls; stop (y' under no_grad); stop with a fraction of
psi = 0 samples skipping y'. Reports medians over repetitions and ratios to vanilla, and
writes JSON.

    .venv/bin/python benchmarks/step_cost.py --out benchmarks/results/step_cost_cpu.json
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pogdiff_dist.config import ModelConfig
from pogdiff_dist.models import ModelSpec, build_unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--ctx", type=int, nargs=2, default=(32, 384), metavar=("L", "D"))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/step_cost_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(unet=args.unet), ModelSpec(args.channels, args.size, args.ctx[1]))
    b = args.batch
    x = torch.randn(b, args.channels, args.size, args.size)
    t = torch.randint(0, 1000, (b,))
    y, y2 = torch.randn(b, *args.ctx), torch.randn(b, *args.ctx)
    eps = torch.randn_like(x)

    def vanilla():
        pred = unet(x, t, encoder_hidden_states=y).sample
        (pred - eps).pow(2).mean().backward()

    def full_batched():
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([y, y2])).sample
        pred, pred2 = out.chunk(2)
        ((pred - eps).pow(2).mean() + (pred - pred2).pow(2).mean()).backward()

    def full_two_calls():
        pred = unet(x, t, encoder_hidden_states=y).sample
        pred2 = unet(x, t, encoder_hidden_states=y2).sample
        ((pred - eps).pow(2).mean() + (pred - pred2).pow(2).mean()).backward()

    def stop(active: int = b):
        pred = unet(x, t, encoder_hidden_states=y).sample
        loss = (pred - eps).pow(2).mean()
        if active:
            with torch.no_grad():
                pred2 = unet(x[:active], t[:active], encoder_hidden_states=y2[:active]).sample
            loss = loss + (pred[:active] - pred2).pow(2).mean()
        loss.backward()

    cases = {"vanilla": vanilla, "full_batched": full_batched, "full_two_calls": full_two_calls, "stop": stop,
             "stop_half_psi_zero": lambda: stop(b // 2)}
    times = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
        unet.zero_grad(set_to_none=True)
    for _ in range(args.reps):  # interleaved, so machine noise hits every case alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            unet.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": vars(args), "machine": platform.processor() or platform.machine(),
        "params": sum(p.numel() for p in unet.parameters()),
        "median_s": med, "ratio_to_vanilla": {k: v / med["vanilla"] for k, v in med.items()},
        "all_s": times,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'case':<22}{'median ms':>10}{'x vanilla':>11}")
    for k in cases:
        print(f"{k:<22}{med[k] * 1e3:>10.1f}{result['ratio_to_vanilla'][k]:>11.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
