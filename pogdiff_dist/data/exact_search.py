"""Exact inner-product search backends for the k-NN (pogdiff_dist/data/neighbours.py), and the
decision of which one runs on which GPUs (:func:`knn_plan`): FAISS ``IndexFlatIP`` on its CPU or
on the GPUs this process was given, or torch matmul + top-k streamed over database chunks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnPlan:
    """How an exact search runs: ``backend`` ``faiss`` on FAISS's GPUs ``faiss_gpus`` (device
    numbers as FAISS sees them; empty: its CPU index), or ``torch`` (streamed matmul + top-k)
    on ``device``."""

    backend: str
    faiss_gpus: tuple[int, ...] = ()
    device: str = "cpu"

    @property
    def name(self) -> str:
        if self.backend == "torch":
            return f"torch on {self.device}"
        return f"faiss on {len(self.faiss_gpus)} GPU(s)" if self.faiss_gpus else "faiss on CPU"


def knn_plan(use_gpu: str | bool = "auto", faiss_visible: int | None = 0, task_gpus: float | None = None,
             device: str | None = None, backend: str = "auto") -> KnnPlan:
    """The search backend and the GPUs it may use, from what this process was given.

    Args:
        use_gpu: ``"auto"``, ``True`` (an error without a usable GPU) or ``False`` (CPU).
        faiss_visible: ``faiss.get_num_gpus()`` here (``None``: FAISS is not installed).
        task_gpus: the GPUs of the Ray task this runs in (``None``: not a Ray task). Ray sets
            ``CUDA_VISIBLE_DEVICES`` only for a task that asked for GPUs, so a task given none
            still sees every GPU of its node (others' GPUs) and must leave them alone; a task
            given n sees exactly its own, as FAISS devices ``0..n-1`` (a fraction: one shared GPU).
        device: the torch device this process computes on; outside a Ray task a ``cuda:i``
            device is the one GPU to use, ``cpu`` none, and no device every GPU FAISS sees.
        backend: ``auto``, ``faiss`` or ``torch``. ``auto``: FAISS, on its GPUs where allowed;
            torch on a CUDA device FAISS cannot use (faiss-cpu on a GPU node) or without FAISS.
    """
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    visible = faiss_visible or 0
    on_cuda = device is not None and str(device).startswith("cuda")
    if task_gpus is not None:
        allowed = list(range(max(1, int(task_gpus)))) if task_gpus > 0 else []
    elif device is not None:
        allowed = [int(str(device).partition(":")[2] or 0)] if on_cuda else []
    else:
        allowed = list(range(visible))
    if use_gpu is False:
        allowed = []
    usable = [g for g in allowed if g < visible]
    if use_gpu is True and not allowed and (task_gpus is not None or device is not None):
        raise ValueError(f"use_gpu=True but this process was given no GPU (task_gpus={task_gpus}, device={device})")
    if use_gpu is True and not usable and not (on_cuda and backend != "faiss"):
        raise ValueError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed, rather than faiss-cpu?)")
    torch_device = str(device) if device is not None else ("cuda" if allowed else "cpu")
    if backend == "torch" or (backend == "auto" and (faiss_visible is None or (allowed and not usable))):
        return KnnPlan("torch", device=torch_device)
    if faiss_visible is None:
        raise ImportError(NO_FAISS)
    return KnnPlan("faiss", faiss_gpus=tuple(usable))


NO_FAISS = ("FAISS is not installed: install pogdiff_dist[cpu] (faiss-cpu) or, on GPU nodes, pogdiff_dist[gpu] "
            "(faiss-gpu-cu12); never both, they install the same faiss package")


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(NO_FAISS) from e
    return faiss


def faiss_visible_gpus() -> int | None:
    """``faiss.get_num_gpus()`` here (0 with faiss-cpu), or ``None`` when FAISS is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss.get_num_gpus()


def faiss_index(d: int, plan: KnnPlan):
    """Exact inner-product index on the plan's FAISS GPUs (each holding the whole table), or its CPU."""
    faiss = import_faiss()

    index = faiss.IndexFlatIP(d)
    logger.info("build_knn: exact IndexFlatIP, %s", plan.name)
    return faiss.index_cpu_to_gpus_list(index, gpus=list(plan.faiss_gpus)) if plan.faiss_gpus else index


# Score-matrix elements one torch search step holds: [query rows x database rows] float32,
# 1 GiB (at the default query batch of 65,536 rows, database chunks of 4,096 rows).
TORCH_BLOCK_ELEMENTS = 1 << 28


def torch_topk_search(q, z, k: int, db_chunk: int):
    """Exact top-``k`` inner products of queries ``q`` [m, d] against database ``z`` [N, d]
    (torch tensors on one device): ``(scores, indices)`` [m, k], best first.

    The database is streamed in chunks of ``db_chunk`` rows with a running top-k, so memory is
    [m x db_chunk] scores, never the [m x N] matrix (79 GB at m = 65,536, N = 300k)."""
    import torch

    if not 1 <= k <= len(z):
        raise ValueError(f"k must be in 1..{len(z)}, got {k}")
    best_s = best_i = None
    for start in range(0, len(z), db_chunk):
        s, i = (q @ z[start:start + db_chunk].T).topk(min(k, len(z) - start, db_chunk), dim=1)
        i += start
        if best_s is not None:
            s, i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
            s, pick = s.topk(min(k, s.shape[1]), dim=1)
            i = i.gather(1, pick)
        best_s, best_i = s, i
    return best_s, best_i


class TorchExactIndex:
    """Exact inner-product search as streamed matmul + top-k on a torch device (FAISS's
    IndexFlatIP semantics: ``search`` returns (similarities, indices), best first)."""

    def __init__(self, device, block_elements: int | None = None):
        import torch

        self.torch, self.device, self.z = torch, torch.device(device), None
        self.block = block_elements or TORCH_BLOCK_ELEMENTS

    def add(self, z: np.ndarray) -> None:
        self.z = self.torch.from_numpy(z).to(self.device)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        # full fp32 products: TF32 would reorder near-ties that exact search must keep
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            chunk = max(k, self.block // max(1, len(q)))
            s, i = torch_topk_search(torch.from_numpy(q).to(self.device), self.z, k, chunk)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow
        return s.cpu().numpy(), i.cpu().numpy()
