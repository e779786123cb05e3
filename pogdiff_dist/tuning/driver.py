"""Hyperparameter sweeps with Ray Tune: the only Ray Tune user in the library.

A sweep is a YAML file (``configs/sweeps/*.yaml``) naming a base config, a search space
over dotted config keys (the CLI's ``--set`` syntax), an objective, a scheduler and a
search algorithm; :func:`load_sweep` reads and validates it, :func:`run_sweep` runs it.

Each trial is a full training run (Ray Train V2 pattern: the Tune trial function calls
:func:`pogdiff_dist.train.driver.run_train`, which builds and fits a ``TorchTrainer`` with
DeepSpeed workers). Trials train in *rungs*: train to ``rungs[0]`` steps, run a small
fixed-seed evaluation (:func:`pogdiff_dist.evaluation.evaluate_model`), ``tune.report``;
if the scheduler lets the trial go on, the same run is resumed from its checkpoint to
``rungs[1]`` (``run_train(..., resume=True)``), and so on. A trial that ASHA stops is
simply not continued; its MLflow run and model stay as they were at its last rung.

All trials share one prepared dataset, prepared once on the driver before the sweep:
keys that would change it (``data.*``, ``model.*``, ``prepare.*``) cannot be searched,
and ``loss.k`` may go up to the ``k_max`` stored at prepare time.

MLflow: the sweep is a parent run (tag ``pogdiff.kind=sweep``), each trial a child run
(tag ``mlflow.parentRunId``) holding what ``run_train`` logs (params, curves, final
metrics, sample grid) plus ``eval/*`` at every rung and ``sweep.*`` tags.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from pogdiff_dist.config import BUNDLED_TEXT_ENCODER, Config, from_dict, load_config, save_config
from pogdiff_dist.evaluation.evaluate import CLASSIFIERS, METRICS
from pogdiff_dist.tracking.mlflow_runs import redact, resolve_tracking_uri, safe_params

SWEEP_STATE = "sweep.json"
RUN_STATE = "pogdiff_run.json"  # = pogdiff_dist.train.driver.RUN_STATE (that module pulls in DeepSpeed)
TUNE_DIR = "tune"  # Tune's experiment folder inside the sweep folder

# What a trial reports at each rung, i.e. what ``metric`` may name.
EVAL_KEYS = tuple(f"eval/{m}_{s}" for m in METRICS for s in ("all", "few"))
TRAIN_KEYS = ("loss", "loss_denoise", "loss_pog")  # the last logged training window at the rung
REPORTED = EVAL_KEYS + TRAIN_KEYS

SPACE_TYPES = ("uniform", "loguniform", "randint", "choice", "grid")
SEARCH_ALGS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")

# Sections and keys a trial may not vary, and why.
_SHARED_DATA = "changes the prepared data that all trials share; run one sweep per prepared dataset instead"
FROZEN_SECTIONS = {"data": _SHARED_DATA, "model": _SHARED_DATA, "prepare": _SHARED_DATA,
                   "tracking": "is set for the whole sweep", "ray": "is set for the whole sweep"}
FROZEN_KEYS = {
    "train.name": "is set per trial by the sweep",
    "train.storage_path": "is set for the whole sweep",
    "optim.max_steps": "is set per rung by the sweep's `rungs`",
    "train.num_workers": "sets the resources of every trial; set it in the base config or with --set",
    "train.cpus_per_worker": "sets the resources of every trial; set it in the base config or with --set",
    "train.use_gpu": "sets the resources of every trial; set it in the base config or with --set",
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class Param:
    """One searched key: ``{type: loguniform, low: 0.1, high: 10}``, ``{type: randint,
    low: 1, high: 10}`` (both ends included), ``{type: choice|grid, values: [...]}``."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple | None = None

    @classmethod
    def parse(cls, key: str, d: Any) -> Param:
        where = f"space.{key}"
        _check(isinstance(d, dict), f"{where} must be a mapping like {{type: uniform, low: 0, high: 1}}, got {d!r}")
        unknown = sorted(set(d) - {"type", "low", "high", "values"})
        _check(not unknown, f"{where}: unknown field(s) {unknown}; valid: type, low, high, values")
        kind = d.get("type")
        _check(kind in SPACE_TYPES, f"{where}.type must be one of {list(SPACE_TYPES)}, got {kind!r}")
        if kind in ("choice", "grid"):
            values = d.get("values")
            _check(isinstance(values, list) and len(values) >= 1, f"{where}: {kind} needs a non-empty list `values`")
            _check("low" not in d and "high" not in d, f"{where}: {kind} takes `values`, not low/high")
            return cls(key, kind, values=tuple(values))
        _check("values" not in d, f"{where}: {kind} takes low/high, not `values`")
        low, high = d.get("low"), d.get("high")
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, str):  # YAML reads 1e-5 (no dot) as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{where}.{name} must be a number, got {v!r}")
            if name == "low":
                low = v
            else:
                high = v
        if kind == "randint":
            _check(float(low).is_integer() and float(high).is_integer(), f"{where}: randint needs integer low/high")
            low, high = int(low), int(high)
            _check(low <= high, f"{where}: low ({low}) must be <= high ({high})")
        else:
            low, high = float(low), float(high)
            _check(low < high, f"{where}: low ({low}) must be < high ({high})")
        if kind == "loguniform":
            _check(low > 0, f"{where}: loguniform needs low > 0, got {low}")
        return cls(key, kind, low=low, high=high)

    def extremes(self) -> list:
        """Values every trial's config must accept: the ends of a range, or each value."""
        return list(self.values) if self.values is not None else [self.low, self.high]

    def to_tune(self):
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "randint":
            return tune.randint(self.low, self.high + 1)  # Tune's upper end is exclusive
        if self.type == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def to_dict(self) -> dict:
        return {"type": self.type, **({"values": list(self.values)} if self.values is not None
                                      else {"low": self.low, "high": self.high})}


@dataclass(frozen=True)
class EvalSpec:
    """The small fixed-seed evaluation at every rung (see EvalConfig for the fields)."""

    num_images: int = 4
    steps: int = 10
    seed: int = 0
    guidance_scale: float | None = None  # None: the trial's train.guidance_scale
    encoder: str = "pixels"
    classifier: str = "auto"
    identities: tuple[str, ...] | None = None  # None: every identity
    few_threshold: int | None = None

    def __post_init__(self):
        _check(self.num_images >= 1 and self.steps >= 1, "eval.num_images and eval.steps must be >= 1")
        _check(self.classifier in CLASSIFIERS, f"eval.classifier must be one of {list(CLASSIFIERS)}")
        if self.identities is not None:
            object.__setattr__(self, "identities", tuple(self.identities))


@dataclass(frozen=True)
class SchedulerSpec:
    """``asha`` stops the worst trials at each rung; ``fifo`` runs every trial to the end.
    ``grace_period`` is in rungs: no trial is stopped before it has reported that many."""

    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self):
        _check(self.type in SCHEDULERS, f"scheduler.type must be one of {list(SCHEDULERS)}, got {self.type!r}")
        _check(self.grace_period >= 1, f"scheduler.grace_period must be >= 1 rung, got {self.grace_period}")
        _check(self.reduction_factor > 1, f"scheduler.reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    space: tuple[Param, ...]
    base_config: str | None = None  # YAML config (relative to the current directory); None: the defaults
    overrides: dict = field(default_factory=dict)  # fixed for every trial, e.g. {"optim.batch_size": 8}
    metric: str = "eval/accuracy_few"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs fit
    trial_cpus: float = 0.5  # the trial process itself (driver of its run + the rung evaluation)
    rungs: tuple[int, ...] = (100, 200, 300)  # optimiser steps at which a trial evaluates and reports
    eval: EvalSpec = field(default_factory=EvalSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: str = "optuna"
    seed: int = 0  # seeds the search algorithm's sampling
    max_failures: int = 0  # restarts of a failed trial (each restart resumes its run)

    def __post_init__(self):
        _check(self.metric in REPORTED, f"metric must be one of {list(REPORTED)}, got {self.metric!r}")
        _check(self.mode in ("min", "max"), f"mode must be 'min' or 'max', got {self.mode!r}")
        _check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
               "max_concurrent_trials must be >= 1 or null (fit the cluster)")
        _check(self.trial_cpus >= 0, "trial_cpus must be >= 0")
        _check(self.search_alg in SEARCH_ALGS, f"search_alg must be one of {list(SEARCH_ALGS)}, got {self.search_alg!r}")
        _check(len(self.space) >= 1, "space must name at least one config key to search")
        _check(len(self.rungs) >= 1 and all(isinstance(r, int) and r >= 1 for r in self.rungs)
               and list(self.rungs) == sorted(set(self.rungs)),
               f"rungs must be increasing positive step counts, e.g. [100, 200, 400], got {list(self.rungs)}")
        _check(self.scheduler.grace_period <= len(self.rungs),
               f"scheduler.grace_period ({self.scheduler.grace_period}) is more rungs than there are "
               f"({len(self.rungs)}): no trial could be stopped")
        if self.search_alg == "optuna":
            grid = [p.key for p in self.space if p.type == "grid"]
            _check(not grid, f"space key(s) {grid}: type grid needs search_alg: random (Optuna samples, it does not grid)")
        _check(self.max_failures >= 0, "max_failures must be >= 0")

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.space]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = {p.key: p.to_dict() for p in self.space}
        d["rungs"] = list(self.rungs)
        d["eval"]["identities"] = None if self.eval.identities is None else list(self.eval.identities)
        return d


def _sub(cls, d: Any, where: str):
    if d is None:
        return cls()
    _check(isinstance(d, dict), f"{where} must be a mapping, got {d!r}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; valid: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def spec_from_dict(d: dict, name: str) -> SweepSpec:
    _check(isinstance(d, dict), f"a sweep file must hold a mapping, got {type(d).__name__}")
    known = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    _check(not unknown, f"unknown sweep field(s) {unknown}; valid: {sorted(known)}")
    space = d.get("space")
    _check(isinstance(space, dict) and space, "space must map config keys to distributions, e.g. "
                                              "{loss.a1: {type: loguniform, low: 0.1, high: 10}}")
    kwargs = {k: v for k, v in d.items() if k not in ("space", "eval", "scheduler", "rungs", "overrides")}
    kwargs.setdefault("name", name)
    try:
        return SweepSpec(space=tuple(Param.parse(str(k), v) for k, v in space.items()),
                         eval=_sub(EvalSpec, d.get("eval"), "eval"),
                         scheduler=_sub(SchedulerSpec, d.get("scheduler"), "scheduler"),
                         rungs=tuple(d.get("rungs", SweepSpec.rungs)),
                         overrides=dict(d.get("overrides") or {}), **kwargs)
    except TypeError as e:
        raise ValueError(f"sweep: {e}") from e


def check_space(spec: SweepSpec, base: Config, k_max: int | None = None) -> None:
    """Every searched key is a real config key that a trial may vary, and every end of its
    range (every value of a choice) gives a valid config; ``loss.k`` stays <= ``k_max``."""
    flat = base.flat()
    for p in spec.space:
        section, _, name = p.key.partition(".")
        if p.key not in flat:
            valid = sorted(k for k in flat if k.startswith(section + ".")) or sorted({k.split(".")[0] for k in flat})
            raise ValueError(f"space key {p.key!r} is not a config key; valid keys: {valid}")
        _check(section not in FROZEN_SECTIONS, f"space key {p.key!r} cannot be searched: {section}.* {FROZEN_SECTIONS.get(section)}")
        _check(p.key not in FROZEN_KEYS, f"space key {p.key!r} cannot be searched: it {FROZEN_KEYS.get(p.key)}")
        for value in p.extremes():
            try:
                base.with_overrides({p.key: value})
            except ValueError as e:
                raise ValueError(f"space key {p.key!r}: value {value!r} gives an invalid config: {e}") from None
        if p.key == "loss.k" and k_max is not None:
            top = max(p.extremes())
            _check(top <= k_max, f"space key 'loss.k' goes up to {top} but the prepared data stores k_max={k_max} "
                                 f"neighbours; lower the range or prepare with prepare.k_max >= {top}")
    if base.optim.schedule == "cosine" and len(spec.rungs) > 1:
        raise ValueError("optim.schedule=cosine decays to the run's max_steps, which the sweep sets per rung; "
                         "use optim.schedule=constant or a single rung (rungs: [N])")


def load_sweep(path: str | Path, base_config: str | None = None, overrides: list[str] | None = None,
               **fields) -> tuple[SweepSpec, Config]:
    """Read a sweep file; ``base_config``/``overrides`` (CLI ``--config``/``--set``) and
    ``fields`` (e.g. ``num_samples=4``, ``None`` = keep the file's) replace the file's."""
    p = Path(path)
    _check(p.is_file(), f"sweep file {p} does not exist")
    d = yaml.safe_load(p.read_text()) or {}
    _check(isinstance(d, dict), f"sweep file {p} must hold a mapping, got {type(d).__name__}")
    d.update({k: v for k, v in fields.items() if v is not None})
    if base_config is not None:
        d["base_config"] = base_config
    spec = spec_from_dict(d, name=p.stem)
    fixed = dict(spec.overrides)
    if overrides:
        from pogdiff_dist.config import parse_override

        fixed.update(dict(parse_override(o) for o in overrides))
    base = load_config(spec.base_config, fixed)
    check_space(spec, base, k_max=base.prepare.k_max)
    return spec, base


# -------------------------------------------------------------------------------------
# What runs in a trial


def _absolute(cfg: Config) -> Config:
    """Trials run in other processes and folders: every path becomes absolute."""
    def ab(p: str | None) -> str | None:
        return None if p is None or Path(p).is_absolute() else str(Path(p).absolute())

    o = {"prepare.out_dir": ab(cfg.prepare.out_dir), "train.storage_path": ab(cfg.train.storage_path),
         "tracking.tracking_uri": resolve_tracking_uri(cfg.tracking.resolved_uri())}
    if cfg.data.bundled is None:
        o["data.dataset"] = ab(cfg.data.dataset)
    for key, keep in (("model.pretrained", None), ("model.init_unet", None), ("model.image_encoder", "pixels"),
                      ("model.text_encoder", BUNDLED_TEXT_ENCODER)):
        value = cfg.flat()[key]
        if value is not None and value != keep and Path(value).exists():
            o[key] = ab(value)
    return cfg.with_overrides({k: v for k, v in o.items() if v is not None})


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _py(v):
    """Tune samples numpy scalars; configs, YAML and JSON want Python ones."""
    return v.item() if hasattr(v, "item") else v


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, passed explicitly (never read from the driver's globals)."""

    base: dict  # Config.to_dict() with absolute paths
    spec: dict  # SweepSpec.to_dict()
    prepared_dir: str
    trials_dir: str
    parent_run_id: str
    tracking_uri: str


def trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _trial_dirname(trial) -> str:
    return trial_name(trial.trial_id)


def run_trial(config: dict, setup: TrialSetup) -> None:
    """One trial: for each rung, ``run_train`` to that many steps (resuming the same run
    after the first), evaluate, report. Resumable: a restored trial continues at the rung
    after its last report, and a run interrupted mid-rung resumes from its checkpoint."""
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.evaluation.evaluate import evaluate_model
    from pogdiff_dist.train.driver import run_train

    spec = setup.spec
    ev = spec["eval"]
    trial_id = tune.get_context().get_trial_id()
    name = trial_name(trial_id)
    rungs_done = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "trial.json").read_text())
        rungs_done, name = state["rungs_done"], state["name"]
    base = from_dict(setup.base).with_overrides(
        {**{k: _py(v) for k, v in config.items()}, "train.name": name, "train.storage_path": setup.trials_dir})
    client = MlflowClient(setup.tracking_uri)
    run_id = None
    try:
        for rung in range(rungs_done, len(spec["rungs"])):
            steps = spec["rungs"][rung]
            run_dir = Path(setup.trials_dir) / name
            resume = (run_dir / RUN_STATE).is_file()  # a later rung, or a restart of this one
            out = run_train(base.with_overrides({"optim.max_steps": steps}), resume=resume,
                            parent_run_id=setup.parent_run_id)
            run_id = out.run_id
            if out.run_dir.name != name:  # a fresh run was given another name; later rungs resume that one
                name = out.run_dir.name
                base = base.with_overrides({"train.name": name})
            client.set_tag(run_id, "sweep.trial_id", trial_id)
            gs = ev["guidance_scale"] if ev["guidance_scale"] is not None else base.train.guidance_scale
            results = evaluate_model(out.model_dir, setup.prepared_dir, num_images=ev["num_images"], steps=ev["steps"],
                                     seed=ev["seed"], encoder=ev["encoder"], classifier=ev["classifier"],
                                     guidance_scale=gs, identities=ev["identities"], few_threshold=ev["few_threshold"],
                                     cache_dir=Path(setup.prepared_dir) / "eval_cache",
                                     out_dir=out.run_dir / f"eval-step{steps}")
            summary = {f"eval/{k}": _nan(v) for k, v in results["summary"].items()}
            for k, v in summary.items():
                if math.isfinite(v):
                    client.log_metric(run_id, k, v, step=steps)
            for kind in ("metrics", "plot"):  # the latest rung's; compare.py reads eval/metrics.json
                client.log_artifact(run_id, results["outputs"][kind], artifact_path="eval")
            client.set_tag(run_id, "sweep.rungs_done", str(rung + 1))
            m = out.metrics
            report = {"step": steps, "rung": rung + 1, "mlflow_run_id": run_id, **summary,
                      "loss": _nan(m.get("final_loss")), "loss_denoise": _nan(m.get("final_loss_denoise")),
                      "loss_pog": _nan(m.get("final_loss_pog"))}
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "trial.json").write_text(json.dumps({"rungs_done": rung + 1, "name": name}))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    except Exception as e:
        state = Path(setup.trials_dir) / name / RUN_STATE
        run_id = run_id or (json.loads(state.read_text())["run_id"] if state.is_file() else None)
        if run_id is not None:
            client.set_tag(run_id, "sweep.error", f"{type(e).__name__}: {e}"[:4000])
            client.set_terminated(run_id, "FAILED")
        raise


# -------------------------------------------------------------------------------------
# The driver


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


def trial_resources(base: Config, spec: SweepSpec) -> dict[str, float]:
    """What one trial holds at once: its own process plus its run's train workers."""
    workers = base.train.num_workers
    out = {"CPU": spec.trial_cpus + workers * base.train.cpus_per_worker}
    if base.train.use_gpu:
        out["GPU"] = float(workers)
    return out


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


def _create_parent(uri: str, base: Config, spec: SweepSpec, name: str) -> str:
    from mlflow.entities import Param as MlflowParam
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(base.tracking.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(base.tracking.experiment)
    run = client.create_run(exp_id, run_name=f"sweep-{name}", tags={
        "pogdiff.kind": "sweep", "sweep.metric": spec.metric, "sweep.mode": spec.mode})
    params = {f"sweep.{k}": json.dumps(v) if isinstance(v, (dict, list)) else str(v)
              for k, v in spec.to_dict().items() if k not in ("space", "eval", "scheduler")}
    params.update({"sweep.space": json.dumps({p.key: p.to_dict() for p in spec.space}),
                   "sweep.space_keys": ",".join(spec.keys), "sweep.eval": json.dumps(asdict(spec.eval)),
                   "sweep.scheduler": json.dumps(asdict(spec.scheduler))})
    # the base config, less the searched keys (their values differ per trial)
    params.update({k: v for k, v in safe_params(base.flat()).items() if k not in spec.keys})
    items = [MlflowParam(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def _rows(results, spec: SweepSpec, trials_dir: Path) -> list[TrialRow]:
    rows = []
    for r in results:
        trial_id = Path(r.path).name.removeprefix("trial-")
        m = r.metrics or {}
        rungs = int(m.get("rung") or 0)
        state = trials_dir / trial_name(trial_id) / RUN_STATE
        run_id = m.get("mlflow_run_id") or (json.loads(state.read_text())["run_id"] if state.is_file() else None)
        if r.error is not None:
            status = "error"
        else:
            status = "completed" if rungs == len(spec.rungs) else "stopped_early"
        value = _lookup(m, spec.metric)
        value = None if value is None or not math.isfinite(float(value)) else float(value)
        err = None if r.error is None else (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1][:300]
        rows.append(TrialRow(trial_id, status, {k: _py(r.config.get(k)) for k in spec.keys}, m.get("step"), rungs, value,
                             {k: _lookup(m, k) for k in REPORTED if _lookup(m, k) is not None}, run_id, err))
    return sorted(rows, key=lambda row: row.trial_id)


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Best objective at the last rung each trial reached (Tune's scope="last"); on a tie
    the trial that trained longer."""
    scored = [r for r in rows if r.value is not None and r.status != "error"]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda r: (sign * r.value, r.steps or 0))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None) -> str:
    head = ["trial", "status", *spec.keys, "steps", spec.metric, "mlflow run"]
    body = [[r.trial_id + (" *" if best is not None and r is best else ""), r.status,
             *[_fmt(r.params.get(k)) for k in spec.keys], _fmt(r.steps), _fmt(r.value),
             (r.run_id or "-")[:12]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r.error:
            lines.append(f"  trial {r.trial_id} failed: {r.error}")
    return "\n".join(lines)


def _finish_parent(uri: str, parent: str, spec: SweepSpec, rows: list[TrialRow], best: TrialRow | None,
                   files: list[Path], wall: float) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "stopped_early", "error")}
    for r in rows:
        if r.run_id:
            client.set_tag(r.run_id, "sweep.status", r.status)
    client.log_metric(parent, "sweep/num_trials", len(rows))
    for s, n in counts.items():
        client.log_metric(parent, f"sweep/num_{'failed' if s == 'error' else s}", n)
    client.log_metric(parent, "sweep/wall_seconds", wall)
    failed = [r for r in rows if r.status == "error"]
    client.set_tag(parent, "sweep.failed_trials", "; ".join(f"{r.trial_id}: {r.error}" for r in failed)[:4000] or "none")
    if best is not None:
        client.log_metric(parent, f"best/{spec.metric}", best.value)
        client.set_tag(parent, "sweep.best_trial", best.trial_id)
        client.set_tag(parent, "sweep.best_run_id", best.run_id or "")
        client.set_tag(parent, "sweep.best_params", json.dumps(best.params))
    for f in files:
        if f.exists():
            client.log_artifact(parent, str(f))
    client.set_terminated(parent, "FINISHED" if len(failed) < len(rows) else "FAILED")


def run_sweep(spec: SweepSpec, base: Config, resume: bool = False, retry_failed: bool = False) -> SweepOutcome:
    """Prepare once, run the sweep (or restore it, ``resume``), write the best config."""
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.prepare.pipeline import run_prepare
    from pogdiff_dist.runtime import init_ray

    t0 = time.time()
    name = _sweep_name(base, spec.name, resume)
    sweep_dir = Path(base.train.storage_path).absolute() / "sweeps" / name
    if resume:  # the stored spec and base config: a restored sweep searches the same space
        state = json.loads((sweep_dir / SWEEP_STATE).read_text())
        spec = spec_from_dict({**state["spec"], "name": name}, name=name)
        base = from_dict(state["base_config"])
    run_cfg = _absolute(base)
    uri = run_cfg.tracking.tracking_uri
    init_ray(run_cfg.ray)
    manifest = run_prepare(run_cfg)  # once, here: every trial then finds it up to date
    check_space(spec, base, k_max=manifest.k_max)
    prepared = str(Path(run_cfg.prepare.out_dir))
    trials_dir = sweep_dir / "trials"

    if resume:
        parent = state["parent_run_id"]
        MlflowClient(uri).update_run(parent, status="RUNNING")
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = _create_parent(uri, base, spec, name)
        (sweep_dir / SWEEP_STATE).write_text(json.dumps({
            "parent_run_id": parent, "tracking_uri": redact(uri), "spec": spec.to_dict(),
            "base_config": base.to_dict()}, indent=1, default=list))
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    setup = TrialSetup(run_cfg.to_dict(), spec.to_dict(), prepared, str(trials_dir), parent, uri)
    resources = trial_resources(run_cfg, spec)
    concurrency = fit_concurrency(run_cfg, spec, ray.cluster_resources())
    # Tune reserves only the trial process; its run's TorchTrainer reserves the workers
    # itself (Ray Train V2 places them outside the trial's placement group).
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources={"CPU": spec.trial_cpus})
    print(f"[tune] sweep {name!r}: {spec.num_samples} sample(s) over {spec.keys}, {spec.search_alg} search, "
          f"{spec.scheduler.type} scheduler, rungs {list(spec.rungs)} steps, objective {spec.metric} ({spec.mode}); "
          f"{concurrency} concurrent trial(s) of {resources}; MLflow parent run {parent}", flush=True)

    tune_path = sweep_dir / TUNE_DIR
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_failed, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={p.key: p.to_tune() for p in spec.space},
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                        search_alg=build_search_alg(spec, concurrency), scheduler=build_scheduler(spec),
                                        max_concurrent_trials=concurrency if spec.search_alg == "optuna" else None,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      checkpoint_config=tune.CheckpointConfig()),
        )
    try:
        results = tuner.fit()
    except BaseException:
        MlflowClient(uri).set_terminated(parent, "KILLED")  # --resume sets it running again
        raise

    rows = _rows(results, spec, trials_dir)
    best = pick_best(rows, spec.mode)
    best_path = None
    if best is not None:
        best_cfg = base.with_overrides({**best.params, "optim.max_steps": best.steps, "train.name": f"{name}-best"})
        best_path = sweep_dir / "best_config.yaml"
        save_config(best_cfg, best_path)
    table = format_table(rows, spec, best)
    with open(sweep_dir / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", *spec.keys, "steps", "rungs_done", spec.metric, "mlflow_run_id", "error"])
        for r in rows:
            w.writerow([r.trial_id, r.status, *[r.params.get(k) for k in spec.keys], r.steps, r.rungs_done,
                        r.value, r.run_id, r.error or ""])
    wall = time.time() - t0
    _finish_parent(uri, parent, spec, rows, best, [sweep_dir / "trials.csv", sweep_dir / "sweep.yaml",
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
    print(f"  MLflow parent run {parent} in experiment {base.tracking.experiment!r}; compare the trials with\n"
          f"  python jobs/compare.py --sweep {sweep_dir}", flush=True)
    return SweepOutcome(name, sweep_dir, parent, uri, rows, best, best_path, wall, table)
