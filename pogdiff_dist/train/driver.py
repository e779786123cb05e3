"""The training driver: prepare (if needed) -> TorchTrainer.fit -> MLflow.

The workers train, and rank 0 writes the diffusers export and the sample grid into the
run directory on its own device (a GPU on a GPU cluster); the driver, which may be a
CPU-only head, only starts the run and records what the workers wrote."""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pogdiff_dist.config import Config, save_config
from pogdiff_dist.data.shard_files import verify_shards
from pogdiff_dist.data.shards import ARRAY_FIELDS
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
    finish_run,
    log_segment,
    read_run_state,
    resolve_tracking_uri,
    run_url_hint,
    start_run,
    write_run_state,
)
from pogdiff_dist.train.diagnostics import PLOTS_DIR
from pogdiff_dist.train.trainer import LORA_DIR, MODEL_DIR, SAMPLES, check_manifest
from pogdiff_dist.train.worker import train_loop_per_worker


@dataclass
class TrainOutcome:
    run_dir: Path
    model_dir: Path
    samples: Path
    metrics: dict
    run_id: str
    tracking_uri: str
    location: str  # the run folder where it is kept: run_dir itself, or its URI (run_dir is then a local copy)


def _run_name(cfg: Config, resume: bool) -> str:
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


def _dataset_input(manifest, prepared: str) -> DatasetInfo:
    return DatasetInfo(name=manifest.dataset or posixpath.basename(prepared.rstrip("/")), source=prepared, fingerprint=manifest.fingerprint,
                       fields={**{f.removesuffix(".npy"): "binary" for f in ARRAY_FIELDS}, "meta": "string"})


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


def run_train(cfg: Config, resume: bool = False, parent_run_id: str | None = None,
              config_file: str | None = None) -> TrainOutcome:
    """``parent_run_id``: a new MLflow run is created as its child (a sweep trial);
    ``config_file``: the YAML the config came from (a run tag)."""
    t0 = time.time()
    check_output_paths(cfg)
    cfg = absolute_paths(cfg)  # the workers run in other folders
    check_storage(cfg)  # a missing or refused bucket fails here, before any work
    init_ray(cfg.ray)
    manifest = run_prepare(cfg)
    check_manifest(cfg, manifest)
    prepared = cfg.prepare.out_dir  # absolute, or a URI

    name = _run_name(cfg, resume)
    # the run folder may be a URI: the driver and rank 0 write into its local mirror and upload
    run = Store(join(cfg.train.storage_path, name))
    run_dir = run.local
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(cfg.tracking.resolved_uri())
    tags = {TAG_RUN_DIR: run.uri(), TAG_PREPARED: prepared, TAG_MODEL: run.uri(MODEL_DIR),
            "pogdiff.dataset": manifest.dataset or prepared, "pogdiff.dataset_fingerprint": manifest.fingerprint,
            "pogdiff.config_file": str(Path(config_file).absolute()) if config_file else "(defaults)",
            "pogdiff.lora_rank": str(cfg.model.lora_rank), "pogdiff.sampling": cfg.data.sampling}
    start_step = 0
    if resume:
        run.download(RUN_STATE)
        run_id = read_run_state(run_dir)["run_id"]
        start_run(cfg, run_id=run_id, tags=tags)
        if run.is_file("metrics.json"):  # where the previous segment ended
            run.download("metrics.json")
            start_step = int(json.loads((run_dir / "metrics.json").read_text()).get("final_step", 0))
    else:
        run_id = start_run(cfg, run_name=name, parent_run_id=parent_run_id, tags=tags,
                           dataset=_dataset_input(manifest, prepared))
    write_run_state(run_dir, run_id, uri, prepared)
    log_segment(uri, run_id, cfg, start_step)
    save_config(cfg, run_dir / "config.yaml")
    run.upload(RUN_STATE)
    run.upload("config.yaml")

    verify_shards(join(prepared, "shards"), manifest, checksum=cfg.train.verify_shards)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "prepared_dir": prepared, "run_id": run_id, "tracking_uri": uri,
                           "run_dir": run.uri()},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=cfg.train.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             logging_config=train_logging_config(cfg.ray.verbose)),
    )
    t_fit = time.time()
    try:
        result = trainer.fit()
    except Exception:
        finish_run(uri, run_id, {}, [], status="FAILED")
        raise
    fit_s = time.time() - t_fit

    # rank 0 exported the pipeline and rendered the grid on its device (into shared storage or a bucket)
    model_dir, samples = run_dir / MODEL_DIR, run_dir / SAMPLES
    if not run.is_file(MODEL_DIR, "model_index.json"):
        raise RuntimeError(f"training finished but rank 0 left no exported model in {run.uri(MODEL_DIR)}: is "
                           f"train.storage_path ({cfg.train.storage_path}) on storage every node shares?")
    for part in (MODEL_DIR, SAMPLES, PLOTS_DIR, *([LORA_DIR] if cfg.model.lora_rank else [])):
        run.download(part)  # MLflow uploads artifacts from local files

    m = result.metrics or {}
    metrics = {
        "final_step": m.get("step"), "final_loss": m.get("loss"), "final_loss_denoise": m.get("loss_denoise"),
        "final_loss_pog": m.get("loss_pog"), "final_samples_per_s": m.get("samples_per_s"),
        "final_peak_rss_mib_max_worker": m.get("peak_rss_mib_max_worker"), "fit_seconds": fit_s,
        "total_seconds": time.time() - t0, "nonfinite_skipped": m.get("nonfinite_skipped"),
        "num_samples": manifest.num_samples, "prepare_skipped": len(manifest.skipped),
        "val_seconds": m.get("val_seconds"), "val_fraction_of_run": m.get("val_fraction_of_run"),
        "final_peak_gpu_mib_max_worker": m.get("peak_gpu_mib_max_worker"),
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    epochs = json.loads(m.get("epochs", "[]"))
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "epochs": epochs}, indent=1))
    run.upload("metrics.json")
    model_uri = None
    if cfg.tracking.log_model:
        model_uri = log_pipeline_model(uri, run_id, model_dir, cfg.tracking.register_model)
    finish_run(uri, run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
               [samples, run_dir / "metrics.json", run_dir / "config.yaml", run_dir / PLOTS_DIR,
                *([run_dir / LORA_DIR] if cfg.model.lora_rank else [])],
               step=int(metrics.get("final_step", 0)))
    print(f"\n[train] done in {metrics['total_seconds']:.0f}s\n"
          f"  model (diffusers, safetensors): {run.uri(MODEL_DIR)}\n"
          f"  sample grid:                    {run.uri(SAMPLES)}\n"
          f"  metrics:                        {run.uri('metrics.json')}  {json.dumps(metrics)}\n"
          + (f"  local copy of the run folder:   {run_dir}\n" if run.remote else "") +
          f"  checkpoints:                    {result.checkpoint.path}\n"
          f"  MLflow run {run_id} in experiment {cfg.tracking.experiment!r}:\n    {run_url_hint(uri, run_id)}"
          + (f"\n  MLflow model:                   {model_uri}" if model_uri else ""), flush=True)
    return TrainOutcome(run_dir, model_dir, samples, metrics, run_id, uri, run.uri())
