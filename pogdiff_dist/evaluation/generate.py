"""Generation: an exported model's images per identity, with fixed per-identity seeds.

:func:`generate_identity` makes one identity's images in this process; :func:`generate_distributed`
spreads identities over Ray actors (``num_workers`` actors each load the exported pipeline
once, on a GPU when given one, and take identities from a queue, so a slow identity does
not hold up the others). Every identity has its own seeded generator (:func:`identity_seed`),
so the images do not depend on the number of workers or the order in which identities finish.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import yaml

from pogdiff_dist.config import EvalConfig
from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.output import quiet_libraries
from pogdiff_dist.pipeline import load_pipeline

PROMPT = IDENTITY_PROMPT  # PoGDiff Sec. 4.1


def prompt_for(name: str) -> str:
    return PROMPT.format(name=name)


def identity_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``(seed, name)``: an identity's images do not depend on which
    worker makes them, in which order, or on which other identities are evaluated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def generate_identity(pipe, name: str, cfg: EvalConfig) -> np.ndarray:
    """``uint8 [num_images, H, W, C]`` for ``"An image of {name}."``, DDIM (eta 0)."""
    import torch

    g = torch.Generator().manual_seed(identity_seed(cfg.seed, name))
    return pipe([prompt_for(name)], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                num_images_per_prompt=cfg.num_images, generator=g)


class IdentityGenerator:
    """Ray actor: loads the pipeline once onto its device (the GPU Ray gave it, else the CPU),
    then generates identity after identity."""

    def __init__(self, model_dir: str, cfg: dict, threads: int, gpus: float = 0.0, lora_dir: str | None = None):
        import torch

        quiet_libraries()  # a Ray actor: the driver's --verbose arrives as $POGDIFF_VERBOSE
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if gpus > 0 else "cpu"
        self.pipe = load_pipeline(model_dir, self.device, lora_dir)
        self.cfg = EvalConfig(**cfg)

    def generate(self, name: str) -> tuple[str, np.ndarray, float]:
        t0 = time.time()
        return name, generate_identity(self.pipe, name, self.cfg), time.time() - t0


def resolve_eval_gpus(setting: float | str, run_dir: Path | None) -> float:
    """GPUs per generation actor: a number as given; ``auto`` by :func:`pogdiff_dist.devices.auto_gpus`
    from the cluster's GPUs now, the GPUs its autoscaler can add (when reported), and what the
    model's training run declared (``train.use_gpu`` in its config.yaml; nothing without a run
    folder), so a cluster whose GPU nodes are still starting does not generate on CPU."""
    if setting != "auto":
        return float(setting)
    from pogdiff_dist.devices import auto_gpus
    from pogdiff_dist.runtime import cluster_gpus

    declared = False
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        declared = bool(yaml.safe_load((run_dir / "config.yaml").read_text())["train"].get("use_gpu"))
    return auto_gpus(*cluster_gpus(), declared=declared)


def generate_distributed(model_dir: str | Path, names: list[str], cfg: EvalConfig, num_workers: int = 2,
                         cpus_per_worker: float = 1.0, progress: bool = True,
                         gpus_per_worker: float = 0.0, lora_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """identity name -> ``uint8 [num_images, H, W, C]``, made by up to ``num_workers`` actors
    (each on a GPU when ``gpus_per_worker`` > 0)."""
    import ray
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(IdentityGenerator)
    n_actors = max(1, min(num_workers, len(names)))
    actors = [actor.remote(str(Path(model_dir).absolute()), cfg.to_dict(), int(max(1, cpus_per_worker)),
                           gpus_per_worker, str(lora_dir) if lora_dir else None) for _ in range(n_actors)]
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
