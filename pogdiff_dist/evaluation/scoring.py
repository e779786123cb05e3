"""Scoring: generated and real images -> every metric, per identity and averaged over all
and few-shot identities (METHOD.md, "Evaluation"). No diffusion model involved."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pogdiff_dist.config import CLASSIFIERS, EVAL_METRICS, EvalConfig
from pogdiff_dist.data.bundled import bundled, dataset_of
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.evaluation import metrics as M
from pogdiff_dist.evaluation.features import ImageEncoder, RealImages
from pogdiff_dist.evaluation.judges import CNNJudge, NearestCentroidClassifier

METRICS = EVAL_METRICS
MIN_HELDOUT = 2  # FID/DINO use held-out images when an identity has at least this many


def evaluated_identities(manifest: Manifest, cfg: EvalConfig) -> list[str]:
    if cfg.identities is None:
        return list(manifest.identities)
    unknown = [n for n in cfg.identities if n not in manifest.identities]
    if unknown:
        raise ValueError(f"identities {unknown} are not in the dataset ({len(manifest.identities)} identities, "
                         f"e.g. {manifest.identities[:3]})")
    return [n for n in manifest.identities if n in set(cfg.identities)]


JUDGE_DATASETS = {"digits": "digits-it2i", "faces": "faces-it2i"}  # classifier kind -> the dataset of its CNN


def resolve_classifier(kind: str, identities, dataset: str | None = None) -> str:
    """The classifier ``kind`` means here: ``auto`` is the CNN of the bundled dataset the
    data was prepared from (``dataset``: the manifest's, e.g. ``faces-it2i:M``), the nearest
    centroid of the encoder features for a user folder; a manifest that does not record its
    dataset is matched by its identity names. A dataset CNN forced on names it does not
    know is an error naming them."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {list(CLASSIFIERS)}, got {kind!r}")
    if kind == "auto":
        name = dataset.partition(":")[0] if dataset is not None else dataset_of(identities)
        by_dataset = {v: k for k, v in JUDGE_DATASETS.items()}
        return by_dataset.get(name, "centroid")
    if kind in JUDGE_DATASETS:
        bundled(JUDGE_DATASETS[kind]).judge_spec(list(identities), 8, 3 if kind == "faces" else 1)  # names check
    return kind


def build_classifier(cfg: EvalConfig, manifest: Manifest, train_features: dict[str, np.ndarray],
                     resolution: int, cache_dir: Path, channels: int = 3):
    """The classifier :func:`resolve_classifier` names for the dataset: the dataset's CNN judge
    (:class:`CNNJudge`, for its identities at ``resolution`` and ``channels``) or the nearest centroid."""
    kind = resolve_classifier(cfg.classifier, manifest.identities, manifest.dataset)
    if kind in JUDGE_DATASETS:
        spec = bundled(JUDGE_DATASETS[kind]).judge_spec(list(manifest.identities), resolution, channels)
        return CNNJudge.load_or_train(cache_dir, spec)
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
    if isinstance(classifier, CNNJudge) and classifier.name == "digits-cnn":
        clf_info["note"] = ("held-out images of Digits-IT2I are load_digits images the CNN was trained on; "
                            "its accuracy on unseen load_digits images is measured in tests/test_metrics.py")
    elif isinstance(classifier, CNNJudge):
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
