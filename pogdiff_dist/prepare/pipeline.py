"""The prepare pipeline on Ray Data: records -> encoded parquet -> k-NN -> density -> shards.

Each stage leaves a marker with the fingerprint of everything it depends on; a stage
whose marker matches is not redone, so a crashed or repeated prepare resumes where it
stopped and a changed setting redoes exactly the stages it affects.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from pogdiff_dist.config import Config
from pogdiff_dist.config.sections import TRAINING_TIME_DATA_KEYS, PrepareConfig
from pogdiff_dist.data.bundled import bundled
from pogdiff_dist.data.columns import IndexedParquet, LookupRows, ParquetColumn, column_shape, list_values
from pogdiff_dist.data.density import (
    DEFAULT_BUFFER_ROWS,
    DensityVAEConfig,
    compute_elbo,
    fit_density_vae,
    save_density_vae,
)
from pogdiff_dist.data.encode import SampleEncoder
from pogdiff_dist.data.neighbours import build_knn, build_knn_ivf, knn_recall, write_neighbours
from pogdiff_dist.data.records import IDENTITY_PROMPT, DatasetRecords, read_dataset
from pogdiff_dist.data.shards import SHARD_FORMAT, Manifest, count_shard_rows, file_digest, shard_rows
from pogdiff_dist.models import TextEncoder, check_pretrained_dir, resolve_text_encoder_dir
from pogdiff_dist.storage import Store, local_mirror

log = logging.getLogger(__name__)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_records(cfg: Config) -> DatasetRecords:
    """The raw dataset: a bundled one (built on first use) or a user folder.

    Faces-IT2I is RGB and its captions name colours (hair, background), so reading it
    as grayscale would leave captions that contradict their images: with a pixel model
    it needs ``data.channels=3`` (a Stable Diffusion VAE always reads RGB).
    """
    which = cfg.data.bundled
    if which is not None:
        name, preset = which
        root = local_mirror(cfg.prepare.out_dir) / "raw"  # images are read from local disk
        build = bundled(name).build
        if name == "faces-it2i" and cfg.data.channels != 3 and cfg.model.pretrained is None:
            raise ValueError(f"data.dataset={cfg.data.dataset!r} is an RGB dataset whose captions name "
                             f"colours; set data.channels=3 (got {cfg.data.channels}), e.g. "
                             "--set data.channels=3 or use configs/faces.yaml")
        build(root, preset=preset, resolution=cfg.data.resolution, seed=cfg.data.seed,
              heldout_per_identity=cfg.data.heldout_per_identity)
    else:
        root = Path(cfg.data.dataset)
        if not root.is_dir():
            raise ValueError(f"data.dataset: {root} is not a directory (nor a bundled '<name>:<preset>')")
    return read_dataset(root, on_bad=cfg.data.on_bad)


def records_fingerprint(records: DatasetRecords) -> str:
    rows = [(r.key, str(r.image), r.caption, r.identity, r.split, r.image.stat().st_size, r.image.stat().st_mtime_ns)
            for r in records.records]
    return _hash(rows)


class _Stage:
    """A resumable stage: ``done()`` if its marker holds the same fingerprint. The marker is
    written last, after the stage's outputs, in the same store (a local folder or a bucket)."""

    def __init__(self, out: Store, name: str, fingerprint: str):
        self.store, self.marker = out, ("stages", f"{name}.json")
        self.name, self.fingerprint = name, fingerprint

    def done(self) -> bool:
        if self.store.is_file(*self.marker) and self.info().get("fingerprint") == self.fingerprint:
            log.info("stage %s: up to date, skipped", self.name)
            print(f"[prepare] {self.name}: up to date (fingerprint {self.fingerprint}), skipped", flush=True)
            return True
        return False

    def info(self) -> dict:
        return json.loads(self.store.read_text(*self.marker))

    def finish(self, **info) -> None:
        self.store.write_text(json.dumps({"fingerprint": self.fingerprint, **info}), *self.marker)


# Columns read from the encoded Parquet in this process, in order (tests check that the
# driver never loads the embedding tables: the k-NN and density tasks read them themselves).
LOADED_COLUMNS: list[tuple[str, ...]] = []
EMBEDDING_COLUMNS = ("z", "pooled", "y", "latent")


def read_encoded_columns(encoded: str | Path, columns: list[str]) -> dict[str, np.ndarray]:
    """Some columns of the encoded Parquet (a local folder or a URI), ordered by sample index,
    read with pyarrow in this process. Tensor columns (Ray's ``arrow_tensor`` layout) come back
    as [N, ...] arrays."""
    import pyarrow.dataset as pads

    LOADED_COLUMNS.append(tuple(columns))
    ds = pads.dataset(str(encoded), format="parquet")
    table = ds.to_table(columns=["index", *columns])
    out = {}
    for name in ["index", *columns]:
        col = table.column(name).combine_chunks()
        meta = ds.schema.field(name).metadata or {}
        shape = meta.get(b"ARROW:extension:metadata")
        if shape is not None:
            out[name] = np.asarray(col.flatten()).reshape(len(col), *json.loads(shape))
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    order = np.argsort(out["index"])
    assert np.array_equal(out["index"][order], np.arange(len(order))), "encoded indices must be 0..N-1"
    return {c: v[order] for c, v in out.items()}


def resolve_gpus(setting: float | str) -> float:
    """``prepare.gpus_per_encoder``: ``auto`` is 1 when the Ray cluster has GPUs, else 0."""
    if setting == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(setting)


def where_am_i(device: str) -> dict:
    """Host, node, process and device of the caller, for the stage markers."""
    return {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "device": device}


def _task_device(gpus: float) -> str:
    """The device of a Ray task or actor given ``gpus`` GPUs (Ray set CUDA_VISIBLE_DEVICES)."""
    return "cuda" if gpus > 0 else "cpu"


def knn_task(encoded: str, out: str, p: PrepareConfig, seed: int, gpus: float) -> dict:
    """The neighbours stage as a Ray task: reads the image embeddings itself, searches on its
    device, writes ``neighbours.parquet`` (:func:`~pogdiff_dist.data.neighbours.write_neighbours`).

    ``knn_index=flat``: exact search over the whole table (faiss-gpu, or torch on a GPU FAISS
    cannot use). ``ivf``: :func:`build_knn_ivf` streams the column in chunks, and its recall@k
    against exact search on ``knn_recall_queries`` random samples is measured and returned."""
    from pogdiff_dist.data.neighbours import knn_backend

    device = _task_device(gpus)
    if p.knn_index == "flat":
        z = read_encoded_columns(encoded, ["z"])["z"].astype(np.float32)
        idx, sims = build_knn(z, p.k_max, device=device)
        del z
        info = {"index": "flat", "backend": knn_backend(device)}
    else:
        source = ParquetColumn(encoded, "z")
        idx, sims, ivf = build_knn_ivf(source, p.k_max, nlist=p.knn_nlist, nprobe=p.knn_nprobe,
                                       train_rows=p.knn_train_rows, seed=seed, device=device)
        recall = {str(k): knn_recall(source, idx, k, queries=p.knn_recall_queries, seed=seed)
                  for k in sorted({min(10, p.k_max), p.k_max})}
        info = {"index": "ivf", "backend": "faiss-ivf", **ivf, "recall": recall,
                "recall_queries": min(p.knn_recall_queries, source.n_rows)}
    write_neighbours(Store(out).uri("neighbours.parquet"), idx, sims)
    return {**where_am_i(device), **info}


def density_task(encoded: str, out: str, dcfg: DensityVAEConfig, density_text: str, identities: list[str],
                 text_dirs: tuple[str, str], max_length: int, gpus: float,
                 buffer_rows: int = DEFAULT_BUFFER_ROWS) -> dict:
    """The density stage as a Ray task: streams the pooled caption embeddings (or each
    sample's identity prompt embedding) from the encoded Parquet itself, fits the text VAE on
    its device from shuffled buffers of ``buffer_rows`` rows, writes ``elbo.npy``."""
    device = _task_device(gpus)
    if density_text == "identity":
        prompts = _identity_prompt_table(identities, *text_dirs, max_length, device)
        rows = LookupRows(ParquetColumn(encoded, "identity_id"), prompts)
    else:
        rows = ParquetColumn(encoded, "pooled")
    vae = fit_density_vae(rows, dcfg, progress=False, device=device, buffer_rows=buffer_rows)
    elbo = compute_elbo(vae, rows)
    store = Store(out)
    store.write_bytes(_npy_bytes(elbo), "elbo.npy")
    with tempfile.TemporaryDirectory() as tmp:
        save_density_vae(vae, Path(tmp) / "density_vae.safetensors")
        store.write_bytes((Path(tmp) / "density_vae.safetensors").read_bytes(), "density_vae.safetensors")
    return {**where_am_i(device), "elbo_min": float(elbo.min()), "elbo_max": float(elbo.max())}


def _identity_prompt_table(identities: list[str], text_dir, tok_dir, max_length: int,
                           device: str = "cpu") -> np.ndarray:
    """[identities, D] pooled embedding of each identity prompt ("An image of {name}."): with
    ``prepare.density_text=identity`` each sample contributes its identity's row, so an
    identity's weight in the fit is its image count."""
    text = TextEncoder(text_dir, tok_dir, max_length).to(device)
    with torch.no_grad():
        _, pooled = text.encode([IDENTITY_PROMPT.format(name=n) for n in identities])
    return pooled.float().cpu().numpy()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _run_task(fn, gpus: float, *args) -> dict:
    return ray.get(ray.remote(fn).options(num_cpus=1, num_gpus=gpus).remote(*args))


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
    ds = ray.data.read_parquet(encoded).select_columns(["index", "key", "caption", "latent", "y", "identity_id"])
    return ds.map_batches(_AttachNeighbours, fn_constructor_args=(out.uri(), fingerprint), batch_size=batch_rows,
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
    ds.write_webdataset(out.uri("shards"))


def run_prepare(cfg: Config) -> Manifest:
    """Run every stage that is not up to date; return the manifest."""
    t_start = time.time()
    out = Store(cfg.prepare.out_dir)  # a local folder or an object-storage prefix
    out.check_writable("prepare.out_dir")
    records = load_records(cfg)
    for w in records.warnings:
        print(f"[prepare] warning: {w}", flush=True)
    if records.skipped:
        print(f"[prepare] skipped {len(records.skipped)} bad item(s) (data.on_bad=skip):", flush=True)
        for ref, why in records.skipped:
            print(f"    {ref}: {why}", flush=True)
    train = records.train()
    identities = records.identities()
    ident_id = {n: i for i, n in enumerate(identities)}
    n = len(train)
    if cfg.prepare.k_max >= n:
        raise ValueError(f"prepare.k_max={cfg.prepare.k_max} is larger than the dataset allows: "
                         f"{n} training samples have at most {n - 1} neighbours each")

    text_dir, tok_dir = resolve_text_encoder_dir(cfg.model.text_encoder, cfg.model.pretrained)
    vae_dir = str(check_pretrained_dir(cfg.model.pretrained) / "vae") if cfg.model.pretrained else None
    channels = 3 if vae_dir else cfg.data.channels

    encoded = out.uri("encoded")
    # data.on_bad is left out: records are re-read on every run, and the skipped ones change
    # records_fingerprint; a dataset that read cleanly reads the same under either policy. The
    # sampling keys act at training time only.
    data_fp = {k: v for k, v in cfg.to_dict()["data"].items() if k not in TRAINING_TIME_DATA_KEYS}
    fp_encode = _hash(records_fingerprint(records), data_fp, cfg.to_dict()["model"], str(text_dir))
    gpus = resolve_gpus(cfg.prepare.gpus_per_encoder)
    stage = _Stage(out, "encode", fp_encode)
    if not stage.done():
        out.delete_dir("encoded")
        items = [{"index": i, "key": r.key, "image": str(r.image), "caption": r.caption,
                  "identity_id": ident_id[r.identity]} for i, r in enumerate(train)]
        t0 = time.time()
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.prepare.batch_size, 64)))
        ds = ds.map_batches(SampleEncoder, batch_size=cfg.prepare.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=cfg.prepare.num_encoders), num_cpus=1,
                            num_gpus=gpus,
                            fn_constructor_kwargs={"text_encoder_dir": str(text_dir), "tokenizer_dir": str(tok_dir),
                                                       "max_length": cfg.model.max_length,
                                                       "resolution": cfg.data.resolution, "channels": channels,
                                                       "image_encoder": cfg.model.image_encoder, "vae_dir": vae_dir,
                                                       "device": _task_device(gpus)})
        ds.write_parquet(encoded)
        dt = time.time() - t0
        ran_on = sorted(ray.data.read_parquet(encoded).select_columns(["encoded_by"]).unique("encoded_by"))
        print(f"[prepare] encode: {n} samples in {dt:.1f}s ({n / dt:.1f} samples/s) on {len(ran_on)} encoder(s) "
              f"with {gpus:g} GPU(s) each", flush=True)
        stage.finish(seconds=dt, gpus_per_encoder=gpus,
                     ran_on=[dict(zip(("host", "pid", "device"), w.split(":", 2))) for w in ran_on])

    p = cfg.prepare
    knn_fp = [p.k_max, "neighbours.parquet"]
    if p.knn_index == "ivf":
        knn_fp += [p.knn_index, p.knn_nlist, p.knn_nprobe, p.knn_train_rows, cfg.data.seed]
    fp_knn = _hash(fp_encode, *knn_fp)
    stage = _Stage(out, "neighbours", fp_knn)
    if not stage.done():
        t0 = time.time()
        ran_on = _run_task(knn_task, gpus, encoded, out.uri(), p, cfg.data.seed, gpus)
        how = ran_on["backend"]
        if p.knn_index == "ivf":
            recall = ", ".join(f"recall@{k} {r:.3f}" for k, r in ran_on["recall"].items())
            how = (f"IVF nlist={ran_on['nlist']} nprobe={ran_on['nprobe']}, {recall} vs exact on "
                   f"{ran_on['recall_queries']} queries")
        print(f"[prepare] neighbours: k_max={p.k_max} over {n} samples in {time.time() - t0:.1f}s "
              f"({how}; on {ran_on['device']}, pid {ran_on['pid']})", flush=True)
        stage.finish(ran_on=ran_on, **({"recall": ran_on["recall"]} if "recall" in ran_on else {}))

    dcfg = DensityVAEConfig(latent_dim=p.density_latent_dim, hidden_dim=p.density_hidden_dim,
                            epochs=p.density_epochs, lr=p.density_lr, seed=cfg.data.seed)
    fp_den = _hash(fp_encode, dcfg.__dict__, p.density_text, p.density_buffer_rows)
    stage = _Stage(out, "density", fp_den)
    if not stage.done():
        t0 = time.time()
        ran_on = _run_task(density_task, gpus, encoded, out.uri(), dcfg, p.density_text,
                           identities, (str(text_dir), str(tok_dir)), cfg.model.max_length, gpus, p.density_buffer_rows)
        lo, hi = ran_on["elbo_min"], ran_on["elbo_max"]
        print(f"[prepare] density: ELBO range [{lo:.1f}, {hi:.1f}] nats (spread {hi - lo:.1f}) in "
              f"{time.time() - t0:.1f}s (on {ran_on['device']}, pid {ran_on['pid']})", flush=True)
        stage.finish(elbo_spread=hi - lo, ran_on=ran_on)

    shard_dir = out.uri("shards")
    fp_shards = _hash(fp_knn, fp_den, cfg.prepare.samples_per_shard, SHARD_FORMAT)
    stage = _Stage(out, "shards", fp_shards)
    if not stage.done():
        t0 = time.time()
        out.delete_dir("shards")
        write_shards(encoded, out, n, cfg.prepare.k_max, cfg.prepare.samples_per_shard, fp_shards)
        shards = out.list_files("shards", suffix=".tar")
        print(f"[prepare] shards: wrote {len(shards)} shard(s) in {time.time() - t0:.1f}s", flush=True)
        # sizes and checksums let training reject a truncated, corrupt or foreign shard by name
        stage.finish(shard_bytes={s: out.size("shards", s) for s in shards},
                     shard_sha256={s: file_digest(out.open_input("shards", s)) for s in shards},
                     shard_rows={s: count_shard_rows(out.open_input("shards", s)) for s in shards})

    shard_info = stage.info()
    sample = ray.data.read_parquet(encoded).select_columns(["latent", "y"]).take(1)[0]
    counts = records.counts("train")
    manifest = Manifest(
        fingerprint=fp_shards, num_samples=n, k_max=cfg.prepare.k_max,
        latent_shape=list(np.asarray(sample["latent"]).shape), text_shape=list(np.asarray(sample["y"]).shape),
        identities=identities, train_counts=[counts.get(i, 0) for i in identities],
        shards=out.list_files("shards", suffix=".tar"),
        text_encoder_dir=str(text_dir), tokenizer_dir=str(tok_dir), vae_dir=vae_dir,
        skipped=[list(s) for s in records.skipped], warnings=records.warnings,
        heldout=[{"image": str(r.image), "identity": r.identity} for r in records.heldout()],
        shard_bytes=shard_info.get("shard_bytes", {}), shard_sha256=shard_info.get("shard_sha256", {}),
        shard_rows=shard_info.get("shard_rows", {}),
        dataset=cfg.data.dataset if cfg.data.bundled is None else ":".join(cfg.data.bundled),
    )
    manifest.save(out.uri())
    print(f"[prepare] done in {time.time() - t_start:.1f}s: {n} samples, {len(identities)} identities, "
          f"{len(manifest.shards)} shard(s) in {shard_dir}", flush=True)
    return manifest
