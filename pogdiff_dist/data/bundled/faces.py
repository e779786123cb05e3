"""Faces-IT2I: a bundled, download-free dataset of procedurally drawn faces.

Digits are a poor stand-in for the paper's face datasets: a cross-identity neighbour of
a digit is just another digit, while faces of different people share one structure and
differ in details, which is what PoGDiff's neighbour borrowing relies on. Here, as in
the synthetic DigiFace, every identity is a vector of traits (face and jaw shape, skin
tone, hair style and colour, eye spacing and size, eyebrows, nose, mouth, glasses,
facial hair) drawn once from a fixed seed, and every image of it varies the nuisances:
pose (tilt, shift, scale), expression, lighting direction and background colour.

Captions name the identity and describe only what varies per image, e.g.
``"An image of Mara Quill, smiling, head tilted left, lit from the right, on a blue
background."``: the evaluation prompt ``"An image of {name}."`` is a prefix, the name is
the only carrier of identity, and captions vary within an identity (METHOD.md).
"Left" and "right" are as seen in the image.

Presets: ``S``, ``M``, ``L`` mirror Digits-IT2I (``M``: 3 x 30 + 7 x 2 training images),
drawn from 16 target identities. ``base`` is the pretraining population of the benchmark
protocol: 24 other identities with other names (no first name or surname shared with
the targets) and traits that differ from every target in at least two salient traits,
balanced at 20 training images each. A base model trained on it can draw faces; it has
never seen the names it is then fine-tuned on.

Determinism: identities depend on nothing but this module; image ``j`` of an identity in
a split depends only on ``(seed, identity, split, j)``, so presets nest (``S``'s images
are ``M``'s) and changing the held-out count leaves training images untouched.

The output is layout 1 of :mod:`pogdiff_dist.data.records` (``metadata.csv`` + images).
Run ``python -m pogdiff_dist.data.bundled.faces --preset M --out faces_grid.png`` to look at it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pogdiff_dist.data.bundled.base import Bundled, JudgeSpec, build_params, write_build
from pogdiff_dist.data.bundled.faces_render import (
    BASE_NAMES,
    RENDER_VERSION,
    TARGET_NAMES,
    Identity,
    Variation,
    caption_for,
    identities,
    render,
    sample_variation,
)
from pogdiff_dist.data.records import slugify

STAMP = "faces_it2i.json"
# the dataset's drawing, re-exported: part of this module's API
__all__ = ["BASE_NAMES", "DATASET", "PRESETS", "RENDER_VERSION", "STAMP", "TARGET_NAMES", "Identity", "Variation",
           "build_faces_it2i", "caption_for", "identities", "image_variation", "judge_spec", "main", "preview_grid",
           "render", "render_faces", "sample_variation"]


@dataclass(frozen=True)
class Preset:
    """Training images per identity, in order; identities not listed are not in it."""

    train_counts: dict[str, int]
    description: str


def _counts(names, counts) -> dict[str, int]:
    assert len(counts) <= len(names)
    return dict(zip(names, counts))


_L_COUNTS = (100, 80, 60, 45, 35, 30, 25, 20, 15, 10, 8, 6, 4, 3, 2, 2)
PRESETS: dict[str, Preset] = {
    "S": Preset(_counts(TARGET_NAMES, (30, 2)), "2 identities: one majority (30), one minority (2)"),
    "M": Preset(_counts(TARGET_NAMES, (30,) * 3 + (2,) * 7),
                "10 identities: 3 majority (30 each), 7 minority (2 each), 104 images"),
    "L": Preset(_counts(TARGET_NAMES, _L_COUNTS),
                f"16 identities, long tail: 100 ... 2 ({sum(_L_COUNTS)} images)"),
    # identities 11-16 (not in S or M, not in base): choose hyperparameters here, report on M
    "val": Preset(_counts(TARGET_NAMES[10:16], (30,) * 2 + (2,) * 4),
                  "6 other identities: 2 majority (30 each), 4 minority (2 each): the validation split for M"),
    "base": Preset(_counts(BASE_NAMES, (20,) * len(BASE_NAMES)),
                   f"{len(BASE_NAMES)} other identities, 20 images each: the balanced pretraining population"),
}
_SPLIT_CODE = {"train": 0, "heldout": 1}


def image_variation(name: str, split: str, j: int, seed: int) -> Variation:
    """The variation of image ``j`` of ``name`` in ``split``: independent of the preset."""
    number = list(identities()).index(name)
    return sample_variation(np.random.default_rng([seed, number, _SPLIT_CODE[split], j]))


def _plan(preset: Preset, heldout: int):
    for name, n_train in preset.train_counts.items():
        for split, n in (("train", n_train), ("heldout", heldout)):
            for j in range(n):
                yield name, split, j


def build_faces_it2i(root: str | Path, preset: str = "M", resolution: int = 32, seed: int = 0,
                     heldout_per_identity: int = 20) -> Path:
    """Write ``root/images/<slug>/<slug>-<split>-<j>.png`` and ``root/metadata.csv``.

    Deterministic for a given ``seed``; idempotent (a ``faces_it2i.json`` stamp, see
    :func:`pogdiff_dist.data.bundled.base.write_build`).
    """
    params = build_params(PRESETS, preset, resolution, seed, heldout_per_identity, render_version=RENDER_VERSION)

    def rows():
        people = identities()
        for name, split, j in _plan(PRESETS[preset], heldout_per_identity):
            var = image_variation(name, split, j, seed)
            rel = (Path("images") / slugify(name) / f"{slugify(name)}-{split}-{j:03d}.png").as_posix()
            yield rel, Image.fromarray(render(people[name], var, resolution), mode="RGB"), caption_for(name, var), \
                name, split

    return write_build(root, STAMP, params, asdict(PRESETS[preset]), rows)


JUDGE_SPLIT = 2  # the judge's renders: the dataset's own images use split codes 0 (train), 1 (heldout)
JUDGE_VERSION = f"v2r{RENDER_VERSION}"  # bump when the judge's network, input or training changes
JUDGE_MAX_INPUT = 32  # the CNN's input side: the evaluation resolution, at most this


def render_faces(names, resolution: int, per_identity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fresh renders for the judge: ``per_identity`` images of each of ``names`` (labels index
    ``names``), ``uint8 [N, R, R, 3]``. Image ``j`` of an identity varies with
    ``default_rng([seed, identity number, JUDGE_SPLIT, j])``, a seed no image of the dataset
    uses (:func:`image_variation`: split 0 or 1), so the judge never sees a dataset image."""
    people = identities()
    number = {n: i for i, n in enumerate(people)}
    images, labels = [], []
    for k, name in enumerate(names):
        for j in range(per_identity):
            var = sample_variation(np.random.default_rng([seed, number[name], JUDGE_SPLIT, j]))
            images.append(render(people[name], var, resolution))
            labels.append(k)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def judge_spec(identities_: list[str], resolution: int, channels: int = 3, per_identity: int = 250) -> JudgeSpec:
    """N-way CNN over exactly the identities it judges (classes in sorted name order), trained
    on ``per_identity`` fresh renders of each: light augmentation (shift +-4%, scale +-5%,
    edge padding, pixel noise std 0.02), since poses already vary in the renders."""
    names = sorted(set(identities_))
    unknown = sorted(set(names) - set(identities()))
    if unknown:
        raise ValueError(f"classifier 'faces' needs Faces-IT2I identities; {unknown[:3]} are not")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return JudgeSpec(
        name="faces-cnn", version=JUDGE_VERSION, classes=tuple(names), class_of={n: n for n in names},
        resolution=resolution, channels=channels, input_size=min(resolution, JUDGE_MAX_INPUT), width=16, epochs=8,
        augment={"shift": 0.08, "scale": 0.05, "padding_mode": "border", "noise": 0.02},
        trained_on=f"fresh Faces-IT2I renders ({per_identity} per identity, balanced; variation seeds "
                   f"[seed, identity, {JUDGE_SPLIT}, j], disjoint from the dataset's images)",
        training_set=lambda: render_faces(names, resolution, per_identity),
        extra={"per_identity": per_identity, "render_version": RENDER_VERSION})


def preview_grid(preset: str = "M", per_identity: int = 8, resolution: int = 32, seed: int = 0,
                 zoom: int = 3) -> Image.Image:
    """One row per identity: its training images, then (after a gap) held-out images
    up to ``per_identity`` in all, each enlarged ``zoom`` times, the name on the left."""
    people = identities()
    cell, gap, label = resolution * zoom, 4, 120
    counts = PRESETS[preset].train_counts
    grid = Image.new("RGB", (label + per_identity * (cell + gap) + 2 * gap, len(counts) * (cell + gap) + gap),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, (name, n_train) in enumerate(counts.items()):
        top = gap + row * (cell + gap)
        draw.text((4, top + cell // 2 - 12), f"{name}\n{n_train} train", fill=(0, 0, 0))
        n_show = min(n_train, per_identity)
        items = [("train", j) for j in range(n_show)] + [("heldout", j) for j in range(per_identity - n_show)]
        for col, (split, j) in enumerate(items):
            pixels = render(people[name], image_variation(name, split, j, seed), resolution)
            tile = Image.fromarray(pixels, mode="RGB").resize((cell, cell), Image.Resampling.NEAREST)
            left = label + col * (cell + gap) + (2 * gap if split == "heldout" else 0)
            grid.paste(tile, (left, top))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a preview grid of Faces-IT2I: one row per identity.")
    parser.add_argument("--preset", default="M", choices=sorted(PRESETS))
    parser.add_argument("--out", default="faces_grid.png")
    parser.add_argument("--per-identity", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=3)
    args = parser.parse_args(argv)
    preview_grid(args.preset, args.per_identity, args.resolution, args.seed, args.zoom).save(args.out)
    print(f"wrote {args.out}: {PRESETS[args.preset].description}")


DATASET = Bundled("faces-it2i", tuple(PRESETS), build_faces_it2i, lambda: set(identities()), judge_spec)


if __name__ == "__main__":
    main()
