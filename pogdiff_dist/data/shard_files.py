"""The shard files themselves: checksums, sample counts and tar structure, read in one pass
(:func:`scan_shard`), and the check training runs before its first step (:func:`verify_shards`),
for shards on local disk or in object storage."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

from pogdiff_dist.data.shards import META_FIELD, Manifest
from pogdiff_dist.storage import Store, join


def _opened(source: str | Path | BinaryIO):
    """A path opened for reading, or an already open binary stream (closed after use)."""
    return open(source, "rb") if isinstance(source, (str, os.PathLike)) else source


class ShardScan(NamedTuple):
    """What one front-to-back read of a shard tells: its SHA-256, its samples (``.meta.json``
    members), the first member that is not a plain relative file, and a tar read error."""

    sha256: str
    rows: int
    odd_member: str | None
    tar_error: str | None


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        return data


def scan_shard(source: str | Path | BinaryIO) -> ShardScan:
    """Checksum, sample count and tar structure of a shard in a single read (a shard in a bucket
    is downloaded once, not once per check)."""
    rows, odd, error = 0, None, None
    with _opened(source) as f:
        hashing = _Hashing(f)
        try:
            with tarfile.open(fileobj=hashing, mode="r|") as tar:
                for member in tar:
                    p = PurePosixPath(member.name)
                    if odd is None and (not member.isfile() or p.is_absolute() or ".." in p.parts):
                        odd = member.name
                    rows += member.name.endswith("." + META_FIELD)
        except tarfile.TarError as e:
            error = str(e)
        while hashing.read(1 << 20):  # the rest (tar padding, or what followed a read error)
            pass
    return ShardScan(hashing.h.hexdigest(), rows, odd, error)


def count_shard_rows(source: str | Path | BinaryIO) -> int:
    """Samples in a shard (a path or a stream, read front to back): its ``.meta.json`` members."""
    return scan_shard(source).rows


def shard_row_counts(manifest: Manifest, prepared_dir: str | Path) -> list[int]:
    """Samples per shard, in ``manifest.shards`` order (counted from the tar headers for a
    manifest written before prepare recorded them)."""
    if all(s in manifest.shard_rows for s in manifest.shards):
        return [int(manifest.shard_rows[s]) for s in manifest.shards]
    store = Store(prepared_dir)
    return [count_shard_rows(store.open_input("shards", s)) for s in manifest.shards]


def file_digest(source: str | Path | BinaryIO) -> str:
    """SHA-256 of a file (a path or a stream, read front to back)."""
    h = hashlib.sha256()
    with _opened(source) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(shard_dir: str | Path, manifest: Manifest, checksum: bool = True) -> None:
    """Before training: every shard is present, complete and the one prepare wrote.

    ``shard_dir`` is a local folder or an object-storage URI. Checks size (cheap; catches
    truncation) and, with ``checksum``, SHA-256 and the tar structure: regular-file members
    only, no absolute or ``..`` names (nothing is ever extracted to disk, but such a member
    marks a shard that is not ours).
    """
    store = Store(shard_dir)
    stages = join(posixpath.dirname(store.uri().rstrip("/")), "stages")
    for name in manifest.shards:
        path = store.uri(name)
        size = store.size(name)
        if size is None:
            raise ValueError(f"shard {path} listed in the manifest is missing: re-run prepare")
        want = manifest.shard_bytes.get(name)
        if want is not None and size != want:
            raise ValueError(f"shard {path} is {size} bytes but prepare wrote {want}: "
                             f"truncated or replaced; re-run prepare (delete {stages})")
        if not checksum:
            continue
        scan = scan_shard(store.open_input(name))
        want = manifest.shard_sha256.get(name)
        if want is not None and scan.sha256 != want:
            raise ValueError(f"shard {path} does not match the checksum prepare recorded: corrupt, or written "
                             f"by another prepare run; re-run prepare (delete {stages})")
        if scan.tar_error is not None:
            raise ValueError(f"shard {path} is not a readable tar file ({scan.tar_error}): re-run prepare")
        if scan.odd_member is not None:
            raise ValueError(f"shard {path}: member {scan.odd_member!r} is not a plain relative file")
