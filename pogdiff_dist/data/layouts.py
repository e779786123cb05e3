"""The dataset layouts on disk: which files become which rows, and which files are left unused.

``data.dataset`` is a folder (the root) or a ``.csv`` table in it (its folder is the root).
Two layouts are accepted:

1. A table, ``root/metadata.csv`` (or any ``.csv`` given as ``data.dataset``), with columns ``image,identity``
   and optional ``caption`` and ``split`` (``train``/``heldout``, default ``train``).
   ``image`` is relative to the table's folder (absolute paths are allowed). A row with no
   caption column, or an empty caption, takes the image's caption file (below); with no
   caption column and no caption file it gets the default caption; an empty caption cell
   with no caption file is an error.
2. Otherwise one folder per identity, ``root/<identity>/*.{png,jpg,jpeg,bmp,webp}``. A
   folder named ``<repeats>_<name>`` (kohya-ss / ai-toolkit style: ``15_Leila``,
   ``3_Jonas Weber``) is identity ``<name>`` with ``<repeats>`` (>= 1) as that identity's
   repeat count: each of its images is seen ``repeats`` times per epoch under
   ``data.sampling=uniform`` (see :mod:`pogdiff_dist.data.sampling` for the other modes).
   A folder without a numeric prefix keeps its whole name and repeats 1; two folders
   giving the same name (``5_Leila`` and ``Leila``) are an error naming both. Captions come
   from ``root/<identity>/captions.csv`` (columns ``image,caption``) or a caption file.

A caption file is ``<image stem>.txt`` next to the image (``leila_000.png`` +
``leila_000.txt``), used as-is (surrounding whitespace stripped); an explicit caption (a
table cell, a ``captions.csv`` row) wins over it. An empty or unreadable caption file is a
bad item naming the file. Images with no caption at all get ``"An image of {identity}."``,
the evaluation prompt.

Files present but not used (another extension, a ``.txt`` without an image, a file at the
root of the folder layout, an image the table does not list, hidden files...) are listed,
grouped and counted, in ``unused`` and in the warnings prepare prints; nothing is dropped
silently.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

METADATA = "metadata.csv"
CAPTIONS = "captions.csv"
CAPTION_SUFFIX = ".txt"  # <image stem>.txt next to an image is its caption
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
SPLITS = ("train", "heldout")
BUILD_STAMPS = "*_it2i.json"  # a bundled build's stamp next to its metadata.csv (data/bundled): part of it
_REPEATS_FOLDER = re.compile(r"(\d+)_(.*)", re.DOTALL)  # kohya-ss: "<repeats>_<name>"
MAX_LISTED = 20


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


def locate_dataset(path: str | Path) -> tuple[Path, Path | None]:
    """``(root, table)`` of a dataset given as a folder or as its ``.csv`` table; ``table`` is
    None for the folder layout (no ``metadata.csv`` in the folder)."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise ValueError(f"{p} is a file but not a .csv table: give the dataset folder or its {METADATA}")
        return p.parent, p
    if not p.is_dir():
        raise ValueError(f"{p} does not exist")
    table = p / METADATA
    return p, table if table.is_file() else None


def parse_folder_name(name: str) -> tuple[str, int]:
    """An identity folder's name -> ``(identity, repeats)``: ``"15_Leila"`` -> ``("Leila", 15)``
    (kohya-ss ``<repeats>_<name>``), ``"Leila"`` -> ``("Leila", 1)``."""
    m = _REPEATS_FOLDER.fullmatch(name)
    if m is None:
        return name, 1
    repeats, identity = int(m.group(1)), m.group(2).strip()
    if not identity:
        raise ValueError(f"folder {name!r}: no identity name after the repeat count ('<repeats>_<name>')")
    if repeats < 1:
        raise ValueError(f"folder {name!r}: repeat count {repeats} must be >= 1 ('<repeats>_<name>')")
    return identity, repeats


# A row before it gets its key: (image, caption or None for the default, identity, split).
Row = tuple[Path, str | None, str, str]
_Bad = list[tuple[str, str]]


@dataclass
class Scan:
    """What reading a dataset found: valid rows, bad items, unused files, repeat counts."""

    root: Path
    rows: list[Row] = field(default_factory=list)
    bad: _Bad = field(default_factory=list)
    unused: list[tuple[str, str]] = field(default_factory=list)
    repeats: dict[str, int] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        """``path`` as the user knows it: relative to the root when inside it."""
        return os.path.relpath(path, self.root) if path.is_relative_to(self.root) else str(path)


def _caption_file(image: Path, sidecars: dict[str, Path] | None = None) -> tuple[str | None, Path | None, str | None]:
    """``(caption, path, problem)`` of the image's ``<stem>.txt`` (``sidecars``: its folder's,
    by stem; None: look next to the image). No file: all None."""
    txt = sidecars.get(image.stem) if sidecars is not None else _sidecar(image)
    if txt is None:
        return None, None, None
    try:
        caption = txt.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, txt, f"cannot read caption file: {type(e).__name__}: {e}"
    return (caption, txt, None) if caption else (None, txt, f"caption file is empty (caption of {image.name})")


def _sidecar(image: Path) -> Path | None:
    for suffix in (CAPTION_SUFFIX, CAPTION_SUFFIX.upper()):
        txt = image.with_suffix(suffix)
        if txt.is_file():
            return txt
    return None


def read_table(table: Path, scan: Scan) -> None:
    """Layout 1. Rows are numbered from 1 after the header line."""
    used: set[Path] = {table}
    explicit: set[Path] = set()  # images whose row gives a caption: their caption file is not read
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("image", "identity") if c not in columns]
        if missing:
            raise ValueError(f"{table}: missing column(s) {', '.join(missing)}; "
                             f"found {columns}, expected image,identity[,caption][,split]")
        for n, row in enumerate(reader, start=1):
            ref = f"{table.name} row {n}"
            problems = []
            for col in ("image", "identity"):
                if not (row.get(col) or "").strip():
                    problems.append(f"field '{col}' is empty")
            split = (row.get("split") or "").strip() or "train"
            if split not in SPLITS:
                problems.append(f"field 'split' is {split!r}, expected one of {SPLITS}")
            image = (row.get("image") or "").strip()
            path = Path(os.path.abspath(table.parent / image)) if image else None
            caption = (row.get("caption") or "").strip()
            if path is not None:
                used.add(path)
                why = check_image(path)
                if why:
                    problems.append(f"field 'image': {why}")
                elif caption:
                    explicit.add(path)
                else:
                    caption, txt, bad_txt = _caption_file(path)
                    if txt is not None:
                        used.add(txt)
                    if bad_txt:
                        problems.append(f"{scan.rel(txt)}: {bad_txt}")
                    elif txt is None and "caption" in columns:
                        problems.append(f"field 'caption' is empty and there is no caption file "
                                        f"{path.stem}{CAPTION_SUFFIX} next to the image")
            if problems:
                scan.bad.append((ref, "; ".join(problems)))
            else:
                scan.rows.append((path, caption or None, row["identity"].strip(), split))
    _unused_under_table(table, used, explicit, scan)


def _unused_under_table(table: Path, used: set[Path], explicit: set[Path], scan: Scan) -> None:
    """Every file under the table's folder that no row uses, hidden ones included."""
    explicit_stems = {p.with_suffix("") for p in explicit}
    listed_stems = {p.with_suffix("") for p in used}
    for dirpath, dirnames, filenames in os.walk(scan.root):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                scan.unused.append((scan.rel(here / d) + "/", _HIDDEN))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = here / name
            if path in used or (here == scan.root and path.match(BUILD_STAMPS)):
                continue
            suffix = path.suffix.lower()
            if name.startswith("."):
                why = _HIDDEN
            elif suffix in IMAGE_SUFFIXES:
                why = f"image not listed in {table.name}"
            elif suffix == CAPTION_SUFFIX and path.with_suffix("") in explicit_stems:
                why = f"caption file overridden: {table.name} gives the image's caption"
            elif suffix == CAPTION_SUFFIX and path.with_suffix("") in listed_stems:
                continue  # the caption of a row reported as bad
            elif suffix == CAPTION_SUFFIX:
                why = f"caption file without an image listed in {table.name}"
            else:
                why = _NOT_DATA
            scan.unused.append((scan.rel(path), why))


_HIDDEN = "hidden (name starts with '.')"
_AT_ROOT = "at the dataset root; images go in <root>/<identity>/ or <root>/<repeats>_<identity>/ folders"
_NESTED = "folder inside an identity folder; images must sit in the identity folder itself"
_NOT_DATA = f"neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a caption file ({CAPTION_SUFFIX})"


def read_folders(scan: Scan) -> None:
    """Layout 2: sorted identity folders, sorted files, all in the train split."""
    root = scan.root
    folders: dict[str, list[Path]] = {}  # identity -> its folders (more than one is an error)
    problems = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            scan.unused.append((entry.name + ("/" if entry.is_dir() else ""), _HIDDEN))
        elif not entry.is_dir():
            what = "image" if entry.suffix.lower() in IMAGE_SUFFIXES else "file"
            scan.unused.append((entry.name, f"{what} {_AT_ROOT}"))
        else:
            try:
                identity, repeats = parse_folder_name(entry.name)
            except ValueError as e:
                problems.append(str(e))
                continue
            folders.setdefault(identity, []).append(entry)
            if entry.name != identity:
                scan.repeats[identity] = repeats
    for identity, dirs in folders.items():
        if len(dirs) > 1:
            problems.append(f"folders {' and '.join(repr(d.name) for d in dirs)} both give identity "
                            f"{identity!r}: merge them into one")
    if problems:
        raise ValueError(f"dataset {root}: " + "; ".join(problems))
    for identity, (folder,) in sorted(folders.items(), key=lambda kv: kv[1][0].name):
        _read_identity_folder(folder, identity, scan)


def _read_identity_folder(folder: Path, identity: str, scan: Scan) -> None:
    captions = _read_captions(folder / CAPTIONS, scan.bad)
    entries = sorted(folder.iterdir())
    images = [p for p in entries
              if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")]
    sidecars = {p.stem: p for p in entries
                if p.suffix.lower() == CAPTION_SUFFIX and p.is_file() and not p.name.startswith(".")}
    names = {p.name for p in images}
    for name in sorted(set(captions) - names):
        scan.bad.append((f"{folder.name}/{CAPTIONS}", f"caption for {name!r} but no such image in {folder}"))
    stems = {p.stem for p in images}
    for p in entries:
        if p.name.startswith("."):
            scan.unused.append((scan.rel(p) + ("/" if p.is_dir() else ""), _HIDDEN))
        elif p.is_dir():
            scan.unused.append((scan.rel(p) + "/", _NESTED))
        elif p.suffix.lower() == CAPTION_SUFFIX and p.stem not in stems:
            scan.unused.append((scan.rel(p), "caption file without an image of the same name"))
        elif p.suffix.lower() not in IMAGE_SUFFIXES | {CAPTION_SUFFIX} and p.name != CAPTIONS:
            scan.unused.append((scan.rel(p), _NOT_DATA))
    if not images:
        scan.unused.append((scan.rel(folder) + "/", "identity folder with no images"))
    for path in images:
        why = check_image(path)
        if why:
            scan.bad.append((scan.rel(path), why))
            continue
        caption = captions.get(path.name)
        if caption is not None:
            if path.stem in sidecars:
                scan.unused.append((scan.rel(sidecars[path.stem]),
                                    f"caption file overridden: {CAPTIONS} gives the image's caption"))
        else:
            caption, txt, bad_txt = _caption_file(path, sidecars)
            if bad_txt:
                scan.bad.append((scan.rel(txt), bad_txt))
                continue
        scan.rows.append((path, caption, identity, "train"))


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


def unused_warnings(unused: list[tuple[str, str]]) -> list[str]:
    """One warning per reason, naming the files (the first few and a count per folder when
    there are many), so a misplaced file is seen rather than silently left out."""
    by_reason: dict[str, list[str]] = {}
    for path, why in unused:
        by_reason.setdefault(why, []).append(path)
    out = []
    for why, paths in by_reason.items():
        shown = paths if len(paths) <= MAX_LISTED else paths[:MAX_LISTED // 2]
        line = f"{len(paths)} item(s) not used ({why}): {', '.join(shown)}"
        if len(paths) > len(shown):
            folders: dict[str, int] = {}
            for p in paths:
                top = p.rstrip("/").rpartition("/")[0] or "."
                folders[top] = folders.get(top, 0) + 1
            top = sorted(folders.items(), key=lambda kv: -kv[1])
            by_folder = ", ".join(f"{d}/ {n}" for d, n in top[:MAX_LISTED // 2])
            more = f", {len(top) - MAX_LISTED // 2} more folder(s)" if len(top) > MAX_LISTED // 2 else ""
            line += f" ... and {len(paths) - len(shown)} more (per folder: {by_folder}{more})"
        out.append(line)
    return out
