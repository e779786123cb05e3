"""The training driver: one :class:`RunContext` per process, then as many runs as asked.

A context is opened once (paths made absolute and checked, object storage probed, Ray up,
the data prepared or found prepared, the shards verified, the tracking store resolved);
:meth:`RunContext.train` then names a run, opens its MLflow run, fits a ``TorchTrainer`` of
:func:`~pogdiff_dist.train.worker.train_loop_per_worker` and closes the run. ``jobs/train.py``
trains once; a Tune trial opens a context for its prepared data (:meth:`RunContext.attach`)
and trains every rung and seed through it, so a rung never restarts Ray or re-probes storage.

The workers train, and rank 0 writes the diffusers export and the sample grid into the run
directory on its own device (a GPU on a GPU cluster); the driver, which may be a CPU-only
head, only starts the run and records what the workers wrote.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pogdiff_dist.budget import majority_advice
from pogdiff_dist.config import Config, save_config
from pogdiff_dist.data.shard_files import verify_shards
from pogdiff_dist.data.shards import ARRAY_FIELDS, Manifest
from pogdiff_dist.prepare.pipeline import run_prepare
from pogdiff_dist.runtime import absolute_paths, check_output_paths, init_ray, train_logging_config
from pogdiff_dist.storage import Store, check_storage, join
from pogdiff_dist.tracking.model import log_pipeline_model
from pogdiff_dist.tracking.runs import (
    RUN_STATE,
    TAG_MODEL,
    TAG_PREPARED,
    TAG_RUN_DIR,
    DatasetInfo,
    read_run_state,
    start_run,
    write_run_state,
)
from pogdiff_dist.train.diagnostics import PLOTS_DIR
from pogdiff_dist.train.export import LORA_DIR, MODEL_DIR, SAMPLES
from pogdiff_dist.train.trainer import check_manifest
from pogdiff_dist.train.worker import train_loop_per_worker

# what a run reports besides its steps (Trainer's logs), recorded as final_<key> in metrics.json
FINAL_KEYS = ("loss", "loss_denoise", "loss_pog", "samples_per_s", "mean_samples_per_s", "samples_trained",
              "fit_seconds_segment", "peak_rss_mib_max_worker", "peak_gpu_mib_max_worker", "val_seconds",
              "val_fraction_of_run", "val/accuracy_majority", "val/accuracy_few")


@dataclass
class TrainOutcome:
    run_dir: Path
    model_dir: Path
    samples: Path
    metrics: dict
    run_id: str
    tracking_uri: str
    location: str  # the run folder where it is kept: run_dir itself, or its URI (run_dir is then a local copy)
    config: Config | None = None  # the config the run trained with, naming the run it wrote


def scaling_config(cfg: Config) -> ScalingConfig:
    """The worker group: ``train.num_workers`` workers of ``train.cpus_per_worker`` CPUs, and one
    GPU each with ``train.use_gpu``."""
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                         resources_per_worker={"CPU": cfg.train.cpus_per_worker})


def worker_bundles(cfg: Config) -> tuple[list[dict[str, float]], str]:
    """The placement group Ray Train reserves for the worker group (one bundle per worker) and its
    strategy, as its WorkerGroup builds them from the ScalingConfig."""
    sc = scaling_config(cfg)
    return [dict(sc._resources_per_worker_not_none)] * sc.num_workers, sc.placement_strategy


class RunContext:
    """Everything a process sets up once before it trains (see the module docstring)."""

    def __init__(self, cfg: Config, manifest: Manifest, config_file: str | None = None):
        """Use :meth:`open` (a training job) or :meth:`attach` (a sweep's trial)."""
        self.cfg, self.manifest, self.config_file = cfg, manifest, config_file
        self.tracking_uri = cfg.tracking.tracking_uri  # absolute_paths resolved it, once
        self.prepared = cfg.prepare.out_dir  # absolute, or a URI

    @classmethod
    def open(cls, cfg: Config, config_file: str | None = None) -> RunContext:
        """Check the paths, probe storage, start (or join) Ray, prepare what is not up to date,
        verify the shards: everything a run needs before its first step, once."""
        check_output_paths(cfg)
        cfg = absolute_paths(cfg)  # the workers run in other folders
        check_storage(cfg)  # a missing or refused bucket fails here, before any work
        init_ray(cfg.ray)
        manifest = run_prepare(cfg)
        check_manifest(cfg, manifest)
        verify_shards(join(cfg.prepare.out_dir, "shards"), manifest, checksum=cfg.train.verify_shards)
        return cls(cfg, manifest, config_file)

    @classmethod
    def attach(cls, cfg: Config, config_file: str | None = None) -> RunContext:
        """For a process inside a prepared setup (a Tune trial: Ray is up, the sweep's driver made
        the paths absolute, prepared the data and verified it): only the manifest is read."""
        manifest = Manifest.load(cfg.prepare.out_dir)
        check_manifest(cfg, manifest)
        return cls(cfg, manifest, config_file)

    def run_name(self, cfg: Config, resume: bool) -> str:
        """Resume continues ``train.name`` exactly; a fresh run never overwrites an old one."""
        run = Store(join(cfg.train.storage_path, cfg.train.name))
        if resume:
            if not run.is_file(RUN_STATE):
                raise ValueError(f"--resume: no run named {cfg.train.name!r} under {cfg.train.storage_path}")
            return cfg.train.name
        if run.exists():
            name = f"{cfg.train.name}-{datetime.now():%Y%m%d-%H%M%S}"
            print(f"[train] run {cfg.train.name!r} exists; starting a new run {name!r} (use --resume to continue it)")
            return name
        return cfg.train.name

    def train(self, overrides: dict | None = None, resume: bool = False,
              parent_run_id: str | None = None) -> TrainOutcome:
        """One run (or one more segment of a resumed run) with the context's config plus
        ``overrides`` (e.g. a sweep's sampled keys, a rung's steps). The saved config and the
        MLflow params name the run actually written."""
        t0 = time.time()
        cfg = self.cfg.with_overrides(overrides or {})
        check_manifest(cfg, self.manifest)
        cfg = cfg.with_overrides({"train.name": self.run_name(cfg, resume)})
        run = Store(join(cfg.train.storage_path, cfg.train.name))  # its local mirror when it is a URI
        run_dir = run.local
        run_dir.mkdir(parents=True, exist_ok=True)
        tracking, start_step = self._open_tracking(cfg, run, resume, parent_run_id)
        save_config(cfg, run_dir / "config.yaml")
        run.upload(RUN_STATE)
        run.upload("config.yaml")

        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.to_dict(), "prepared_dir": self.prepared, "tracking": tracking,
                               "run_dir": run.uri()},
            scaling_config=scaling_config(cfg),
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            run_config=RunConfig(name=cfg.train.name, storage_path=cfg.train.storage_path,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 logging_config=train_logging_config(cfg.ray.verbose)),
        )
        mlflow_run = tracking.open()
        t_fit = time.time()
        try:
            result = trainer.fit()
        except Exception:
            mlflow_run.set_status("FAILED")
            raise
        fit_s = time.time() - t_fit

        # rank 0 exported the pipeline and rendered the grid on its device (into shared storage or a bucket)
        if not run.is_file(MODEL_DIR, "model_index.json"):
            raise RuntimeError(f"training finished but rank 0 left no exported model in {run.uri(MODEL_DIR)}: is "
                               f"train.storage_path ({cfg.train.storage_path}) on storage every node shares?")
        for part in (MODEL_DIR, SAMPLES, PLOTS_DIR, *([LORA_DIR] if cfg.model.lora_rank else [])):
            run.download(part)  # MLflow uploads artifacts from local files
        metrics = self._final_metrics(result.metrics or {}, fit_s, time.time() - t0, start_step)
        epochs = json.loads((result.metrics or {}).get("epochs", "[]"))
        (run_dir / "metrics.json").write_text(json.dumps({**metrics, "epochs": epochs}, indent=1))
        run.upload("metrics.json")
        model_uri = None
        if cfg.tracking.log_model:
            model_uri = log_pipeline_model(tracking.uri, tracking.run_id, run_dir / MODEL_DIR,
                                           cfg.tracking.register_model)
        mlflow_run.finish({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                          [run_dir / SAMPLES, run_dir / "metrics.json", run_dir / "config.yaml", run_dir / PLOTS_DIR,
                           *([run_dir / LORA_DIR] if cfg.model.lora_rank else [])],
                          step=int(metrics.get("final_step", 0)))
        print(f"\n[train] done in {metrics['total_seconds']:.0f}s\n"
              f"  model (diffusers, safetensors): {run.uri(MODEL_DIR)}\n"
              f"  sample grid:                    {run.uri(SAMPLES)}\n"
              f"  metrics:                        {run.uri('metrics.json')}  {json.dumps(metrics)}\n"
              + (f"  local copy of the run folder:   {run_dir}\n" if run.remote else "") +
              f"  checkpoints:                    {result.checkpoint.path}\n"
              f"  MLflow run {tracking.run_id} in experiment {cfg.tracking.experiment!r}:\n    {mlflow_run.url_hint()}"
              + (f"\n  MLflow model:                   {model_uri}" if model_uri else ""), flush=True)
        advice = majority_advice(metrics.get("final_val/accuracy_majority"), int(metrics.get("final_step") or 0),
                                 cfg.optim.batch_size * cfg.train.num_workers * cfg.optim.grad_accum,
                                 self.manifest.train_counts, cfg.data.sampling, cfg.data.sampling_alpha,
                                 self.manifest.train_repeats or None)
        if advice:
            print(advice, flush=True)
        return TrainOutcome(run_dir, run_dir / MODEL_DIR, run_dir / SAMPLES, metrics, tracking.run_id,
                            tracking.uri, run.uri(), cfg)

    def _open_tracking(self, cfg: Config, run: Store, resume: bool, parent_run_id: str | None):
        """The run's MLflow run (new, or the resumed one) and the step this segment starts at."""
        m, prepared = self.manifest, self.prepared
        tags = {TAG_RUN_DIR: run.uri(), TAG_PREPARED: prepared, TAG_MODEL: run.uri(MODEL_DIR),
                "pogdiff.dataset": m.dataset or prepared, "pogdiff.dataset_fingerprint": m.fingerprint,
                "pogdiff.config_file": str(Path(self.config_file).absolute()) if self.config_file else "(defaults)",
                "pogdiff.lora_rank": str(cfg.model.lora_rank), "pogdiff.sampling": cfg.data.sampling}
        start_step = 0
        if resume:
            run.download(RUN_STATE)
            tracking = start_run(cfg, self.tracking_uri, run_id=read_run_state(run.local)["run_id"], tags=tags)
            if run.is_file("metrics.json"):  # where the previous segment ended
                run.download("metrics.json")
                start_step = int(json.loads((run.local / "metrics.json").read_text()).get("final_step", 0))
        else:
            dataset = DatasetInfo(name=m.dataset or posixpath.basename(prepared.rstrip("/")), source=prepared,
                                  fingerprint=m.fingerprint,
                                  fields={**{f.removesuffix(".npy"): "binary" for f in ARRAY_FIELDS}, "meta": "string"})
            tracking = start_run(cfg, self.tracking_uri, run_name=cfg.train.name, parent_run_id=parent_run_id,
                                 tags=tags, dataset=dataset)
        write_run_state(run.local, tracking, prepared)
        tracking.open().log_segment(cfg, start_step)
        return tracking, start_step

    def _final_metrics(self, reported: dict, fit_s: float, total_s: float, start_step: int) -> dict:
        """What rank 0 reported with its last checkpoint, as ``final_<key>``, plus the driver's own."""
        out = {"final_step": reported.get("step"), **{f"final_{k}": reported.get(k) for k in FINAL_KEYS},
               "fit_seconds": fit_s, "total_seconds": total_s, "nonfinite_skipped": reported.get("nonfinite_skipped"),
               "num_samples": self.manifest.num_samples, "prepare_skipped": len(self.manifest.skipped),
               "segment_start_step": start_step}
        return {k: v for k, v in out.items() if v is not None}


def run_train(cfg: Config, resume: bool = False, parent_run_id: str | None = None,
              config_file: str | None = None) -> TrainOutcome:
    """Open a context for ``cfg`` and train one run in it."""
    return RunContext.open(cfg, config_file).train(resume=resume, parent_run_id=parent_run_id)
