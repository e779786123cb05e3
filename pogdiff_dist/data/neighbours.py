"""Image-space neighbours of every sample: exact cosine k-NN with FAISS (Eq. 8 of PoGDiff).

PoGDiff lets sample i borrow strength from its k nearest *other* samples in the frozen
image-embedding space z. Here they are found once per dataset by exact inner-product
search on L2-normalised embeddings, i.e. by cosine similarity, and turned into the
sampling weights w_j used to draw one neighbour per training step. The search is FAISS
``IndexFlatIP`` (on its GPUs with faiss-gpu), or, on a CUDA device that FAISS cannot use
(faiss-cpu installed on a GPU node), the same exact search as chunked matmul + top-k in torch.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _first_bad_row(mask: np.ndarray) -> int:
    """Index of the first row of a 2-D boolean mask with any True entry (-1 if none)."""
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[0]) if rows.size else -1


def _normalised_copy(z: np.ndarray) -> np.ndarray:
    """Validated, L2-normalised float32 copy of ``z`` [N, d]."""
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"z must be a non-empty 2-D array [N, d], got shape {z.shape}")
    z = np.array(z, dtype=np.float32, order="C", copy=True)
    bad = _first_bad_row(~np.isfinite(z))
    if bad >= 0:
        raise ValueError(f"z has a NaN/Inf value in row {bad}")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"z row {int(zero[0])} has zero norm, so its cosine similarity is undefined")
    z /= norms
    return z


def _make_index(d: int, use_gpu: str | bool):
    """Exact inner-product index, moved to all GPUs when asked for (or when ``"auto"`` finds one)."""
    import faiss

    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    index = faiss.IndexFlatIP(d)
    n_gpus = faiss.get_num_gpus()
    if use_gpu is True and n_gpus == 0:
        raise ValueError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
    if n_gpus > 0 and use_gpu in (True, "auto"):
        logger.info("build_knn: exact IndexFlatIP on %d GPU(s)", n_gpus)
        return faiss.index_cpu_to_all_gpus(index)
    logger.info("build_knn: exact IndexFlatIP on CPU")
    return index


class _TorchExactIndex:
    """Exact inner-product search as matmul + top-k on a torch device (FAISS's IndexFlatIP
    semantics: ``search`` returns (similarities, indices), best first)."""

    def __init__(self, device):
        import torch

        self.torch, self.device, self.z = torch, torch.device(device), None

    def add(self, z: np.ndarray) -> None:
        self.z = self.torch.from_numpy(z).to(self.device)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        # full fp32 products: TF32 would reorder near-ties that exact search must keep
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            s, i = (torch.from_numpy(q).to(self.device) @ self.z.T).topk(k, dim=1)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow
        return s.cpu().numpy(), i.cpu().numpy()


def knn_backend(device: str | None = None, backend: str = "auto") -> str:
    """Which exact search ``build_knn`` runs: ``faiss`` (its GPUs when faiss-gpu sees one) or
    ``torch`` (matmul + top-k on ``device``). ``auto``: FAISS, except on a CUDA device that
    FAISS cannot use (faiss-cpu installed on a GPU node, or no FAISS at all)."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend != "auto":
        return backend
    on_cuda = device is not None and str(device).startswith("cuda")
    try:
        import faiss
    except ImportError:
        if on_cuda:
            return "torch"
        raise
    return "torch" if on_cuda and faiss.get_num_gpus() == 0 else "faiss"


def build_knn(
    z: np.ndarray,
    k_max: int,
    use_gpu: str | bool = "auto",
    query_batch: int = 65536,
    progress: bool = False,
    device: str | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k_max`` nearest other samples of every sample by cosine similarity (Eq. 8).

    Args:
        z: image embeddings [N, d]; need not be normalised (a normalised copy is searched).
        k_max: neighbours kept per sample; training may use any k <= k_max.
        use_gpu: ``True`` (error without a GPU), ``False``, or ``"auto"`` (GPU if FAISS sees one).
        query_batch: rows queried at once, bounding the [query_batch, k_max + 1] result memory.
        progress: show a tqdm bar over the query batches.
        device: the torch device this process was given; a CUDA device searches there
            (with faiss-gpu, or with torch when FAISS has no GPU support).
        backend: ``auto``, ``faiss`` or ``torch`` (see ``knn_backend``).

    Returns:
        ``(idx, sims)``: int64 [N, k_max] neighbour indices and float32 [N, k_max] cosine
        similarities, sorted by similarity descending, each sample itself excluded.
    """
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if query_batch < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    z = _normalised_copy(z)
    n, d = z.shape
    if k_max >= n:
        raise ValueError(
            f"k_max={k_max} is larger than the dataset allows: N={n} samples leave only {n - 1} "
            "other samples to be neighbours"
        )
    if knn_backend(device, backend) == "torch":
        index = _TorchExactIndex(device or "cpu")
    else:
        index = _make_index(d, use_gpu)
    index.add(z)

    idx = np.empty((n, k_max), dtype=np.int64)
    sims = np.empty((n, k_max), dtype=np.float32)
    starts = range(0, n, query_batch)
    for start in tqdm(starts, desc="knn", unit="batch", disable=not progress):
        stop = min(start + query_batch, n)
        s, i = index.search(z[start:stop], k_max + 1)
        # Exclude self by index, not position: with exact duplicates a twin can tie with
        # (and precede) the self hit. If self fell outside the k_max + 1 hits (many
        # duplicates), every hit is another sample and the last one is dropped instead.
        keep = i != np.arange(start, stop)[:, None]
        keep[keep.all(axis=1), -1] = False
        idx[start:stop] = i[keep].reshape(stop - start, k_max)
        sims[start:stop] = s[keep].reshape(stop - start, k_max)
    assert (idx >= 0).all(), "FAISS returned a missing neighbour (-1) although k_max < N"
    return idx, sims
