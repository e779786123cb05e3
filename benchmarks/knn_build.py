"""Neighbour index build time on CPU against a matmul + top-k lower bound.

``pogdiff_dist.data.neighbours.build_knn`` (exact FAISS ``IndexFlatIP``, self excluded)
over N random unit vectors of d = 384 (the MiniLM text / image embedding size), set
against the least any exact method must do on the same machine: one ``Z @ Z.T`` block at
a time and ``torch.topk`` of k + 1 per row. Also times FAISS alone (add + search, no
wrapper) to attribute any gap to build_knn's own code or to FAISS. Target: build_knn
within 1.5x of the lower bound.

The lower bound and the raw FAISS search scale linearly in the number of query rows, so
at large N they are timed on the first ``--query-frac`` of the rows and scaled up (the
database is always all N vectors); build_knn itself always runs in full.

    .venv/bin/python benchmarks/knn_build.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import write_result

import faiss
import numpy as np
import torch

from pogdiff_dist.data.neighbours import build_knn


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def matmul_topk(z: torch.Tensor, k: int, rows: int, block: int = 1024) -> None:
    """Exact top-(k+1) inner products of the first ``rows`` rows against all of ``z``."""
    for start in range(0, rows, block):
        torch.topk(z[start:start + block] @ z.T, k + 1, dim=1)


def faiss_search(z: np.ndarray, k: int, rows: int) -> None:
    index = faiss.IndexFlatIP(z.shape[1])
    index.add(z)
    index.search(z[:rows], k + 1)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(n: int, d: int, k: int, reps: int, query_frac: float) -> dict:
    z = unit_vectors(n, d)
    zt = torch.from_numpy(z)
    rows = n if query_frac >= 1 else max(1024, int(n * query_frac))
    scale = n / rows
    matmul_topk(zt, k, min(rows, 2048))  # warm-up
    times: dict[str, list[float]] = {"build_knn": [], "faiss_search": [], "matmul_topk": []}
    for _ in range(reps):  # interleaved
        times["build_knn"].append(timed(lambda: build_knn(z, k, use_gpu=False)))
        times["faiss_search"].append(timed(lambda: faiss_search(z, k, rows)) * scale)
        times["matmul_topk"].append(timed(lambda: matmul_topk(zt, k, rows)) * scale)
    med = {key: statistics.median(v) for key, v in times.items()}
    flops = 2.0 * n * n * d
    return {
        "n": n, "d": d, "k": k, "reps": reps, "query_rows_timed": rows, "scaled_by": scale,
        "median_s": med, "all_s": times,
        "build_over_lower_bound": med["build_knn"] / med["matmul_topk"],
        "faiss_over_lower_bound": med["faiss_search"] / med["matmul_topk"],
        "wrapper_overhead_s": med["build_knn"] - med["faiss_search"],
        "gemm_gflops": {key: flops / v / 1e9 for key, v in med.items()},
        "target": {"value": med["build_knn"] / med["matmul_topk"], "target": "<= 1.5",
                   "met": bool(med["build_knn"] / med["matmul_topk"] <= 1.5)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=(10_000, 100_000))
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=20, help="prepare.k_max's default")
    p.add_argument("--reps", type=int, nargs="+", default=(3, 1), help="repetitions per size")
    p.add_argument("--query-frac", type=float, nargs="+", default=(1.0, 0.1),
                   help="fraction of rows timed for the lower bound / raw FAISS, per size")
    p.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: all cores)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    threads = {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}
    rows = []
    for i, n in enumerate(args.sizes):
        reps = args.reps[min(i, len(args.reps) - 1)]
        frac = args.query_frac[min(i, len(args.query_frac) - 1)]
        r = bench(n, args.d, args.k, reps, frac)
        rows.append(r)
        m = r["median_s"]
        print(f"N={n}: build_knn {m['build_knn']:.2f}s  faiss {m['faiss_search']:.2f}s  "
              f"matmul+topk {m['matmul_topk']:.2f}s  -> build_knn {r['build_over_lower_bound']:.2f}x lower bound "
              f"({'MET' if r['target']['met'] else 'MISSED'} <= 1.5)", flush=True)
    write_result("knn_build", {"config": vars(args), "threads": threads, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
