"""Read a user's image-caption-identity dataset into validated records.

This is the first stage of the pipeline (raw dataset -> shards -> ...): everything
downstream trusts these records, so every problem is found here, once, with a message
that names the file (and, for a metadata table, the row and field) so the user can fix
the data rather than debug a crash deep in sharding or training.

Two layouts are accepted under ``root``:

1. ``root/metadata.csv`` with columns ``image,caption,identity`` and an optional
   ``split`` column (``train``/``heldout``, default ``train``). ``image`` is relative to
   ``root`` (absolute paths are allowed).
2. Otherwise one folder per identity, ``root/<identity>/*.{png,jpg,jpeg,bmp,webp}``,
   with optional captions in ``root/<identity>/captions.csv`` (columns ``image,caption``).
   Images without a caption get ``"An image of {identity}."``, the evaluation prompt.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IDENTITY_PROMPT = "An image of {name}."  # the evaluation prompt (PoGDiff Sec. 4.1)
METADATA = "metadata.csv"
CAPTIONS = "captions.csv"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
SPLITS = ("train", "heldout")
ON_BAD = ("raise", "skip")
_MAX_LISTED = 20


@dataclass(frozen=True)
class Record:
    """One valid sample. ``key`` is unique and webdataset-safe ([A-Za-z0-9_-], no dots),
    because webdataset splits a member name at its first dot."""

    key: str
    image: Path
    caption: str
    identity: str
    split: str


@dataclass
class DatasetRecords:
    """The valid records of a dataset plus what was skipped and what looks risky."""

    root: Path
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def identities(self) -> list[str]:
        return sorted({r.identity for r in self.records})

    def train(self) -> list[Record]:
        return [r for r in self.records if r.split == "train"]

    def heldout(self) -> list[Record]:
        return [r for r in self.records if r.split == "heldout"]

    def counts(self, split: str = "train") -> dict[str, int]:
        """Images per identity in ``split`` (identities absent from it are omitted)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.split == split:
                out[r.identity] = out.get(r.identity, 0) + 1
        return dict(sorted(out.items()))


def slugify(text: str) -> str:
    """Lower-case ``text`` and map every run of unsafe characters to one '_'."""
    slug = re.sub(r"[^a-z0-9_-]+", "_", text.strip().lower()).strip("_")
    return slug or "x"


def check_image(path: Path) -> str | None:
    """Return why ``path`` is not a usable image, or None. ``load()`` forces a full
    decode: ``Image.open`` alone reads only the header and misses truncated files."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad data
        return f"cannot decode image {path}: {type(e).__name__}: {e}"
    return None


def load_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    """Decode ``path`` to float32 ``[channels, resolution, resolution]`` in [-1, 1].

    Center-crops to a square first so non-square photos are not distorted, then
    resizes with Lanczos (sharp on downsampling, smooth on upsampling).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr / 127.5 - 1.0)


def read_dataset(root: str | Path, on_bad: str = "raise") -> DatasetRecords:
    """Read and validate the dataset under ``root`` (layout chosen by ``metadata.csv``).

    ``on_bad="raise"`` raises one ``ValueError`` listing every bad item, so a user fixes
    the data in one pass; ``on_bad="skip"`` drops them into ``skipped`` and raises only
    if nothing valid is left.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a directory")
    table = root / METADATA
    rows, bad = _read_table(table) if table.is_file() else _read_folders(root)
    if bad and on_bad == "raise":
        raise ValueError(_format_bad(root, bad))
    if not rows:
        why = f"; all {len(bad)} items were bad:\n{_format_bad(root, bad)}" if bad else ""
        raise ValueError(f"dataset at {root} has no valid images{why}")
    records = _with_keys(rows)
    return DatasetRecords(root, records, bad, _warnings(records))


# A row before it gets its key: (image, caption, identity, split).
_Row = tuple[Path, str, str, str]
_Bad = list[tuple[str, str]]


def _read_table(table: Path) -> tuple[list[_Row], _Bad]:
    """Layout 1. Rows are numbered from 1 after the header line."""
    rows: list[_Row] = []
    bad: _Bad = []
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image", "caption", "identity") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{table}: missing column(s) {', '.join(missing)}; "
                             f"found {reader.fieldnames or []}, expected image,caption,identity[,split]")
        for n, row in enumerate(reader, start=1):
            ref = f"{table.name} row {n}"
            problems = []
            for col in ("image", "caption", "identity"):
                if not (row.get(col) or "").strip():
                    problems.append(f"field '{col}' is empty")
            split = (row.get("split") or "").strip() or "train"
            if split not in SPLITS:
                problems.append(f"field 'split' is {split!r}, expected one of {SPLITS}")
            image = (row.get("image") or "").strip()
            path = Path(os.path.abspath(table.parent / image)) if image else None
            if path is not None:
                why = check_image(path)
                if why:
                    problems.append(f"field 'image': {why}")
            if problems:
                bad.append((ref, "; ".join(problems)))
            else:
                rows.append((path, row["caption"].strip(), row["identity"].strip(), split))
    return rows, bad


def _read_folders(root: Path) -> tuple[list[_Row], _Bad]:
    """Layout 2: sorted identity folders, sorted files, all in the train split."""
    rows: list[_Row] = []
    bad: _Bad = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        identity = folder.name
        captions = _read_captions(folder / CAPTIONS, bad)
        images = sorted(p for p in folder.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        names = {p.name for p in images}
        for name in sorted(set(captions) - names):
            bad.append((f"{folder.name}/{CAPTIONS}", f"caption for {name!r} but no such image in {folder}"))
        for path in images:
            why = check_image(path)
            if why:
                bad.append((f"{folder.name}/{path.name}", why))
            else:
                caption = captions.get(path.name) or IDENTITY_PROMPT.format(name=identity)
                rows.append((path, caption, identity, "train"))
    return rows, bad


def _read_captions(path: Path, bad: _Bad) -> dict[str, str]:
    """Optional per-folder captions; bad rows go to ``bad`` and fall back to the default."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected image,caption")
        out = {}
        for n, row in enumerate(reader, start=1):
            image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not image or not caption:
                field_ = "image" if not image else "caption"
                bad.append((f"{path.parent.name}/{CAPTIONS} row {n}", f"field '{field_}' is empty"))
            else:
                out[image] = caption
    return out


def _with_keys(rows: list[_Row]) -> list[Record]:
    """Key = ``{identity_slug}-{stem_slug}`` (stem kept as is if already prefixed),
    made unique with ``_2``, ``_3``... in row order, so keys are stable across reads."""
    seen: set[str] = set()
    records = []
    for path, caption, identity, split in rows:
        ident, stem = slugify(identity), slugify(path.stem)
        base = stem if stem.startswith(f"{ident}-") else f"{ident}-{stem}"
        key, i = base, 1
        while key in seen:
            i += 1
            key = f"{base}_{i}"
        seen.add(key)
        records.append(Record(key, path, caption, identity, split))
    return records


def _warnings(records: list[Record]) -> list[str]:
    """PoGDiff's neighbour borrowing needs >= 2 training images per minority identity."""
    train: dict[str, int] = {}
    for r in records:
        train[r.identity] = train.get(r.identity, 0) + (r.split == "train")
    out = []
    for identity, n in sorted(train.items()):
        if n == 0:
            out.append(f"identity {identity!r} has no training images (held-out only)")
        elif n == 1:
            out.append(f"identity {identity!r} has a single training image; "
                       "PoGDiff needs >= 2 per minority identity")
    return out


def _format_bad(root: Path, bad: _Bad) -> str:
    lines = [f"{len(bad)} bad item(s) in dataset {root}:"]
    lines += [f"  {ref}: {why}" for ref, why in bad[:_MAX_LISTED]]
    if len(bad) > _MAX_LISTED:
        lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
    return "\n".join(lines)
