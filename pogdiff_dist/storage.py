"""Where prepared data and runs live: a local folder or an object-storage prefix (``s3://``,
``gs://``, ``hdfs://``, ...), through ``pyarrow.fs``, the filesystem layer Ray Data and Ray
Train use themselves.

A :class:`Store` is one such folder. Small files (stage markers, the manifest, the ELBO
table, run state) are read and written through it; Ray Data reads and writes the large ones
(encoded Parquet, shards) at ``store.uri(...)`` directly, and Ray Train puts checkpoints under
``train.storage_path`` itself. What must be a local folder (diffusers' ``save_pretrained``,
MLflow's artifact upload, the bundled dataset's images) is staged in :func:`local_mirror` and
copied up or down with :meth:`Store.upload` / :meth:`Store.download`. For a local path the
mirror is the folder itself and the copies do nothing, so both cases run the same code.

Credentials are never part of a location: pyarrow resolves them from the standard chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role;
``AWS_ENDPOINT_URL`` for an S3-compatible server), so they never reach a config, a log line
or MLflow.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from pathlib import Path

import pyarrow.fs as pafs

CACHE_ENV = "POGDIFF_CACHE_DIR"  # local staging for object-storage locations (default ~/.cache/pogdiff_dist)


def is_uri(location: str | os.PathLike) -> bool:
    """An object-storage (or other non-local) location, as opposed to a local path."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...``: posix joins for a URI (``Path`` would fold ``s3://`` to ``s3:/``)."""
    if is_uri(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return str(Path(location).joinpath(*parts))


def local_mirror(location: str | os.PathLike) -> Path:
    """The local folder that stands for ``location``: the folder itself for a local path, else a
    per-location folder under ``$POGDIFF_CACHE_DIR`` (default ``~/.cache/pogdiff_dist/mirror``)."""
    if not is_uri(location):
        return Path(location)
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pogdiff_dist").expanduser()
    tag = hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:16]
    return root / "mirror" / f"{tag}-{posixpath.basename(str(location).rstrip('/'))}"


class Store:
    """A folder at ``location`` (local path or URI): small-file I/O, listing, and copies to and
    from its :func:`local_mirror`. Picklable as its location string (a Ray task rebuilds it, with
    the credentials of its own node)."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self.remote = is_uri(self.location)
        if self.remote:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.location)
            except Exception as e:  # an unknown scheme or a malformed URI, named
                raise ValueError(f"{self.location}: not a storage location pyarrow.fs can open ({e})") from e
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(self.location).absolute())
        self.local = local_mirror(self.location) if self.remote else Path(self.root)

    def __reduce__(self):
        return Store, (self.location,)

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def uri(self, *parts: str) -> str:
        """The location of ``parts`` inside this folder, as Ray Data and pyarrow take it."""
        return join(self.location if self.remote else self.root, *(p for p in parts if p))

    def _path(self, *parts: str) -> str:
        parts = tuple(p for p in parts if p)
        return posixpath.join(self.root, *parts) if parts else self.root

    # -- small files

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._path(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._path(*parts)).type == pafs.FileType.File

    def size(self, *parts: str) -> int | None:
        info = self.fs.get_file_info(self._path(*parts))
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self._path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self._path(*parts)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def open_input(self, *parts: str):
        """A readable binary stream (not seekable for object storage: read it front to back)."""
        return self.fs.open_input_stream(self._path(*parts))

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Names of the files directly in the sub-folder ``parts`` that end with ``suffix``."""
        base = self._path(*parts)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(posixpath.basename(i.path) for i in infos
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def delete_dir(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_dir(self._path(*parts))

    # -- copies between the store and its local mirror

    def upload(self, *parts: str) -> None:
        """Copy ``local_mirror/parts`` (a file or a folder, replacing what is there) up to the store."""
        if not self.remote:
            return
        src = self.local.joinpath(*parts)
        if src.is_dir():
            self.delete_dir(*parts)
            self.fs.create_dir(self._path(*parts), recursive=True)
        else:
            self.fs.create_dir(posixpath.dirname(self._path(*parts)), recursive=True)
        pafs.copy_files(str(src), self._path(*parts), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, *parts: str) -> Path:
        """Copy ``parts`` (a file or a folder) from the store into the local mirror; return its
        local path. A missing source is an error naming it."""
        dst = self.local.joinpath(*parts)
        if not self.remote:
            return dst
        info = self.fs.get_file_info(self._path(*parts))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri(*parts)} does not exist")
        if info.type == pafs.FileType.Directory:
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._path(*parts), str(dst), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return dst

    # -- before any work

    def check_writable(self, setting: str) -> None:
        """A missing bucket, refused access or an unreachable server is a ValueError naming the
        setting and the URI, raised before any work (for a local path: nothing to check here)."""
        if not self.remote:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ValueError(f"{setting}={self.location!r}: bucket {bucket!r} does not exist (create it, or "
                                 f"check the endpoint and the credentials' account)")
            probe = self._path(".pogdiff-write-check")
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as e:
            raise ValueError(f"{setting}={self.location!r}: cannot write there ({_first_line(e)}); check the "
                             f"credentials (AWS_* environment, profile or instance role) and the bucket's "
                             f"permissions") from e


def fetch(location: str | os.PathLike, only: list[str] | None = None) -> Path:
    """A local folder holding ``location``: the folder itself (absolute) for a local path; for a
    URI its local mirror, with everything (or just the files ``only``) downloaded."""
    store = Store(location)
    if store.remote:
        for part in only or [""]:
            if store.exists(part):
                store.download(part)
    return store.local


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_storage(cfg) -> None:
    """Every object-storage output of ``cfg`` exists and takes writes (see :meth:`Store.check_writable`)."""
    for setting, location in (("prepare.out_dir", cfg.prepare.out_dir), ("train.storage_path", cfg.train.storage_path)):
        Store(location).check_writable(setting)
