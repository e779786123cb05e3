"""Evaluate an exported model: generate, score, write the outputs, log to MLflow.

:func:`evaluate_model` runs in one process (a sweep's rung evaluation, the reproduction);
:func:`run_evaluate` generates on Ray actors (``jobs/evaluate.py``). :func:`resolve_source`
turns the CLI's ``--model`` / ``--mlflow-run`` into folders: a training run records its run,
model and prepared folders as MLflow tags and in its ``pogdiff_run.json``; :func:`eval_settings`
gives a run's model the evaluation settings of that run (its config.yaml's ``eval`` section),
so re-evaluating it reproduces the figures its ``--evaluate`` printed. The model and
prepared directories must be readable by every node (shared storage, as for
``train.storage_path``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pogdiff_dist.config import Config, EvalConfig, RayConfig, load_config, parse_override
from pogdiff_dist.config.sections import resolve_tracking_uri
from pogdiff_dist.data.shards import MANIFEST, Manifest
from pogdiff_dist.evaluation.generate import (
    RunPrecision,
    generate_distributed,
    generate_identity,
    generation_dtype,
    generation_tf32,
    load_pipeline,
    resolve_eval_gpus,
    run_precision,
    score_distributed,
    tf32_mode,
)
from pogdiff_dist.evaluation.report import LOGGED, mlflow_metrics, settings_text, summary_text, write_outputs
from pogdiff_dist.evaluation.scoring import Scorer, evaluated_identities
from pogdiff_dist.pipeline import LORA_WEIGHTS
from pogdiff_dist.runtime import init_ray
from pogdiff_dist.storage import fetch
from pogdiff_dist.tracking.runs import TrackingRef, read_run_state


@dataclass
class EvalSource:
    """What to evaluate and where its results go."""

    model_dir: Path
    prepared_dir: Path
    run_dir: Path | None = None  # the training run folder (runs/<name>), when known
    run_id: str | None = None  # MLflow run that receives eval/* metrics (None: no MLflow)
    tracking_uri: str | None = None
    lora_dir: Path | None = None  # a LoRA adapter (diffusers format) loaded onto model_dir's UNet

    @property
    def training_run(self) -> Path | None:
        """The run folder that trained what is evaluated: the model's, else the LoRA's."""
        return self.run_dir or (self.lora_dir.parent if self.lora_dir else None)


@dataclass
class EvalOutcome:
    results: dict
    out_dir: Path
    paths: dict[str, Path]
    mlflow_keys: list[str]


def resolve_source(model: str | None = None, prepared: str | None = None, mlflow_run: str | None = None,
                   tracking_uri: str | None = None, lora: str | None = None) -> EvalSource:
    """Turn the CLI's ``--model`` / ``--prepared`` / ``--mlflow-run`` / ``--lora`` into directories.

    - ``model`` given: that exported pipeline; a model inside a training run folder
      (``runs/<name>/model``) finds its prepared dir in the folder's ``pogdiff_run.json``.
    - only ``mlflow_run``: the run's ``pogdiff.model_dir`` / ``pogdiff.prepared_dir`` tags.
    - ``mlflow_run`` (with or without ``model``): eval/* metrics go into that run.
    - ``lora`` (``runs/<name>/lora``): that adapter on ``model`` or, without ``model``, on the
      base its run trained from (``model.pretrained`` in the run's config.yaml).
    """
    import os

    lora_dir = Path(lora).absolute() if lora else None
    if lora_dir is not None:
        model, run_state = _lora_base(lora_dir, model), read_run_state(lora_dir.parent)
        prepared = prepared or (run_state or {}).get("prepared_dir")
    if model is None and mlflow_run is None:
        raise ValueError("give --model DIR (an exported model), --mlflow-run RUN_ID or --lora DIR")
    run_dir = model_dir = found_prepared = None
    state = None
    if model is not None:
        model_dir = Path(model).absolute()
        state = read_run_state(model_dir.parent)
        if state is not None:
            run_dir, found_prepared = model_dir.parent, state.get("prepared_dir")
    uri = None
    if mlflow_run is not None:
        uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                   or (state or {}).get("tracking_uri") or "sqlite:///mlflow.db")
        folders = TrackingRef(uri, mlflow_run).open().folders()
        if model_dir is None:
            if "model_dir" not in folders:
                raise ValueError(f"MLflow run {mlflow_run} records no model folder (tag pogdiff.model_dir; "
                                 f"not a training run of this project?): pass --model runs/<name>/model")
            model_dir = fetch(folders["model_dir"])  # a URI (train.storage_path in a bucket) is downloaded
            run_dir = fetch(folders["run_dir"], only=["config.yaml"]) if "run_dir" in folders else None
        found_prepared = found_prepared or folders.get("prepared_dir")
    prepared = prepared or found_prepared
    prepared_dir = fetch(prepared, only=[MANIFEST]) if prepared is not None else None
    if prepared_dir is None:
        raise ValueError("cannot tell which prepared dataset this model was trained on: pass --prepared DIR "
                         "(the prepare.out_dir of its training config)")
    if not (prepared_dir / MANIFEST).is_file():
        raise ValueError(f"{prepared_dir} is not a prepared dataset (no {MANIFEST}); run jobs/prepare.py")
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{model_dir} is not an exported model (no model_index.json)")
    return EvalSource(model_dir, prepared_dir, run_dir, mlflow_run, uri, lora_dir)


def run_settings_origin(run_dir: Path) -> str:
    """How metrics.json and the printout name a run's own evaluation settings."""
    return f"{Path(run_dir) / 'config.yaml'} (the run's eval section)"


def eval_settings(source: EvalSource, config_file: str | None = None, overrides=()) -> tuple[Config, str]:
    """The evaluation's config and where its ``eval`` section came from. Later wins: the
    defaults, the eval section of the run that trained the model (``source.training_run``'s
    config.yaml: what its ``--evaluate`` used), the eval keys of ``config_file``, then
    ``overrides`` (``--set section.key=value``)."""
    origin, run_eval = [], {}
    run_cfg = source.training_run / "config.yaml" if source.training_run is not None else None
    if run_cfg is not None and run_cfg.is_file():
        run_eval = (yaml.safe_load(run_cfg.read_text()) or {}).get("eval") or {}
        origin.append(run_settings_origin(source.training_run))
    file_eval = {}
    if config_file is not None and Path(config_file).is_file():  # load_config reports a missing or bad file
        d = yaml.safe_load(Path(config_file).read_text())
        file_eval = (d.get("eval") or {}) if isinstance(d, dict) else {}
        origin += [f"--config {config_file}"] if file_eval else []
    parsed = [parse_override(o) for o in overrides]
    origin += [f"--set {k}={v}" for k, v in parsed if k.startswith("eval.")]
    inherited = {f"eval.{k}": v for k, v in run_eval.items() if k not in file_eval}
    try:
        cfg = load_config(config_file, {**inherited, **dict(parsed)})
    except ValueError as e:
        if not run_eval:
            raise
        raise ValueError(f"{e} (evaluation settings from {run_cfg}; change them with --set eval.KEY=VALUE)") from e
    return cfg, "; ".join(origin) or "the defaults (EvalConfig)"


def _lora_base(lora_dir: Path, model: str | None) -> str:
    """The pipeline a LoRA adapter goes onto: ``model``, else its run's ``model.pretrained``."""
    if not (lora_dir / LORA_WEIGHTS).is_file():
        raise ValueError(f"{lora_dir} is not a LoRA export (no {LORA_WEIGHTS}; "
                         f"a model.lora_rank > 0 run writes runs/<name>/lora)")
    if model is not None:
        return model
    config = lora_dir.parent / "config.yaml"
    base = load_config(config).model.pretrained if config.is_file() else None
    if base is None:
        raise ValueError(f"--lora {lora_dir}: cannot tell the base model it was trained on ({config} names no "
                         f"model.pretrained); pass --model BASE_PIPELINE_DIR")
    return base


def evaluate_model(model_dir: str | Path, prepared_dir: str | Path, cfg: EvalConfig | None = None,
                   out_dir: str | Path | None = None, device: str = "cpu",
                   precision: RunPrecision | None = None) -> dict:
    """Generate every identity in this process, then score them (:class:`Scorer`), both on ``device``.

    For a Ray Tune trial's small fixed-seed evaluation: e.g.
    ``evaluate_model(d, prepared, EvalConfig(num_images=4, steps=20))["summary"]["accuracy_few"]``.
    With ``out_dir`` the images, grids, plot and metrics.json are written there too. ``precision``
    (default: the run folder around ``model_dir``, if any) matters on a GPU only.
    """
    cfg = cfg or EvalConfig()
    manifest = Manifest.load(prepared_dir)
    names = evaluated_identities(manifest, cfg)
    run = precision or run_precision(Path(model_dir).parent)
    t0 = time.time()
    pipe = load_pipeline(model_dir, device, dtype=generation_dtype(device, run.precision))
    with tf32_mode(generation_tf32(device, run.allow_tf32)):
        generated = {n: generate_identity(pipe, n, cfg) for n in names}
    del pipe  # its memory (a GPU's) goes to the scorer
    gen_s = time.time() - t0
    some = generated[names[0]]
    scorer = Scorer(manifest, cfg, some.shape[1], some.shape[3], device=device,
                    cache_dir=cfg.cache_dir or Path(prepared_dir) / "eval_cache")
    results, previews = scorer.score(prepared_dir, generated)  # every identity's references: see compute_metrics
    results.update(model_dir=str(Path(model_dir).absolute()), prepared_dir=str(Path(prepared_dir).absolute()),
                   generation_seconds=gen_s)
    if out_dir is not None:
        results["outputs"] = {k: str(v) for k, v in write_outputs(out_dir, results, generated, previews).items()}
    return results


def run_evaluate(source: EvalSource, out_dir: str | Path, cfg: EvalConfig, *, num_workers: int = 2,
                 cpus_per_worker: float = 1.0, ray_cfg: RayConfig | None = None,
                 gpus_per_worker: float | str = "auto", settings_from: str | None = None) -> EvalOutcome:
    """Generate on Ray, compute every metric, write the outputs, log to MLflow if a run is set,
    and print the figures, each with the settings it was computed with (``settings_from``: where
    ``cfg`` came from, :func:`eval_settings`; also in metrics.json).

    Generation actors and then one scoring actor (:func:`score_distributed`: the references'
    VAE decode and the image encoder) get ``gpus_per_worker`` GPUs each. This driver holds the
    generated images (``uint8 [num_images, H, W, C]`` per identity, for the PNGs), the metrics and
    up to ``num_images`` training images per identity for the grids; never the decoded
    references or any encoder features."""
    t0 = time.time()
    init_ray(ray_cfg or RayConfig())
    manifest = Manifest.load(source.prepared_dir)
    names = evaluated_identities(manifest, cfg)
    gpus = resolve_eval_gpus(gpus_per_worker, source.run_dir)
    run = run_precision(source.training_run)  # a LoRA's own run folder says how it trained
    lora = f" + LoRA {source.lora_dir}" if source.lora_dir else ""
    print(f"[evaluate] model {source.model_dir}{lora}\n[evaluate] {len(names)} identities x {cfg.num_images} images, "
          f"DDIM {cfg.steps} steps, guidance {cfg.guidance_scale:g}, seed {cfg.seed}, {num_workers} worker(s) with "
          f"{gpus:g} GPU(s) each" + (f" ({run.precision}, TF32 {'on' if run.allow_tf32 else 'off'})" if gpus > 0 else "")
          + (f"\n[evaluate] settings from {settings_from}" if settings_from else ""), flush=True)
    generated = generate_distributed(source.model_dir, names, cfg, num_workers, cpus_per_worker,
                                     gpus_per_worker=gpus, lora_dir=source.lora_dir, precision=run)
    gen_s = time.time() - t0
    print(f"[evaluate] metrics (encoder {cfg.encoder!r}, classifier {cfg.classifier!r}) on an actor with "
          f"{gpus:g} GPU(s)", flush=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else source.prepared_dir / "eval_cache"
    results, previews = score_distributed(source.prepared_dir, manifest, generated, cfg, cache,
                                          cpus=cpus_per_worker, gpus=gpus)
    results.update(model_dir=str(source.model_dir), prepared_dir=str(source.prepared_dir),
                   lora_dir=str(source.lora_dir) if source.lora_dir else None, mlflow_run=source.run_id,
                   settings_from=settings_from, generation_seconds=gen_s, total_seconds=time.time() - t0)
    out_dir = Path(out_dir).absolute()
    paths = write_outputs(out_dir, results, generated, previews)
    keys = TrackingRef(source.tracking_uri, source.run_id).open().log_eval(
        mlflow_metrics(results), [paths[k] for k in LOGGED], folders={"grids": paths["grids"]}) if source.run_id else []

    print(f"\n[evaluate] done in {time.time() - t0:.0f}s ({len(results['few_shot_identities'])} few-shot "
          f"of {len(names)} identities)\n"
          f"  settings: {settings_text(results, encoder=True)}" + (f"; from {settings_from}" if settings_from else "")
          + f"\n{summary_text(results)}\n"
          f"  metrics:    {paths['metrics']}\n"
          f"  plot:       {paths['plot']}\n"
          f"  bleed:      {paths['confusion']}\n"
          f"  grids:      {paths['grids']}\n"
          f"  images:     {paths['images']}" +
          (f"\n  MLflow run {source.run_id}: {len(keys)} eval/* metrics and artifacts under eval/"
           if source.run_id else ""), flush=True)
    return EvalOutcome(results, out_dir, paths, keys)
