"""``train_loop_per_worker``: the only ray.train user inside the library.

Reads its split of the WebDataset stream, runs the dual-condition step inside a
DeepSpeed engine, logs to MLflow on rank 0, checkpoints through ``ray.train``.
"""

from __future__ import annotations

import json
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


def _worker_state(gen: torch.Generator, step: int, epoch: int, ledger: "EpochLedger",
                  epochs: list[dict]) -> dict[str, torch.Tensor]:
    return {"generator": gen.get_state(), "step": torch.tensor(step), "epoch": torch.tensor(epoch),
            "epoch_rows_before_checkpoint": torch.tensor(ledger.rows + ledger.carried),
            "epochs_json": torch.frombuffer(bytearray(json.dumps(epochs).encode()), dtype=torch.uint8)}


def _sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class EpochLedger:
    """What each epoch trained on, so nothing is lost silently.

    Per rank: rows received from the stream, rows skipped as bad (``data.on_bad=skip``),
    distinct sample indices. Resume semantics: the Ray Data stream has no resumable
    position, so an epoch interrupted by a restart is read again from its start; the rows
    that epoch had already trained on before the checkpoint (``carried``) are trained on
    twice, and that count is reported as ``epoch_repeated_after_resume``.
    """

    def __init__(self, carried: int = 0):
        self.rows, self.skipped, self.carried = 0, 0, carried
        self.indices: list[np.ndarray] = []
        self.skip_reports: list[str] = []

    def add(self, rows: int, batch) -> None:
        self.rows += rows
        if batch is not None:
            self.indices.append(batch.index.numpy())

    def close(self, epoch: int, num_samples: int) -> dict[str, float]:
        """All ranks call at the end of a full pass; returns the global counts."""
        mine = np.unique(np.concatenate(self.indices)) if self.indices else np.zeros(0, np.int64)
        seen = torch.zeros(num_samples, dtype=torch.int32)
        seen[torch.from_numpy(mine)] = 1
        if dist.is_initialized():
            dist.all_reduce(seen)
        rows, skipped, carried = _sum([self.rows, self.skipped, self.carried])
        trained = rows - skipped
        out = {"epoch": epoch, "epoch_rows": rows, "epoch_samples": trained, "epoch_skipped_bad": skipped,
               "epoch_unique_samples": float((seen > 0).sum()), "epoch_seen_twice": float((seen > 1).sum()),
               "epoch_not_delivered": float(num_samples - rows), "epoch_repeated_after_resume": carried}
        self.__init__()
        return out


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
    stepper = DualConditionStep(cfg.loss, scheduler, text, uncond, elbo, cfg.train.caption_dropout,
                                cfg.train.text_cache_mib)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    c, h, _ = manifest.latent_shape
    unet = build_unet(cfg.model, ModelSpec(c, h, manifest.text_shape[1]))
    engine = Engine(unet, cfg, world)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)  # per-rank noise, t and neighbour draws

    step, epoch, carried, epochs = 0, 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load(d)
            state = load_file(str(Path(d) / f"worker_rank{rank}.safetensors"))
        gen.set_state(state["generator"])
        step, epoch = int(state["step"]), int(state["epoch"])
        carried = int(state["epoch_rows_before_checkpoint"])
        epochs = json.loads(bytes(state["epochs_json"].tolist()).decode())
        assert step == engine.global_step, (step, engine.global_step)
        print(f"[train] rank {rank} resumed at step {step} (lr {engine.lr:.3g})", flush=True)

    tracker = MlflowTracker(config["tracking_uri"], config["run_id"]) if rank == 0 else NullTracker()
    if resumed:
        tracker.log(step, {"resumed_from_step": step, "resumed_lr": engine.lr})
    shard = ray.train.get_dataset_shard("train")
    accum = cfg.optim.grad_accum
    samples_per_step = cfg.optim.batch_size * accum * world
    t_last, window_stats, window_wait, last = time.time(), [], 0.0, {}
    ledger = EpochLedger(carried)
    nonfinite, nonfinite_run, checkpoint_due = 0, 0, False

    def checkpoint_now(final: bool) -> None:
        metrics = {"step": step, "epoch": epoch, **last, "nonfinite_skipped": nonfinite,
                   "epochs": json.dumps(epochs)}
        with tempfile.TemporaryDirectory() as d:
            engine.save(d, tag=f"step{step}", client_state={"step": step, "epoch": epoch})
            save_file(_worker_state(gen, step, epoch, ledger, epochs), str(Path(d) / f"worker_rank{rank}.safetensors"))
            if final:
                state = engine.export_state_dict()
                if state is not None:
                    export = build_unet(cfg.model, ModelSpec(c, h, manifest.text_shape[1]))
                    export.load_state_dict(state)
                    export.save_pretrained(str(Path(d) / UNET_EXPORT), safe_serialization=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    while step < cfg.optim.max_steps:
        t_wait = time.time()
        for numpy_batch in shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy",
                                              drop_last=False, local_shuffle_buffer_size=cfg.train.shuffle_buffer,
                                              local_shuffle_seed=cfg.train.seed * 7919 + epoch * 31 + rank):
            window_wait += time.time() - t_wait
            if checkpoint_due:  # taken before this batch, so a resume re-reads from here
                checkpoint_now(final=False)
                checkpoint_due = False
            skipped: list[str] = []
            batch = collate(numpy_batch, on_bad=cfg.data.on_bad, skipped=skipped, fingerprint=manifest.fingerprint)
            ledger.add(len(numpy_batch["__key__"]), batch)
            if skipped:
                ledger.skipped += len(skipped)
                for report in skipped:
                    print(f"[train] rank {rank} skipped bad sample (data.on_bad=skip): {report}", flush=True)
            # Every rank must agree to step (the gradient all-reduce would hang otherwise):
            # a rank with nothing left to train on, or a non-finite loss anywhere, skips the step on all.
            loss, stats = stepper(engine, batch, gen, dtype=engine.dtype) if batch is not None else (None, {})
            finite_here = loss is None or bool(torch.isfinite(loss))
            flags = torch.tensor([float(loss is not None), float(finite_here)])  # [has a batch, finite]
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            if not flags[1]:  # a non-finite loss on some rank: every rank skips and counts it
                nonfinite, nonfinite_run = nonfinite + 1, nonfinite_run + 1
                if not finite_here:
                    where = (f"non-finite loss {loss.item()} at step {step + 1} on rank {rank} "
                             f"(samples {batch.index.tolist()}; {stats})")
                    if cfg.train.on_nonfinite == "raise" or nonfinite_run >= cfg.train.max_nonfinite:
                        why = ("train.on_nonfinite=raise" if cfg.train.on_nonfinite == "raise"
                               else f"{nonfinite_run} non-finite steps in a row (train.max_nonfinite)")
                        raise FloatingPointError(f"{where}; stopping: {why}")
                    print(f"[train] skipped step: {where}", flush=True)
                elif cfg.train.on_nonfinite == "raise" or nonfinite_run >= cfg.train.max_nonfinite:
                    raise FloatingPointError(f"non-finite loss on another rank at step {step + 1}; stopping")
                tracker.log(step, {"nonfinite_skipped": nonfinite})
                t_wait = time.time()
                continue
            if not flags[0]:  # some rank has nothing left to train on in this batch
                t_wait = time.time()
                continue
            nonfinite_run = 0
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
            # Deferred to the next batch or the end of the epoch, so a checkpoint on an epoch's
            # last step records the closed epoch instead of an epoch to re-read.
            checkpoint_due = step % cfg.train.checkpoint_every == 0 and step < cfg.optim.max_steps
            if step >= cfg.optim.max_steps:
                break
        else:
            record = ledger.close(epoch, manifest.num_samples)
            if record["epoch_samples"] == 0:
                raise ValueError(f"epoch {epoch} delivered no trainable sample ({manifest.num_samples} samples "
                                 f"over {world} workers, {record['epoch_skipped_bad']:.0f} skipped as bad)")
            epochs.append(record)
            tracker.log(step, {k: v for k, v in record.items() if k != "epoch"})
            if rank == 0:
                print(f"[train] epoch {epoch}: trained on {record['epoch_samples']:.0f} of {manifest.num_samples} "
                      f"samples ({record['epoch_skipped_bad']:.0f} skipped as bad, "
                      f"{record['epoch_not_delivered']:.0f} not delivered by the split)", flush=True)
            epoch += 1
            if checkpoint_due:
                checkpoint_now(final=False)
                checkpoint_due = False
            continue
        break

    peak = torch.tensor(float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024)  # MiB
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tracker.log(step, {"peak_rss_mib_max_worker": peak.item(), "nonfinite_skipped": nonfinite})
    last["peak_rss_mib_max_worker"] = peak.item()
    checkpoint_now(final=True)
