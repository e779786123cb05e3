"""Exact k-NN of 1M x 768 vectors on one GPU with the project's ``build_knn`` (faiss-gpu).

Times ``pogdiff_dist.data.neighbours.build_knn(z, k, use_gpu=True)``: exact
``IndexFlatIP`` moved to the GPU, every vector querying all others, self excluded. Goal
(issue 5): under a minute for N = 1,000,000, d = 768 (CLIP ViT-L/14 image embeddings).
When torch sees a GPU, a torch matmul + topk pass over the same vectors on that GPU is
timed as a lower bound.

Needs faiss-gpu (the ``gpu`` extra: ``FAISS_EXTRA=gpu bash scripts/install.sh``, which
replaces faiss-cpu) and a CUDA device; without them it exits
with a message. The CPU path of the same code runs with ``--device cpu`` (use a small N):

    .venv/bin/python benchmarks/faiss_gpu.py                          # GPU machine
    .venv/bin/python benchmarks/faiss_gpu.py --device cpu --n 20000   # code-path check on CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [p for p in (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1]))
                if p not in sys.path]

import faiss
import numpy as np
import torch

from pogdiff_dist.data.neighbours import build_knn


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z


def torch_lower_bound(z: np.ndarray, k: int, device: str, block: int = 2048) -> float:
    """Seconds for block-wise Z @ Z.T + topk(k + 1) over all rows on ``device`` (fp32)."""
    zt = torch.from_numpy(z).to(device)
    torch.topk(zt[:block] @ zt.T, k + 1, dim=1)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(zt), block):
        torch.topk(zt[start:start + block] @ zt.T, k + 1, dim=1)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--query-batch", type=int, default=65536)
    p.add_argument("--out", default=None, help="JSON path (default: results/faiss_gpu.json on a GPU run)")
    args = p.parse_args()
    use_gpu = args.device == "cuda"
    if use_gpu and faiss.get_num_gpus() == 0:
        print("faiss_gpu.py: FAISS sees no GPU (faiss.get_num_gpus() == 0: no CUDA device, or faiss-cpu is "
              "installed instead of faiss-gpu-cu12). This benchmark needs one; --device cpu --n 20000 checks "
              "the same code on CPU.", file=sys.stderr)
        sys.exit(2)

    from _common import write_result

    z = unit_vectors(args.n, args.d)
    t0 = time.perf_counter()
    idx, _sims = build_knn(z, args.k, use_gpu=use_gpu, query_batch=args.query_batch)
    build_s = time.perf_counter() - t0
    assert idx.shape == (args.n, args.k) and (idx != np.arange(args.n)[:, None]).all()
    result = {"config": vars(args), "build_knn_s": build_s, "gpus": faiss.get_num_gpus(),
              "gflops": 2.0 * args.n * args.n * args.d / build_s / 1e9}
    if use_gpu:
        result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        result["target"] = {"value": build_s, "target": "< 60 s", "met": bool(build_s < 60)}
    lb_device = "cuda" if use_gpu and torch.cuda.is_available() else ("cpu" if not use_gpu else None)
    if lb_device:
        result["torch_matmul_topk_s"] = torch_lower_bound(z, args.k, lb_device)
        result["build_over_lower_bound"] = build_s / result["torch_matmul_topk_s"]
    print(f"build_knn over {args.n} x {args.d} (k={args.k}, {args.device}): {build_s:.1f}s"
          + (f"; torch matmul+topk {result['torch_matmul_topk_s']:.1f}s" if lb_device else ""), flush=True)
    if args.out or use_gpu:
        write_result("faiss_gpu", result, args.out)


if __name__ == "__main__":
    main()
