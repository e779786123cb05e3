"""Evaluation on Ray: where the model is, per-identity generation in Ray actors, then
metrics, outputs and the MLflow record on the driver.

Generation is the cost (num_images x DDIM steps per identity), so it is what is
distributed: ``num_workers`` actors each load the exported pipeline once and take
identities from a queue (``ActorPool``), so many identities spread over a cluster and a
slow identity does not hold up the others. Every identity has its own seeded generator
(:func:`pogdiff_dist.evaluation.identity_seed`), so the images do not depend on the
number of workers or the order in which identities finish. Metrics are cheap next to
generation and run on the driver (:func:`pogdiff_dist.evaluation.compute_metrics`).
The model and prepared directories must be readable by every node (shared storage, as
for ``train.storage_path``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import yaml

from pogdiff_dist.config import RayConfig
from pogdiff_dist.data.shards import MANIFEST, Manifest
from pogdiff_dist.evaluation.evaluate import (
    EvalConfig,
    compute_metrics,
    evaluated_identities,
    generate_identity,
    load_pipeline,
)
from pogdiff_dist.evaluation.features import load_real_images
from pogdiff_dist.evaluation.report import log_to_mlflow, write_outputs
from pogdiff_dist.runtime import init_ray
from pogdiff_dist.tracking.mlflow_runs import resolve_tracking_uri

RUN_STATE = "pogdiff_run.json"  # = pogdiff_dist.train.driver.RUN_STATE (not imported: it pulls in DeepSpeed)


@dataclass
class EvalSource:
    """What to evaluate and where its results go."""

    model_dir: Path
    prepared_dir: Path
    run_dir: Path | None = None  # the training run folder (runs/<name>), when known
    run_id: str | None = None  # MLflow run that receives eval/* metrics (None: no MLflow)
    tracking_uri: str | None = None


@dataclass
class EvalOutcome:
    results: dict
    out_dir: Path
    paths: dict[str, Path]
    mlflow_keys: list[str]


def _training_cwd(run_dir: Path, storage_path: str) -> Path:
    """The directory training ran in: run_dir = cwd / storage_path / name for a relative
    storage path, so relative paths of that run's config resolve against it."""
    storage = Path(storage_path)
    return run_dir.parent if storage.is_absolute() else run_dir.parents[len(storage.parts)]


def _prepared_from_config(run_dir: Path, out_dir: str, storage_path: str) -> Path | None:
    candidates = [Path(out_dir)] if Path(out_dir).is_absolute() else [
        _training_cwd(run_dir, storage_path) / out_dir, Path(out_dir).absolute()]
    return next((p for p in candidates if (p / MANIFEST).is_file()), None)


def _run_state(run_dir: Path) -> dict | None:
    path = run_dir / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _find_run_dir(run, tracking_uri: str) -> tuple[Path | None, list[Path]]:
    """The run folder of an MLflow run: ``<storage_path>/<run name>`` resolved against the
    places training may have run from (this cwd, the SQLite store's folder, the folder
    holding the artifact store), accepted only if its pogdiff_run.json names this run."""
    params, run_id = run.data.params, run.info.run_id
    storage = params.get("train.storage_path", "runs")
    names = [run.data.tags.get("mlflow.runName"), params.get("train.name")]
    bases = [Path.cwd()]
    if tracking_uri.startswith("sqlite:///"):
        bases.append(Path(tracking_uri[len("sqlite:///"):]).parent)
    artifact_uri = run.info.artifact_uri or ""
    if "/mlruns/" in artifact_uri and not artifact_uri.startswith(("s3:", "gs:", "http")):
        bases.append(Path(artifact_uri.replace("file://", "").split("/mlruns/")[0]))
    tried = []
    for base in bases:
        root = Path(storage) if Path(storage).is_absolute() else base / storage
        candidates = [root / n for n in names if n] + sorted(p.parent for p in root.glob(f"*/{RUN_STATE}"))
        for run_dir in candidates:
            tried.append(run_dir)
            state = _run_state(run_dir)
            if state and state.get("run_id") == run_id:
                return run_dir.absolute(), tried
    return None, tried


def resolve_source(model: str | None = None, prepared: str | None = None, mlflow_run: str | None = None,
                   tracking_uri: str | None = None) -> EvalSource:
    """Turn the CLI's ``--model`` / ``--prepared`` / ``--mlflow-run`` into directories.

    - ``model`` given: that exported pipeline; a model inside a training run folder
      (``runs/<name>/model``) also finds its prepared dir through the run's config.yaml.
    - only ``mlflow_run``: the run's folder is found from its logged params
      (``train.storage_path``, run name) and verified by its pogdiff_run.json; the model
      is ``<run folder>/model``, the prepared dir ``prepare.out_dir`` of its config.
    - ``mlflow_run`` (with or without ``model``): eval/* metrics go into that run.
    """
    if model is None and mlflow_run is None:
        raise ValueError("give --model DIR (an exported model) or --mlflow-run RUN_ID")
    run_dir = None
    uri = tracking_uri
    if model is not None:
        model_dir = Path(model).absolute()
        if _run_state(model_dir.parent) is not None:
            run_dir = model_dir.parent
    if mlflow_run is not None:
        from mlflow.tracking import MlflowClient

        state_uri = (_run_state(run_dir) or {}).get("tracking_uri") if run_dir else None
        uri = resolve_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or state_uri or "sqlite:///mlflow.db")
        try:
            run = MlflowClient(uri).get_run(mlflow_run)
        except Exception as e:
            raise ValueError(f"MLflow run {mlflow_run!r} not found in {uri} ({type(e).__name__}: {e}); "
                             f"pass --tracking-uri") from e
        if model is None:
            run_dir, tried = _find_run_dir(run, uri)
            if run_dir is None:
                raise ValueError(f"cannot find the folder of MLflow run {mlflow_run} (tried "
                                 f"{[str(t) for t in tried[:6]]}); pass --model runs/<name>/model")
            model_dir = run_dir / "model"
    if prepared is not None:
        prepared_dir = Path(prepared).absolute()
    else:
        found = None
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            found = _prepared_from_config(run_dir, cfg["prepare"]["out_dir"], cfg["train"]["storage_path"])
        if found is None:
            raise ValueError("cannot tell which prepared dataset this model was trained on: pass --prepared DIR "
                             "(the prepare.out_dir of its training config)")
        prepared_dir = found
    if not (prepared_dir / MANIFEST).is_file():
        raise ValueError(f"{prepared_dir} is not a prepared dataset (no {MANIFEST}); run jobs/prepare.py")
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{model_dir} is not an exported model (no model_index.json)")
    return EvalSource(model_dir, prepared_dir, run_dir, mlflow_run, uri if mlflow_run else None)


class IdentityGenerator:
    """Ray actor: loads the pipeline once onto its device (the GPU Ray gave it, else the CPU),
    then generates identity after identity."""

    def __init__(self, model_dir: str, cfg: dict, threads: int, gpus: float = 0.0):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if gpus > 0 else "cpu"
        self.pipe = load_pipeline(model_dir, self.device)
        self.cfg = EvalConfig(**cfg)

    def generate(self, name: str) -> tuple[str, np.ndarray, float]:
        t0 = time.time()
        return name, generate_identity(self.pipe, name, self.cfg), time.time() - t0


def resolve_eval_gpus(setting: float | str, run_dir: Path | None) -> float:
    """GPUs per generation actor: ``auto`` = 1 when the model's training run used GPUs
    (``train.use_gpu`` in its config.yaml) or, without a run folder, when the cluster has GPUs."""
    if setting != "auto":
        return float(setting)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return 1.0 if yaml.safe_load((run_dir / "config.yaml").read_text())["train"].get("use_gpu") else 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def generate_distributed(model_dir: str | Path, names: list[str], cfg: EvalConfig, num_workers: int = 2,
                         cpus_per_worker: float = 1.0, progress: bool = True,
                         gpus_per_worker: float = 0.0) -> dict[str, np.ndarray]:
    """identity name -> ``uint8 [num_images, H, W, C]``, made by up to ``num_workers`` actors
    (each on a GPU when ``gpus_per_worker`` > 0)."""
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(IdentityGenerator)
    n_actors = max(1, min(num_workers, len(names)))
    actors = [actor.remote(str(Path(model_dir).absolute()), cfg.to_dict(), int(max(1, cpus_per_worker)),
                           gpus_per_worker) for _ in range(n_actors)]
    out: dict[str, np.ndarray] = {}
    t0 = time.time()
    try:
        pool = ActorPool(actors)
        for name, images, seconds in pool.map_unordered(lambda a, n: a.generate.remote(n), names):
            out[name] = images
            if progress:
                print(f"[evaluate] generated {len(out)}/{len(names)}: {name!r} ({len(images)} images, "
                      f"{seconds:.1f}s; {time.time() - t0:.0f}s so far)", flush=True)
    finally:
        for a in actors:
            ray.kill(a)
    return {n: out[n] for n in names}


def run_evaluate(source: EvalSource, out_dir: str | Path, cfg: EvalConfig, *, num_workers: int = 2,
                 cpus_per_worker: float = 1.0, ray_cfg: RayConfig | None = None,
                 gpus_per_worker: float | str = "auto") -> EvalOutcome:
    """Generate on Ray, compute every metric, write the outputs, log to MLflow if a run is set."""
    t0 = time.time()
    init_ray(ray_cfg or RayConfig())
    manifest = Manifest.load(source.prepared_dir)
    names = evaluated_identities(manifest, cfg)
    gpus = resolve_eval_gpus(gpus_per_worker, source.run_dir)
    print(f"[evaluate] model {source.model_dir}\n[evaluate] {len(names)} identities x {cfg.num_images} images, "
          f"DDIM {cfg.steps} steps, seed {cfg.seed}, {num_workers} worker(s) with {gpus:g} GPU(s) each", flush=True)
    generated = generate_distributed(source.model_dir, names, cfg, num_workers, cpus_per_worker,
                                     gpus_per_worker=gpus)
    gen_s = time.time() - t0
    some = generated[names[0]]
    real = load_real_images(source.prepared_dir, manifest, some.shape[1], some.shape[3])
    print(f"[evaluate] metrics (encoder {cfg.encoder!r}, classifier {cfg.classifier!r})", flush=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else source.prepared_dir / "eval_cache"
    results = compute_metrics(generated, real, manifest, cfg, cache_dir=cache)
    results.update(model_dir=str(source.model_dir), prepared_dir=str(source.prepared_dir),
                   mlflow_run=source.run_id, generation_seconds=gen_s, total_seconds=time.time() - t0)
    out_dir = Path(out_dir).absolute()
    paths = write_outputs(out_dir, results, generated, real)
    keys = log_to_mlflow(source.tracking_uri, source.run_id, results, paths) if source.run_id else []

    s = results["summary"]
    table = "\n".join(f"    {m:<9} all {_fmt(s[f'{m}_all'])}   few {_fmt(s[f'{m}_few'])}"
                      for m in ("fid", "dino", "grecall", "accuracy"))
    print(f"\n[evaluate] done in {time.time() - t0:.0f}s ({len(results['few_shot_identities'])} few-shot "
          f"of {len(names)} identities)\n{table}\n"
          f"  metrics:    {paths['metrics']}\n"
          f"  plot:       {paths['plot']}\n"
          f"  grids:      {paths['grids']}\n"
          f"  images:     {paths['images']}" +
          (f"\n  MLflow run {source.run_id}: {len(keys)} eval/* metrics and artifacts under eval/"
           if source.run_id else ""), flush=True)
    return EvalOutcome(results, out_dir, paths, keys)


def _fmt(v) -> str:
    return "   n/a" if v is None else f"{v:6.3f}"
