"""Scoring: generated and real images -> every metric, per identity and averaged over all
and few-shot identities (METHOD.md, "Evaluation"). No diffusion model involved, but a latent
model's references are decoded with its VAE: :class:`Scorer` does that, and runs the image
encoder, on one device (a Ray actor's GPU in ``jobs/evaluate.py``: see
:func:`pogdiff_dist.evaluation.generate.score_distributed`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pogdiff_dist.config import CLASSIFIERS, EVAL_METRICS, EvalConfig
from pogdiff_dist.data.bundled import bundled, dataset_of
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.evaluation import metrics as M
from pogdiff_dist.evaluation.bleed import identity_bleed
from pogdiff_dist.evaluation.features import ImageEncoder, RealImages, TrainingImages, heldout_images
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
    """Every metric, per identity and averaged over all / few-shot identities, from images in
    memory (:class:`Scorer` streams the references from a prepared dir instead).

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
    some = generated[names[0]]
    scorer = Scorer(manifest, cfg, int(some.shape[1]), int(some.shape[3]), encoder=encoder, classifier=classifier,
                    cache_dir=cache_dir)
    scorer.add_references(real)
    for n in names:
        scorer.add_generated(n, generated[n])
    return scorer.results()


class Scorer:
    """Images in, metrics out, on one ``device`` (the VAE decode of the references and a vision
    encoder run there, in fp32 whatever the run's precision, so a metric does not depend on how
    the model trained; the pixel encoder, the metric math and the judge, a CNN of some 10^4
    parameters, run on the CPU).

    Feed it the references first, streamed from a prepared dir (:meth:`load_references`) or in
    memory (:meth:`add_references`), then each identity's generated images
    (:meth:`add_generated`); :meth:`results` is metrics.json's content. :meth:`score` does all
    three, on an evaluation actor. Between calls it keeps only ``float32 [n, d]`` encoder
    features of every reference and generated image, the judge's predictions, and
    :meth:`previews`; while streaming, at most ``batch_size`` decoded training images are alive.
    """

    def __init__(self, manifest: Manifest, cfg: EvalConfig, size: int, channels: int, device: str = "cpu",
                 encoder=None, classifier=None, cache_dir: str | Path | None = None, batch_size: int = 16,
                 keep: int | None = None):
        self.manifest, self.cfg = manifest, cfg
        self.size, self.channels, self.device, self.batch_size = int(size), int(channels), device, batch_size
        self.keep = cfg.num_images if keep is None else keep  # training images per identity kept for the grids
        self.encoder = encoder if encoder is not None else ImageEncoder(cfg.encoder, device=device)
        self.classifier = classifier
        cache = cache_dir if cache_dir is not None else cfg.cache_dir
        self.cache_dir = Path(cache) if cache is not None else Path.home() / ".cache" / "pogdiff_dist" / "eval"
        self.train_f: dict[str, np.ndarray] = {}
        self.held_f: dict[str, np.ndarray] = {}
        self.held_pred: dict[str, list[str]] = {}
        self.gen_f: dict[str, np.ndarray] = {}
        self.gen_pred: dict[str, list[str]] = {}
        self._previews: dict[str, np.ndarray] = {}
        self._has_references = False

    def score(self, prepared_dir: str | Path, generated: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        """(:meth:`results`, :meth:`previews`) of ``generated`` against ``prepared_dir``'s references.
        What comes back is all an evaluation driver holds of the references: numbers, and at most
        ``keep`` training images per identity (``uint8 [<= keep, size, size, channels]``)."""
        self.load_references(prepared_dir)
        for name in self.manifest.identities:
            if name in generated:
                self.add_generated(name, generated[name])
        return self.results(), self.previews()

    def load_references(self, prepared_dir: str | Path) -> None:
        """Every identity's references from ``prepared_dir``: the training samples decoded and
        encoded ``batch_size`` at a time (:class:`TrainingImages`), then the held-out images, one
        identity at a time."""
        source = TrainingImages(prepared_dir, self.manifest)
        idents = {name: np.flatnonzero(source.ids == i) for i, name in enumerate(self.manifest.identities)}
        shown = np.concatenate([rows[:self.keep] for rows in idents.values()])
        features, kept = None, {}
        for rows, images in source.batches(self.size, self.channels, self.batch_size, self.device):
            f = self.encoder(images)
            if features is None:
                features = np.zeros((len(source), f.shape[1]), np.float32)  # [N, d], in sample-index order
            features[rows] = f
            picked = np.isin(rows, shown)
            kept.update(zip(rows[picked].tolist(), images[picked]))  # copies: the batch itself can go
            del images  # nothing holds this batch while the next one is decoded
        empty = np.zeros((0, self.size, self.size, self.channels), np.uint8)
        self._previews = {name: np.stack([kept[int(r)] for r in rows[:self.keep]]) if len(rows) else empty
                          for name, rows in idents.items()}
        self._set_references({name: features[rows] for name, rows in idents.items() if len(rows)},
                             ((name, heldout_images(self.manifest, name, self.size, self.channels))
                              for name in self.manifest.identities))

    def add_references(self, real: RealImages) -> None:
        """The references from images in memory (every identity: see :func:`compute_metrics`)."""
        self._previews = {name: images[:self.keep] for name, images in real.train.items()}
        self._set_references({name: self.encoder(images) for name, images in real.train.items() if len(images)},
                             real.heldout.items())

    def _set_references(self, train_f: dict[str, np.ndarray], heldout) -> None:
        """Training features, then the classifier (the nearest centroid is built from them), then
        each identity's held-out images (``heldout``: ``(name, uint8 images)`` pairs, made one
        at a time by a generator) encoded and judged: the judge's accuracy on real images."""
        self.train_f = train_f
        if self.classifier is None:
            self.classifier = build_classifier(self.cfg, self.manifest, train_f, self.size, self.cache_dir,
                                               channels=self.channels)
        for name, images in heldout:
            if len(images):
                self.held_f[name] = self.encoder(images)
                self.held_pred[name] = self.classifier.predict(images, self.held_f[name], list(self.manifest.identities))
        self._has_references = True

    def add_generated(self, name: str, images: np.ndarray) -> None:
        """One identity's generated images, ``uint8 [n, size, size, channels]``: encoded and judged."""
        if not self._has_references:
            raise RuntimeError("Scorer: add the references before the generated images (the classifier needs them)")
        if tuple(images.shape[1:]) != (self.size, self.size, self.channels):
            raise ValueError(f"{name!r}: generated images of shape {images.shape[1:]}, the scorer was built for "
                             f"{(self.size, self.size, self.channels)}")
        self.gen_f[name] = self.encoder(images)
        self.gen_pred[name] = self.classifier.predict(images, self.gen_f[name], list(self.manifest.identities))

    def previews(self) -> dict[str, np.ndarray]:
        """The first ``keep`` training images of each identity, ``uint8 [<= keep, size, size, channels]``."""
        return dict(self._previews)

    def results(self) -> dict:
        """Every metric of the identities added so far, from the features alone."""
        manifest, cfg = self.manifest, self.cfg
        names = [n for n in manifest.identities if n in self.gen_f]
        if not names:
            raise ValueError("no generated images for any identity of the dataset")
        gen_f, train_f, held_f = self.gen_f, self.train_f, self.held_f
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
            predicted = self.gen_pred[n]
            row["accuracy"] = M.identity_accuracy(predicted, n)
            row["predicted"] = {p: predicted.count(p) for p in sorted(set(predicted))}
            per[n] = row

        # the classifier's own accuracy on real held-out images: a sanity check of the judge
        held_names = [n for n in names if n in held_f]
        judged = [self.held_pred[n] for n in held_names]
        hits = sum(p == n for n, preds in zip(held_names, judged) for p in preds)
        total = sum(len(p) for p in judged)
        classifier = self.classifier
        clf_info = classifier.describe()
        clf_info["accuracy_on_real_heldout"] = hits / total if total else None
        if isinstance(classifier, CNNJudge) and classifier.name == "digits-cnn":
            clf_info["note"] = ("held-out images of Digits-IT2I are load_digits images the CNN was trained on; "
                                "its accuracy on unseen load_digits images is measured in tests/test_metrics.py")
        elif isinstance(classifier, CNNJudge):
            clf_info["note"] = ("trained on fresh renders of these identities, none of them a dataset image: the "
                                "held-out accuracy above is on images it never saw (tests/test_faces_judge.py)")

        summary = M.summarize(per, METRICS, few)
        real_predicted = {n: {p: preds.count(p) for p in sorted(set(preds))} for n, preds in zip(held_names, judged)}
        bleed = identity_bleed(per, few, real_predicted)  # adds each identity's top bleed target to its row
        encoder = self.encoder
        return {
            "summary": summary,
            "per_identity": per,
            "identities": names,
            "few_shot_identities": [n for n in names if n in few],
            "bleed": bleed,
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
            "resolution": self.size,
            "config": cfg.to_dict(),
        }
