"""Typed configuration for every stage, validated once.

One override syntax serves the CLI and Ray Tune: dotted keys such as ``loss.a1=2.0``
(``--set loss.a1=2.0`` on the command line, ``{"loss.a1": tune.uniform(...)}`` in a
search space). A config is built once with :func:`load_config` and never mutated:
overrides produce a new, re-validated object, so what is logged is what ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pogdiff_dist.config.evaluation import CLASSIFIERS, EVAL_METRICS, EvalConfig
from pogdiff_dist.config.sections import (  # the sections are part of this module's API (__all__)
    BUNDLED_DATASETS,
    BUNDLED_TEXT_ENCODER,
    LOSS_METHODS,
    PAPER_POGDIFF,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PrepareConfig,
    RayConfig,
    TrackingConfig,
    TrainConfig,
    _check,
)

__all__ = ["BUNDLED_DATASETS", "BUNDLED_TEXT_ENCODER", "CLASSIFIERS", "EVAL_METRICS", "LOSS_METHODS", "PAPER_POGDIFF", "Config",
           "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig", "PrepareConfig", "RayConfig",
           "TrackingConfig", "TrainConfig", "from_dict", "load_config", "parse_override", "save_config"]


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _check(self.loss.k <= self.prepare.k_max,
               f"loss.k={self.loss.k} is larger than prepare.k_max={self.prepare.k_max} stored at prepare time")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"loss.a1": 1.0, ...}``: MLflow params and Tune keys use this form."""
        out = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        return from_dict(self.to_dict(), overrides)

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of some sections (stage caches compare it)."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(cls, values: Mapping[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                         f"valid keys in {where.rstrip('.') or 'config'}: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = _coerce(value, str(known[name].type), f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong value types surface as ValueError with the section name
        raise ValueError(f"bad value in {where.rstrip('.')}: {e}") from e


def _coerce(value: Any, type_name: str, key: str) -> Any:
    """YAML reads ``1e-5`` (no dot) as a string; numbers must still be numbers."""
    if value is None or isinstance(value, bool):
        return value
    if type_name.startswith("float") and isinstance(value, (int, str)):
        if "str" in type_name and isinstance(value, str):  # e.g. "auto" or a number: keep a word as it is
            try:
                return float(value)
            except ValueError:
                return value
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if type_name.startswith("int") and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.a1=2"`` -> ``("loss.a1", 2)``; values are parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. loss.a1=2.0)")
    return key.strip(), yaml.safe_load(raw)


def from_dict(d: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """Build and validate a Config from nested dicts plus dotted overrides."""
    sections = {k: dict(v or {}) for k, v in d.items()}
    section_types = {f.name: f.type for f in fields(Config)}
    unknown = sorted(set(sections) - set(section_types))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {sorted(section_types)}")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in section_types or not name:
            raise ValueError(f"override key {key!r} must be section.key with section in {sorted(section_types)}")
        sections.setdefault(section, {})[name] = value
    classes = {f.name: f.default_factory for f in fields(Config)}
    built = {name: _build(classes[name], sections.get(name, {}), f"{name}.") for name in classes}
    return Config(**built)


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping[str, Any] | None = None) -> Config:
    """Read a YAML/JSON config file (optional) and apply overrides."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"config file {p} must hold a mapping of sections, got {type(d).__name__}")
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(d, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    d = {section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
         for section, values in cfg.to_dict().items()}  # YAML's safe dumper writes lists, not tuples
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
