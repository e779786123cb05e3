"""Prepare's k-NN, density and neighbour-join stages at a million samples, on this machine.

Synthetic encoded Parquet (the layout the encode stage writes: Ray tensor columns) of N
samples with d-dim image embeddings ``z`` drawn around cluster centres, d-dim pooled
caption embeddings ``pooled`` drawn around identity centres (identity sizes Zipf-like,
so some are rare), L caption tokens and tiny latents, is run through prepare's own stage
functions on a local Ray cluster:

* neighbours: ``knn_task`` with ``prepare.knn_index=ivf`` (streamed IVF build and search,
  recall@k against exact search on 1000 random queries), as a Ray task of 2 CPUs (Ray then
  gives FAISS and torch 2 threads; prepare's own task asks for 1);
* density: ``density_task`` (the VAE fitted from streamed buffers, ELBO streamed), with
  ``--density-epochs`` passes (one pass over 1M rows is already ~4000 Adam steps);
* join: ``join_neighbour_tokens`` (Ray Data: hash partition by neighbour, sort by sample)
  and the encoded rows streamed through ``_AttachNeighbours`` into shard rows. The rows are
  consumed, not written as tar files, unless ``--write-shards`` (at 1M the tar headers
  alone would be ~8 GB of scratch disk).

Peak RSS is sampled (psutil, every 0.25 s) for every process of the session: the driver
and every Ray process (raylet, GCS, workers), per stage; the k-NN and density tasks also
report their own ``ru_maxrss`` (each runs in a fresh worker). RSS counts the pages of Ray's
shared-memory object store a worker has mapped. Goal: no process above 4 GiB, the three
stages under 30 minutes.

    .venv/bin/python benchmarks/prepare_scale.py               # N = 1,000,000
    .venv/bin/python benchmarks/prepare_scale.py --n 20000     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from _common import RESULTS, WORK, write_result

from pogdiff_dist.config import PrepareConfig, RayConfig
from pogdiff_dist.data.density import DensityVAEConfig
from pogdiff_dist.prepare.join import join_neighbour_tokens, shard_row_dataset
from pogdiff_dist.prepare.pipeline import density_task, knn_task
from pogdiff_dist.runtime import init_ray
from pogdiff_dist.storage import Store

GIB = 2**30


class PeakRSS:
    """Peak RSS per process of this process tree, sampled in a thread, kept per stage."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.stage, self.peaks = interval, "setup", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    mem, name = proc.memory_info(), " ".join(proc.cmdline()[:2])[:80] or proc.name()
                except psutil.Error:
                    continue
                # resident pages not shared with other processes (statm: rss - shared, i.e. anonymous
                # memory): RSS also counts Ray's shared-memory object store pages a process maps
                rss, private = mem.rss, mem.rss - mem.shared
                if proc.pid == me.pid:
                    name = "driver"
                elif name.startswith("ray::"):
                    name = name.split()[0]
                stage = self.peaks.setdefault(self.stage, {})
                prev = stage.setdefault(proc.pid, {"rss": 0, "private": 0, "name": name})
                if rss > prev["rss"]:  # named by what the process ran at its peak (a Ray worker's title)
                    prev["rss"], prev["name"] = rss, name
                prev["private"] = max(prev["private"], private)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def table(self, stage: str) -> list[dict]:
        rows = sorted(self.peaks.get(stage, {}).items(), key=lambda kv: -kv[1]["rss"])
        return [{"pid": pid, "name": v["name"], "peak_rss_gib": v["rss"] / GIB, "peak_private_gib": v["private"] / GIB}
                for pid, v in rows]


def synthetic_block(batch: dict, d: int, length: int, clusters: int, identities: int, seed: int) -> dict:
    """Encoded rows for sample indices ``batch['id']``, seeded by the first index."""
    index = batch["id"].astype(np.int64)
    n = len(index)
    centres_rng = np.random.default_rng(seed)  # the same centres in every block
    z_centres = centres_rng.standard_normal((clusters, d)).astype(np.float32)
    z_centres /= np.linalg.norm(z_centres, axis=1, keepdims=True)
    t_centres = centres_rng.standard_normal((identities, d)).astype(np.float32)
    p = 1.0 / np.arange(1, clusters + 1) ** 0.8  # Zipf-like cluster sizes
    rng = np.random.default_rng([seed, int(index[0])])
    cluster = rng.choice(clusters, size=n, p=p / p.sum())
    identity = cluster * identities // clusters
    z = z_centres[cluster] + 0.7 * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    pooled = t_centres[identity] + 0.3 * rng.standard_normal((n, d), dtype=np.float32)
    lengths = rng.integers(3, length + 1, size=n).astype(np.int32)
    tokens = rng.integers(1, 30000, size=(n, length)).astype(np.int32)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return {"index": index, "key": np.array([f"{i:08d}" for i in index]), "identity_id": identity.astype(np.int64),
            "caption": np.array([f"synthetic caption {i}" for i in index]), "tokens": tokens, "length": lengths,
            "latent": rng.standard_normal((n, 1, 2, 2), dtype=np.float32),
            "y": rng.standard_normal((n, 2, 4)).astype(np.float16), "pooled": pooled.astype(np.float32),
            "z": z.astype(np.float32)}


def _measured(fn, *args):
    """Run a stage function and report this worker's peak RSS with its result."""
    out = fn(*args)
    return {**out, "task_ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=20, help="prepare.k_max's default")
    p.add_argument("--length", type=int, default=16, help="caption tokens per sample (configs' max_length)")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--identities", type=int, default=500)
    p.add_argument("--nlist", type=int, default=0, help="prepare.knn_nlist (0: ~4 sqrt N)")
    p.add_argument("--nprobe", type=int, default=16, help="prepare.knn_nprobe")
    p.add_argument("--density-epochs", type=int, default=1)
    p.add_argument("--task-cpus", type=int, default=2, help="CPUs (so threads) of the k-NN and density tasks")
    p.add_argument("--write-shards", action="store_true", help="write the WebDataset shards to scratch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(WORK / "prepare-scale"))
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results/prepare-<n>)")
    args = p.parse_args()
    out_dir = Path(args.out) if args.out else RESULTS / f"prepare-{args.n // 1000}k".replace("1000k", "1m")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    encoded = work / "encoded"

    import ray
    import ray.data

    rss = PeakRSS()
    init_ray(RayConfig(num_cpus=4))
    stages: dict[str, dict] = {}

    def stage(name):
        rss.stage = name
        return time.perf_counter()

    t0 = stage("synthetic")
    block_rows = 50_000
    (ray.data.range(args.n, override_num_blocks=max(1, args.n // block_rows))
     .map_batches(synthetic_block, batch_size=block_rows, batch_format="numpy",
                  fn_kwargs={"d": args.d, "length": args.length, "clusters": args.clusters,
                             "identities": args.identities, "seed": args.seed})
     .write_parquet(str(encoded)))
    stages["synthetic"] = {"wall_s": time.perf_counter() - t0}
    print(f"synthetic: {args.n} rows in {stages['synthetic']['wall_s']:.0f}s", flush=True)

    measured = ray.remote(max_calls=1)(_measured)  # a fresh worker per task: its ru_maxrss is the task's

    def run(fn, *a):
        return ray.get(measured.options(num_cpus=args.task_cpus).remote(fn, *a))

    pcfg = PrepareConfig(out_dir=str(work), k_max=args.k, knn_index="ivf", knn_nlist=args.nlist,
                         knn_nprobe=args.nprobe)
    t0 = stage("neighbours")
    info = run(knn_task, str(encoded), str(work), pcfg, args.seed, 0.0)
    stages["neighbours"] = {"wall_s": time.perf_counter() - t0, "task": info}
    print(f"neighbours: {stages['neighbours']['wall_s']:.0f}s recall {info['recall']} "
          f"(nlist {info['nlist']}, nprobe {info['nprobe']})", flush=True)

    t0 = stage("density")
    dcfg = DensityVAEConfig(epochs=args.density_epochs, seed=args.seed)
    info = run(density_task, str(encoded), str(work), dcfg, "caption", [], ("", ""), args.length, 0.0)
    stages["density"] = {"wall_s": time.perf_counter() - t0, "task": info}
    elbo = np.load(work / "elbo.npy")
    ident = np.concatenate([b["identity_id"] for b in ray.data.read_parquet(str(encoded)).select_columns(
        ["identity_id"]).iter_batches(batch_size=None, batch_format="numpy")])
    # rows arrive in file order; elbo is in index order
    idx = np.concatenate([b["index"] for b in ray.data.read_parquet(str(encoded)).select_columns(
        ["index"]).iter_batches(batch_size=None, batch_format="numpy")])
    ident = ident[np.argsort(idx)]
    counts = np.bincount(ident, minlength=args.identities)
    rare, common = counts <= np.quantile(counts[counts > 0], 0.1), counts >= np.quantile(counts, 0.9)
    stages["density"]["elbo_rare_identities"] = float(elbo[rare[ident]].mean())
    stages["density"]["elbo_common_identities"] = float(elbo[common[ident]].mean())
    print(f"density: {stages['density']['wall_s']:.0f}s, mean ELBO rare identities "
          f"{stages['density']['elbo_rare_identities']:.1f} vs common {stages['density']['elbo_common_identities']:.1f}",
          flush=True)

    t0 = stage("join")
    nbr_dir = work / "neighbour_tokens"
    join_neighbour_tokens(str(encoded), str(work / "neighbours.parquet"), str(nbr_dir), args.n, args.k)
    t_join = time.perf_counter() - t0
    ds = shard_row_dataset(str(encoded), Store(str(work)), "bench")  # what prepare's shards stage streams
    rows = 0
    if args.write_shards:
        ds.repartition(target_num_rows_per_block=256).write_webdataset(str(work / "shards"))
        rows = args.n
    else:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(batch["__key__"])
            assert batch["nbr_tokens.npy"].shape[1:] == (args.k, args.length)
    assert rows == args.n, rows
    stages["join"] = {"wall_s": time.perf_counter() - t0, "join_neighbour_tokens_s": t_join,
                      "attach_s": time.perf_counter() - t0 - t_join, "rows": rows}
    print(f"join: {stages['join']['wall_s']:.0f}s ({t_join:.0f}s Ray Data join, then attach)", flush=True)
    stage("done")
    rss.stop()
    ray.shutdown()

    timed = ("neighbours", "density", "join")
    total = sum(stages[s]["wall_s"] for s in timed)
    for s, info in stages.items():
        info["peak_rss"] = rss.table(s)
    worst = max((r["peak_rss_gib"], s, r["name"]) for s in timed for r in stages[s]["peak_rss"])
    worst_private = max((r["peak_private_gib"], s, r["name"]) for s in timed for r in stages[s]["peak_rss"])
    recall = stages["neighbours"]["task"]["recall"]
    result = {
        "config": vars(args), "stages": stages, "total_wall_s": total,
        "recall_at_10": recall.get("10"), "max_process_rss_gib": worst[0], "max_process": [worst[1], worst[2]],
        "max_process_private_gib": worst_private[0], "max_private_process": [worst_private[1], worst_private[2]],
        "targets": {"wall": {"value_s": total, "target": "< 1800 s", "met": total < 1800},
                    "rss": {"value_gib": worst[0], "target": "< 4 GiB per process", "met": worst[0] < 4}},
    }
    write_result("prepare_scale", result, out_dir / "result.json")
    lines = [f"# prepare at N={args.n:,} (d={args.d}, k_max={args.k}, L={args.length}) on {os.cpu_count()} cores",
             "", "| stage | wall (s) | top processes by peak RSS, GiB (private: RSS less shared pages) |", "|---|---:|---|"]
    for s in ("synthetic", *timed):
        top = ", ".join(f"{r['name']} {r['peak_rss_gib']:.2f} ({r['peak_private_gib']:.2f})"
                        for r in stages[s]["peak_rss"][:4])
        lines.append(f"| {s} | {stages[s]['wall_s']:.0f} | {top} |")
    nb, de = stages["neighbours"]["task"], stages["density"]
    lines += ["", (f"k-NN + density + join: {total:.0f} s (target < 1800 s: {'met' if total < 1800 else 'MISSED'}); "
                   f"largest process {worst[0]:.2f} GiB ({worst[2]}, {worst[1]}; target < 4 GiB: "
                   f"{'met' if worst[0] < 4 else 'MISSED'}); largest private memory {worst_private[0]:.2f} GiB "
                   f"({worst_private[2]}, {worst_private[1]})."),
              (f"IVF: nlist {nb['nlist']}, nprobe {nb['nprobe']}, "
               f"recall {json.dumps(recall)} against exact search on {nb['recall_queries']} random queries."),
              (f"k-NN task ru_maxrss {nb['task_ru_maxrss_gib']:.2f} GiB, density task "
               f"{de['task']['task_ru_maxrss_gib']:.2f} GiB; density {args.density_epochs} epoch(s), "
               f"mean ELBO rare identities {de['elbo_rare_identities']:.1f} vs common "
               f"{de['elbo_common_identities']:.1f} nats."), ""]
    (out_dir / "table.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
