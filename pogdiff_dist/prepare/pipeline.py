"""The prepare pipeline on Ray Data: records -> encoded parquet -> k-NN -> density -> shards.

Each stage leaves a marker with the fingerprint of everything it depends on; a stage
whose marker matches is not redone, so a crashed or repeated prepare resumes where it
stopped and a changed setting redoes exactly the stages it affects.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from pogdiff_dist.config import Config
from pogdiff_dist.config.sections import BUNDLED_DATASETS, PrepareConfig
from pogdiff_dist.data.bundled import bundled
from pogdiff_dist.data.columns import LookupRows, ParquetColumn
from pogdiff_dist.data.density import (
    DEFAULT_BUFFER_ROWS,
    DensityVAEConfig,
    compute_elbo,
    fit_density_vae,
    save_density_vae,
)
from pogdiff_dist.data.encode import SampleEncoder
from pogdiff_dist.data.exact_search import faiss_visible_gpus, knn_plan
from pogdiff_dist.data.layouts import locate_dataset
from pogdiff_dist.data.neighbours import build_knn, build_knn_ivf, knn_recall, write_neighbours
from pogdiff_dist.data.records import IDENTITY_PROMPT, DatasetRecords, read_dataset
from pogdiff_dist.data.shard_files import scan_shard
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.devices import auto_gpus, task_device
from pogdiff_dist.families.load import multi_encoder_family
from pogdiff_dist.models import check_pretrained_dir, load_text_encoder, resolve_text_encoder_dir
from pogdiff_dist.prepare.join import write_shards
from pogdiff_dist.prepare.stages import Stage, records_fingerprint, stage_fingerprints
from pogdiff_dist.runtime import cluster_gpus, map_on_actors
from pogdiff_dist.storage import Store, local_mirror

log = logging.getLogger(__name__)


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
        root = Path(cfg.data.dataset)  # a folder or its metadata.csv
        try:
            locate_dataset(root)
        except ValueError as e:
            raise ValueError(f"data.dataset: {e} (expected a dataset folder, its metadata.csv, or a bundled "
                             f"'<name>:<preset>' of {', '.join(BUNDLED_DATASETS)})") from None
    return read_dataset(root, on_bad=cfg.data.on_bad)


def report_records(records: DatasetRecords) -> None:
    """What prepare prints about the raw dataset: warnings (unused files included), skipped
    items, and the repeat counts read from folder names."""
    for w in records.warnings:
        print(f"[prepare] warning: {w}", flush=True)
    if records.skipped:
        print(f"[prepare] skipped {len(records.skipped)} bad item(s) (data.on_bad=skip):", flush=True)
        for ref, why in records.skipped:
            print(f"    {ref}: {why}", flush=True)
    identities, counts, repeats = records.identity_table()
    if records.repeats:
        each = [f"{i} x{r} ({n} image(s))" for i, n, r in zip(identities, counts, repeats)]
        more = f", ... and {len(each) - 20} more" if len(each) > 20 else ""
        print(f"[prepare] repeats from '<repeats>_<name>' folders: {', '.join(each[:20])}{more}; with "
              f"data.sampling=uniform an epoch is {sum(n * r for n, r in zip(counts, repeats))} rows "
              f"({sum(counts)} images), each image seen its identity's repeats times", flush=True)


def encoded_by(encoded: str) -> list[str]:
    """The distinct ``encoded_by`` values (``host:pid:device`` of each encoder), deduplicated per
    block and then here: a handful of strings, without the hash shuffle (and its aggregator
    actors) Ray Data's ``unique`` runs."""
    per_block = (ray.data.read_parquet(encoded, columns=["encoded_by"])
                 .map_batches(lambda b: {"encoded_by": np.unique(b["encoded_by"])}, batch_size=None,
                              batch_format="numpy"))
    return sorted({str(row["encoded_by"]) for row in per_block.take_all()})


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


# CPUs each encoder actor and each k-NN / density task asks for (cluster plans count them:
# pogdiff_dist/cluster_plan.py).
ENCODER_CPUS = 1.0
TASK_CPUS = 1.0


def resolve_gpus(setting: float | str, use_gpu: bool) -> float:
    """``prepare.gpus_per_encoder``: a number as given; ``auto`` by :func:`~pogdiff_dist.devices.auto_gpus`
    from the cluster's GPUs now, the GPUs its autoscaler can add (when reported) and the run's
    own ``train.use_gpu``, so an autoscaling cluster that has no GPU node yet still encodes on GPUs."""
    if setting == "auto":
        return auto_gpus(*cluster_gpus(), declared=use_gpu)
    return float(setting)


def task_threads(device: str, cpus: float = TASK_CPUS) -> int:
    """A CPU task computes with as many torch (and FAISS) threads as it has CPUs, not with
    whatever a reused Ray worker process or the user's OMP_NUM_THREADS left: a reduction
    split over another number of threads rounds differently (docs/REPRODUCIBILITY.md)."""
    threads = max(1, int(cpus))
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
        try:
            from pogdiff_dist.data.exact_search import import_faiss

            import_faiss().omp_set_num_threads(threads)
        except ImportError:  # no FAISS: the k-NN runs in torch
            pass
    return threads


def where_am_i(device: str) -> dict:
    """Host, node, process and device of the caller, for the stage markers."""
    return {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "device": device}


def knn_task(encoded: str, out: str, p: PrepareConfig, seed: int, gpus: float) -> dict:
    """The neighbours stage as a Ray task: reads the image embeddings itself, searches on its
    device, writes ``neighbours.parquet`` (:func:`~pogdiff_dist.data.neighbours.write_neighbours`).

    ``knn_index=flat``: exact search over the whole table (faiss-gpu, or torch on a GPU FAISS
    cannot use). ``ivf``: :func:`build_knn_ivf` streams the column in chunks, and its recall@k
    against exact search on ``knn_recall_queries`` random samples is measured and returned."""
    device = task_device(gpus)
    task_threads(device)
    if p.knn_index == "flat":
        z = read_encoded_columns(encoded, ["z"])["z"].astype(np.float32)
        idx, sims = build_knn(z, p.k_max, device=device, task_gpus=gpus)
        del z
        plan = knn_plan("auto", faiss_visible_gpus(), gpus, device)
        info = {"index": "flat", "backend": plan.backend, "faiss_gpus": len(plan.faiss_gpus)}
    else:
        source = ParquetColumn(encoded, "z")
        idx, sims, ivf = build_knn_ivf(source, p.k_max, nlist=p.knn_nlist, nprobe=p.knn_nprobe,
                                       train_rows=p.knn_train_rows, seed=seed, device=device, task_gpus=gpus)
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
    device = task_device(gpus)
    task_threads(device)
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
    text = load_text_encoder(text_dir, tok_dir, max_length).to(device)
    with torch.no_grad():
        _, pooled = text.encode([IDENTITY_PROMPT.format(name=n) for n in identities])
    return pooled.float().cpu().numpy()


def _scanned(out: Store, shards: list[str]) -> dict[str, dict]:
    """The shards' checksums and sample counts for the stage marker, one read of each."""
    scans = {s: scan_shard(out.open_input("shards", s)) for s in shards}
    return {"shard_sha256": {s: v.sha256 for s, v in scans.items()}, "shard_rows": {s: v.rows for s, v in scans.items()}}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _run_task(fn, gpus: float, *args) -> dict:
    return ray.get(ray.remote(fn).options(num_cpus=TASK_CPUS, num_gpus=gpus).remote(*args))


@contextmanager
def ordered_datasets():
    """Ray Data hands each operator's outputs on in input order while prepare runs. By default
    it passes on whichever block is ready first, so which encoded rows went into which Parquet
    file, and the order of the samples in the shards, followed the actors' timing: two prepares
    of Digits-IT2I M wrote identical encodings, neighbours and ELBOs but the same 104 rows in
    two different orders (from the first row on), so each rank of a run trained on other rows
    and two runs of one seed gave different models."""
    options = ray.data.DataContext.get_current().execution_options
    saved = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = saved


def run_prepare(cfg: Config) -> Manifest:
    """Run every stage that is not up to date; return the manifest."""
    with ordered_datasets():
        return _run_prepare(cfg)


def _run_prepare(cfg: Config) -> Manifest:
    t_start = time.time()
    out = Store(cfg.prepare.out_dir)  # a local folder or an object-storage prefix
    out.check_writable("prepare.out_dir")
    records = load_records(cfg)
    report_records(records)
    train = records.train()
    identities, train_counts, train_repeats = records.identity_table()
    ident_id = {n: i for i, n in enumerate(identities)}
    n = len(train)
    if cfg.prepare.k_max >= n:
        raise ValueError(f"prepare.k_max={cfg.prepare.k_max} is larger than the dataset allows: "
                         f"{n} training samples have at most {n - 1} neighbours each")

    text_dir, tok_dir = resolve_text_encoder_dir(cfg.model.text_encoder, cfg.model.pretrained)
    vae_dir = str(check_pretrained_dir(cfg.model.pretrained) / "vae") if cfg.model.pretrained else None
    channels = 3 if vae_dir else cfg.data.channels

    encoded = out.uri("encoded")
    # data.on_bad is in no fingerprint: records are re-read on every run, and the skipped ones change
    # records_fingerprint; a dataset that read cleanly reads the same under either policy.
    fps = stage_fingerprints(cfg, records_fingerprint(records), (text_dir, tok_dir, vae_dir))
    fp_encode = fps["encode"]
    gpus = resolve_gpus(cfg.prepare.gpus_per_encoder, cfg.train.use_gpu)
    stage = Stage(out, "encode", fp_encode)
    if not stage.done():
        out.delete_dir("encoded")
        items = [{"index": i, "key": r.key, "image": str(r.image), "caption": r.caption,
                  "identity_id": ident_id[r.identity]} for i, r in enumerate(train)]
        t0 = time.time()
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.prepare.batch_size, 64)))
        ds = map_on_actors(ds, SampleEncoder, batch_size=cfg.prepare.batch_size, batch_format="numpy",
                           compute=ray.data.ActorPoolStrategy(size=cfg.prepare.num_encoders), num_cpus=ENCODER_CPUS,
                           num_gpus=gpus,
                           fn_constructor_kwargs={"text_encoder_dir": str(text_dir), "tokenizer_dir": str(tok_dir),
                                                  "max_length": cfg.model.max_length,
                                                  "resolution": cfg.data.resolution, "channels": channels,
                                                  "image_encoder": cfg.model.image_encoder, "vae_dir": vae_dir,
                                                  "device": task_device(gpus)})
        ds.write_parquet(encoded)
        dt = time.time() - t0
        ran_on = encoded_by(encoded)
        print(f"[prepare] encode: {n} samples in {dt:.1f}s ({n / dt:.1f} samples/s) on {len(ran_on)} encoder(s) "
              f"with {gpus:g} GPU(s) each", flush=True)
        stage.finish(seconds=dt, gpus_per_encoder=gpus,
                     ran_on=[dict(zip(("host", "pid", "device"), w.split(":", 2))) for w in ran_on])

    p = cfg.prepare
    stage = Stage(out, "neighbours", fps["neighbours"])
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
    stage = Stage(out, "density", fps["density"])
    if not stage.done():
        t0 = time.time()
        ran_on = _run_task(density_task, gpus, encoded, out.uri(), dcfg, p.density_text,
                           identities, (str(text_dir), str(tok_dir)), cfg.model.max_length, gpus, p.density_buffer_rows)
        lo, hi = ran_on["elbo_min"], ran_on["elbo_max"]
        print(f"[prepare] density: ELBO range [{lo:.1f}, {hi:.1f}] nats (spread {hi - lo:.1f}) in "
              f"{time.time() - t0:.1f}s (on {ran_on['device']}, pid {ran_on['pid']})", flush=True)
        stage.finish(elbo_spread=hi - lo, ran_on=ran_on)

    shard_dir = out.uri("shards")
    fp_shards = fps["shards"]
    stage = Stage(out, "shards", fp_shards)
    if not stage.done():
        t0 = time.time()
        out.delete_dir("shards")
        write_shards(encoded, out, n, cfg.prepare.k_max, cfg.prepare.samples_per_shard, fp_shards)
        shards = out.list_files("shards", suffix=".tar")
        print(f"[prepare] shards: wrote {len(shards)} shard(s) in {time.time() - t0:.1f}s", flush=True)
        # sizes and checksums let training reject a truncated, corrupt or foreign shard by name
        stage.finish(shard_bytes={s: out.size("shards", s) for s in shards},
                     **_scanned(out, shards))

    shard_info = stage.info()
    sample = ray.data.read_parquet(encoded).take(1)[0]
    family = multi_encoder_family(cfg.model.pretrained)
    manifest = Manifest(
        fingerprint=fp_shards, num_samples=n, k_max=cfg.prepare.k_max,
        latent_shape=list(np.asarray(sample["latent"]).shape), text_shape=list(np.asarray(sample["y"]).shape),
        identities=identities, train_counts=train_counts, train_repeats=train_repeats,
        shards=out.list_files("shards", suffix=".tar"),
        text_encoder_dir=str(text_dir), tokenizer_dir=str(tok_dir), vae_dir=vae_dir,
        skipped=[list(s) for s in records.skipped], warnings=records.warnings,
        heldout=[{"image": str(r.image), "identity": r.identity} for r in records.heldout()],
        shard_bytes=shard_info.get("shard_bytes", {}), shard_sha256=shard_info.get("shard_sha256", {}),
        shard_rows=shard_info.get("shard_rows", {}),
        dataset=cfg.data.dataset if cfg.data.bundled is None else ":".join(cfg.data.bundled),
        family=family.name if family is not None else None, max_length=cfg.model.max_length,
        pooled_dim=int(np.asarray(sample["y_pooled"]).shape[-1]) if sample.get("y_pooled") is not None else 0,
    )
    manifest.save(out.uri())
    print(f"[prepare] done in {time.time() - t_start:.1f}s: {n} samples, {len(identities)} identities, "
          f"{len(manifest.shards)} shard(s) in {shard_dir}", flush=True)
    return manifest
