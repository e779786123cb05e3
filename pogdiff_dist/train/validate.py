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
from diffusers import DDIMScheduler

from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.models import LatentCodec
from pogdiff_dist.pipeline import PoGDiffPipeline, image_grid
from pogdiff_dist.storage import local_mirror


class Validator:
    def __init__(self, trainer):
        self.trainer = trainer
        m, t = trainer.manifest, trainer.cfg.train
        self.every, self.images, self.steps = t.validate_every, t.validate_images, t.validate_steps
        majority, minority = m.majority(), m.minority()
        self.names = ([majority[0]] if majority else []) + ([minority[-1]] if minority else [])
        self.seconds = 0.0
        self._judge, self._vae = None, None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.trainer.cfg.optim.max_steps

    def __call__(self, step: int, run_seconds: float) -> None:
        """Every rank calls (ZeRO-3 gathers the weights); rank 0 samples, judges and logs."""
        tr = self.trainer
        with tr.engine.gathered():
            if tr.rank != 0:
                return
            t0 = time.time()
            images = self._sample()
            counts = dict(zip(tr.manifest.identities, tr.manifest.train_counts))
            labels = [f"{n} ({counts[n]} imgs)" for n in self.names]
            tr.tracker.log_image(step, "val/samples", image_grid(images, rows=len(self.names), labels=labels))
            metrics = self._accuracy(images)
            self.seconds += time.time() - t0
            metrics.update({"val/seconds": self.seconds, "val/fraction_of_run": self.seconds / max(run_seconds, 1e-9)})
            tr.tracker.log(step, metrics)
            print(f"[train] step {step}: validation grid logged ({self.seconds:.1f}s of validation so far"
                  + "".join(f", {k} {v:.2f}" for k, v in metrics.items() if "accuracy" in k) + ")", flush=True)

    @torch.no_grad()
    def _sample(self) -> np.ndarray:
        tr = self.trainer
        unet = tr.engine.module
        if tr.manifest.vae_dir and self._vae is None:
            self._vae = LatentCodec(tr.manifest.vae_dir, tr.device).vae.to(tr.dtype)
        pipe = PoGDiffPipeline(unet=unet, scheduler=DDIMScheduler.from_config(tr.stepper.scheduler.config),
                               text_encoder=tr.text.model, tokenizer=tr.text.tokenizer, vae=self._vae,
                               max_length=tr.cfg.model.max_length)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        try:
            return pipe([IDENTITY_PROMPT.format(name=n) for n in self.names], num_inference_steps=self.steps,
                        guidance_scale=tr.cfg.train.guidance_scale, num_images_per_prompt=self.images,
                        generator=torch.Generator().manual_seed(tr.cfg.train.seed))
        finally:
            unet.train(was_training)

    def _accuracy(self, images: np.ndarray) -> dict[str, float]:
        """Identity accuracy of the majority and few-shot images, by the dataset's CNN judge."""
        tr = self.trainer
        if self._judge is None:
            from pogdiff_dist.data.bundled import bundled, dataset_of
            from pogdiff_dist.evaluation.judges import CNNJudge

            name = (tr.manifest.dataset or "").partition(":")[0] or dataset_of(tr.manifest.identities)
            if name not in ("digits-it2i", "faces-it2i"):
                self._judge = False  # a user folder: no judge, the grid only
                return {}
            spec = bundled(name).judge_spec(list(tr.manifest.identities), images.shape[1], images.shape[3])
            self._judge = CNNJudge.load_or_train(local_mirror(tr.prepared) / "eval_cache", spec)
        if self._judge is False:
            return {}
        out = {}
        few = set(tr.manifest.minority())
        for k, name in enumerate(self.names):
            predicted = self._judge.predict(images[k * self.images:(k + 1) * self.images], None,
                                            list(tr.manifest.identities))
            out["val/accuracy_few" if name in few else "val/accuracy_majority"] = float(
                np.mean([p == name for p in predicted]))
        return out
