"""The training loop, without Ray: engine + step + state + checkpoint + export.

A :class:`Trainer` gets the config, its device, its rank and the world size, a source of
collated batches per epoch and a report callback. The Ray Train worker
(:mod:`pogdiff_dist.train.worker`) supplies ``ray.train.torch.get_device()``, its
``streaming_split`` of the WebDataset stream and ``ray.train.report``; a plain process
(:func:`pogdiff_dist.train.local.train_local`: tests, ``scripts/gpu_check.sh``) supplies a device, the shards read
with ``webdataset`` and a local checkpoint folder. Everything the step touches lives on
the trainer's device: the UNet (placed by DeepSpeed), the frozen text encoder (in the
compute dtype, outside ZeRO), the empty-caption states, the y' cache, the generator of
noise, timesteps and neighbour draws, and every batch (moved in :meth:`Trainer.to_device`).

The loop reads top to bottom as torchtitan's does: ``fit`` -> ``_run_epoch`` ->
``_train_step``; the cross-rank rule "every rank agrees to step" and the non-finite
policy are functions of their own (:func:`agree_to_step`, :func:`nonfinite_policy`).
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.config import Config
from pogdiff_dist.data.sampling import SamplingPlan
from pogdiff_dist.data.shards import Batch, Manifest, StreamedBatch
from pogdiff_dist.devices import resolve_device
from pogdiff_dist.models import (
    LatentCodec,
    ModelSpec,
    TextEncoder,
    add_lora,
    build_noise_scheduler,
    build_unet,
    lora_state_dict,
)
from pogdiff_dist.pipeline import export_pipeline, load_pipeline
from pogdiff_dist.storage import Store
from pogdiff_dist.train.diagnostics import PLOTS_DIR, PsiRecord, eta, sample_grid, write_plots
from pogdiff_dist.train.engine import Engine
from pogdiff_dist.train.state import (
    EpochLedger,
    TrainState,
    agree_to_step,
    all_reduce,
    nonfinite_policy,
)
from pogdiff_dist.train.step import DualConditionStep
from pogdiff_dist.train.stream import EpochStream, Reader
from pogdiff_dist.train.validate import Validator

STATE_FILE = "train_state_rank{rank}.safetensors"  # TrainState of each rank, next to DeepSpeed's files
MODEL_DIR, SAMPLES, LORA_DIR = "model", "samples.png", "lora"

# report(metrics, checkpoint_dir): checkpoint_dir is a temporary folder valid during the call
Report = Callable[[dict, Path], None]


def check_manifest(cfg: Config, manifest: Manifest) -> None:
    """The run's config must fit the shards it reads; say which setting does not."""
    if cfg.loss.k > manifest.k_max:
        raise ValueError(f"loss.k={cfg.loss.k} exceeds the k_max={manifest.k_max} stored in the shards; "
                         f"lower loss.k or re-prepare with prepare.k_max >= {cfg.loss.k}")
    if manifest.text_shape[0] != cfg.model.max_length:
        raise ValueError(f"shards hold captions of {manifest.text_shape[0]} tokens but model.max_length="
                         f"{cfg.model.max_length}: the shards were prepared with another config")


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One rank's training: build once, ``load`` a checkpoint (optional), ``fit``.

    ``epoch_batches(epoch)`` yields :class:`StreamedBatch` items for that epoch (CPU tensors);
    ``report(metrics, dir)`` persists a checkpoint folder; ``tracker.log(step, metrics)``
    records metrics (a null tracker on ranks other than 0). ``run_dir`` receives the
    exported model and the sample grid, written by rank 0 on its device.
    """

    def __init__(self, cfg: Config, prepared_dir: str | Path, device: torch.device | str, rank: int, world: int,
                 report: Report, tracker=None, run_dir: str | Path | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = resolve_device(device)  # cuda -> cuda:<current>: set_device and NCCL need the index
        # run_dir and prepared_dir may be object-storage URIs: the export is written to the run's
        # local mirror and uploaded; shards are streamed from where they are
        self.report = report
        self.run_store = Store(run_dir) if run_dir is not None else None
        self.run_dir = self.run_store.local if self.run_store is not None else None
        self.tracker = tracker if tracker is not None else _NullTracker()
        self.prepared = str(prepared_dir)
        self.manifest = Manifest.load(self.prepared)
        check_manifest(cfg, self.manifest)
        t = cfg.train
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, min(int(t.cpus_per_worker), os.cpu_count() or 1)))  # never oversubscribe
        else:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
            torch.backends.cudnn.allow_tf32 = t.allow_tf32
        self.dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32

        # Frozen text encoder for y': built here, never handed to DeepSpeed, so ZeRO-3 does not partition it.
        m = self.manifest
        self.text = TextEncoder(m.text_encoder_dir, m.tokenizer_dir, cfg.model.max_length).to(self.device, self.dtype)
        uncond = self.text.encode([""])[0][0]
        elbo = torch.from_numpy(np.load(io.BytesIO(Store(self.prepared).read_bytes(m.elbo_file))))
        self.stepper = DualConditionStep(cfg.loss, build_noise_scheduler(cfg.model), self.text, uncond, elbo,
                                         t.caption_dropout, t.text_cache_mib, device=self.device,
                                         identity_counts=torch.tensor(m.train_counts))

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.spec = ModelSpec(m.latent_shape[0], m.latent_shape[1], m.text_shape[1])
        unet = build_unet(cfg.model, self.spec)
        if cfg.model.lora_rank:
            add_lora(unet, cfg.model)
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.attention = sorted({type(p).__name__ for p in unet.attn_processors.values()})
        self.engine = Engine(unet, cfg, world, self.device)
        if t.compile:
            self.engine.ds.compile()
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed * 1000 + rank)
        self.sampling = SamplingPlan(m.train_counts, cfg.data.sampling, cfg.data.sampling_alpha, t.seed)
        self.stream = EpochStream(cfg, m, self.prepared, rank, world, self.sampling)
        self.state = TrainState()
        self.ledger = EpochLedger()
        self._skip = 0  # rows of the first epoch to skip: what this rank had consumed before a restart
        self._last_batch: Batch | None = None  # what a rank whose share ran out steps on, with weight 0
        self._checkpoint_due = False
        self._window: list[tuple[torch.Tensor, dict]] = []
        self._window_t0, self._window_wait = time.time(), 0.0
        self._t_start = time.time()
        self._first_step, self._t_fit = 0, time.time()  # where and when this segment's fit() began
        self.validator = Validator(self)
        self.psi = PsiRecord(self.device) if rank == 0 and cfg.loss.method == "pogdiff" else None

    # -- checkpoints

    def load(self, checkpoint_dir: str | Path) -> None:
        """Resume from a checkpoint folder (every rank's, as :meth:`save_checkpoint` wrote it)."""
        d = Path(checkpoint_dir)
        self.engine.load(d)
        self.state = TrainState.load(d / STATE_FILE.format(rank=self.rank))
        self.generator.set_state(self.state.generator)
        assert self.state.step == self.engine.global_step, (self.state.step, self.engine.global_step)
        self.ledger = EpochLedger.restore(self.state)
        self._skip = self.state.open_rows
        print(f"[train] rank {self.rank} resumed at step {self.state.step} (lr {self.engine.lr:.3g})", flush=True)
        self.tracker.log(self.state.step, {"resumed_from_step": self.state.step, "resumed_lr": self.engine.lr})

    def save_checkpoint(self) -> None:
        """Every rank writes its ZeRO partition and its state, then reports the folder."""
        s = self.state
        s.generator = self.generator.get_state()
        self.ledger.snapshot(s)
        metrics = {"step": s.step, "epoch": s.epoch, **s.last, "nonfinite_skipped": s.nonfinite,
                   "epochs": json.dumps(s.epochs)}
        with tempfile.TemporaryDirectory() as d:
            self.engine.save(d, tag=f"step{s.step}", client_state={"step": s.step, "epoch": s.epoch})
            s.save(Path(d) / STATE_FILE.format(rank=self.rank))
            self.report(metrics, Path(d))

    # -- the loop

    def to_device(self, batch: Batch) -> Batch:
        """The one place a batch moves: pinned host memory, then an asynchronous copy."""
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def fit(self, read: Reader, final_checkpoint: bool = True) -> TrainState:
        """Train to ``optim.max_steps``, then export (rank 0) and write the final checkpoint
        (unless ``final_checkpoint`` is False: a measurement that needs no checkpoint on disk).
        ``read(paths)`` streams the numpy batches of shards, in the given order."""
        max_steps = self.cfg.optim.max_steps
        self._first_step, self._t_fit = self.state.step, time.time()
        self._epoch_line_step = self.state.step
        while self.state.step < max_steps:
            items = self.stream(read, self.state.epoch, skip=self._skip)
            self._skip = 0
            if not self._run_epoch(items):
                break
            self._close_epoch()
        self._finish(final_checkpoint)
        return self.state

    def _run_epoch(self, batches: Iterable[StreamedBatch]) -> bool:
        """True when the epoch ran out (on every rank), False when ``max_steps`` was reached inside it.

        Ranks step in lockstep: while any rank still has a batch, every rank takes part in the
        step; one whose share ran out steps on its last batch with weight 0 (its shard of the
        gradient all-reduce is zero), so no row of a longer share is dropped."""
        items = _timed(batches, self)
        while True:
            item = next(items, None)
            if not all_reduce(torch.tensor([float(item is not None)]), self.device, op="max").item():
                return True
            if self._checkpoint_due:  # taken before this batch, so a resume re-reads from here
                self.save_checkpoint()
                self._checkpoint_due = False
            if item is not None:
                self.ledger.add(item)
                for report in item.skipped:
                    print(f"[train] rank {self.rank} skipped bad sample (data.on_bad=skip): {report}", flush=True)
            stepped = self._train_step(item.batch if item is not None else None, idle=item is None)
            if stepped and self.state.step >= self.cfg.optim.max_steps:
                return self._stream_ended(items)

    def _stream_ended(self, items: Iterator[StreamedBatch]) -> bool:
        """At ``max_steps``: did this epoch's last batch just train on every rank? Then the
        epoch is closed in the final checkpoint, and a resume starts the next epoch instead
        of reading this one again. Peeks one batch (not trained, not counted)."""
        more = torch.tensor([float(next(items, None) is not None)])
        return all_reduce(more, self.device, op="max").item() == 0

    def _train_step(self, batch: Batch | None, idle: bool = False) -> bool:
        """Forward, the cross-rank agreement, backward and (at a boundary) the optimiser step.
        ``idle``: this rank's share ran out while another's did not: a weight-0 step on its last
        batch. True when an optimiser step happened."""
        s = self.state
        loss, stats, psi = None, {}, None
        if batch is not None:
            self._last_batch = batch
            loss, stats = self.stepper(self.engine, self.to_device(batch), self.generator, dtype=self.dtype)
            psi = stats.pop("psi", None)
        elif idle and self._last_batch is not None:
            loss, _ = self.stepper(self.engine, self.to_device(self._last_batch), self.generator, dtype=self.dtype)
            loss = loss * 0.0
        has_batch, finite, finite_here = agree_to_step(loss, self.device)
        if not finite:  # a non-finite loss on some rank: every rank skips and counts it
            where = "" if finite_here else (f"non-finite loss {loss.item()} at step {s.step + 1} on rank {self.rank} "
                                            f"(samples {batch.index.tolist()}; "
                                            f"{ {k: float(v) for k, v in stats.items()} })")
            nonfinite_policy(s, self.cfg.train, finite_here, where)
            self.tracker.log(s.step, {"nonfinite_skipped": s.nonfinite})
            return False
        if not has_batch:  # some rank has nothing left to train on in this batch
            return False
        s.nonfinite_run = 0
        if not self.engine.backward_step(loss):
            return False
        s.step += 1
        if self.psi is not None and psi is not None:
            self.psi.add(psi)
        if stats:  # an idle rank's weight-0 step has none: its window keeps the rows it trained
            self._window.append((loss.detach(), stats))
        if s.step % self.cfg.train.log_every == 0 or s.step == self.cfg.optim.max_steps:
            self._log_window()
        if self.validator.due(s.step):
            self.validator(s.step, time.time() - self._t_start)
        # Deferred to the next batch or the end of the epoch, so a checkpoint on an epoch's
        # last step records the closed epoch instead of an epoch to re-read.
        self._checkpoint_due = s.step % self.cfg.train.checkpoint_every == 0 and s.step < self.cfg.optim.max_steps
        return True

    def _log_window(self) -> None:
        """Means over the window since the last log: the only place step stats reach the host."""
        if not self._window:  # this rank only took weight-0 steps since the last log
            return
        s, now = self.state, time.time()
        dt = now - self._window_t0
        keys = list(self._window[0][1])
        values = torch.stack([torch.stack([loss.float().cpu(), *[torch.as_tensor(st[k], dtype=torch.float32).cpu()
                                                                  for k in keys]])
                              for loss, st in self._window]).mean(0).tolist()
        mean = dict(zip(["loss", *keys], values))
        samples_per_step = self.cfg.optim.batch_size * self.cfg.optim.grad_accum * self.world
        mean.update(lr=self.engine.lr, samples_per_s=len(self._window) * samples_per_step / dt, epoch=s.epoch,
                    data_wait_frac=self._window_wait / dt)
        self.tracker.log(s.step, mean)
        if self.rank == 0:
            total = self.cfg.optim.max_steps
            print(f"[train] step {s.step}/{total} ({s.step / total:.0%}) loss {mean['loss']:.4f} "
                  f"(denoise {mean['loss_denoise']:.4f}, pog {mean['loss_pog']:.4f}) "
                  f"lr {self.engine.lr:.2e} {mean['samples_per_s']:.1f} samples/s, ETA {eta(s.step - self._first_step, total - s.step, now - self._t_fit)}", flush=True)
        s.last, self._window, self._window_t0, self._window_wait = mean, [], now, 0.0

    def _close_epoch(self) -> None:
        s, m = self.state, self.manifest
        self.ledger.planned = self.stream.planned
        record = self.ledger.close(s.epoch, m.num_samples, self.device, len(m.identities))
        if record["epoch_samples"] == 0:
            raise ValueError(f"epoch {s.epoch} delivered no trainable sample ({m.num_samples} samples "
                             f"over {self.world} workers, {record['epoch_skipped_bad']:.0f} skipped as bad)")
        s.epochs.append(record)
        self.tracker.log(s.step, {k: v for k, v in record.items() if k != "epoch" and not isinstance(v, list)})
        # every epoch reaches MLflow and metrics.json; the terminal gets the first, any epoch that
        # skipped or lost rows (with data.sampling, undrawn samples are the plan, not a loss), and
        # otherwise at most one per logging window (short epochs)
        every = self.cfg.train.log_every
        lost = record["epoch_not_delivered"] if not self.sampling.active else 0
        noteworthy = s.epoch == 0 or record["epoch_skipped_bad"] or lost
        if self.rank == 0 and (noteworthy or s.step // every != self._epoch_line_step // every):
            self._epoch_line_step = s.step
            head = f"[train] epoch {s.epoch}: trained on {record['epoch_samples']:.0f} rows"
            if self.sampling.active:  # drawn with replacement: repeats and undrawn samples are the plan
                print(f"{head} (data.sampling={self.cfg.data.sampling}: {record['epoch_unique_samples']:.0f} distinct "
                      f"of {m.num_samples} samples, {record['epoch_repeats']:.0f} repeated rows, "
                      f"{record['epoch_not_delivered']:.0f} not drawn this epoch, "
                      f"{record['epoch_skipped_bad']:.0f} skipped as bad; rows per identity "
                      f"{record['identity_rows']})", flush=True)
            else:
                print(f"{head} of {m.num_samples} samples ({record['epoch_skipped_bad']:.0f} skipped as bad, "
                      f"{record['epoch_not_delivered']:.0f} not delivered)", flush=True)
        s.epoch += 1
        if self._checkpoint_due:
            self.save_checkpoint()
            self._checkpoint_due = False

    def _finish(self, final_checkpoint: bool = True) -> None:
        peaks = {"peak_rss_mib_max_worker": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024}
        if self.device.type == "cuda":
            peaks["peak_gpu_mib_max_worker"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        names = sorted(peaks)
        peak = all_reduce(torch.tensor([peaks[k] for k in names], dtype=torch.float64), self.device,
                          op="max").tolist()
        peaks = dict(zip(names, peak))
        if self.validator.seconds:
            peaks.update(val_seconds=self.validator.seconds,
                         val_fraction_of_run=self.validator.seconds / max(time.time() - self._t_start, 1e-9))
        self.tracker.log(self.state.step, {**peaks, "nonfinite_skipped": self.state.nonfinite})
        self.state.last.update(peaks)
        self.export()
        if final_checkpoint:
            self.save_checkpoint()

    # -- export

    def export(self) -> Path | None:
        """The diffusers pipeline in ``run_dir/model`` (a ``StableDiffusionPipeline`` for a model
        fine-tuned from a Stable Diffusion layout, ``PoGDiffPipeline`` for a pixel-space one), with
        LoRA also the adapter alone in diffusers' LoRA format in ``run_dir/lora`` (the pipeline then
        holds the merged weights), and the sample grid in ``run_dir/samples.png``: made by rank 0
        on its device. Every rank calls (ZeRO-3 gathers the weights)."""
        state = self.engine.export_state_dict()
        if state is None or self.run_dir is None:
            return None
        m = self.manifest
        unet = build_unet(self.cfg.model, self.spec)
        if self.cfg.model.lora_rank:
            add_lora(unet, self.cfg.model)
        unet.load_state_dict(state)
        if self.cfg.model.lora_rank:
            from diffusers import StableDiffusionPipeline

            lora_dir = self.run_dir / LORA_DIR
            shutil.rmtree(lora_dir, ignore_errors=True)
            StableDiffusionPipeline.save_lora_weights(str(lora_dir), unet_lora_layers=lora_state_dict(unet),
                                                      safe_serialization=True)
            unet.fuse_lora()  # the adapter folded into the base weights: a plain UNet for the pipeline
            unet.unload_lora()
        # a fresh fp32 copy of the frozen encoder: the trainer's runs in the compute dtype
        text = TextEncoder(m.text_encoder_dir, m.tokenizer_dir, self.cfg.model.max_length)
        vae = LatentCodec(m.vae_dir).vae if m.vae_dir else None
        model_dir = self.run_dir / MODEL_DIR
        shutil.rmtree(model_dir, ignore_errors=True)
        export_pipeline(model_dir, unet, build_noise_scheduler(self.cfg.model), text, vae)
        pipe = load_pipeline(model_dir, self.device)
        sample_grid(pipe, m, self.cfg, self.run_dir / SAMPLES)
        write_plots(self.run_dir / PLOTS_DIR, m, self.psi, self.cfg.loss, self.prepared)
        for part in (MODEL_DIR, SAMPLES, PLOTS_DIR, *([LORA_DIR] if self.cfg.model.lora_rank else [])):
            self.run_store.upload(part)
        print(f"[train] rank {self.rank} exported the model to {model_dir} and the sample grid on {self.device}",
              flush=True)
        return model_dir



def _timed(batches: Iterable[StreamedBatch], trainer: Trainer) -> Iterator[StreamedBatch]:
    """The batches, with the time spent waiting for each added to the trainer's window."""
    it = iter(batches)
    while True:
        t0 = time.time()
        try:
            item = next(it)
        except StopIteration:
            return
        trainer._window_wait += time.time() - t0
        yield item


class _NullTracker:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_image(self, step: int, key: str, image) -> None:
        pass
