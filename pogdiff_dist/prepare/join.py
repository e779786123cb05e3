"""The shards stage's neighbour join on Ray Data, and the shard rows it feeds.

Every shard row carries its neighbours' caption tokens (y' is encoded on the worker), so the
join must not hold the N x k_max x L table in one process at a million samples.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FilenameProvider

from pogdiff_dist.data.columns import IndexedParquet, column_shape, files_in_index_order, list_values
from pogdiff_dist.data.shards import shard_rows
from pogdiff_dist.runtime import map_on_actors
from pogdiff_dist.storage import Store

# The neighbour join (Ray Data). Every sample's row must carry its k_max neighbours' caption
# tokens, lengths and identities; at a million samples that is an N x k_max x L table no
# process should hold. So it is built as a reduce-side join over (sample, neighbour) pairs:
#   1. pair rows (key=j, i, r, sim) from neighbours.parquet and token rows (key=j, tok, len,
#      ident) from the encoded Parquet, in one schema, hash-partitioned by the key j, so a
#      neighbour's token row and every pair naming it meet in one block and are joined there;
#   2. the joined pairs sorted by sample i into index ranges and folded, per block, into one
#      row per sample, neighbours in rank order r (the k-NN table's similarity-descending
#      order, ties as it broke them), written as <out>/neighbour_tokens/ Parquet;
#   3. the encoded rows streamed in their stored order, as before, each batch looking its
#      samples up in that sorted Parquet by row group (IndexedParquet).
_PAIR_SCHEMA = pa.schema([("key", pa.int64()), ("i", pa.int64()), ("r", pa.int32()), ("sim", pa.float32()),
                          ("tok", pa.binary()), ("len", pa.int32()), ("ident", pa.int64())])


def _binary_rows(values: np.ndarray) -> pa.Array:
    """[n, ...] fixed-size rows -> a binary array of their raw bytes (no per-row Python)."""
    values = np.ascontiguousarray(values)
    width = values[0].nbytes if len(values) else 0
    offsets = np.arange(len(values) + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(values)])


def _binary_values(arr: pa.Array, dtype, width: int) -> np.ndarray:
    """Inverse of :func:`_binary_rows`: [n, width] values of ``dtype``."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    item = np.dtype(dtype).itemsize * width
    assert (np.diff(offsets) == item).all(), "binary rows of unequal width"
    return data[offsets[0] : offsets[-1]].view(dtype).reshape(len(arr), width)


def _pair_rows(batch: pa.Table) -> pa.Table:
    """neighbours.parquet rows -> one pair row per (sample i, rank r, neighbour j)."""
    i = batch.column("index").to_numpy().astype(np.int64)
    nbr = list_values(batch.column("nbr_idx")).astype(np.int64).reshape(len(i), -1)
    sim = list_values(batch.column("nbr_sim")).astype(np.float32).reshape(len(i), -1)
    n, k = nbr.shape
    return pa.table({"key": nbr.ravel(), "i": np.repeat(i, k), "r": np.tile(np.arange(k, dtype=np.int32), n),
                     "sim": sim.ravel(), "tok": _binary_rows(np.zeros((n * k, 0), np.int32)),
                     "len": np.zeros(n * k, np.int32), "ident": np.full(n * k, -1, np.int64)}, schema=_PAIR_SCHEMA)


def _token_rows(batch: pa.Table) -> pa.Table:
    """Encoded rows -> one token row per sample j (its caption tokens, length, identity)."""
    j = batch.column("index").to_numpy().astype(np.int64)
    tokens = list_values(batch.column("tokens")).astype(np.int32).reshape(len(j), -1)
    return pa.table({"key": j, "i": np.full(len(j), -1, np.int64), "r": np.full(len(j), -1, np.int32),
                     "sim": np.zeros(len(j), np.float32), "tok": _binary_rows(tokens),
                     "len": batch.column("length").to_numpy().astype(np.int32),
                     "ident": batch.column("identity_id").to_numpy().astype(np.int64)}, schema=_PAIR_SCHEMA)


def _join_tokens(block: pa.Table) -> pa.Table:
    """One hash partition (all rows of its keys) -> its pairs with the neighbour's token row."""
    i = block.column("i").to_numpy()
    tok_rows = np.flatnonzero(i < 0)
    pairs = np.flatnonzero(i >= 0)
    key = block.column("key").to_numpy()
    order = tok_rows[np.argsort(key[tok_rows], kind="stable")]
    pos = np.searchsorted(key[order], key[pairs])
    found = (pos < len(order)) & (key[order][np.minimum(pos, max(len(order) - 1, 0))] == key[pairs])
    if not found.all():
        raise AssertionError(f"neighbour {int(key[pairs][~found][0])} has no token row in its hash partition "
                             "(the encoded Parquet lacks it, or the partition was split)")
    src = pa.array(order[pos])
    return pa.table({"i": block.column("i").take(pa.array(pairs)), "r": block.column("r").take(pa.array(pairs)),
                     "j": block.column("key").take(pa.array(pairs)), "sim": block.column("sim").take(pa.array(pairs)),
                     "tok": block.column("tok").take(src), "len": block.column("len").take(src),
                     "ident": block.column("ident").take(src)})


def _fold_neighbours(block: pa.Table, k_max: int, length: int) -> pa.Table:
    """One index range of joined pairs -> one row per sample, neighbours in rank order."""
    i, r = block.column("i").to_numpy(), block.column("r").to_numpy()
    order = np.lexsort((r, i))
    n = len(i) // k_max
    index = i[order][::k_max] if n else np.zeros(0, np.int64)
    complete = len(i) == n * k_max and (i[order].reshape(n, k_max) == index[:, None]).all() and (
        r[order].reshape(n, k_max) == np.arange(k_max)).all()
    if not complete:
        raise AssertionError("a sample's neighbour pairs were split across blocks (or a rank is missing)")
    take = pa.array(order)

    def fixed(name: str, dtype, width: int) -> pa.Array:
        values = block.column(name).take(take).to_numpy().astype(dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(values), width)

    tok = _binary_values(block.column("tok").take(take), np.int32, length).reshape(-1)
    return pa.table({"index": index.astype(np.int64), "nbr_index": fixed("j", np.int64, k_max),
                     "nbr_sim": fixed("sim", np.float32, k_max), "nbr_len": fixed("len", np.int32, k_max),
                     "nbr_identity": fixed("ident", np.int64, k_max),
                     "nbr_tokens": pa.FixedSizeListArray.from_arrays(pa.array(tok), k_max * length)})


def join_neighbour_tokens(encoded: str, neighbours: str, dest: str, n: int, k_max: int,
                          rows_per_block: int = 50_000) -> None:
    """Steps 1-2 above: write ``dest`` (Parquet sorted by index) with each sample's
    ``nbr_index``/``nbr_sim``/``nbr_len``/``nbr_identity`` [k_max] and ``nbr_tokens``
    [k_max * L], from ``neighbours.parquet`` and the encoded Parquet's [L] tokens."""
    import pyarrow.dataset as pads

    (length,) = column_shape(pads.dataset(encoded, format="parquet").schema, "tokens")
    pairs = ray.data.read_parquet(neighbours).map_batches(_pair_rows, batch_format="pyarrow")
    tokens = (ray.data.read_parquet(encoded).select_columns(["index", "tokens", "length", "identity_id"])
              .map_batches(_token_rows, batch_format="pyarrow"))
    # pair rows outnumber samples k_max to 1; partitions of ~rows_per_block pairs keep every
    # shuffle block, and so every reduce task, small
    parts = max(1, -(-n * k_max // rows_per_block))
    joined = (pairs.union(tokens).repartition(parts, keys=["key"])
              .map_batches(_join_tokens, batch_size=None, batch_format="pyarrow"))
    per_block = max(1, rows_per_block // k_max)
    bounds = list(range(per_block, n, per_block))
    folded = joined.sort("i", boundaries=bounds) if bounds else joined.sort("i")
    folded = folded.map_batches(_fold_neighbours, batch_size=None, batch_format="pyarrow",
                                fn_kwargs={"k_max": k_max, "length": length})
    folded.write_parquet(dest, row_group_size=4096)


class _AttachNeighbours:
    """Step 3 above, as a Ray Data actor: encoded rows -> shard rows."""

    def __init__(self, out: str, fingerprint: str):
        store = Store(out)
        self.nbrs = IndexedParquet(store.uri("neighbour_tokens"),
                                   ["nbr_index", "nbr_sim", "nbr_len", "nbr_identity", "nbr_tokens"])
        self.elbo = np.load(io.BytesIO(store.read_bytes("elbo.npy")))  # [N] float64: 8 MB at a million
        self.fingerprint = fingerprint

    def __call__(self, batch):
        idx = batch["index"].astype(np.int64)
        nb = self.nbrs.rows(idx)
        k = nb["nbr_index"].shape[1]
        return shard_rows(batch, nbr_index=nb["nbr_index"], nbr_sim=nb["nbr_sim"],
                          nbr_tokens=nb["nbr_tokens"].reshape(len(idx), k, -1), nbr_len=nb["nbr_len"],
                          nbr_identity=nb["nbr_identity"], elbo=np.asarray(self.elbo[idx]),
                          fingerprint=self.fingerprint)


def shard_row_dataset(encoded: str, out: Store, fingerprint: str, batch_rows: int = 1024) -> ray.data.Dataset:
    """The encoded rows streamed through :class:`_AttachNeighbours` (after the join): the shard
    rows. Batches of ``batch_rows``: Ray Data's default is a whole block (a whole Parquet file,
    50,000 rows at the benchmark's million), and one such batch of shard rows, with a Python
    dict of metadata per row, is what took the actor past 5 GiB."""
    # the files in sample order (not name order: names carry Ray's random write id), read in that
    # order (prepare runs Ray Data with preserve_order, see prepare.pipeline.ordered_datasets)
    files = files_in_index_order(encoded)
    columns = ["index", "key", "caption", "latent", "y", "identity_id"]
    if "y_pooled" in ray.data.read_parquet(files[:1]).schema().names:  # SDXL, SD3, Flux
        columns.append("y_pooled")
    ds = ray.data.read_parquet(files).select_columns(columns)
    return map_on_actors(ds, _AttachNeighbours, fn_constructor_args=(out.uri(), fingerprint), batch_size=batch_rows,
                         compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")


def write_shards(encoded: str, out: Store, n: int, k_max: int, samples_per_shard: int, fingerprint: str) -> None:
    """The shards stage's work: the neighbour join (:func:`join_neighbour_tokens`), then the
    encoded rows streamed through :class:`_AttachNeighbours` into WebDataset shards, all at
    locations in ``out`` (a local folder or a bucket)."""
    out.delete_dir("neighbour_tokens")
    join_neighbour_tokens(encoded, out.uri("neighbours.parquet"), out.uri("neighbour_tokens"), n, k_max)
    ds = shard_row_dataset(encoded, out, fingerprint)
    # One shard per block of samples_per_shard rows (streaming, no shuffle): shards are the
    # unit of parallel reads, so 2 workers need >= 2 of them. (write_webdataset's
    # min_rows_per_file is only a minimum: alone, it wrote one shard for 385 rows.)
    ds = ds.repartition(target_num_rows_per_block=samples_per_shard)
    ds.write_webdataset(out.uri("shards"), filename_provider=ShardNames())


class ShardNames(FilenameProvider):
    """``shard-000000.tar``, ``shard-000001.tar``, ...: the write task's index, which (Ray Data
    preserving order) is the shard's position in the sample order. Ray's default names start
    with random ids, so two prepares of the same data listed the same shards under other
    names; with these the manifests, and so every epoch's seeded shard order, are the same."""

    def __init__(self):
        super().__init__(file_format="tar")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"shard-{task_index:06d}.tar"
