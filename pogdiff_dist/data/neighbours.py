"""Image-space neighbours of every sample: exact cosine k-NN with FAISS (Eq. 8 of PoGDiff).

PoGDiff lets sample i borrow strength from its k nearest *other* samples in the frozen
image-embedding space z. Here they are found once per dataset by exact inner-product
search on L2-normalised embeddings, i.e. by cosine similarity, and turned into the
sampling weights w_j used to draw one neighbour per training step. The search is FAISS
``IndexFlatIP`` (on the GPUs this process was given, with faiss-gpu), or, on a CUDA device that
FAISS cannot use (faiss-cpu on a GPU node) or without FAISS, the same exact search in torch:
matmul + top-k streamed over database chunks with a running top-k (:func:`knn_plan` decides).

At a million samples exact search is N^2 d work and the [N, d] table alone is 2 GiB, so
:func:`build_knn_ivf` offers FAISS's inverted-file index instead (``prepare.knn_index=ivf``):
k-means centroids trained on a sample, every vector added in streamed chunks, each query
scanning the ``nprobe`` nearest of ``nlist`` lists. It is approximate; :func:`knn_recall`
measures how much against exact search on a random sample of queries.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from pogdiff_dist.data.columns import list_values
from pogdiff_dist.data.exact_search import TorchExactIndex, faiss_index, faiss_visible_gpus, import_faiss, knn_plan
from pogdiff_dist.storage import Store

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
    return _normalised_chunk(np.arange(len(z)), z)


def build_knn(
    z: np.ndarray,
    k_max: int,
    use_gpu: str | bool = "auto",
    query_batch: int = 65536,
    progress: bool = False,
    device: str | None = None,
    backend: str = "auto",
    task_gpus: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k_max`` nearest other samples of every sample by cosine similarity (Eq. 8).

    Args:
        z: image embeddings [N, d]; need not be normalised (a normalised copy is searched).
        k_max: neighbours kept per sample; training may use any k <= k_max.
        use_gpu: ``True`` (error without a GPU), ``False``, or ``"auto"`` (the GPUs this process
            may use, see :func:`knn_plan`).
        query_batch: rows queried at once, bounding the [query_batch, k_max + 1] result memory.
        progress: show a tqdm bar over the query batches.
        device: the torch device this process was given; a CUDA device searches there
            (with faiss-gpu, or with torch when FAISS has no GPU support).
        backend: ``auto``, ``faiss`` or ``torch`` (see :func:`knn_plan`).
        task_gpus: the GPUs of the Ray task this runs in: FAISS uses those and no others.

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
    plan = knn_plan(use_gpu, faiss_visible_gpus(), task_gpus, device, backend)
    index = TorchExactIndex(plan.device) if plan.backend == "torch" else faiss_index(d, plan)
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
        idx[start:stop], sims[start:stop] = _drop_self(s, i, np.arange(start, stop))
    assert (idx >= 0).all(), "FAISS returned a missing neighbour (-1) although k_max < N"
    return idx, sims


def ties_by_index(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search hits [n, k] re-sorted by similarity descending, equal similarities by sample index
    ascending. FAISS, torch's top-k and FAISS on a GPU each order exact ties their own way
    (heap, partial sort, thread blocks), so without a rule the neighbour at rank r of a
    sample with duplicate images would depend on the backend; with it, on the similarities
    alone. (Which of several tied samples makes the cut at rank k is still the backend's.)"""
    order = np.lexsort((i, -s), axis=1)
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _drop_self(s: np.ndarray, i: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, k + 1] search hits of queries ``ids`` -> [n, k] without the query itself, ties by
    index (:func:`ties_by_index`).

    Self is excluded by index, not position: with exact duplicates a twin can tie with (and
    precede) the self hit. If self fell outside the k + 1 hits (many duplicates), every hit
    is another sample and the last one is dropped instead."""
    s, i = ties_by_index(s, i)
    keep = i != ids[:, None]
    keep[keep.all(axis=1), -1] = False
    n, k = len(ids), i.shape[1] - 1
    return i[keep].reshape(n, k), s[keep].reshape(n, k)


def _normalised_chunk(index: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Validated, L2-normalised float32 copy of one streamed chunk (errors name the sample)."""
    z = np.array(z, dtype=np.float32, order="C", copy=True).reshape(len(index), -1)
    bad = _first_bad_row(~np.isfinite(z))
    if bad >= 0:
        raise ValueError(f"z has a NaN/Inf value in row {int(index[bad])}")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"z row {int(index[zero[0]])} has zero norm, so its cosine similarity is undefined")
    z /= norms
    return z


def ivf_nlist(n: int, nlist: int = 0) -> int:
    """Inverted lists for N vectors: ``nlist``, or when 0 about 4 sqrt(N) (FAISS's usual
    guidance), at most N / 39 so k-means has the 39 points per centroid FAISS asks for."""
    if nlist < 0:
        raise ValueError(f"nlist must be >= 0 (0: automatic), got {nlist}")
    auto = max(1, min(int(4 * np.sqrt(n) + 0.5), n // 39))
    return nlist or auto


# k-means iterations for the IVF centroids (FAISS's default is 25): the lists only route the
# search, and 10 iterations on a 2-core CPU keep training at a million samples to minutes.
IVF_KMEANS_ITERS = 10


def build_knn_ivf(
    source,
    k_max: int,
    nlist: int = 0,
    nprobe: int = 16,
    train_rows: int = 0,
    seed: int = 0,
    use_gpu: str | bool = "auto",
    device: str | None = None,
    task_gpus: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate ``k_max`` nearest other samples by cosine similarity with ``IndexIVFFlat``.

    Args:
        source: a :class:`~pogdiff_dist.data.columns.RowSource` of image embeddings (read
            three times: training sample, add, queries), so the [N, d] table is never held
            beyond the index's own float32 copy.
        nlist: inverted lists (0: :func:`ivf_nlist`'s 4 sqrt(N)).
        nprobe: lists scanned per query; nprobe = nlist is exact search.
        train_rows: k-means training sample, drawn uniformly without replacement (0: 64 per list).
        seed: the training sample and k-means initialisation.
        use_gpu, device, task_gpus: as :func:`build_knn`: the index runs on the FAISS GPUs
            :func:`knn_plan` allows this process (a Ray task: only its own).

    Returns:
        ``(idx, sims, info)`` as :func:`build_knn` (similarities are exact inner products of
        the neighbours found), and ``info`` with the index parameters used.
    """
    faiss = import_faiss()

    n = source.n_rows
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if k_max >= n:
        raise ValueError(f"k_max={k_max} is larger than the dataset allows: N={n} samples leave only {n - 1} "
                         "other samples to be neighbours")
    nlist = ivf_nlist(n, nlist)
    if nlist > n:
        raise ValueError(f"nlist={nlist} exceeds the N={n} vectors to cluster")
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    nprobe = min(nprobe, nlist)
    train_rows = min(n, train_rows or 64 * nlist)
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).choice(n, train_rows, replace=False)] = True
    sample = np.concatenate([_normalised_chunk(i, z)[chosen[i]] for i, z in source.chunks()])

    d = sample.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.seed = IVF_KMEANS_ITERS, seed
    # no device and no task: the CPU unless asked (the flat search's "every GPU" does not apply)
    plan = knn_plan(use_gpu, faiss.get_num_gpus(), task_gpus, device if device or use_gpu is True else "cpu", "faiss")
    on_gpu = bool(plan.faiss_gpus)
    if on_gpu:
        index = faiss.index_cpu_to_gpus_list(index, gpus=list(plan.faiss_gpus))
    logger.info("build_knn_ivf: IVF%d,Flat nprobe=%d on %s, trained on %d rows", nlist, nprobe,
                "GPU" if on_gpu else "CPU", train_rows)
    index.train(sample)
    del sample
    for i, z in source.chunks():
        index.add_with_ids(_normalised_chunk(i, z), np.asarray(i, dtype=np.int64))
    if on_gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        index.nprobe = nprobe

    idx = np.full((n, k_max), -1, dtype=np.int64)
    sims = np.zeros((n, k_max), dtype=np.float32)
    for i, z in source.chunks():
        s, hits = index.search(_normalised_chunk(i, z), k_max + 1)
        idx[i], sims[i] = _drop_self(s, hits, np.asarray(i, dtype=np.int64))
    short = np.flatnonzero((idx < 0).any(axis=1))
    if short.size:
        raise ValueError(f"the IVF search found fewer than k_max={k_max} neighbours for {short.size} sample(s) "
                         f"(e.g. {int(short[0])}): raise prepare.knn_nprobe (now {nprobe}) or lower "
                         f"prepare.knn_nlist (now {nlist})")
    return idx, sims, {"nlist": nlist, "nprobe": nprobe, "train_rows": train_rows, "gpu": on_gpu}


def knn_recall(source, idx: np.ndarray, k: int, queries: int = 1000, seed: int = 0,
               db_chunk: int = 65536) -> float:
    """recall@k of neighbour table ``idx`` [N, >= k] against exact search: the mean share of
    each query's k exact nearest other samples that ``idx[q, :k]`` holds, over ``queries``
    samples drawn at random. The exact answer streams ``source`` once, scoring the queries
    against each chunk of the database (FAISS flat search) and keeping a running top-k."""
    faiss = import_faiss()

    n = source.n_rows
    if not 1 <= k <= idx.shape[1]:
        raise ValueError(f"k must be in 1..{idx.shape[1]}, got {k}")
    q_ids = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
    slot = np.full(n, -1)
    slot[q_ids] = np.arange(len(q_ids))
    q = np.zeros((len(q_ids), source.dim), dtype=np.float32)
    for i, z in source.chunks():
        hit = slot[i] >= 0
        q[slot[i][hit]] = _normalised_chunk(i, z)[hit]
    best_s = np.full((len(q_ids), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q_ids), k), -1, dtype=np.int64)
    for i, z in source.chunks():
        i = np.asarray(i, dtype=np.int64)
        for start in range(0, len(i), db_chunk):
            ids, zc = i[start:start + db_chunk], _normalised_chunk(i[start:start + db_chunk], z[start:start + db_chunk])
            flat = faiss.IndexFlatIP(zc.shape[1])
            flat.add(zc)
            s, local = flat.search(q, min(k + 1, len(ids)))
            found = ids[local]
            s[found == q_ids[:, None]] = -np.inf  # the query itself is not its neighbour
            all_s, all_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, found], axis=1)
            top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    hits = [len(set(a) & set(b)) for a, b in zip(idx[q_ids, :k], best_i)]
    return float(np.mean(hits) / k)


def write_neighbours(path, idx: np.ndarray, sims: np.ndarray, row_group_rows: int = 65536) -> None:
    """The neighbour table as Parquet: ``index`` int64, ``nbr_idx`` [k_max] int64 and
    ``nbr_sim`` [k_max] float32 (fixed-size lists, similarity-descending)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = idx.shape
    table = pa.table({
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "nbr_idx": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(idx, np.int64).ravel()), k),
        "nbr_sim": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(sims, np.float32).ravel()), k),
    })
    pq.write_table(table, path, row_group_size=row_group_rows)


def read_neighbours(prepared_dir) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, sims)`` [N, k_max] of a prepared dataset, in sample order: ``neighbours.parquet``
    (what prepare writes), else the ``neighbours.npz`` of older or synthetic datasets."""
    import io

    import pyarrow.parquet as pq

    store = Store(prepared_dir)  # a local folder or a URI
    if not store.is_file("neighbours.parquet"):
        knn = np.load(io.BytesIO(store.read_bytes("neighbours.npz")))
        return knn["idx"], knn["sims"]
    table = pq.read_table(store.uri("neighbours.parquet"))
    order = np.argsort(table.column("index").to_numpy())
    k = table.schema.field("nbr_idx").type.list_size
    idx = list_values(table.column("nbr_idx")).reshape(-1, k)
    sims = list_values(table.column("nbr_sim")).reshape(-1, k)
    return idx[order], sims[order]
