"""The sweep file: a base config, a search space over dotted config keys (the CLI's
``--set`` syntax), an objective, rungs, a scheduler and a search algorithm. Read and
validated once by :func:`load_sweep`; nothing here starts Ray.

The rung evaluation is the base config's ``eval`` section (``Config.eval``): a sweep file
sets it with ``overrides: {eval.num_images: 16}`` or an ``eval:`` mapping (both become
``eval.*`` overrides of the base config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pogdiff_dist.config import EVAL_METRICS, Config, load_config, parse_override
from pogdiff_dist.config.stages import PREPARE_KEYS

# What a trial reports at each rung, i.e. what ``metric`` may name.
EVAL_KEYS = tuple(f"eval/{m}_{s}" for m in EVAL_METRICS for s in ("all", "few", "majority"))
TRAIN_KEYS = ("loss", "loss_denoise", "loss_pog")  # the last logged training window at the rung
REPORTED = EVAL_KEYS + TRAIN_KEYS

SPACE_TYPES = ("uniform", "loguniform", "randint", "choice", "grid")
SEARCH_ALGS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")

# Sections and keys a trial may not vary, and why. Keys a prepare stage reads
# (pogdiff_dist.config.stages.PREPARE_KEYS) would change the prepared data all trials share;
# every other key, model.* train-time keys included (model.lora_rank, model.init_unet...), may be searched.
SHARED_DATA = "changes the prepared data that all trials share; run one sweep per prepared dataset instead"
FROZEN_SECTIONS = {"tracking": "is set for the whole sweep", "ray": "is set for the whole sweep",
                   "eval": "is how every trial is measured; set it for the whole sweep (overrides: eval.*)"}
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

    def to_dict(self) -> dict:
        return {"type": self.type, **({"values": list(self.values)} if self.values is not None
                                      else {"low": self.low, "high": self.high})}


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
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: str = "optuna"
    seed: int = 0  # seeds the search algorithm's sampling
    max_failures: int = 0  # restarts of a failed trial (each restart resumes its run)
    seeds: tuple[int, ...] | None = None  # train.seed of each run of a trial (the objective is their mean)

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
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(int(x) for x in self.seeds))
            _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
                   f"seeds must be distinct integers, got {list(self.seeds)}")

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.space]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = {p.key: p.to_dict() for p in self.space}
        d["rungs"] = list(self.rungs)
        d["seeds"] = None if self.seeds is None else list(self.seeds)
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
    known = {*SweepSpec.__dataclass_fields__, "eval"}
    unknown = sorted(set(d) - known)
    _check(not unknown, f"unknown sweep field(s) {unknown}; valid: {sorted(known)}")
    space = d.get("space")
    _check(isinstance(space, dict) and space, "space must map config keys to distributions, e.g. "
                                              "{loss.a1: {type: loguniform, low: 0.1, high: 10}}")
    kwargs = {k: v for k, v in d.items() if k not in ("space", "eval", "scheduler", "rungs", "overrides")}
    kwargs.setdefault("name", name)
    ev = d.get("eval") or {}
    _check(isinstance(ev, dict), f"eval must be a mapping of eval.* settings, got {ev!r}")
    overrides = {**{f"eval.{k}": v for k, v in ev.items()}, **dict(d.get("overrides") or {})}
    try:
        return SweepSpec(space=tuple(Param.parse(str(k), v) for k, v in space.items()),
                         scheduler=_sub(SchedulerSpec, d.get("scheduler"), "scheduler"),
                         rungs=tuple(d.get("rungs", SweepSpec.rungs)), overrides=overrides, **kwargs)
    except TypeError as e:
        raise ValueError(f"sweep: {e}") from e


def check_space(spec: SweepSpec, base: Config, k_max: int | None = None) -> None:
    """Every searched key is a real config key that a trial may vary, and every end of its
    range (every value of a choice) gives a valid config; ``loss.k`` stays <= ``k_max``."""
    flat = base.flat()
    for p in spec.space:
        section, _, _name = p.key.partition(".")
        if p.key not in flat:
            valid = sorted(k for k in flat if k.startswith(section + ".")) or sorted({k.split(".")[0] for k in flat})
            raise ValueError(f"space key {p.key!r} is not a config key; valid keys: {valid}")
        _check(section not in FROZEN_SECTIONS,
               f"space key {p.key!r} cannot be searched: {section}.* {FROZEN_SECTIONS.get(section)}")
        _check(p.key not in PREPARE_KEYS, f"space key {p.key!r} cannot be searched: it {SHARED_DATA}")
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
        fixed.update(dict(parse_override(o) for o in overrides))
    base = load_config(spec.base_config, fixed)
    check_space(spec, base, k_max=base.prepare.k_max)
    return spec, base
