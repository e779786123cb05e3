"""``train_loop_per_worker``: the only ray.train user inside the library.

Reads its split of the WebDataset stream, runs the dual-condition step inside a
DeepSpeed engine, logs to MLflow on rank 0, checkpoints through ``ray.train``.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pogdiff_dist.config import from_dict
from pogdiff_dist.data.shards import Manifest, collate
from pogdiff_dist.dist.engine import Engine
from pogdiff_dist.models import ModelSpec, TextEncoder, build_noise_scheduler, build_unet
from pogdiff_dist.step import DualConditionStep
from pogdiff_dist.tracking import MlflowTracker, NullTracker

UNET_EXPORT = "unet"


def check_manifest(cfg, manifest: Manifest) -> None:
    """The run's config must fit the shards it reads; say which setting does not."""
    if cfg.loss.k > manifest.k_max:
        raise ValueError(f"loss.k={cfg.loss.k} exceeds the k_max={manifest.k_max} stored in the shards; "
                         f"lower loss.k or re-prepare with prepare.k_max >= {cfg.loss.k}")
    if manifest.text_shape[0] != cfg.model.max_length:
        raise ValueError(f"shards hold captions of {manifest.text_shape[0]} tokens but model.max_length="
                         f"{cfg.model.max_length}: the shards were prepared with another config")


def _worker_state(gen: torch.Generator, step: int, epoch: int) -> dict[str, torch.Tensor]:
    return {"generator": gen.get_state(), "step": torch.tensor(step), "epoch": torch.tensor(epoch)}


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    prepared = Path(config["prepared_dir"])
    manifest = Manifest.load(prepared)
    check_manifest(cfg, manifest)

    text = TextEncoder(manifest.text_encoder_dir, manifest.tokenizer_dir, cfg.model.max_length)
    uncond = text.encode([""])[0][0]
    scheduler = build_noise_scheduler(cfg.model)
    elbo = torch.from_numpy(np.load(prepared / manifest.elbo_file))
    stepper = DualConditionStep(cfg.loss, scheduler, text, uncond, elbo, cfg.train.caption_dropout)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    c, h, _ = manifest.latent_shape
    unet = build_unet(cfg.model, ModelSpec(c, h, manifest.text_shape[1]))
    engine = Engine(unet, cfg, world)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)  # per-rank noise, t and neighbour draws

    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load(d)
            state = load_file(str(Path(d) / f"worker_rank{rank}.safetensors"))
        gen.set_state(state["generator"])
        step, epoch = int(state["step"]), int(state["epoch"])
        assert step == engine.global_step, (step, engine.global_step)
        print(f"[train] rank {rank} resumed at step {step} (lr {engine.lr:.3g})", flush=True)

    tracker = MlflowTracker(config["tracking_uri"], config["run_id"]) if rank == 0 else NullTracker()
    shard = ray.train.get_dataset_shard("train")
    accum = cfg.optim.grad_accum
    samples_per_step = cfg.optim.batch_size * accum * world
    t_last, window_stats, window_wait, last = time.time(), [], 0.0, {}

    def checkpoint_now(final: bool) -> None:
        metrics = {"step": step, "epoch": epoch, **last}
        with tempfile.TemporaryDirectory() as d:
            engine.save(d, tag=f"step{step}", client_state={"step": step, "epoch": epoch})
            save_file(_worker_state(gen, step, epoch), str(Path(d) / f"worker_rank{rank}.safetensors"))
            if final:
                state = engine.export_state_dict()
                if state is not None:
                    export = build_unet(cfg.model, ModelSpec(c, h, manifest.text_shape[1]))
                    export.load_state_dict(state)
                    export.save_pretrained(str(Path(d) / UNET_EXPORT), safe_serialization=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    while step < cfg.optim.max_steps:
        t_wait, batches = time.time(), 0
        for numpy_batch in shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy",
                                              drop_last=True, local_shuffle_buffer_size=cfg.train.shuffle_buffer,
                                              local_shuffle_seed=cfg.train.seed * 7919 + epoch * 31 + rank):
            window_wait += time.time() - t_wait
            batches += 1
            batch = collate(numpy_batch)
            loss, stats = stepper(engine, batch, gen, dtype=engine.dtype)
            stepped = engine.backward_step(loss)
            t_wait = time.time()
            if not stepped:
                continue
            step += 1
            window_stats.append({"loss": loss.item(), **stats})
            if step % cfg.train.log_every == 0 or step == cfg.optim.max_steps:
                dt = time.time() - t_last
                n = len(window_stats)
                mean = {k: float(np.mean([s[k] for s in window_stats])) for k in window_stats[0]}
                mean.update(lr=engine.lr, samples_per_s=n * samples_per_step / dt, epoch=epoch,
                            data_wait_frac=window_wait / dt)
                tracker.log(step, mean)
                if rank == 0:
                    print(f"[train] step {step}/{cfg.optim.max_steps} loss {mean['loss']:.4f} "
                          f"(denoise {mean['loss_denoise']:.4f}, pog {mean['loss_pog']:.4f}) "
                          f"lr {engine.lr:.2e} {mean['samples_per_s']:.1f} samples/s", flush=True)
                t_last, window_stats, window_wait, last = time.time(), [], 0.0, mean
            if step % cfg.train.checkpoint_every == 0 and step < cfg.optim.max_steps:
                checkpoint_now(final=False)
            if step >= cfg.optim.max_steps:
                break
        else:
            if batches == 0:
                raise ValueError(f"rank {rank} got no full batch of {cfg.optim.batch_size} samples in an epoch: "
                                 f"the dataset ({manifest.num_samples} samples over {world} workers) is too small")
            epoch += 1
            continue
        break

    peak = torch.tensor(float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024)  # MiB
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tracker.log(step, {"peak_rss_mib_max_worker": peak.item()})
    last["peak_rss_mib_max_worker"] = peak.item()
    checkpoint_now(final=True)
