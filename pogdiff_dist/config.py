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

BUNDLED_TEXT_ENCODER = "bundled:minilm"  # the offline all-MiniLM-L6-v2 package


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _one_of(name: str, value: Any, options: tuple) -> None:
    _check(value in options, f"{name} must be one of {list(options)}, got {value!r}")


# "<name>:<preset>" -> presets; "base" is the balanced pretraining population, "val" the validation split for M
BUNDLED_DATASETS = {
    "digits-it2i": ("S", "M", "L", "base", "val"),
    "faces-it2i": ("S", "M", "L", "base", "val"),
}


@dataclass(frozen=True)
class DataConfig:
    """Where the raw dataset comes from and how images are read."""

    dataset: str = "digits-it2i:M"  # "<digits-it2i|faces-it2i>:<S|M|L|base|val>" or a local dataset folder
    resolution: int = 32
    channels: int = 1  # pixel channels read from images (3 for RGB / Stable Diffusion)
    heldout_per_identity: int = 20  # bundled dataset only: images kept out of training
    on_bad: str = "raise"  # "raise" or "skip" (skips are counted and reported)
    seed: int = 0

    def __post_init__(self):
        _check(self.resolution >= 8, f"data.resolution must be >= 8, got {self.resolution}")
        _one_of("data.channels", self.channels, (1, 3))
        _one_of("data.on_bad", self.on_bad, ("raise", "skip"))
        _check(self.heldout_per_identity >= 0, "data.heldout_per_identity must be >= 0")
        bundled = self.bundled
        if bundled is not None:
            _one_of(f"data.dataset preset of {bundled[0]}", bundled[1], BUNDLED_DATASETS[bundled[0]])

    @property
    def bundled(self) -> tuple[str, str] | None:
        """(name, preset) for a bundled dataset, None for a user folder."""
        name, _, preset = self.dataset.partition(":")
        if name not in BUNDLED_DATASETS:
            return None
        return name, preset or "M"


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion model and its frozen encoders, all from local directories."""

    pretrained: str | None = None  # local Stable Diffusion dir (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    text_encoder: str = BUNDLED_TEXT_ENCODER  # used when pretrained is None
    unet: str = "tiny"  # from-scratch UNet preset when pretrained is None
    image_encoder: str = "pixels"  # "pixels" or a local transformers vision model dir
    max_length: int = 32  # caption tokens (77 for CLIP)
    init_unet: str | None = None  # start from this UNet instead: an exported model dir (model/unet) or a unet dir
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.pretrained is None:
            from pogdiff_dist.models import UNET_PRESETS  # local import: models imports torch

            _one_of("model.unet", self.unet, tuple(UNET_PRESETS))
        _check(self.max_length >= 4, f"model.max_length must be >= 4, got {self.max_length}")
        _check(self.num_train_timesteps >= 2, "model.num_train_timesteps must be >= 2")


@dataclass(frozen=True)
class PrepareConfig:
    """Offline stage: encode, shard, neighbour index, text density."""

    out_dir: str = "runs/prepared"
    k_max: int = 20  # neighbours stored per sample; train-time k may be any value <= k_max
    samples_per_shard: int = 256
    batch_size: int = 32
    num_encoders: int = 2  # Ray Data actors encoding images/captions
    density_latent_dim: int = 16
    density_hidden_dim: int = 256
    density_epochs: int = 200
    density_lr: float = 1e-3
    # What the density VAE models (Eq. 10). "caption": each sample's own caption (the paper's
    # y_i). "identity": each sample's identity prompt "An image of {name}.", one row per
    # sample, so psi_den ranks rare *names* rather than rare *descriptions* (a departure for
    # per-image captions, whose ELBO measured a description's rarity; see README).
    density_text: str = "caption"
    # GPUs per encoder actor (fractional allowed) and per k-NN / density task: "auto" = 1 when
    # the Ray cluster has GPUs (ray.cluster_resources()), else 0.
    gpus_per_encoder: float | str = "auto"

    def __post_init__(self):
        _one_of("prepare.density_text", self.density_text, ("caption", "identity"))
        g = self.gpus_per_encoder
        _check(g == "auto" or (isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0),
               f"prepare.gpus_per_encoder must be 'auto' or a number >= 0, got {g!r}")
        _check(self.k_max >= 1, f"prepare.k_max must be >= 1, got {self.k_max}")
        _check(self.samples_per_shard >= 1, "prepare.samples_per_shard must be >= 1")
        _check(self.batch_size >= 1 and self.num_encoders >= 1, "prepare.batch_size and num_encoders must be >= 1")
        _check(self.density_epochs >= 1, "prepare.density_epochs must be >= 1")


LOSS_METHODS = ("pogdiff", "vanilla", "cbdm", "t2h", "diffrop")


@dataclass(frozen=True)
class LossConfig:
    """Training objective (METHOD.md). psi options beyond Eq. 12 are off by default."""

    method: str = "pogdiff"  # one of LOSS_METHODS (METHOD.md: PoGDiff and its baselines)
    a1: float = 1.0  # psi_img exponent for same-identity neighbours (Eq. 9)
    a2: float = 1.0  # extra exponent for cross-identity neighbours (Eq. 9)
    a3: float = 1.0  # psi_den scale (Eq. 11); psi_den averages to 1/a3 over the dataset
    k: int = 10  # neighbours drawn from (<= prepare.k_max)
    neighbor_grad: str = "full"  # "full" (Algorithm 1) or "stop" (y' branch is a fixed target)
    use_psi_img: bool = True  # ablation: off -> psi = psi_den
    use_psi_den: bool = True  # ablation: off -> psi = psi_img
    den_temperature: float = 1.0  # departure from Eq. 11: psi_den ~ exp(-ELBO / T); 1 = literal
    psi_cap: float | None = None  # departure from Eq. 12: psi = min(psi, cap); None = literal
    cbdm_tau: float = 1.0  # CBDM regulariser weight (times t / T)
    diffrop_tau: float = 1.0  # DiffROP overlap weight at t = 0
    diffrop_decay: float = 5.0  # DiffROP: tau(t) = diffrop_tau * exp(-diffrop_decay * t / T)

    def __post_init__(self):
        _one_of("loss.method", self.method, LOSS_METHODS)
        _check(self.cbdm_tau >= 0 and self.diffrop_tau >= 0 and self.diffrop_decay >= 0,
               "loss.cbdm_tau, loss.diffrop_tau and loss.diffrop_decay must be >= 0")
        _one_of("loss.neighbor_grad", self.neighbor_grad, ("full", "stop"))
        for name in ("a1", "a2"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.a3 > 0, f"loss.a3 must be > 0 (psi_den = 1 / (a3 e^ELBO)), got {self.a3}")
        _check(self.k >= 1, f"loss.k must be >= 1, got {self.k}")
        _check(self.den_temperature > 0, f"loss.den_temperature must be > 0, got {self.den_temperature}")
        _check(self.psi_cap is None or self.psi_cap > 0, f"loss.psi_cap must be > 0 or null, got {self.psi_cap}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule, accumulation and clipping: set here and nowhere else."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 8  # micro-batch per worker
    grad_accum: int = 1
    max_steps: int = 300  # optimiser steps
    warmup_steps: int = 20
    schedule: str = "constant"  # "constant" (after warmup) or "cosine"
    grad_clip: float = 1.0

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "optim.batch_size and optim.grad_accum must be >= 1")
        _check(self.max_steps >= 1, f"optim.max_steps must be >= 1, got {self.max_steps}")
        _check(0 <= self.warmup_steps, "optim.warmup_steps must be >= 0")
        _one_of("optim.schedule", self.schedule, ("constant", "cosine"))
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        _check(len(self.betas) == 2, "optim.betas must have two values")


@dataclass(frozen=True)
class TrainConfig:
    """Distributed run: workers, engine, checkpoints, EMA, sampling."""

    name: str = "default"
    storage_path: str = "runs"  # Ray Train storage (local path or URI); checkpoints live here
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    zero_stage: int = 2
    precision: str = "fp32"  # "fp32" or "bf16"
    seed: int = 0
    caption_dropout: float = 0.1  # train the unconditional branch for classifier-free guidance
    ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (Ray Train FailureConfig)
    log_every: int = 10
    shuffle_buffer: int = 256
    sample_steps: int = 25  # DDIM steps for the sample grid logged at the end
    guidance_scale: float = 3.0
    samples_per_prompt: int = 4
    on_nonfinite: str = "skip"  # non-finite loss: "skip" the step (counted, logged) or "raise"
    max_nonfinite: int = 20  # with "skip": stop with an error after this many skipped steps in a row
    verify_shards: bool = True  # checksum every shard against the manifest before training (size is always checked)
    text_cache_mib: float = 256.0  # per worker: y' hidden states of distinct neighbour captions kept (LRU); 0: off
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~+30% step time)
    allow_tf32: bool = True  # CUDA: TF32 for fp32 matmuls/convolutions (bf16 compute is unaffected)
    compile: bool = False  # torch.compile the UNet inside the DeepSpeed engine (first steps pay the compile)

    def __post_init__(self):
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker must be > 0")
        _one_of("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("train.precision", self.precision, ("fp32", "bf16"))
        _check(0 <= self.caption_dropout < 1, "train.caption_dropout must be in [0, 1)")
        _check(0 < self.ema_decay < 1, "train.ema_decay must be in (0, 1)")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "train.checkpoint_every and log_every must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.sample_steps >= 1 and self.samples_per_prompt >= 1, "train.sample_steps and samples_per_prompt must be >= 1")
        _one_of("train.on_nonfinite", self.on_nonfinite, ("skip", "raise"))
        _check(self.max_nonfinite >= 1, "train.max_nonfinite must be >= 1")
        _check(self.text_cache_mib >= 0, f"train.text_cache_mib must be >= 0, got {self.text_cache_mib}")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "pogdiff"

    def resolved_uri(self) -> str:
        import os

        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: join $RAY_ADDRESS or start a local cluster
    num_cpus: int | None = None  # logical CPUs of a local cluster (None: 2 x physical, see ENVIRONMENT.md)


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
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
