"""The sweep driver: prepare once, run Ray Tune over the trials, read Ray Tune's results.

Each trial trains in *rungs* (:mod:`pogdiff_dist.tuning.trial`); ASHA stops the weak
trials at each rung and Optuna proposes the next ones. The outcome is read from Tune's
own :class:`~ray.tune.ResultGrid`: ``get_best_result`` picks the best trial (scope
``last``: its value at the last rung it reached; among equal values, the trial that
trained longer), ``get_dataframe`` is the trials table (``trials.csv``).

All trials share one prepared dataset, prepared once here before the sweep: keys a prepare
stage reads (:data:`pogdiff_dist.config.stages.PREPARE_KEYS`) cannot be searched, every
train-time key can (``model.lora_rank``, ``data.sampling``, ``loss.*``...), and
``loss.k`` may go up to the ``k_max`` stored at prepare time.

MLflow: the sweep is a parent run (tag ``pogdiff.kind=sweep``), each trial a child run
(tag ``mlflow.parentRunId``) holding what ``run_train`` logs plus ``eval/*`` at every rung
and ``sweep.*`` tags.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import ray
import yaml
from ray import tune

from pogdiff_dist.config import Config, from_dict, save_config
from pogdiff_dist.data.shard_files import verify_shards
from pogdiff_dist.prepare.pipeline import run_prepare
from pogdiff_dist.runtime import absolute_paths, check_output_paths, init_ray
from pogdiff_dist.storage import is_uri, join
from pogdiff_dist.tracking.compare import _fmt, text_table
from pogdiff_dist.tracking.runs import TrackingRef, create_sweep_parent, read_run_state, redact, safe_params
from pogdiff_dist.tuning.spec import REPORTED, Param, SweepSpec, _check, check_space, spec_from_dict
from pogdiff_dist.tuning.trial import (
    TrialSetup,
    _py,
    _trial_dirname,
    run_trial,
    trial_name,
    trial_resources,
)

SWEEP_STATE = "sweep.json"
TUNE_DIR = "tune"  # Tune's experiment folder inside the sweep folder


def to_tune(p: Param):
    """A searched key as Ray Tune's sampler (randint's upper end included, as in the sweep file)."""
    if p.type == "uniform":
        return tune.uniform(p.low, p.high)
    if p.type == "loguniform":
        return tune.loguniform(p.low, p.high)
    if p.type == "randint":
        return tune.randint(p.low, p.high + 1)  # Tune's upper end is exclusive
    if p.type == "choice":
        return tune.choice(list(p.values))
    return tune.grid_search(list(p.values))


@dataclass
class TrialRow:
    trial_id: str
    status: str  # completed | stopped_early | error
    params: dict
    steps: int | None
    rungs_done: int
    value: float | None  # the objective at the last rung reached
    metrics: dict
    run_id: str | None
    error: str | None = None


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: Path
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Path | None
    wall_seconds: float
    table: str
    trials: pd.DataFrame | None = None  # Ray Tune's ResultGrid.get_dataframe(), with status and MLflow run


def fit_concurrency(base: Config, spec: SweepSpec, cluster: dict[str, float]) -> int:
    """Trials that fit the cluster at once, keeping one CPU free for Ray Data's read tasks
    (a trial whose workers take every CPU hangs waiting for its data, ENVIRONMENT.md)."""
    need = trial_resources(base, spec)
    fits = math.floor((cluster.get("CPU", 0) - 1) / need["CPU"]) if need["CPU"] > 0 else spec.num_samples
    if "GPU" in need:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / need["GPU"]))
    if spec.max_concurrent_trials is None:
        return max(1, fits)
    if spec.max_concurrent_trials > max(fits, 1):
        print(f"[tune] warning: max_concurrent_trials={spec.max_concurrent_trials} but the cluster ({cluster.get('CPU', 0):g} "
              f"CPUs, {cluster.get('GPU', 0):g} GPUs) fits {max(fits, 0)} trial(s) of {need}: the others wait "
              f"for resources", flush=True)
    return spec.max_concurrent_trials


def build_search_alg(spec: SweepSpec, max_concurrent: int):
    """Metric and mode come from the TuneConfig (Tune refuses them twice)."""
    if spec.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seed)  # TuneConfig.max_concurrent_trials limits it
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a search *generator*: Tune ignores max_concurrent_trials for it, so it takes its own limit
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent)


def build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # time is counted in reports, i.e. rungs: a trial at rung r has training_iteration == r
    return ASHAScheduler(time_attr="training_iteration", max_t=len(spec.rungs), grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _lookup(metrics: dict | None, key: str):
    """Tune may hand back ``eval/x`` flat or nested as ``{"eval": {"x": ...}}``."""
    if not metrics:
        return None
    if key in metrics:
        return metrics[key]
    node = metrics
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _sweep_name(base: Config, name: str, resume: bool) -> str:
    root = Path(base.train.storage_path).absolute() / "sweeps"
    if resume:
        _check((root / name / SWEEP_STATE).is_file(), f"--resume: no sweep named {name!r} under {root}")
        return name
    if (root / name).exists():
        new = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
        print(f"[tune] sweep {name!r} exists; starting a new sweep {new!r} (use --resume to continue it)", flush=True)
        return new
    return name


def create_parent(uri: str, base: Config, spec: SweepSpec, name: str) -> TrackingRef:
    """The sweep's MLflow parent run: the spec as params, the base config less the searched keys."""
    params = {f"sweep.{k}": json.dumps(v) if isinstance(v, (dict, list)) else str(v)
              for k, v in spec.to_dict().items() if k not in ("space", "scheduler")}
    params.update({"sweep.space": json.dumps({p.key: p.to_dict() for p in spec.space}),
                   "sweep.space_keys": ",".join(spec.keys), "sweep.scheduler": json.dumps(asdict(spec.scheduler))})
    params.update({k: v for k, v in safe_params(base.flat()).items() if k not in spec.keys})
    return create_sweep_parent(uri, base.tracking.experiment, f"sweep-{name}",
                               {"pogdiff.kind": "sweep", "sweep.metric": spec.metric, "sweep.mode": spec.mode}, params)


def trial_status(result, spec: SweepSpec) -> str:
    if result.error is not None:
        return "error"
    return "completed" if int((result.metrics or {}).get("rung") or 0) == len(spec.rungs) else "stopped_early"


def _row(result, spec: SweepSpec, trials_dir: Path) -> TrialRow:
    trial_id = Path(result.path).name.removeprefix("trial-")
    m = result.metrics or {}
    run_id = m.get("mlflow_run_id") or (read_run_state(trials_dir / trial_name(trial_id)) or {}).get("run_id")
    value = _lookup(m, spec.metric)
    value = None if value is None or not math.isfinite(float(value)) else float(value)
    err = None if result.error is None else (str(result.error).strip().splitlines()
                                             or [type(result.error).__name__])[-1][:300]
    return TrialRow(trial_id, trial_status(result, spec), {k: _py((result.config or {}).get(k)) for k in spec.keys},
                    m.get("step"), int(m.get("rung") or 0), value,
                    {k: _lookup(m, k) for k in REPORTED if _lookup(m, k) is not None}, run_id, err)


def best_result(results, spec: SweepSpec):
    """Ray Tune's best trial (``get_best_result``, scope ``last``, errors and NaN left out);
    among trials with the same value, the one that trained longer (more rungs): with an
    objective that moves in steps of one image, ties are common and a longer run is the
    better-supported choice. None when no trial reported a finite value."""
    try:
        best = results.get_best_result(spec.metric, spec.mode, scope="last", filter_nan_and_inf=True)
    except RuntimeError:  # no trial has the metric
        return None
    return prefer_longer(best, [r for r in results if r.error is None], spec.metric)


def prefer_longer(best, candidates, metric: str):
    """``best``, or the candidate with the same last value of ``metric`` that reported more steps."""
    value = _lookup(best.metrics, metric)
    if value is None or best.error is not None:
        return None
    ties = [r for r in candidates if _lookup(r.metrics, metric) == value]
    return max(ties or [best], key=lambda r: (r.metrics or {}).get("step") or 0)


def trials_dataframe(results, rows: list[TrialRow]) -> pd.DataFrame:
    """Ray Tune's ``get_dataframe()`` (one row per trial, its last report and config), plus the
    status, rungs, MLflow run and error of each trial; errored trials without a report included."""
    df = results.get_dataframe()
    extra = pd.DataFrame([{"trial_id": r.trial_id, "status": r.status, "rungs_done": r.rungs_done,
                           "mlflow_run_id": r.run_id, "error": r.error or ""} for r in rows])
    if "trial_id" not in df.columns:
        df = pd.DataFrame({"trial_id": []})
    df = df.drop(columns=[c for c in extra.columns if c != "trial_id" and c in df.columns])  # ours are the full story
    return extra.merge(df, on="trial_id", how="left").sort_values("trial_id").reset_index(drop=True)


def format_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None) -> str:
    """The printed trials table (the same trials as trials.csv, fewer columns)."""
    table = text_table([{"trial": r.trial_id + (" *" if best is not None and r.trial_id == best.trial_id else ""),
                         "status": r.status, **{k: _fmt(r.params.get(k)) for k in spec.keys}, "steps": _fmt(r.steps),
                         spec.metric: _fmt(r.value), "mlflow run": (r.run_id or "-")[:12]} for r in rows])
    return "\n".join([table, *[f"  trial {r.trial_id} failed: {r.error}" for r in rows if r.error]])


def finish_parent(parent: TrackingRef, spec: SweepSpec, rows: list[TrialRow], best: TrialRow | None,
                  files: list[Path], wall: float) -> None:
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "stopped_early", "error")}
    for r in rows:
        if r.run_id:
            TrackingRef(parent.uri, r.run_id).open().set_tags({"sweep.status": r.status})
    metrics = {"sweep/num_trials": len(rows), "sweep/wall_seconds": wall,
               **{f"sweep/num_{'failed' if s == 'error' else s}": n for s, n in counts.items()}}
    failed = [r for r in rows if r.status == "error"]
    tags = {"sweep.failed_trials": "; ".join(f"{r.trial_id}: {r.error}" for r in failed)[:4000] or "none"}
    if best is not None:
        metrics[f"best/{spec.metric}"] = best.value
        tags.update({"sweep.best_trial": best.trial_id, "sweep.best_run_id": best.run_id or "",
                     "sweep.best_params": json.dumps(best.params)})
    run = parent.open()
    run.log(0, metrics)
    run.set_tags(tags)
    run.log_artifacts([f for f in files if f.exists()])
    run.set_status("FINISHED" if len(failed) < len(rows) else "FAILED")


def run_sweep(spec: SweepSpec, base: Config, resume: bool = False, retry_failed: bool = False) -> SweepOutcome:
    """Prepare once, run the sweep (or restore it, ``resume``), write the best config."""
    check_output_paths(base)
    if is_uri(base.train.storage_path):
        raise ValueError(f"train.storage_path={base.train.storage_path!r}: a sweep keeps its trials, state and "
                         f"best config in a shared folder; object storage is supported for prepare.out_dir and "
                         f"single training runs, not yet for sweeps (see NOTES.md)")
    t0 = time.time()
    name = _sweep_name(base, spec.name, resume)
    sweep_dir = Path(base.train.storage_path).absolute() / "sweeps" / name
    if resume:  # the stored spec and base config: a restored sweep searches the same space
        state = json.loads((sweep_dir / SWEEP_STATE).read_text())
        spec = spec_from_dict({**state["spec"], "name": name}, name=name)
        base = from_dict(state["base_config"])
    run_cfg = absolute_paths(base)
    uri = run_cfg.tracking.tracking_uri
    init_ray(run_cfg.ray)
    manifest = run_prepare(run_cfg)  # once, here: every trial then finds it up to date
    verify_shards(join(run_cfg.prepare.out_dir, "shards"), manifest, checksum=run_cfg.train.verify_shards)
    check_space(spec, base, k_max=manifest.k_max)
    prepared = str(Path(run_cfg.prepare.out_dir))
    trials_dir = sweep_dir / "trials"

    if resume:
        parent = TrackingRef(uri, state["parent_run_id"])
        parent.open().set_status("RUNNING")
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = create_parent(uri, base, spec, name)
        (sweep_dir / SWEEP_STATE).write_text(json.dumps({
            "parent_run_id": parent.run_id, "tracking_uri": redact(uri), "spec": spec.to_dict(),
            "base_config": base.to_dict()}, indent=1, default=list))
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    setup = TrialSetup(run_cfg.to_dict(), spec.to_dict(), prepared, str(trials_dir), parent.run_id, uri,
                       spec_file=str(sweep_dir / "sweep.yaml"))
    resources = trial_resources(run_cfg, spec)
    concurrency = fit_concurrency(run_cfg, spec, ray.cluster_resources())
    # Tune reserves only the trial process; its run's TorchTrainer reserves the workers
    # itself (Ray Train V2 places them outside the trial's placement group).
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources={"CPU": spec.trial_cpus})
    print(f"[tune] sweep {name!r}: {spec.num_samples} sample(s) over {spec.keys}, {spec.search_alg} search, "
          f"{spec.scheduler.type} scheduler, rungs {list(spec.rungs)} steps, objective {spec.metric} ({spec.mode}); "
          f"{concurrency} concurrent trial(s) of {resources}; MLflow parent run {parent.run_id}", flush=True)

    tune_path = sweep_dir / TUNE_DIR
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_failed, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={p.key: to_tune(p) for p in spec.space},
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                        search_alg=build_search_alg(spec, concurrency), scheduler=build_scheduler(spec),
                                        max_concurrent_trials=concurrency if spec.search_alg == "optuna" else None,
                                        trial_dirname_creator=_trial_dirname),
            # Tune's trial status tables only with --verbose: ours is printed at the end (a
            # trial's error is still logged by Tune as it happens)
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), verbose=int(run_cfg.ray.verbose),
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      checkpoint_config=tune.CheckpointConfig()),
        )
    try:
        results = tuner.fit()
    except BaseException:
        parent.open().set_status("KILLED")  # --resume sets it running again
        raise

    rows = sorted((_row(r, spec, trials_dir) for r in results), key=lambda row: row.trial_id)
    best_r = best_result(results, spec)
    best = None if best_r is None else next(r for r in rows if r.trial_id == Path(best_r.path).name.removeprefix("trial-"))
    best_path = None
    if best is not None:
        best_cfg = base.with_overrides({**best.params, "optim.max_steps": best.steps, "train.name": f"{name}-best"})
        best_path = sweep_dir / "best_config.yaml"
        save_config(best_cfg, best_path)
    table = format_table(rows, spec, best)
    trials = trials_dataframe(results, rows)
    trials.to_csv(sweep_dir / "trials.csv", index=False)
    wall = time.time() - t0
    finish_parent(parent, spec, rows, best, [sweep_dir / "trials.csv", sweep_dir / "sweep.yaml",
                                                  *([best_path] if best_path else [])], wall)
    n_err = sum(r.status == "error" for r in rows)
    print(f"\n[tune] sweep {name!r} done in {wall:.0f}s: {len(rows)} trial(s), "
          f"{sum(r.status == 'completed' for r in rows)} completed, "
          f"{sum(r.status == 'stopped_early' for r in rows)} stopped early, {n_err} failed\n{table}", flush=True)
    if best is not None:
        print(f"\n[tune] best trial {best.trial_id}: {spec.metric} = {best.value:.4g} at step {best.steps} "
              f"with {best.params}\n  best config: {best_path}\n"
              f"  train it:    python jobs/train.py {best_path}", flush=True)
    else:
        print(f"\n[tune] no trial reported a finite {spec.metric}: no best config written", flush=True)
    if n_err:
        print(f"[tune] {n_err} trial(s) failed (see above; errors in {sweep_dir / TUNE_DIR}). "
              f"`--resume --retry-failed` runs them again.", flush=True)
    print(f"  MLflow parent run {parent.run_id} in experiment {base.tracking.experiment!r}; compare the trials with\n"
          f"  python jobs/compare.py --sweep {sweep_dir}", flush=True)
    return SweepOutcome(name, sweep_dir, parent.run_id, uri, rows, best, best_path, wall, table, trials)
