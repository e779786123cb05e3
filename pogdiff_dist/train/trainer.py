"""The training loop, without Ray: engine + step + state + checkpoint + export.

A :class:`Trainer` gets the config, its device, its rank and the world size, a source of
collated batches per epoch and a report callback. The Ray Train worker
(:mod:`pogdiff_dist.train.worker`) supplies ``ray.train.torch.get_device()``, its
``streaming_split`` of the WebDataset stream and ``ray.train.report``; a plain process
(:func:`pogdiff_dist.train.local.train_local`: tests, ``scripts/gpu_check.sh``) supplies a device, the shards read
with ``webdataset`` and a local checkpoint folder. What the device half of a step touches
lives on the trainer's device: the UNet (placed by DeepSpeed), the frozen fp32 text encoder
(outside ZeRO), the empty-caption states, the y' cache, the generator of noise and
timesteps, and every batch (copied once, :meth:`HostBatch.to_device`); the host half (the
step's plan, the epoch ledger, the ranks' agreements) works on host arrays.

The loop reads top to bottom as torchtitan's does: ``fit`` -> ``_run_epoch`` ->
``_train_step``; the non-finite policy is a function of its own (:func:`nonfinite_policy`),
applied once per log window.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.config import Config
from pogdiff_dist.data.shards import HostBatch, Manifest, StreamedBatch
from pogdiff_dist.devices import compute_dtype, resolve_device
from pogdiff_dist.storage import Store
from pogdiff_dist.syncs import host_side
from pogdiff_dist.tracking.null import NullRun
from pogdiff_dist.train.build import (
    build_denoiser,
    build_engine,
    build_step,
    build_stream,
    build_text_encoder,
    generators,
    model_spec,
    setup_device,
)
from pogdiff_dist.train.diagnostics import PsiRecord, eta
from pogdiff_dist.train.export import LORA_DIR, MODEL_DIR, SAMPLES, export_run
from pogdiff_dist.train.metrics import MetricsWindow
from pogdiff_dist.train.state import EpochLedger, HostComm, TrainState, nonfinite_policy
from pogdiff_dist.train.stream import Reader
from pogdiff_dist.train.validate import Validator

STATE_FILE = "train_state_rank{rank}.safetensors"  # TrainState of each rank, next to DeepSpeed's files
__all__ = ["LORA_DIR", "MODEL_DIR", "SAMPLES", "Trainer", "check_manifest"]

# report(metrics, checkpoint_dir): checkpoint_dir is a temporary folder valid during the call
Report = Callable[[dict, Path], None]


def check_manifest(cfg: Config, manifest: Manifest) -> None:
    """The run's config must fit the shards it reads; say which setting does not."""
    if cfg.loss.k > manifest.k_max:
        raise ValueError(f"loss.k={cfg.loss.k} exceeds the k_max={manifest.k_max} stored in the shards; "
                         f"lower loss.k or re-prepare with prepare.k_max >= {cfg.loss.k}")
    prepared_length = manifest.max_length if manifest.max_length is not None else manifest.text_shape[0]
    if prepared_length != cfg.model.max_length:
        raise ValueError(f"shards hold captions of {prepared_length} tokens but model.max_length="
                         f"{cfg.model.max_length}: the shards were prepared with another config")


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One rank's training: build once, ``load`` a checkpoint (optional), ``fit``.

    ``epoch_batches(epoch)`` yields :class:`StreamedBatch` items for that epoch (host arrays);
    ``report(metrics, dir)`` persists a checkpoint folder; ``tracker.log(step, metrics)``
    records metrics (a null tracker on ranks other than 0). ``run_dir`` receives the
    exported model and the sample grid, written by rank 0 on its device.

    Inside a micro-step the host never waits for the device (:mod:`pogdiff_dist.syncs`): the
    step's shape-setting draws are made on the host (:meth:`DualConditionStep.plan`), the
    ranks agree on host facts through :class:`HostComm`, a non-finite loss is skipped on the
    device (:class:`Engine`), and statistics reach the host once per log window
    (:class:`MetricsWindow`).
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
        self.tracker = tracker if tracker is not None else NullRun()
        self.prepared = str(prepared_dir)
        self.manifest = m = Manifest.load(self.prepared)
        check_manifest(cfg, m)
        setup_device(self.device, cfg.train)
        self.dtype = compute_dtype(cfg.train.precision)
        self.comm = HostComm()
        # the parts, each built alone (train/build.py)
        self.text, uncond, uncond_pooled = build_text_encoder(m, cfg.model.max_length, self.device)
        self.stepper = build_step(cfg, m, self.prepared, self.text, uncond, uncond_pooled, self.device)
        self.spec = model_spec(m)
        unet, self.attention = build_denoiser(cfg.model, cfg.train, self.spec)
        self.engine = build_engine(unet, cfg, world, self.device)
        self.generator, self.host_generator = generators(self.device, cfg.train.seed, rank)
        self.stream = build_stream(cfg, m, self.prepared, rank, world)
        self.sampling = self.stream.sampling
        self.validator = Validator(m, cfg.train, cfg.model.max_length, self.prepared, self.device, self.dtype, rank,
                                   cfg.optim.max_steps)
        self.window = MetricsWindow()
        self.psi = PsiRecord() if rank == 0 and cfg.loss.method == "pogdiff" else None
        self.state = TrainState()
        self.ledger = EpochLedger()
        self._skip = 0  # rows of the first epoch to skip: what this rank had consumed before a restart
        self._last_batch: HostBatch | None = None  # what a rank whose share ran out steps on, with weight 0
        self._checkpoint_due = False
        self._t_start = time.time()
        self._first_step, self._t_fit = 0, time.time()  # where and when this segment's fit() began
        self.samples_trained = 0  # this segment, all ranks (counted in the log windows)

    # -- checkpoints

    def load(self, checkpoint_dir: str | Path) -> None:
        """Resume from a checkpoint folder (every rank's, as :meth:`save_checkpoint` wrote it)."""
        d = Path(checkpoint_dir)
        self.engine.load(d)
        self.state = TrainState.load(d / STATE_FILE.format(rank=self.rank))
        self.generator.set_state(self.state.generator)
        self.host_generator.set_state(self.state.host_generator)
        assert self.state.step == self.engine.global_step, (self.state.step, self.engine.global_step)
        self.ledger = EpochLedger.restore(self.state)
        self._skip = self.state.open_rows
        print(f"[train] rank {self.rank} resumed at step {self.state.step} (lr {self.engine.lr:.3g})", flush=True)
        self.tracker.log(self.state.step, {"resumed_from_step": self.state.step, "resumed_lr": self.engine.lr})

    def save_checkpoint(self) -> None:
        """Every rank writes its ZeRO partition and its state, then reports the folder."""
        s = self.state
        s.generator, s.host_generator = self.generator.get_state(), self.host_generator.get_state()
        self.ledger.snapshot(s)
        metrics = {"step": s.step, "epoch": s.epoch, **s.last, "nonfinite_skipped": s.nonfinite,
                   "epochs": json.dumps(s.epochs)}
        with tempfile.TemporaryDirectory() as d:
            self.engine.save(d, tag=f"step{s.step}", client_state={"step": s.step, "epoch": s.epoch})
            s.save(Path(d) / STATE_FILE.format(rank=self.rank))
            self.report(metrics, Path(d))

    # -- the loop

    def fit(self, read: Reader, final_checkpoint: bool = True) -> TrainState:
        """Train to ``optim.max_steps``, then export (rank 0) and write the final checkpoint
        (unless ``final_checkpoint`` is False: a throughput measurement keeps no weights).
        ``read(paths)`` streams the numpy batches of shards, in the given order."""
        max_steps = self.cfg.optim.max_steps
        self._first_step, self._t_fit = self.state.step, time.time()
        self._epoch_line_step = self.state.step
        self.window.restart_clock()
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
        gradient all-reduce is zero), so no row of a longer share is dropped. The agreement is
        one host collective of two flags per micro-step."""
        items = _timed(batches, self.window)
        while True:
            item = next(items, None)
            batch = item.batch if item is not None else None  # None too when every row of it was bad
            any_item, all_can = self.comm.any_every(item is not None, batch is not None or self._last_batch is not None)
            if not any_item:
                return True
            if self._checkpoint_due:  # taken before this batch, so a resume re-reads from here
                self.save_checkpoint()
                self._checkpoint_due = False
            if item is not None:
                self.ledger.add(item)
                for report in item.skipped:
                    print(f"[train] rank {self.rank} skipped bad sample (data.on_bad=skip): {report}", flush=True)
            if not all_can:  # some rank has nothing at all to step on yet (every row it read was bad)
                continue
            stepped = self._train_step(batch if batch is not None else self._last_batch, idle=batch is None)
            if stepped and self.state.step >= self.cfg.optim.max_steps:
                return self._stream_ended(items)

    def _stream_ended(self, items: Iterator[StreamedBatch]) -> bool:
        """At ``max_steps``: did this epoch's last batch just train on every rank? Then the
        epoch is closed in the final checkpoint, and a resume starts the next epoch instead
        of reading this one again. Peeks one batch (not trained, not counted)."""
        return not self.comm.any(next(items, None) is not None)

    def _train_step(self, host: HostBatch, idle: bool = False) -> bool:
        """The host half (plan), the one copy to the device, forward, backward and (at a boundary)
        the optimiser step. ``idle``: this rank's share ran out while another's did not: a
        weight-0 step on its last batch. True when an optimiser step happened."""
        s = self.state
        if not idle:
            self._last_batch = host
        plan = self.stepper.plan(host, self.host_generator)
        psi = (plan.host_stats or {}).pop("psi", None)
        loss, stats = self.stepper(self.engine, host.to_device(self.device), self.generator, dtype=self.dtype,
                                   plan=plan.to_device(self.device))
        if idle:
            loss = loss * 0.0
        else:
            self.window.add_micro(loss, stats, len(host), host.index)
            if self.psi is not None and psi is not None:
                self.psi.add(psi)
        outcome = self.engine.backward_step(loss)
        if not outcome.boundary:
            return False
        s.step += 1
        self.window.close_step(s.step, outcome.skipped, outcome.overflow)
        if s.step % self.cfg.train.log_every == 0 or s.step == self.cfg.optim.max_steps:
            self._log_window()
        if self.validator.due(s.step):
            val = self.validator(s.step, self.engine, self.stepper.scheduler.config, self.text, self.tracker,
                                 time.time() - self._t_start)
            s.last.update({k: v for k, v in val.items() if "accuracy" in k})
        # Deferred to the next batch or the end of the epoch, so a checkpoint on an epoch's
        # last step records the closed epoch instead of an epoch to re-read.
        self._checkpoint_due = s.step % self.cfg.train.checkpoint_every == 0 and s.step < self.cfg.optim.max_steps
        return True

    def _log_window(self) -> None:
        """The window's means and throughput: the only place step statistics reach the host."""
        s = self.state
        first = s.step - len(self.window) + 1
        r = self.window.read(self.comm)
        nonfinite_policy(s, self.cfg.train, r.skipped_steps, list(range(first, s.step + 1)), r.bad_here)
        self.samples_trained += r.samples
        if not r.means:  # this rank only took weight-0 steps since the last log
            return
        mean = dict(r.means)
        mean.update(lr=self.engine.lr, samples_per_s=r.samples / max(r.seconds, 1e-9), epoch=s.epoch,
                    data_wait_frac=r.data_wait_s / max(r.seconds, 1e-9), nonfinite_skipped=s.nonfinite,
                    samples_trained=self.samples_trained)
        self.tracker.log(s.step, mean)
        if self.rank == 0:
            total, elapsed = self.cfg.optim.max_steps, time.time() - self._t_fit
            pog = mean.get("loss_pog", 0.0)
            print(f"[train] step {s.step}/{total} ({s.step / total:.0%}) loss {mean['loss']:.4f} "
                  f"(denoise {mean.get('loss_denoise', float('nan')):.4f}, pog {pog:.4f}) "
                  f"lr {self.engine.lr:.2e} {mean['samples_per_s']:.1f} samples/s, "
                  f"ETA {eta(s.step - self._first_step, total - s.step, elapsed)}", flush=True)
        s.last = {**{k: v for k, v in s.last.items() if k.startswith("val/")}, **mean}  # the latest validation too

    def _close_epoch(self) -> None:
        s, m = self.state, self.manifest
        self.ledger.planned = self.stream.planned
        record = self.ledger.close(s.epoch, m.num_samples, self.comm, len(m.identities))
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
                print(f"{head} ({self.sampling.label}: {record['epoch_unique_samples']:.0f} distinct "
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
        fit_s = time.time() - self._t_fit
        peaks = {"peak_rss_mib_max_worker": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024}
        if self.device.type == "cuda":  # the allocator's counter: a host read, no device sync
            peaks["peak_gpu_mib_max_worker"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        names = sorted(peaks)
        peaks = dict(zip(names, self.comm.all_reduce(np.array([peaks[k] for k in names]), op="max").tolist()))
        # the run's own totals: samples counted in the log windows over the fit's wall time
        peaks.update(fit_seconds_segment=fit_s, samples_trained=self.samples_trained,
                     mean_samples_per_s=self.samples_trained / max(fit_s, 1e-9))
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
        """Rank 0 writes the model (:func:`~pogdiff_dist.train.export.export_run`) from the fp32
        master weights (their EMA with ``train.ema``). Every rank calls (the weights are gathered)."""
        masters = self.engine.master_state_dict()
        if masters is None or self.run_dir is None:
            return None
        model_dir = export_run(self.cfg, self.manifest, self.spec, masters, self.run_store, self.device, self.psi,
                               self.prepared)
        print(f"[train] rank {self.rank} exported the model to {model_dir} and the sample grid on {self.device}",
              flush=True)
        return model_dir


@host_side
def _timed(batches: Iterable[StreamedBatch], window: MetricsWindow) -> Iterator[StreamedBatch]:
    """The batches (host arrays), with the time spent waiting for each added to the window."""
    it = iter(batches)
    while True:
        t0 = time.time()
        try:
            item = next(it)
        except StopIteration:
            return
        window.data_wait += time.time() - t0
        yield item
