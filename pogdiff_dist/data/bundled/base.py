"""What the bundled datasets share: the dataset and judge descriptions, and the build writer."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff_dist.data.layouts import BUILD_STAMPS, METADATA


@dataclass(frozen=True)
class JudgeSpec:
    """What a dataset's CNN judge is trained on and how (read by ``CNNJudge``)."""

    name: str  # "digits-cnn", "faces-cnn": the classifier name in metrics.json
    version: str  # bumped when the network, its input, its training or the renders change
    classes: tuple[str, ...]  # what the CNN separates
    class_of: dict[str, str]  # evaluated identity -> its class
    resolution: int
    channels: int
    input_size: int
    width: int  # filters of the first conv block
    epochs: int
    augment: dict  # shift / scale / padding_mode / noise of the training augmentation
    trained_on: str
    training_set: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False, compare=False)
    extra: dict = field(default_factory=dict)  # recorded in the judge's info


@dataclass(frozen=True)
class Bundled:
    name: str  # "digits-it2i"
    presets: tuple[str, ...]
    build: Callable[..., Path]  # (root, preset, resolution, seed, heldout_per_identity) -> root
    names: Callable[[], set[str]]  # every identity name the dataset can produce
    judge_spec: Callable[[list[str], int, int], JudgeSpec]  # (identities, resolution, channels)


# ----------------------------------------------------------------------------- the builds' shared writer

Row = tuple[str, Image.Image, str, str, str]  # relative path, image, caption, identity, split


def build_params(presets, preset: str, resolution: int, seed: int, heldout_per_identity: int, **extra) -> dict:
    """The validated parameters of a build (what its stamp records)."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    if heldout_per_identity < 0:
        raise ValueError(f"heldout_per_identity must be >= 0, got {heldout_per_identity}")
    return {"preset": preset, "resolution": resolution, "seed": seed, "heldout_per_identity": heldout_per_identity,
            **extra}


def write_build(root: str | Path, stamp_name: str, params: dict, preset_info: dict,
                rows: Callable[[], Iterable[Row]]) -> Path:
    """Write ``root/<images>`` and ``root/metadata.csv`` from ``rows()``, then the stamp.

    Idempotent: the stamp, written last, records ``params``; a matching stamp next to
    ``metadata.csv`` means the build is complete and is returned as is. Any bundled stamp
    (``*_it2i.json``, of either dataset) marks the folder as a bundled build: its images are
    removed before a rebuild.
    """
    root = Path(root)
    stamp = root / stamp_name
    if (root / METADATA).is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("params") == params:
        return root
    stamps = list(root.glob(BUILD_STAMPS)) if root.is_dir() else []
    if stamps:
        shutil.rmtree(root / "images", ignore_errors=True)  # a bundled build (stamped): drop stale images
        for s in stamps:
            s.unlink()
    table = []
    for rel, image, caption, identity, split in rows():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
        table.append((rel, caption, identity, split))
    tmp = root / (METADATA + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "caption", "identity", "split"))
        writer.writerows(table)
    os.replace(tmp, root / METADATA)
    stamp.write_text(json.dumps({"params": params, "preset": preset_info}, indent=1))
    return root
