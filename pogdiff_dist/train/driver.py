"""The training driver: prepare (if needed) -> TorchTrainer.fit -> MLflow.

The workers train, and rank 0 writes the diffusers export and the sample grid into the
run directory on its own device (a GPU on a GPU cluster); the driver, which may be a
CPU-only head, only starts the run and records what the workers wrote."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pogdiff_dist.config import Config, save_config
from pogdiff_dist.data.shards import ARRAY_FIELDS, verify_shards
from pogdiff_dist.prepare.pipeline import run_prepare
from pogdiff_dist.runtime import absolute_paths, check_output_paths, init_ray, train_logging_config
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


def _run_name(cfg: Config, resume: bool) -> str:
    """Resume continues ``train.name`` exactly; a fresh run never overwrites an old one."""
    run_dir = Path(cfg.train.storage_path).absolute() / cfg.train.name
    if resume:
        if not (run_dir / RUN_STATE).is_file():
            raise ValueError(f"--resume: no run named {cfg.train.name!r} under {run_dir.parent}")
        return cfg.train.name
    if run_dir.exists():
        name = f"{cfg.train.name}-{datetime.now():%Y%m%d-%H%M%S}"
        print(f"[train] run {cfg.train.name!r} exists; starting a new run {name!r} (use --resume to continue it)")
        return name
    return cfg.train.name


def _dataset_input(manifest, prepared: Path) -> DatasetInfo:
    return DatasetInfo(name=manifest.dataset or prepared.name, source=str(prepared), fingerprint=manifest.fingerprint,
                       fields={**{f.removesuffix(".npy"): "binary" for f in ARRAY_FIELDS}, "meta": "string"})


def run_train(cfg: Config, resume: bool = False, parent_run_id: str | None = None,
              config_file: str | None = None) -> TrainOutcome:
    """``parent_run_id``: a new MLflow run is created as its child (a sweep trial);
    ``config_file``: the YAML the config came from (a run tag)."""
    t0 = time.time()
    check_output_paths(cfg)
    cfg = absolute_paths(cfg)  # the workers run in other folders
    init_ray(cfg.ray)
    manifest = run_prepare(cfg)
    check_manifest(cfg, manifest)
    prepared = Path(cfg.prepare.out_dir).absolute()

    name = _run_name(cfg, resume)
    run_dir = Path(cfg.train.storage_path).absolute() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(cfg.tracking.resolved_uri())
    tags = {TAG_RUN_DIR: str(run_dir), TAG_PREPARED: str(prepared), TAG_MODEL: str(run_dir / MODEL_DIR),
            "pogdiff.dataset": manifest.dataset or str(prepared), "pogdiff.dataset_fingerprint": manifest.fingerprint,
            "pogdiff.config_file": str(Path(config_file).absolute()) if config_file else "(defaults)",
            "pogdiff.lora_rank": str(cfg.model.lora_rank), "pogdiff.sampling": cfg.data.sampling}
    start_step = 0
    if resume:
        run_id = read_run_state(run_dir)["run_id"]
        start_run(cfg, run_id=run_id, tags=tags)
        if (run_dir / "metrics.json").is_file():  # where the previous segment ended
            start_step = int(json.loads((run_dir / "metrics.json").read_text()).get("final_step", 0))
    else:
        run_id = start_run(cfg, run_name=name, parent_run_id=parent_run_id, tags=tags,
                           dataset=_dataset_input(manifest, prepared))
    write_run_state(run_dir, run_id, uri, prepared)
    log_segment(uri, run_id, cfg, start_step)
    save_config(cfg, run_dir / "config.yaml")

    verify_shards(prepared / "shards", manifest, checksum=cfg.train.verify_shards)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "prepared_dir": str(prepared), "run_id": run_id, "tracking_uri": uri,
                           "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(cfg.train.storage_path).absolute()),
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

    # rank 0 exported the pipeline and rendered the grid on its device (run_dir is shared storage)
    model_dir, samples = run_dir / MODEL_DIR, run_dir / SAMPLES
    if not (model_dir / "model_index.json").is_file():
        raise RuntimeError(f"training finished but rank 0 left no exported model in {model_dir}: is "
                           f"train.storage_path ({cfg.train.storage_path}) on storage every node shares?")

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
    model_uri = None
    if cfg.tracking.log_model:
        model_uri = log_pipeline_model(uri, run_id, model_dir, cfg.tracking.register_model)
    finish_run(uri, run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
               [samples, run_dir / "metrics.json", run_dir / "config.yaml", run_dir / PLOTS_DIR,
                *([run_dir / LORA_DIR] if cfg.model.lora_rank else [])],
               step=int(metrics.get("final_step", 0)))
    print(f"\n[train] done in {metrics['total_seconds']:.0f}s\n"
          f"  model (diffusers, safetensors): {model_dir}\n"
          f"  sample grid:                    {samples}\n"
          f"  metrics:                        {run_dir / 'metrics.json'}  {json.dumps(metrics)}\n"
          f"  checkpoints:                    {result.checkpoint.path}\n"
          f"  MLflow run {run_id} in experiment {cfg.tracking.experiment!r}:\n    {run_url_hint(uri, run_id)}"
          + (f"\n  MLflow model:                   {model_uri}" if model_uri else ""), flush=True)
    return TrainOutcome(run_dir, model_dir, samples, metrics, run_id, uri)
