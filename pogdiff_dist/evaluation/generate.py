"""Generation: an exported model's images per identity, with fixed per-identity seeds; and
the Ray actor that scores them (this is the evaluation's one Ray module).

:func:`generate_identity` makes one identity's images in this process; :func:`generate_distributed`
spreads identities over Ray actors (``num_workers`` actors each load the exported pipeline
once, on a GPU when given one, and take identities from a queue, so a slow identity does
not hold up the others). Every identity has its own seeded generator (:func:`identity_seed`),
so the images do not depend on the number of workers or the order in which identities finish.
On a GPU a pipeline samples in its training run's compute dtype, with TF32 as the run allowed
it (:func:`generation_dtype`, :func:`generation_tf32`); on the CPU in fp32.
:func:`score_distributed` then computes every metric on one more actor, on a GPU when given one.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from pogdiff_dist.config import EvalConfig, TrainConfig
from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.devices import auto_gpus, compute_dtype, task_device
from pogdiff_dist.evaluation.scoring import Scorer
from pogdiff_dist.output import quiet_libraries
from pogdiff_dist.pipeline import load_pipeline
from pogdiff_dist.runtime import cluster_gpus

PROMPT = IDENTITY_PROMPT  # PoGDiff Sec. 4.1


def prompt_for(name: str) -> str:
    return PROMPT.format(name=name)


def identity_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``(seed, name)``: an identity's images do not depend on which
    worker makes them, in which order, or on which other identities are evaluated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def generate_identity(pipe, name: str, cfg: EvalConfig) -> np.ndarray:
    """``uint8 [num_images, H, W, C]`` for ``"An image of {name}."``, DDIM (eta 0)."""
    g = torch.Generator().manual_seed(identity_seed(cfg.seed, name))
    return pipe([prompt_for(name)], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                num_images_per_prompt=cfg.num_images, generator=g)


@dataclass(frozen=True)
class RunPrecision:
    """How the model's training run computed (``train.precision``, ``train.allow_tf32``):
    generation on a GPU computes the same way."""

    precision: str = TrainConfig.precision
    allow_tf32: bool = TrainConfig.allow_tf32


def run_precision(run_dir: Path | None) -> RunPrecision:
    """The run folder's ``train.precision`` and ``train.allow_tf32`` (its config.yaml); the
    training defaults when the run is unknown or the file names neither."""
    path = Path(run_dir) / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return RunPrecision()
    train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
    return RunPrecision(str(train.get("precision", TrainConfig.precision)),
                        bool(train.get("allow_tf32", TrainConfig.allow_tf32)))


def generation_dtype(device: str | torch.device, precision: str) -> torch.dtype:
    """The dtype a pipeline samples in: the training's compute dtype on a GPU (bf16 for a bf16
    run, as its validation grids were made); fp32 on the CPU whatever the precision (CPU bf16
    is slow, and CPU numbers stay those of every earlier CPU evaluation)."""
    return compute_dtype(precision) if torch.device(device).type == "cuda" else torch.float32


def generation_tf32(device: str | torch.device, allow_tf32: bool) -> bool:
    """TF32 for fp32 matmuls and convolutions while sampling: as ``train.allow_tf32`` says on a
    GPU; off elsewhere (no CPU kernel reads the flags)."""
    return bool(allow_tf32) and torch.device(device).type == "cuda"


@contextmanager
def tf32_mode(enabled: bool):
    """CUDA TF32 (matmuls and cuDNN convolutions) set to ``enabled`` inside, restored after:
    torch's defaults differ (matmul off, convolutions on), so both are set."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class IdentityGenerator:
    """Ray actor: loads the pipeline once onto its device (the GPU Ray gave it, else the CPU) in
    the dtype :func:`generation_dtype` chooses, then generates identity after identity."""

    def __init__(self, model_dir: str, cfg: dict, threads: int, gpus: float = 0.0, lora_dir: str | None = None,
                 precision: RunPrecision = RunPrecision()):
        quiet_libraries()  # a Ray actor: the driver's --verbose arrives as $POGDIFF_VERBOSE
        torch.set_num_threads(max(1, threads))
        self.device = task_device(gpus)
        self.dtype = generation_dtype(self.device, precision.precision)
        self.tf32 = generation_tf32(self.device, precision.allow_tf32)
        self.pipe = load_pipeline(model_dir, self.device, lora_dir, dtype=self.dtype)
        self.cfg = EvalConfig(**cfg)

    def generate(self, name: str) -> tuple[str, np.ndarray, float]:
        t0 = time.time()
        with tf32_mode(self.tf32):
            images = generate_identity(self.pipe, name, self.cfg)
        return name, images, time.time() - t0


def resolve_eval_gpus(setting: float | str, run_dir: Path | None) -> float:
    """GPUs per generation actor: a number as given; ``auto`` by :func:`pogdiff_dist.devices.auto_gpus`
    from the cluster's GPUs now, the GPUs its autoscaler can add (when reported), and what the
    model's training run declared (``train.use_gpu`` in its config.yaml; nothing without a run
    folder), so a cluster whose GPU nodes are still starting does not generate on CPU."""
    if setting != "auto":
        return float(setting)
    declared = False
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        declared = bool(yaml.safe_load((run_dir / "config.yaml").read_text())["train"].get("use_gpu"))
    return auto_gpus(*cluster_gpus(), declared=declared)


def generate_distributed(model_dir: str | Path, names: list[str], cfg: EvalConfig, num_workers: int = 2,
                         cpus_per_worker: float = 1.0, progress: bool = True,
                         gpus_per_worker: float = 0.0, lora_dir: str | Path | None = None,
                         precision: RunPrecision = RunPrecision()) -> dict[str, np.ndarray]:
    """identity name -> ``uint8 [num_images, H, W, C]``, made by up to ``num_workers`` actors
    (each on a GPU when ``gpus_per_worker`` > 0, computing as ``precision`` says)."""
    import ray
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(IdentityGenerator)
    n_actors = max(1, min(num_workers, len(names)))
    actors = [actor.remote(str(Path(model_dir).absolute()), cfg.to_dict(), int(max(1, cpus_per_worker)),
                           gpus_per_worker, str(lora_dir) if lora_dir else None, precision) for _ in range(n_actors)]
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


class ScoringActor(Scorer):
    """Ray actor: a :class:`Scorer` on the device of the actor (the GPU Ray gave it, else the CPU)."""

    def __init__(self, manifest: Manifest, cfg: dict, size: int, channels: int, threads: int, gpus: float,
                 cache_dir: str | None):
        quiet_libraries()
        torch.set_num_threads(max(1, threads))
        super().__init__(manifest, EvalConfig(**cfg), size, channels, device=task_device(gpus), cache_dir=cache_dir)


def score_distributed(prepared_dir: str | Path, manifest: Manifest, generated: dict[str, np.ndarray], cfg: EvalConfig,
                      cache_dir: str | Path | None, cpus: float = 1.0, gpus: float = 0.0) -> tuple[dict, dict]:
    """Every metric of ``generated`` against ``prepared_dir``'s references, on one Ray actor with
    ``gpus`` GPUs: the VAE decode of the training latents and the image encoder run there,
    streamed (:meth:`Scorer.load_references`). What comes back to the driver is
    :meth:`Scorer.score`'s: the metrics and at most ``cfg.num_images`` training images per identity
    for the grids (``uint8 [<= num_images, H, W, C]``), never the decoded references or their features."""
    import ray

    some = next(iter(generated.values()))
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(ScoringActor).remote(
        manifest, cfg.to_dict(), int(some.shape[1]), int(some.shape[3]), int(max(1, cpus)), gpus,
        str(cache_dir) if cache_dir is not None else None)
    try:
        return ray.get(actor.score.remote(str(Path(prepared_dir).absolute()), generated))
    finally:
        ray.kill(actor)
