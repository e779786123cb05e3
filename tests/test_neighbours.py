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
    from pogdiff_dist.data.neighbours import knn_backend

    z = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32)
    idx, sims = build_knn(z, 7, query_batch=50, device="cpu", backend="torch")
    ref_idx, ref_sims = build_knn(z, 7, use_gpu=False, backend="faiss")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert knn_backend("cpu") == "faiss" and knn_backend(None) == "faiss"
    assert knn_backend("cuda:0") == ("faiss" if faiss.get_num_gpus() > 0 else "torch")


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
