"""Read a user's image-caption-identity dataset into validated records.

This is the first stage of the pipeline (raw dataset -> shards -> ...): everything
downstream trusts these records, so every problem is found here, once, with a message
that names the file (and, for a metadata table, the row and field) so the user can fix
the data rather than debug a crash deep in sharding or training.

The layouts (a ``metadata.csv`` table, a folder per identity, kohya-ss ``<repeats>_<name>``
folders, ``<image stem>.txt`` caption files) and the report of unused files are in
:mod:`pogdiff_dist.data.layouts`; this module turns what they read into keyed records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff_dist.data.layouts import (
    MAX_LISTED,
    METADATA,
    Row,
    Scan,
    locate_dataset,
    read_folders,
    read_table,
    unused_warnings,
)

IDENTITY_PROMPT = "An image of {name}."  # the evaluation prompt (PoGDiff Sec. 4.1)
ON_BAD = ("raise", "skip")
__all__ = ["IDENTITY_PROMPT", "METADATA", "DatasetRecords", "Record", "load_image", "read_dataset", "slugify"]


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
    # identity -> repeat count, for identities read from "<repeats>_<name>" folders (others: 1)
    repeats: dict[str, int] = field(default_factory=dict)
    unused: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, why not used)

    def identities(self) -> list[str]:
        return sorted({r.identity for r in self.records})

    def repeat(self, identity: str) -> int:
        return self.repeats.get(identity, 1)

    def train(self) -> list[Record]:
        return [r for r in self.records if r.split == "train"]

    def heldout(self) -> list[Record]:
        return [r for r in self.records if r.split == "heldout"]

    def identity_table(self) -> tuple[list[str], list[int], list[int]]:
        """The manifest's identities (sorted: identity_id is the position), their training
        images and their repeat counts."""
        identities, counts = self.identities(), self.counts("train")
        return identities, [counts.get(i, 0) for i in identities], [self.repeat(i) for i in identities]

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
    """Read and validate the dataset at ``root``: a folder (layout chosen by ``metadata.csv``)
    or a ``.csv`` table.

    ``on_bad="raise"`` raises one ``ValueError`` listing every bad item, so a user fixes
    the data in one pass; ``on_bad="skip"`` drops them into ``skipped`` and raises only
    if nothing valid is left. Problems with the layout itself (a missing column, a folder
    name that does not parse, two folders of one identity) raise either way.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    try:
        root, table = locate_dataset(root)
    except ValueError as e:
        raise ValueError(f"dataset {e}") from None
    scan = Scan(root)
    if table is not None:
        read_table(table, scan)
    else:
        read_folders(scan)
    if scan.bad and on_bad == "raise":
        raise ValueError(_format_bad(root, scan.bad))
    unused = unused_warnings(scan.unused)
    if not scan.rows:
        why = f"; all {len(scan.bad)} items were bad:\n{_format_bad(root, scan.bad)}" if scan.bad else ""
        seen = "".join(f"\n  {w}" for w in unused)
        raise ValueError(f"dataset at {root} has no valid images{why}{seen}")
    records = _with_keys(scan.rows)
    return DatasetRecords(root, records, scan.bad, _warnings(records) + unused, scan.repeats, scan.unused)


def _with_keys(rows: list[Row]) -> list[Record]:
    """Key = ``{identity_slug}-{stem_slug}`` (stem kept as is if already prefixed),
    made unique with ``_2``, ``_3``... in row order, so keys are stable across reads.
    A row without a caption gets the identity prompt."""
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
        records.append(Record(key, path, caption or IDENTITY_PROMPT.format(name=identity), identity, split))
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


def _format_bad(root: Path, bad: list[tuple[str, str]]) -> str:
    lines = [f"{len(bad)} bad item(s) in dataset {root}:"]
    lines += [f"  {ref}: {why}" for ref, why in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return "\n".join(lines)


