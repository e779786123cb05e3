"""Row sources: one column of a dataset read in bounded chunks, never whole.

The k-NN and density stages need every sample's embedding, but at a million samples an
[N, 512] float32 column is 2 GiB, so they read it as a stream of ``(index [n], values
[n, D])`` chunks. A :class:`ParquetColumn` streams a column of the encoded Parquet one row
group at a time (pyarrow only, no Ray: Ray's tensor columns are read through their storage
layout, a list per row with the shape in the field metadata); :class:`ArrayRows` serves an
in-memory array through the same interface, so small datasets and tests take the same code
path. ``chunks(rng)`` visits the pieces in a random order when given a generator (what the
density fit's epochs do), in index order otherwise (:func:`index_ordered`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pyarrow as pa


class RowSource(Protocol):
    n_rows: int
    dim: int

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(index int64 [n], values [n, dim])`` pieces covering every row once."""
        ...


def list_values(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The flat values of a (large/fixed-size) list column, or of a Ray tensor column read
    with Ray's extension type registered (its storage is such a list)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def column_shape(schema: pa.Schema, name: str) -> tuple[int, ...] | None:
    """Per-row shape of a Ray tensor column (from its field metadata), None for a scalar column."""
    field = schema.field(name)
    meta = field.metadata or {}
    shape = meta.get(b"ARROW:extension:metadata")
    if shape is not None:
        return tuple(json.loads(shape))
    if isinstance(field.type, pa.ExtensionType) and hasattr(field.type, "shape"):
        return tuple(field.type.shape)
    if pa.types.is_fixed_size_list(field.type):
        return (field.type.list_size,)
    return None


def index_ordered(pieces: list) -> list:
    """Row-group fragments in the order of their first sample ``index`` (Parquet statistics),
    then path and row group: a stable order that does not depend on the files' names. Ray
    Data names the files it writes after a random write id and the order its tasks finished,
    so "stored order" would differ between two writes of the same rows; every pass over a
    source (the density fit's moments, its ELBO batches, the IVF chunks) must not."""

    def key(piece):
        rg = piece.row_groups[0]
        stats = rg.statistics or {}
        first = stats.get("index", {}).get("min") if isinstance(stats.get("index"), dict) else None
        return (first is None, first if first is not None else 0, piece.path, rg.id)

    return sorted(pieces, key=key)


def files_in_index_order(path: str, filesystem=None) -> list[str]:
    """The Parquet files of a dataset (a folder or a URI) in the order of their first sample
    ``index``: what a reader that must see the rows in index order (prepare's shard writer)
    passes to ``ray.data.read_parquet`` instead of the folder, whose listing follows the names."""
    import pyarrow.dataset as pads

    ds = pads.dataset(path, format="parquet", filesystem=filesystem)
    first: dict[str, tuple] = {}
    for piece in index_ordered([rg for frag in ds.get_fragments() for rg in frag.split_by_row_group()]):
        first.setdefault(piece.path, (len(first),))
    scheme = path.split("://", 1)[0] + "://" if "://" in str(path) else ""
    return [p if "://" in p or not scheme else scheme + p for p in sorted(first, key=first.get)]


class ParquetColumn:
    """One column of a Parquet dataset with an ``index`` column, streamed by row group.

    ``chunk_rows`` bounds each chunk (a row group larger than that arrives in pieces), so a
    reader holds O(chunk_rows x D) of it at a time.
    """

    def __init__(self, path: str, column: str, chunk_rows: int = 65536, filesystem=None):
        import pyarrow.dataset as pads

        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        ds = pads.dataset(path, format="parquet", filesystem=filesystem)
        if column not in ds.schema.names or "index" not in ds.schema.names:
            raise ValueError(f"{path}: needs columns 'index' and {column!r}, has {ds.schema.names}")
        self.column, self.chunk_rows = column, chunk_rows
        self.shape = column_shape(ds.schema, column) or ()
        self.dim = int(np.prod(self.shape)) if self.shape else 1
        self.pieces = index_ordered([rg for frag in ds.get_fragments() for rg in frag.split_by_row_group()])
        self.n_rows = sum(rg.num_rows for p in self.pieces for rg in p.row_groups)

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = rng.permutation(len(self.pieces)) if rng is not None else range(len(self.pieces))
        for p in order:
            for batch in self.pieces[p].to_batches(columns=["index", self.column], batch_size=self.chunk_rows):
                index = batch.column("index").to_numpy().astype(np.int64)
                values = list_values(batch.column(self.column)) if self.shape else batch.column(self.column).to_numpy()
                yield index, values.reshape(len(index), *self.shape)


class ArrayRows:
    """An in-memory [N, D] array as a row source (row i has index i)."""

    def __init__(self, values: np.ndarray, chunk_rows: int = 65536):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.values, self.chunk_rows = values, chunk_rows
        self.n_rows = len(values)
        self.dim = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = np.arange(0, self.n_rows, self.chunk_rows)
        for s in rng.permutation(starts) if rng is not None else starts:
            stop = min(s + self.chunk_rows, self.n_rows)
            yield np.arange(s, stop, dtype=np.int64), self.values[s:stop]


class LookupRows:
    """Rows ``table[key]`` for a stream of integer keys: e.g. each sample's identity prompt
    embedding from its identity id, without materialising the [N, D] result."""

    def __init__(self, keys: RowSource, table: np.ndarray):
        self.keys, self.table = keys, table
        self.n_rows, self.dim = keys.n_rows, int(table.shape[1])

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index, key in self.keys.chunks(rng):
            yield index, self.table[np.asarray(key, dtype=np.int64).reshape(-1)]


class IndexedParquet:
    """Rows of a Parquet dataset by sample index, one row group at a time.

    For a dataset written in index-sorted ranges (each row group covering an ``index``
    interval, as prepare's sorted neighbour table is): the row-group statistics locate the
    groups that hold a batch's indices, and the last few groups read stay cached, so a
    stream of roughly index-ordered batches reads each group about once and holds a few.
    """

    def __init__(self, path: str, columns: list[str], cache_groups: int = 4, filesystem=None):
        import pyarrow.dataset as pads

        ds = pads.dataset(path, format="parquet", filesystem=filesystem)
        self.columns, self.cache_groups = columns, cache_groups
        self.shapes = {c: column_shape(ds.schema, c) for c in columns}
        self.groups, lo, hi = [], [], []
        for frag in ds.get_fragments():
            for rg in frag.split_by_row_group():
                stats = rg.row_groups[0].statistics["index"]
                self.groups.append(rg)
                lo.append(stats["min"])
                hi.append(stats["max"])
        order = np.argsort(lo)
        self.groups = [self.groups[i] for i in order]
        self.lo, self.hi = np.asarray(lo, dtype=np.int64)[order], np.asarray(hi, dtype=np.int64)[order]
        if len(self.lo) > 1 and (self.lo[1:] <= self.hi[:-1]).any():
            raise ValueError(f"{path}: row groups overlap in 'index'; write it sorted by index")
        self._cache: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}

    def _group(self, g: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if g not in self._cache:
            if len(self._cache) >= self.cache_groups:
                self._cache.pop(next(iter(self._cache)))
            t = self.groups[g].to_table(columns=["index", *self.columns])
            index = t.column("index").to_numpy()
            order = np.argsort(index)
            cols = {}
            for c in self.columns:
                shape = self.shapes[c]
                v = list_values(t.column(c)) if shape else t.column(c).to_numpy()
                cols[c] = v.reshape(len(index), *(shape or ()))[order]
            self._cache[g] = index[order], cols
        return self._cache[g]

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of the rows with these sample indices, in the order given."""
        index = np.asarray(index, dtype=np.int64)
        g_of = np.searchsorted(self.lo, index, side="right") - 1
        if (g_of < 0).any() or (index > self.hi[np.maximum(g_of, 0)]).any():
            raise KeyError(f"sample index {int(index[(g_of < 0) | (index > self.hi[np.maximum(g_of, 0)])][0])} "
                           "is in no row group")
        out: dict[str, np.ndarray] = {}
        for g in np.unique(g_of):
            rows = g_of == g
            have, cols = self._group(int(g))
            pos = np.searchsorted(have, index[rows])
            if (pos >= len(have)).any() or (have[np.minimum(pos, len(have) - 1)] != index[rows]).any():
                raise KeyError(f"a sample index of row group {int(g)}'s range is missing from it")
            for c, v in cols.items():
                if c not in out:
                    out[c] = np.empty((len(index), *v.shape[1:]), dtype=v.dtype)
                out[c][rows] = v[pos]
        return out
