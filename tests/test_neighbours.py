"""build_knn against brute force, and the Eq. 8 sampling weights."""

import faiss
import numpy as np
import pytest

from pogdiff_dist.data.neighbours import build_knn


def brute_force_knn(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = zn @ zn.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


def test_matches_brute_force():
    z = np.random.default_rng(0).normal(size=(500, 32)).astype(np.float32) * 3.0  # not normalised
    idx, sims = build_knn(z, 10, use_gpu=False, query_batch=77)  # batches not dividing N
    ref_idx, ref_sims = brute_force_knn(z.astype(np.float64), 10)
    assert idx.shape == sims.shape == (500, 10) and idx.dtype == np.int64 and sims.dtype == np.float32
    for row, ref in zip(idx, ref_idx):
        assert set(row) == set(ref)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # descending
    assert not (idx == np.arange(500)[:, None]).any()  # self never in its own row


def test_torch_backend_matches_faiss():
    """The exact search a CUDA device runs when FAISS has no GPU (matmul + top-k), here on CPU."""
    from pogdiff_dist.data.exact_search import knn_plan

    z = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32)
    idx, sims = build_knn(z, 7, query_batch=50, device="cpu", backend="torch")
    ref_idx, ref_sims = build_knn(z, 7, use_gpu=False, backend="faiss")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    here = faiss.get_num_gpus()
    assert knn_plan("auto", here, device="cpu").backend == "faiss" and knn_plan("auto", here).backend == "faiss"
    assert knn_plan("auto", here, device="cuda:0").backend == ("faiss" if here > 0 else "torch")


@pytest.mark.parametrize("db_chunk", [1, 6, 7, 64, 500])  # k larger than a chunk, chunks not dividing N, one chunk
def test_streamed_torch_search_matches_brute_force(db_chunk):
    """The running top-k over database chunks is exact: the same scores as the full [m, N] product."""
    import torch

    from pogdiff_dist.data.exact_search import torch_topk_search

    rng = np.random.default_rng(4)
    z, q = rng.normal(size=(500, 24)).astype(np.float32), rng.normal(size=(37, 24)).astype(np.float32)
    s, i = torch_topk_search(torch.from_numpy(q), torch.from_numpy(z), 7, db_chunk)
    full = q.astype(np.float64) @ z.T.astype(np.float64)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(i.numpy(), ref)
    np.testing.assert_allclose(s.numpy(), np.take_along_axis(full, ref, 1), atol=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        torch_topk_search(torch.from_numpy(q), torch.from_numpy(z[:5]), 6, db_chunk)


def test_build_knn_torch_backend_never_holds_the_query_by_database_matrix(monkeypatch):
    """build_knn's torch search asks for score blocks of at most TORCH_BLOCK_ELEMENTS, and still
    matches brute force (the full [query_batch, N] block ran out of GPU memory near N = 250k)."""
    from pogdiff_dist.data import exact_search

    blocks, search = [], exact_search.torch_topk_search
    monkeypatch.setattr(exact_search, "TORCH_BLOCK_ELEMENTS", 40 * 9)
    monkeypatch.setattr(exact_search, "torch_topk_search",
                        lambda q, z, k, chunk: blocks.append(len(q) * min(chunk, len(z))) or search(q, z, k, chunk))
    z = np.random.default_rng(5).normal(size=(400, 16)).astype(np.float32)
    idx, sims = build_knn(z, 5, query_batch=40, device="cpu", backend="torch")
    assert blocks and max(blocks) <= 40 * 9
    ref_idx, ref_sims = brute_force_knn(z.astype(np.float64), 5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


# (task_gpus, FAISS's visible GPUs there, device) -> backend, FAISS GPUs used, torch device.
# Ray sets CUDA_VISIBLE_DEVICES only for a task given GPUs: one given none sees its whole node.
GPU_CASES = [
    (0, 2, "cpu", "faiss", (), "cpu"),             # a CPU task on a 2-GPU node: FAISS's CPU index
    (1, 1, "cuda", "faiss", (0,), "cuda"),         # given 1: FAISS sees (and uses) that one
    (0.5, 1, "cuda", "faiss", (0,), "cuda"),       # a GPU fraction: the one shared GPU
    (2, 2, "cuda", "faiss", (0, 1), "cuda"),
    (1, 0, "cuda", "torch", (), "cuda"),           # faiss-cpu on a GPU node: torch on the task's GPU
    (0, None, "cpu", "torch", (), "cpu"),          # no FAISS at all: torch's exact search
    (None, 2, None, "faiss", (0, 1), "cuda"),      # a plain process, no device: every GPU it sees
    (None, 2, "cuda:1", "faiss", (1,), "cuda:1"),  # a plain process on one device: that one
    (None, 2, "cpu", "faiss", (), "cpu"),
]


@pytest.mark.parametrize("task_gpus,visible,device,backend,gpus,torch_device", GPU_CASES)
def test_knn_plan_uses_only_the_gpus_its_task_was_given(task_gpus, visible, device, backend, gpus, torch_device):
    from pogdiff_dist.data.exact_search import knn_plan

    plan = knn_plan("auto", visible, task_gpus, device)
    assert (plan.backend, plan.faiss_gpus) == (backend, gpus)
    if backend == "torch":
        assert plan.device == torch_device


def test_knn_plan_errors_and_explicit_choices():
    from pogdiff_dist.data.exact_search import knn_plan

    assert knn_plan(False, 2, 1, "cuda").faiss_gpus == ()  # use_gpu=False: FAISS's CPU index
    assert knn_plan("auto", 2, 1, "cuda", backend="torch").device == "cuda"
    with pytest.raises(ValueError, match="given no GPU"):
        knn_plan(True, 2, 0, "cpu")  # a task that asked for no GPU must not take one
    with pytest.raises(ValueError, match="FAISS sees no GPU"):
        knn_plan(True, 0)
    with pytest.raises(ValueError, match="use_gpu"):
        knn_plan("yes", 0)
    with pytest.raises(ImportError, match=r"pogdiff_dist\[cpu\]"):
        knn_plan("auto", None, backend="faiss")


def test_duplicates_exclude_self_by_index():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 8)).astype(np.float32)
    z[[3, 10, 20, 30]] = z[3]  # four identical vectors
    idx, sims = build_knn(z, 2, use_gpu=False)
    assert not (idx == np.arange(50)[:, None]).any()
    for i in (3, 10, 20, 30):
        assert set(idx[i]) <= {3, 10, 20, 30} - {i}
        np.testing.assert_allclose(sims[i], 1.0, atol=1e-6)


def test_many_duplicates_self_beyond_search():
    # 20 identical vectors: FAISS breaks the ties the same way for every query, so for most
    # rows self is not among the k+1 hits and the last hit is dropped instead.
    z = np.ones((20, 4), dtype=np.float32)
    idx, sims = build_knn(z, 2, use_gpu=False)
    assert not (idx == np.arange(20)[:, None]).any()
    assert ((idx >= 0) & (idx < 20)).all() and (idx[:, 0] != idx[:, 1]).all()
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_errors():
    z = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k_max=5.*N=5.*4 other"):
        build_knn(z, 5, use_gpu=False)
    with pytest.raises(ValueError, match="k_max must be >= 1"):
        build_knn(z, 0, use_gpu=False)
    bad = z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        build_knn(bad, 2, use_gpu=False)
    zero = z.copy()
    zero[2] = 0
    with pytest.raises(ValueError, match="row 2 has zero norm"):
        build_knn(zero, 2, use_gpu=False)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="a GPU is present")
def test_use_gpu_true_without_gpu():
    with pytest.raises(ValueError, match="no GPU"):
        build_knn(np.eye(4, dtype=np.float32), 2, use_gpu=True)
