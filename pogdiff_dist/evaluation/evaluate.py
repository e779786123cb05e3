"""Generation and evaluation of an exported model, in one process.

:func:`generate_identity` makes one identity's images with its own seeded generator;
:func:`compute_metrics` turns generated and real images into every metric (no model of
the diffusion side involved); :func:`evaluate_model` does both sequentially, which is
what a Ray Tune trial runs for a small fixed-seed check at the end of training.
:mod:`pogdiff_dist.evaluation.generate` runs the same generation over a Ray cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.evaluation import metrics as M
from pogdiff_dist.evaluation.features import ImageEncoder, RealImages, load_real_images
from pogdiff_dist.evaluation.judges import (
    DigitsClassifier,
    FacesClassifier,
    NearestCentroidClassifier,
    digit_names,
    face_names,
)

PROMPT = IDENTITY_PROMPT  # PoGDiff Sec. 4.1
METRICS = ("fid", "dino", "grecall", "accuracy")
CLASSIFIERS = ("auto", "digits", "faces", "centroid")
MIN_HELDOUT = 2  # FID/DINO use held-out images when an identity has at least this many


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; everything that changes a number is here and in metrics.json."""

    num_images: int = 10  # generated per identity (the paper samples 10 per identity)
    steps: int = 50  # DDIM steps (the paper's 50)
    guidance_scale: float = 3.0  # classifier-free guidance, as train.guidance_scale
    seed: int = 0  # identity i's generator is seeded from (seed, name): see identity_seed
    encoder: str = "pixels"  # "pixels" or a local transformers vision model dir (DINOv2...)
    classifier: str = "auto"  # "digits" (Digits-IT2I CNN), "faces" (Faces-IT2I CNN), "centroid", or "auto" (see
    #   resolve_classifier: digits if every name is a digit's, faces if every name is a face's, else centroid)
    fid_dims: int = 16  # FID on this many principal axes of the real features (see metrics.py)
    fid_eps: float = M.FID_EPS  # added to both covariances' diagonals before sqrtm
    grecall_threshold: float = M.GRECALL_THRESHOLD
    few_threshold: int | None = None  # few-shot: <= this many training images (None: Manifest.minority default)
    identities: tuple[str, ...] | None = None  # a subset to evaluate (None: all)
    cache_dir: str | None = None  # classifier cache (None: <prepared>/eval_cache)

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        check(self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}")
        check(self.classifier in CLASSIFIERS, f"classifier must be one of {list(CLASSIFIERS)}, got {self.classifier!r}")
        check(self.fid_dims >= 1, f"fid_dims must be >= 1, got {self.fid_dims}")
        check(self.fid_eps > 0, f"fid_eps must be > 0, got {self.fid_eps}")
        check(-1 <= self.grecall_threshold <= 1, "grecall_threshold must be a cosine in [-1, 1]")
        check(self.few_threshold is None or self.few_threshold >= 0, "few_threshold must be >= 0 or None")
        check(self.encoder == "pixels" or Path(self.encoder).is_dir(),
              f"encoder must be 'pixels' or a local transformers vision model directory, got {self.encoder!r}")
        if self.identities is not None:
            object.__setattr__(self, "identities", tuple(self.identities))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def prompt_for(name: str) -> str:
    return PROMPT.format(name=name)


def identity_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``(seed, name)``: an identity's images do not depend on which
    worker makes them, in which order, or on which other identities are evaluated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def load_pipeline(model_dir: str | Path, device: str = "cpu"):
    """The exported diffusers pipeline (:func:`pogdiff_dist.pipeline.export_pipeline`), on ``device``."""
    from pogdiff_dist.pipeline import PoGDiffPipeline

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{model_dir} is not an exported model (no model_index.json); jobs/train.py writes "
                         f"one to runs/<name>/model")
    pipe = PoGDiffPipeline.from_pretrained(str(model_dir)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_identity(pipe, name: str, cfg: EvalConfig) -> np.ndarray:
    """``uint8 [num_images, H, W, C]`` for ``"An image of {name}."``, DDIM (eta 0)."""
    import torch

    g = torch.Generator().manual_seed(identity_seed(cfg.seed, name))
    return pipe([prompt_for(name)], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                num_images_per_prompt=cfg.num_images, generator=g)


def evaluated_identities(manifest: Manifest, cfg: EvalConfig) -> list[str]:
    if cfg.identities is None:
        return list(manifest.identities)
    unknown = [n for n in cfg.identities if n not in manifest.identities]
    if unknown:
        raise ValueError(f"identities {unknown} are not in the dataset ({len(manifest.identities)} identities, "
                         f"e.g. {manifest.identities[:3]})")
    return [n for n in manifest.identities if n in set(cfg.identities)]


def resolve_classifier(kind: str, identities) -> str:
    """The classifier ``kind`` means for these identity names: ``auto`` is the
    Digits-IT2I CNN when every name is a digit's, the Faces-IT2I CNN when every name is a
    Faces-IT2I identity's, otherwise the nearest centroid of the encoder features. A
    dataset CNN forced on names it does not know is an error naming them."""
    names = set(identities)
    if kind not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {list(CLASSIFIERS)}, got {kind!r}")
    if kind == "auto":
        if names <= set(digit_names()):
            return "digits"
        if names <= face_names():
            return "faces"
        return "centroid"
    if kind == "digits":
        missing = sorted(names - set(digit_names()))
        if missing:
            raise ValueError(f"classifier 'digits' needs Digits-IT2I identities; {missing[:3]} are not")
    if kind == "faces":
        missing = sorted(names - face_names())
        if missing:
            raise ValueError(f"classifier 'faces' needs Faces-IT2I identities; {missing[:3]} are not")
    return kind


def build_classifier(cfg: EvalConfig, manifest: Manifest, train_features: dict[str, np.ndarray],
                     resolution: int, cache_dir: Path, channels: int = 3):
    """The classifier :func:`resolve_classifier` names for the dataset's identities: the
    digit CNN (per resolution), the faces CNN (trained on fresh renders of exactly the
    dataset's identities at ``resolution`` and ``channels``), or the nearest centroid."""
    kind = resolve_classifier(cfg.classifier, manifest.identities)
    if kind == "digits":
        return DigitsClassifier.load_or_train(cache_dir, resolution)
    if kind == "faces":
        return FacesClassifier.load_or_train(cache_dir, manifest.identities, resolution, channels)
    return NearestCentroidClassifier(train_features, encoder=cfg.encoder)


def compute_metrics(generated: dict[str, np.ndarray], real: RealImages, manifest: Manifest, cfg: EvalConfig,
                    encoder=None, classifier=None, cache_dir: str | Path | None = None) -> dict:
    """Every metric, per identity and averaged over all / few-shot identities.

    ``generated``: identity name -> ``uint8 [n, H, W, C]``. ``encoder`` and ``classifier``
    default to what ``cfg`` names; pass them to reuse loaded ones. Reference sets: FID and
    DINO against an identity's held-out images when it has >= 2, else its training
    images; gRecall against training images (METHOD.md); accuracy needs no reference.
    ``real`` should hold every identity of the dataset, also when only some are
    generated: the FID projection and the nearest-centroid classifier are built from all
    of them, so an identity's numbers do not depend on which others were evaluated.
    """
    names = [n for n in manifest.identities if n in generated]
    if not names:
        raise ValueError("no generated images for any identity of the dataset")
    encoder = encoder if encoder is not None else ImageEncoder(cfg.encoder)
    some = next(iter(generated.values()))
    resolution = int(some.shape[1])

    gen_f = {n: encoder(generated[n]) for n in names}
    train_f = {n: encoder(real.train[n]) for n in real.train if len(real.train[n])}
    held_f = {n: encoder(real.heldout[n]) for n in real.heldout if len(real.heldout[n])}
    if classifier is None:
        cache = cache_dir if cache_dir is not None else cfg.cache_dir
        cache = Path(cache) if cache is not None else Path.home() / ".cache" / "pogdiff_dist" / "eval"
        classifier = build_classifier(cfg, manifest, train_f, resolution, cache, channels=int(some.shape[3]))

    pool = [f for f in (*train_f.values(), *held_f.values()) if len(f)]
    projection = M.fit_projection(np.concatenate(pool), cfg.fid_dims)
    counts = dict(zip(manifest.identities, manifest.train_counts))
    few = set(manifest.minority(cfg.few_threshold))

    per = {}
    for n in names:
        use_heldout = n in held_f and len(held_f[n]) >= MIN_HELDOUT
        ref = held_f[n] if use_heldout else train_f.get(n)
        row = {"train_count": counts[n], "few_shot": n in few, "num_generated": len(gen_f[n]),
               "reference": "heldout" if use_heldout else "train",
               "num_reference": 0 if ref is None else len(ref)}
        if ref is None:
            row["fid"] = row["dino"] = math.nan
        else:
            row["fid"] = M.fid(M.project(gen_f[n], projection), M.project(ref, projection), cfg.fid_eps)
            row["dino"] = M.dino_score(gen_f[n], ref)
        if n in train_f:
            covered, total = M.grecall_identity(gen_f[n], train_f[n], cfg.grecall_threshold)
            row.update(grecall=covered / total, covered=covered, num_train=total)
        else:
            row.update(grecall=math.nan, covered=0, num_train=0)
        predicted = classifier.predict(generated[n], gen_f[n], list(manifest.identities))
        row["accuracy"] = M.identity_accuracy(predicted, n)
        row["predicted"] = {p: predicted.count(p) for p in sorted(set(predicted))}
        per[n] = row

    # the classifier's own accuracy on real held-out images: a sanity check of the judge
    held_names = [n for n in names if n in held_f]
    judged = [classifier.predict(real.heldout[n], held_f[n], list(manifest.identities)) for n in held_names]
    hits = sum(p == n for n, preds in zip(held_names, judged) for p in preds)
    total = sum(len(p) for p in judged)
    clf_info = classifier.describe()
    clf_info["accuracy_on_real_heldout"] = hits / total if total else None
    if isinstance(classifier, DigitsClassifier):
        clf_info["note"] = ("held-out images of Digits-IT2I are load_digits images the CNN was trained on; "
                            "its accuracy on unseen load_digits images is measured in tests/test_metrics.py")
    elif isinstance(classifier, FacesClassifier):
        clf_info["note"] = ("trained on fresh renders of these identities, none of them a dataset image: the "
                            "held-out accuracy above is on images it never saw (tests/test_faces_judge.py)")

    summary = M.summarize(per, METRICS, few)
    return {
        "summary": summary,
        "per_identity": per,
        "identities": names,
        "few_shot_identities": [n for n in names if n in few],
        "reference_sets": {
            "fid": f"held-out images where an identity has >= {MIN_HELDOUT}, else training images "
                   "(per identity: per_identity.<name>.reference)",
            "dino": "same as fid",
            "grecall": "training images",
            "accuracy": "none (identity classifier)",
        },
        "encoder": encoder.describe() if hasattr(encoder, "describe") else type(encoder).__name__,
        "classifier": clf_info,
        "fid": {"dims": int(projection[1].shape[0]), "eps": cfg.fid_eps,
                "projection": "PCA of the real features of every identity (train + held-out)",
                "note": "Frechet distance of unit-norm encoder features: not comparable with Inception FID"},
        "grecall_threshold": cfg.grecall_threshold,
        "resolution": resolution,
        "config": cfg.to_dict(),
    }


def evaluate_model(model_dir: str | Path, prepared_dir: str | Path, *, num_images: int = 10, steps: int = 50,
                   seed: int = 0, encoder: str = "pixels", classifier: str = "auto", guidance_scale: float = 3.0,
                   identities=None, fid_dims: int = 16, few_threshold: int | None = None,
                   cache_dir: str | Path | None = None, out_dir: str | Path | None = None) -> dict:
    """Generate every identity in this process, then :func:`compute_metrics`.

    For a Ray Tune trial's small fixed-seed evaluation: e.g.
    ``evaluate_model(d, prepared, num_images=4, steps=20)["summary"]["accuracy_few"]``.
    With ``out_dir`` the images, grids, plot and metrics.json are written there too.
    """
    cfg = EvalConfig(num_images=num_images, steps=steps, seed=seed, encoder=encoder, classifier=classifier,
                     guidance_scale=guidance_scale, identities=identities, fid_dims=fid_dims,
                     few_threshold=few_threshold, cache_dir=None if cache_dir is None else str(cache_dir))
    manifest = Manifest.load(prepared_dir)
    names = evaluated_identities(manifest, cfg)
    t0 = time.time()
    pipe = load_pipeline(model_dir)
    generated = {n: generate_identity(pipe, n, cfg) for n in names}
    gen_s = time.time() - t0
    h, c = generated[names[0]].shape[1], generated[names[0]].shape[3]
    real = load_real_images(prepared_dir, manifest, h, c)  # every identity: see compute_metrics
    results = compute_metrics(generated, real, manifest, cfg,
                              cache_dir=cache_dir or cfg.cache_dir or Path(prepared_dir) / "eval_cache")
    results.update(model_dir=str(Path(model_dir).absolute()), prepared_dir=str(Path(prepared_dir).absolute()),
                   generation_seconds=gen_s)
    if out_dir is not None:
        from pogdiff_dist.evaluation.report import write_outputs

        results["outputs"] = {k: str(v) for k, v in write_outputs(out_dir, results, generated, real).items()}
    return results
