"""Peak memory per worker for ZeRO stages 0/1/2/3 with 2 Ray Train workers, against the
ZeRO paper's accounting; also step time and gloo bandwidth for SCALING.md.

Each stage is one ``TorchTrainer.fit`` of 2 CPU workers (gloo) running a few optimiser
steps of a 72M-parameter UNet (defined here, so parameter and optimiser memory dwarf the
~0.5 GB a Ray worker holds anyway) through the project's ``Engine`` (DeepSpeed, fp32,
AdamW). Inputs are tiny (1 x 1 x 8 x 8) so activations are negligible.

Model, fp32 Adam on CPU (the paper's 16 bytes/param, with fp32 weights instead of a
bf16/fp16 copy + fp32 master): weights 4 + gradients 4 + Adam m, v 8 bytes per param;
over N ranks stage 1 divides the optimiser states by N, stage 2 also the gradients,
stage 3 also the weights:

    stage 0: 16 P     stage 1: (8 + 8/N) P     stage 2: (4 + 12/N) P     stage 3: 16 P / N

Measured per worker: RSS above the worker's RSS before the model was built, at steady
state after the steps, again after ``malloc_trim`` (freed heap pages returned to the OS),
and at the peak (ru_maxrss, which includes transients such as
DeepSpeed's flattening copies and the full model built before ZeRO-3 partitions it), and
this rank's weights, fp32 master copy and Adam states read off the engine (DeepSpeed's
ZeRO-1/2 optimisers clone an fp32 master partition even when the weights are fp32: 4/N
bytes/param beyond the paper's fp32 accounting; ZeRO-3 updates its partition in place).

    .venv/bin/python benchmarks/zero_memory.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from _common import bench_config, write_result
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pogdiff_dist.runtime import init_ray

MEM_UNET = {  # 71.9M parameters at cross_attention_dim 384, 1 channel
    "block_out_channels": (128, 256, 512),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2, "attention_head_dim": 8, "norm_num_groups": 32,
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "cross_attention_dim": 384,
}


def model_bytes_per_param(stage: int, n: int) -> float:
    """ZeRO accounting for fp32 AdamW: weights 4, grads 4, Adam states 8 bytes/param."""
    w, g, o = 4.0, 4.0, 8.0
    return {0: w + g + o, 1: w + g + o / n, 2: w + (g + o) / n, 3: (w + g + o) / n}[stage]


def memory_loop(config: dict) -> None:
    """One worker: baseline RSS, build the UNet, Engine, a few steps; write figures to JSON.
    Helpers are local so Ray ships this function by value (no benchmarks/ import)."""
    import gc
    import os
    import resource
    import statistics as st
    import time as tm

    import ray.train
    import torch
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    from pogdiff_dist.config import from_dict
    from pogdiff_dist.train.engine import Engine

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def tensor_mib(engine) -> dict:
        """This rank's bytes of weights, fp32 master copy and Adam states, read off the engine."""
        params = list(engine.module.parameters())
        weights = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in params)
        opt = engine.ds.optimizer
        inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch AdamW; stage 0 may not
        own = {id(p) for p in params}
        master = sum(q.numel() * q.element_size() for g in inner.param_groups for q in g["params"] if id(q) not in own)
        states = sum(v.numel() * v.element_size() for st_ in inner.state.values() for v in st_.values()
                     if torch.is_tensor(v) and v.numel() > 1)
        return {"weights_mib": weights / 2**20, "master_mib": master / 2**20, "adam_states_mib": states / 2**20}

    if config.get("zero_overrides"):  # investigation: extra zero_optimization keys on top of the engine's config
        import pogdiff_dist.train.engine as engine_module

        generate = engine_module.deepspeed_config

        def with_overrides(optim, train, world_size):
            ds = generate(optim, train, world_size)
            ds["zero_optimization"].update(config["zero_overrides"])
            return ds

        engine_module.deepspeed_config = with_overrides

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    gc.collect()
    base_rss, base_peak = rss(), peak()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config["unet"])
    params = sum(p.numel() for p in unet.parameters())
    built_rss = rss()
    engine = Engine(unet, cfg.optim, cfg.train, world)
    del unet
    init_rss = rss()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, 1, 8, 8, generator=g)
    t = torch.tensor([500])
    y = torch.randn(1, 8, 384, generator=g)
    step_s = []
    for _ in range(config["steps"]):
        t0 = tm.perf_counter()
        loss = engine(x, t, encoder_hidden_states=y).sample.pow(2).mean()
        engine.backward_step(loss)
        step_s.append(tm.perf_counter() - t0)
    gc.collect()
    steady = rss()
    # Hand freed heap memory back to the OS: what remains is what the process still holds.
    # (glibc raises its mmap threshold after large frees, so later medium tensors, e.g.
    # ZeRO-3's per-layer gathers, come from the heap and stay in RSS after being freed.)
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out = {
        "rank": rank, "world": world, "stage": cfg.train.zero_stage, "params": params,
        "base_rss_mib": base_rss, "base_peak_mib": base_peak,
        "built_rss_delta_mib": built_rss - base_rss, "init_rss_delta_mib": init_rss - base_rss,
        "steady_rss_delta_mib": steady - base_rss, "trimmed_rss_delta_mib": rss() - base_rss,
        "peak_rss_delta_mib": peak() - base_rss,
        **tensor_mib(engine),
        "step_s": step_s, "median_step_s": st.median(step_s[1:] or step_s),
    }
    if config.get("bandwidth") and dist.is_initialized():  # gloo all-reduce of 64 MiB, for SCALING.md
        buf = torch.ones(16 * 2**20)
        dist.all_reduce(buf)
        times = []
        for _ in range(3):
            t0 = tm.perf_counter()
            dist.all_reduce(buf)
            times.append(tm.perf_counter() - t0)
        # ring all-reduce sends 2 (N-1)/N of the buffer per rank
        out["allreduce_64mib_s"] = st.median(times)
        out["allreduce_bus_gbps"] = 2 * (world - 1) / world * buf.numel() * 4 / st.median(times) / 1e9
    Path(config["out_dir"], f"stage{cfg.train.zero_stage}_rank{rank}.json").write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=(0, 1, 2, 3))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-overrides", type=json.loads, default=None, metavar="JSON",
                   help='investigation: keys merged into zero_optimization, e.g. \'{"reduce_bucket_size": 5e6}\'')
    p.add_argument("--name", default="zero_memory", help="results/<name>.json")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps per stage (the first allocates Adam states)")
    args = p.parse_args()
    base = bench_config({"optim.batch_size": 1, "optim.warmup_steps": 1, "optim.max_steps": 100,
                         "train.num_workers": args.workers})
    init_ray(base.ray)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for stage in args.stages:
                cfg = base.with_overrides({"train.zero_stage": stage})
                t0 = time.perf_counter()
                TorchTrainer(
                    memory_loop,
                    train_loop_config={"cfg": cfg.to_dict(), "unet": MEM_UNET, "steps": args.steps, "out_dir": tmp,
                                       "bandwidth": stage == args.stages[0], "zero_overrides": args.zero_overrides},
                    scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False,
                                                 resources_per_worker={"CPU": 1}),
                    torch_config=TorchConfig(backend="gloo"),
                    run_config=RunConfig(name=f"zero-memory-{stage}", storage_path=str(Path(tmp) / "ray")),
                ).fit()
                ranks = [json.loads((Path(tmp) / f"stage{stage}_rank{r}.json").read_text())
                         for r in range(args.workers)]
                n = ranks[0]["params"]
                model = model_bytes_per_param(stage, args.workers) * n / 2**20
                # ZeRO-1/2 clone an fp32 master partition even from fp32 weights; ZeRO-3 updates its
                # fp32 partition in place (DeepSpeed stage3.py _create_fp32_partitions).
                master = 4.0 / args.workers * n / 2**20 if stage in (1, 2) else 0.0
                row = {
                    "stage": stage, "params": n, "fit_s": time.perf_counter() - t0,
                    "model_mib": model, "model_bytes_per_param": model_bytes_per_param(stage, args.workers),
                    "model_plus_master_mib": model + master,
                    "steady_rss_delta_mib": max(r["steady_rss_delta_mib"] for r in ranks),
                    "trimmed_rss_delta_mib": max(r["trimmed_rss_delta_mib"] for r in ranks),
                    "peak_rss_delta_mib": max(r["peak_rss_delta_mib"] for r in ranks),
                    **{k: max(r[k] for r in ranks) for k in ("weights_mib", "master_mib", "adam_states_mib")},
                    "median_step_s": max(r["median_step_s"] for r in ranks),
                    "ranks": ranks,
                }
                row["steady_over_model"] = row["steady_rss_delta_mib"] / model
                row["measured_bytes_per_param_steady"] = row["steady_rss_delta_mib"] * 2**20 / n
                row["measured_bytes_per_param_trimmed"] = row["trimmed_rss_delta_mib"] * 2**20 / n
                row["measured_bytes_per_param_peak"] = row["peak_rss_delta_mib"] * 2**20 / n
                bw = [r["allreduce_bus_gbps"] for r in ranks if "allreduce_bus_gbps" in r]
                if bw:
                    row["allreduce_bus_gbps"] = min(bw)
                rows.append(row)
                print(f"[bench] ZeRO-{stage}: model {model:.0f} MiB/worker; weights {row['weights_mib']:.0f}, "
                      f"fp32 master {row['master_mib']:.0f}, Adam {row['adam_states_mib']:.0f}; "
                      f"trimmed RSS +{row['trimmed_rss_delta_mib']:.0f}, "
                      f"steady RSS +{row['steady_rss_delta_mib']:.0f}, peak RSS +{row['peak_rss_delta_mib']:.0f} MiB; "
                      f"step {row['median_step_s']:.2f}s", flush=True)
    finally:
        ray.shutdown()
    write_result(args.name, {"config": vars(args), "workers": args.workers, "unet": MEM_UNET, "rows": rows})


if __name__ == "__main__":
    main()
