"""Validation images during training (``train.validate_every``).

Every ``validate_every`` steps rank 0 samples, with the live weights and fixed seeds (the same
noise each time, so the images change only because the model did), ``validate_images`` images
of the largest majority identity and of the rarest few-shot one, logs the grid to MLflow as an
image at that step (``val/samples``: the MLflow UI's image view steps through them), and, when
the dataset is a bundled one with a CNN judge, their identity accuracy (``val/accuracy_few``,
``val/accuracy_majority``). ``val/seconds`` is the validation's share of the run so far.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from pogdiff_dist.data.bundled import bundled, dataset_of
from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.evaluation.judges import CNNJudge
from pogdiff_dist.families.latents import vae_scale_factor
from pogdiff_dist.families.pipeline import FamilyPipeline
from pogdiff_dist.families.spec import get_family
from pogdiff_dist.models import LatentCodec
from pogdiff_dist.pipeline import PoGDiffPipeline, image_grid
from pogdiff_dist.storage import local_mirror


class Validator:
    """Rank 0's validation grids (module docstring). Built from the manifest and the ``train``
    section; each call gets the live parts it samples with."""

    def __init__(self, manifest: Manifest, train_cfg, max_length: int, prepared_dir: str, device: torch.device,
                 dtype: torch.dtype, rank: int, max_steps: int):
        t = train_cfg
        self.manifest, self.prepared, self.device, self.dtype, self.rank = manifest, prepared_dir, device, dtype, rank
        self.every, self.images, self.steps, self.max_steps = t.validate_every, t.validate_images, t.validate_steps, max_steps
        self.guidance, self.seed, self.max_length = t.guidance_scale, t.seed, max_length
        majority, minority = manifest.majority(), manifest.minority()
        self.names = ([majority[0]] if majority else []) + ([minority[-1]] if minority else [])
        self.seconds = 0.0
        self._judge, self._vae, self._pipe = None, None, None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.max_steps

    def __call__(self, step: int, engine, scheduler_config, text, tracker, run_seconds: float) -> dict[str, float]:
        """Every rank calls (ZeRO-3 gathers the weights); rank 0 samples, judges and logs, and
        returns the metrics it logged (the other ranks an empty dict)."""
        with engine.gathered():
            if self.rank != 0:
                return {}
            t0 = time.time()
            images = self._sample(engine.module, scheduler_config, text)
            counts = dict(zip(self.manifest.identities, self.manifest.train_counts))
            labels = [f"{n} ({counts[n]} imgs)" for n in self.names]
            tracker.log_image(step, "val/samples", image_grid(images, rows=len(self.names), labels=labels))
            metrics = self._accuracy(images)
            self.seconds += time.time() - t0
            metrics.update({"val/seconds": self.seconds, "val/fraction_of_run": self.seconds / max(run_seconds, 1e-9)})
            tracker.log(step, metrics)
            print(f"[train] step {step}: validation grid logged ({self.seconds:.1f}s of validation so far"
                  + "".join(f", {k} {v:.2f}" for k, v in metrics.items() if "accuracy" in k) + ")", flush=True)
            return metrics

    @torch.no_grad()
    def _sample(self, unet, scheduler_config, text) -> np.ndarray:
        if self.manifest.family:
            return self._sample_family(unet, text)
        if self.manifest.vae_dir and self._vae is None:
            self._vae = LatentCodec(self.manifest.vae_dir, self.device).vae.to(self.dtype)
        pipe = PoGDiffPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config),
                               text_encoder=text.model, tokenizer=text.tokenizer, vae=self._vae,
                               max_length=self.max_length)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        try:
            return pipe([IDENTITY_PROMPT.format(name=n) for n in self.names], num_inference_steps=self.steps,
                        guidance_scale=self.guidance, num_images_per_prompt=self.images,
                        generator=torch.Generator().manual_seed(self.seed))
        finally:
            unet.train(was_training)

    def _sample_family(self, unet, text) -> np.ndarray:
        """SDXL / SD3 / Flux: their own pipeline around the live denoiser and the trainer's encoders."""
        if self._pipe is None:
            family = get_family(self.manifest.family)
            vae = LatentCodec(self.manifest.vae_dir, self.device).vae
            parts = {family.denoiser: unet, "vae": vae, **{name: m for name, m in text.models.items()}}
            pipe = DiffusionPipeline.from_pretrained(self.manifest.text_encoder_dir, **parts)
            pipe.set_progress_bar_config(disable=True)
            size = self.manifest.latent_shape[-1] * vae_scale_factor(vae.config)
            self._pipe = FamilyPipeline(pipe, family, size)
        was_training = unet.training
        unet.eval()
        # the live denoiser computes in the run's dtype (bf16) while the trainer's encoders stay fp32:
        # autocast, as diffusers' training scripts sample their validation images
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        try:
            with autocast:
                return self._pipe([IDENTITY_PROMPT.format(name=n) for n in self.names],
                                  num_inference_steps=self.steps, guidance_scale=self.guidance,
                                  num_images_per_prompt=self.images, generator=torch.Generator().manual_seed(self.seed))
        finally:
            unet.train(was_training)

    def _accuracy(self, images: np.ndarray) -> dict[str, float]:
        """Identity accuracy of the majority and few-shot images, by the dataset's CNN judge."""
        m = self.manifest
        if self._judge is None:
            name = (m.dataset or "").partition(":")[0] or dataset_of(m.identities)
            if name not in ("digits-it2i", "faces-it2i"):
                self._judge = False  # a user folder: no judge, the grid only
                return {}
            spec = bundled(name).judge_spec(list(m.identities), images.shape[1], images.shape[3])
            self._judge = CNNJudge.load_or_train(local_mirror(self.prepared) / "eval_cache", spec)
        if self._judge is False:
            return {}
        out = {}
        few = set(m.minority())
        for k, name in enumerate(self.names):
            predicted = self._judge.predict(images[k * self.images:(k + 1) * self.images], None, list(m.identities))
            out["val/accuracy_few" if name in few else "val/accuracy_majority"] = float(
                np.mean([p == name for p in predicted]))
        return out
