"""Input pipeline and worker scaling at the benchmark config (benchmarks/bench.yaml).

1. Prepares real shards with ``run_prepare`` (Digits-IT2I L, 32x32, MiniLM captions;
   cached under benchmarks/.work after the first run).
2. Stream: the Ray Data WebDataset stream read exactly as a training worker reads it
   (``read_webdataset`` -> ``streaming_split`` -> ``iter_batches`` with the worker's
   arguments -> ``collate``), for several epochs; samples/s delivered to the consumer.
3. Consumption: short real ``run_train`` runs (PoGDiff full, ZeRO-2) with 1 and 2 Ray
   Train workers; samples/s and ``data_wait_frac`` as the workers log them to MLflow
   (the first logging window, which holds the stream's start-up, is reported apart; the
   wait fraction is the duration-weighted mean of the other windows, so an epoch restart
   inside the run counts).

Targets: stream >= 3x the samples/s training consumes; workers wait for data < 5% of
the step time. Writes results/input_pipeline.json and results/scaling.json.

    .venv/bin/python benchmarks/input_pipeline.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import ray
from _common import bench_config, write_result
from mlflow.tracking import MlflowClient

from pogdiff_dist.data.shards import collate
from pogdiff_dist.prepare.pipeline import run_prepare
from pogdiff_dist.runtime import init_ray
from pogdiff_dist.train.driver import run_train


def measure_stream(shards: list[str], cfg, epochs: int) -> dict:
    """Samples/s through the worker's iter_batches + collate, one consumer, ``epochs`` epochs."""
    it = ray.data.read_webdataset(shards).streaming_split(1, equal=True)[0]
    per_epoch, first_batch, total_n = [], [], 0
    t_all = time.perf_counter()
    for epoch in range(epochs):
        t0, n, first = time.perf_counter(), 0, None
        for numpy_batch in it.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy", drop_last=True,
                                           local_shuffle_buffer_size=cfg.train.shuffle_buffer,
                                           local_shuffle_seed=cfg.train.seed * 7919 + epoch * 31):
            n += len(collate(numpy_batch))
            if first is None:
                first = time.perf_counter() - t0
        dt = time.perf_counter() - t0
        per_epoch.append({"samples": n, "seconds": dt, "samples_per_s": n / dt, "first_batch_s": first,
                          "steady_samples_per_s": (n - cfg.optim.batch_size) / max(dt - first, 1e-9)})
        first_batch.append(first)
        total_n += n
    total = time.perf_counter() - t_all
    return {
        "epochs": per_epoch, "samples": total_n, "seconds": total,
        "samples_per_s": total_n / total,
        "samples_per_s_after_first_epoch": sum(e["samples"] for e in per_epoch[1:]) /
        max(sum(e["seconds"] for e in per_epoch[1:]), 1e-9) if epochs > 1 else None,
        "median_first_batch_s": statistics.median(first_batch),
    }


def train_run(cfg, workers: int, num_samples: int) -> dict:
    name = f"bench-w{workers}"
    storage = Path(cfg.train.storage_path)
    for old in storage.glob(f"{name}*"):  # a rerun replaces, never accumulates
        shutil.rmtree(old, ignore_errors=True)
    c = cfg.with_overrides({"train.num_workers": workers, "train.name": name})
    t0 = time.perf_counter()
    outcome = run_train(c)
    wall = time.perf_counter() - t0
    client = MlflowClient(outcome.tracking_uri)

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(outcome.run_id, key), key=lambda m: m.step)]

    sps, wait, psi0 = history("samples_per_s"), history("data_wait_frac"), history("psi_zero_frac")
    steady_sps, steady_wait = sps[1:] or sps, wait[1:] or wait
    # Windows hold equal step counts: weight each by its duration, so a window with an epoch
    # restart (the stream's start-up latency) counts as much as the time it took.
    window_s = [c.train.log_every * c.optim.batch_size * workers / v for v in steady_sps]
    wait_mean = sum(w * d for w, d in zip(steady_wait, window_s)) / sum(window_s)
    return {
        "workers": workers, "steps": c.optim.max_steps, "log_every": c.train.log_every,
        "samples_per_step": c.optim.batch_size * c.optim.grad_accum * workers,
        "samples_per_s_windows": sps, "data_wait_frac_windows": wait,
        "samples_per_s": statistics.median(steady_sps), "data_wait_frac": wait_mean,
        "data_wait_frac_median_window": statistics.median(steady_wait),
        "epochs_crossed": c.optim.max_steps * c.optim.batch_size * workers // num_samples,
        "data_wait_frac_first_window": wait[0] if wait else None,
        "psi_zero_frac_windows": psi0,  # samples that skipped the y' pass (rank 0)
        # cumulative share of y' captions found in the caption cache (rank 0), per window
        "text_cache_hit_rate_windows": history("text_cache_hit_rate"),
        "peak_rss_mib_max_worker": outcome.metrics.get("final_peak_rss_mib_max_worker"),
        "fit_seconds": outcome.metrics.get("fit_seconds"), "run_train_wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="stream epochs (385 samples each)")
    p.add_argument("--steps", type=int, default=32,
                   help="optimiser steps per training run (2 workers x 8 x 32 = 512 samples: one epoch restart)")
    p.add_argument("--workers", type=int, nargs="+", default=(2, 1))
    args = p.parse_args()
    cfg = bench_config({"optim.max_steps": args.steps})
    init_ray(cfg.ray)
    try:
        t0 = time.perf_counter()
        manifest = run_prepare(cfg)
        prepare_s = time.perf_counter() - t0
        prepared = Path(cfg.prepare.out_dir)
        shards = [str(prepared / "shards" / s) for s in manifest.shards]
        stream = measure_stream(shards, cfg, args.epochs)
        print(f"[bench] stream: {stream['samples_per_s']:.0f} samples/s over {args.epochs} epochs", flush=True)
        runs = {w: train_run(cfg, w, manifest.num_samples) for w in args.workers}
    finally:
        ray.shutdown()

    main_run = runs[max(runs)]
    consume = main_run["samples_per_s"]
    ratio = stream["samples_per_s"] / consume
    write_result("input_pipeline", {
        "config": {**vars(args), "bench": cfg.to_dict()}, "prepare_s_or_cached": prepare_s,
        "num_samples": manifest.num_samples, "shards": len(shards),
        "bytes_per_sample": sum(Path(s).stat().st_size for s in shards) / manifest.num_samples,
        "stream": stream, "train": runs,
        "consumption_samples_per_s": consume, "stream_over_consumption": ratio,
        "targets": {
            "stream_ge_3x_consumption": {"value": ratio, "target": ">= 3.0", "met": bool(ratio >= 3.0)},
            "data_wait_lt_5pct": {"value": main_run["data_wait_frac"], "target": "< 0.05",
                                  "met": bool(main_run["data_wait_frac"] < 0.05)},
        },
    })
    if len(runs) > 1:
        one = runs[min(runs)]["samples_per_s"]
        write_result("scaling", {
            "config": {"steps": args.steps, "bench": cfg.to_dict()},
            "samples_per_s": {str(w): r["samples_per_s"] for w, r in runs.items()},
            "speedup": {str(w): r["samples_per_s"] / one for w, r in runs.items()},
            "efficiency": {str(w): r["samples_per_s"] / one / (w / min(runs)) for w, r in runs.items()},
            "step_s": {str(w): r["samples_per_step"] / r["samples_per_s"] for w, r in runs.items()},
        })
    print(f"[bench] stream {stream['samples_per_s']:.0f} samples/s vs training {consume:.1f} samples/s "
          f"({ratio:.1f}x); data wait {main_run['data_wait_frac']:.1%} of step time", flush=True)


if __name__ == "__main__":
    main()
