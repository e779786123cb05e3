"""Digits-IT2I: a bundled, download-free imbalanced image-caption-identity dataset.

Built from scikit-learn's ``load_digits()`` (1797 8x8 images, ~180 per class): each
digit class becomes a person-like identity with a generic name, as the paper masks real
names. Presets mirror AgeDB-IT2I's sizes (S, M, L). Captions name the identity and
describe the image (stroke weight, slant, size) so they vary within an identity: the
probe in METHOD.md shows identical per-identity captions let vanilla fine-tuning
memorise the minority, which leaves nothing for PoGDiff to fix.

``base`` is the pretraining population of the benchmark protocol: all ten classes, 20
training images each, under ten other names (``BASE_NAMES``), drawn from images S, M
and L do not use (see :func:`_select` for the one exception). A base model learns to
draw every digit but never sees the names S, M and L fine-tune on. Digits cannot give it
other *identities* (there are only ten classes); Faces-IT2I
(:mod:`pogdiff_dist.data.bundled.faces`) can.

The output is layout 1 of :mod:`pogdiff_dist.data.records` (``metadata.csv`` + images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff_dist.data.bundled.base import Bundled, JudgeSpec, build_params, write_build
from pogdiff_dist.data.records import slugify

STAMP = "digits_it2i.json"

# One generic name per digit class 0..9.
NAMES: tuple[str, ...] = (
    "Alice Moreau", "Bruno Silva", "Chloe Novak", "Daniel Okafor", "Elena Petrova",
    "Farid Haddad", "Grace Lindqvist", "Hugo Tanaka", "Ines Carvalho", "Jonas Weber",
)
# The same classes under other names, for the "base" preset; no first name or surname is shared.
BASE_NAMES: tuple[str, ...] = (
    "Kira Lund", "Leon Duarte", "Maya Kowalski", "Nils Arendt", "Olga Brenner",
    "Pablo Reyes", "Quinn Adair", "Rosa Bianchi", "Stefan Holm", "Tara Mehta",
)

# A third set of names, for the "val" preset (hyperparameters are chosen on it, never on M).
VAL_NAMES: tuple[str, ...] = (
    "Anya Sorel", "Boris Lemaire", "Carmen Ibarra", "Dmitri Falk", "Esme Thorne",
    "Felix Nakamura", "Gemma Roux", "Hamid Farouk", "Iris Vallen", "Joel Brandt",
)


@dataclass(frozen=True)
class Preset:
    """Training images per digit class; classes not listed are not in the dataset.
    ``from_end``: take images from the end of each class's permutation instead of the
    start; ``skip``: (prefix presets) leave the first ``skip`` images of the permutation
    to the other presets (see :func:`_select`)."""

    train_counts: dict[int, int]
    description: str
    names: tuple[str, ...] = NAMES
    from_end: bool = False
    skip: int = 0


PRESETS: dict[str, Preset] = {
    "S": Preset({0: 30, 1: 2}, "2 identities: digit 0 majority (30), digit 1 minority (2)"),
    "M": Preset({d: 30 if d < 3 else 2 for d in range(10)},
                "10 identities: digits 0, 1, 2 majority (30 each), digits 3-9 minority (2 each)"),
    "L": Preset(dict(enumerate((120, 90, 60, 45, 30, 20, 10, 5, 3, 2))),
                "10 identities, long tail: digit 0 has 120 ... digit 9 has 2 (385 in all)"),
    "base": Preset({d: 20 for d in range(10)},
                   "10 identities under BASE_NAMES, 20 each: the balanced pretraining population",
                   names=BASE_NAMES, from_end=True),
    # digits are 10 classes, so val reuses them under other names and other images
    "val": Preset({0: 30, 1: 30, 3: 2, 5: 2, 7: 2, 9: 2},
                  "6 identities under VAL_NAMES: digits 0, 1 majority (30 each), 3, 5, 7, 9 minority (2 each); "
                  "images 60+ of each class's permutation: the validation split for M",
                  names=VAL_NAMES, skip=60),
}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def _descriptors(images: np.ndarray) -> np.ndarray:
    """Raw ``[N, 3]`` (ink mass, slant, bounding-box area) of 8x8 images in 0..16.

    Slant is the shear ``-mu11 / mu02`` of the intensity-weighted second moments
    (rows grow downwards, so a stroke leaning right has negative row-column covariance).
    """
    images = images.reshape(-1, 8, 8)
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float64)
    mass = images.sum(axis=(1, 2))
    m = np.maximum(mass, 1e-9)
    r0 = (images * rows).sum(axis=(1, 2)) / m
    c0 = (images * cols).sum(axis=(1, 2)) / m
    dr, dc = rows - r0[:, None, None], cols - c0[:, None, None]
    mu11 = (images * dr * dc).sum(axis=(1, 2)) / m
    mu02 = (images * dr * dr).sum(axis=(1, 2)) / m
    slant = -mu11 / np.maximum(mu02, 1e-9)
    ink = images >= 4
    height = ink.any(axis=2).sum(axis=1)
    width = ink.any(axis=1).sum(axis=1)
    return np.stack([mass, slant, height * width], axis=1).astype(np.float64)


@lru_cache(maxsize=1)
def _thresholds() -> dict[str, tuple[float, ...]]:
    """Cut points from the whole load_digits set, so a caption never depends on the
    preset, seed or split that happened to include the image."""
    mass, slant, area = _descriptors(_digits()[0]).T
    return {
        "mass": tuple(np.quantile(mass, [1 / 3, 2 / 3])),
        "slant": tuple(np.quantile(slant, [1 / 3, 2 / 3])),
        "area": (float(np.median(area)),),
    }


def caption_for(image8x8: np.ndarray, name: str) -> str:
    """``"An image of {name}, <weight> strokes, <slant>, <size>."``: the evaluation
    prompt ``"An image of {name}."`` is a prefix, and the tail varies per image."""
    mass, slant, area = _descriptors(np.asarray(image8x8, dtype=np.float64))[0]
    t = _thresholds()
    weight = ("thin", "medium", "bold")[int(np.searchsorted(t["mass"], mass, side="right"))]
    lean = ("slanted left", "upright", "slanted right")[int(np.searchsorted(t["slant"], slant, side="right"))]
    size = "small" if area < t["area"][0] else "large"
    return f"An image of {name}, {weight} strokes, {lean}, {size}."


def _to_png(image8x8: np.ndarray, resolution: int) -> Image.Image:
    """Scale 0..16 to 0..255 and upsample bicubically to ``resolution`` squared."""
    pixels = np.clip(np.rint(image8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((resolution, resolution), Image.Resampling.BICUBIC)


def _select(preset: Preset, seed: int, heldout: int) -> list[tuple[int, str, int]]:
    """(digit, split, source index) triples, held-out drawn first from one permutation
    per class so train and held-out are disjoint by construction.

    Every preset draws the same permutation of a class for the same ``seed`` (one
    generator, classes in order), and S, M, L take prefixes of it: held-out first, then
    training images (``val`` the same after skipping 60). ``base`` takes a suffix: training
    images last, its held-out just before them. For one ``seed`` and held-out count h (S/M/L) and h' (base), base's
    training images never meet S, M or L while h <= 38 (the tightest class: digit 0,
    178 images, 120 for L); its held-out images meet L's digit-0 training images only
    if h + h' > 38: at the default h = h' = 20, two digit-0 images that L trains on are
    among base's held-out images (never among its training images). Different seeds
    for base and S/M/L give unrelated permutations: overlaps are then by chance.
    """
    _, target = _digits()
    rng = np.random.default_rng(seed)
    out = []
    for digit in range(10):  # every class's permutation is drawn, in order, whichever classes the preset has
        pool = np.flatnonzero(target == digit)
        perm = rng.permutation(pool)
        if digit not in preset.train_counts:
            continue
        n_train = preset.train_counts[digit]
        if preset.skip + n_train + heldout > len(pool):
            raise ValueError(f"digit {digit} has {len(pool)} images, cannot take {n_train} train "
                             f"+ {heldout} held-out")
        if preset.from_end:
            end = len(perm) - n_train
            train, held = perm[end:], perm[end - heldout:end]
        else:
            s = preset.skip
            train, held = perm[s + heldout:s + heldout + n_train], perm[s:s + heldout]
        out += [(digit, "train", int(i)) for i in sorted(train)]
        out += [(digit, "heldout", int(i)) for i in sorted(held)]
    return out


def build_digits_it2i(root: str | Path, preset: str = "M", resolution: int = 32, seed: int = 0,
                      heldout_per_identity: int = 20) -> Path:
    """Write ``root/images/<slug>/<slug>-<source index>.png`` and ``root/metadata.csv``.

    Deterministic for a given ``seed``; idempotent (a ``digits_it2i.json`` stamp, see
    :func:`pogdiff_dist.data.bundled.base.write_build`).
    """
    params = build_params(PRESETS, preset, resolution, seed, heldout_per_identity)

    def rows():
        images, _ = _digits()
        for digit, split, src in _select(PRESETS[preset], seed, heldout_per_identity):
            name = PRESETS[preset].names[digit]
            rel = (Path("images") / slugify(name) / f"{slugify(name)}-{src:04d}.png").as_posix()
            yield rel, _to_png(images[src], resolution), caption_for(images[src], name), name, split

    return write_build(root, STAMP, params, asdict(PRESETS[preset]), rows)


def digit_names() -> dict[str, int]:
    """Identity name -> digit class, for every naming Digits-IT2I uses (its presets, the
    ``base`` pretraining population and the ``val`` split)."""
    out = {}
    for names in (NAMES, BASE_NAMES, VAL_NAMES):
        out.update({n: d for d, n in enumerate(names)})
    return out


def render_digits(resolution: int, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """load_digits images as Digits-IT2I writes them (0..16 -> 0..255, bicubic to
    ``resolution``): ``uint8 [N, R, R, 1]`` and digit labels ``[N]``."""
    images, target = _digits()
    idx = np.arange(len(target)) if indices is None else np.asarray(indices)
    return (np.stack([np.asarray(_to_png(im, resolution)) for im in images[idx]])[..., None],
            target[idx].astype(np.int64))


JUDGE_VERSION = "v2"  # bump when the judge's network, input or training changes
JUDGE_INPUT = 16  # the CNN's input side: load_digits images hold 8x8 pixels of information


def judge_spec(identities: list[str], resolution: int, channels: int = 1) -> JudgeSpec:
    """The digit CNN: ten-way, trained on all 1,797 images of the balanced load_digits,
    rendered as the dataset renders them; an identity's class is its digit. Shift and
    scale augmentation: generated digits are rarely centred like load_digits' normalised ones."""
    names = digit_names()
    unknown = sorted(set(identities) - set(names))
    if unknown:
        raise ValueError(f"classifier 'digits' needs Digits-IT2I identities; {unknown[:3]} are not")
    return JudgeSpec(
        name="digits-cnn", version=JUDGE_VERSION, classes=tuple(str(d) for d in range(10)),
        class_of={n: str(names[n]) for n in identities}, resolution=resolution, channels=1, input_size=JUDGE_INPUT,
        width=32, epochs=12, augment={"shift": 0.15, "scale": 0.1},
        trained_on="scikit-learn load_digits (balanced, 10 classes)",
        training_set=lambda: render_digits(resolution))


DATASET = Bundled("digits-it2i", tuple(PRESETS), build_digits_it2i, lambda: set(digit_names()), judge_spec)
