"""Prepare at scale, without Ray: the IVF index against exact search, the density VAE fitted
from a streamed Parquet column, and the neighbour join's block functions against the
in-memory attach_neighbours."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pogdiff_dist.data.columns import ArrayRows, IndexedParquet, ParquetColumn
from pogdiff_dist.data.density import DensityVAEConfig, compute_elbo, fit_density_vae
from pogdiff_dist.data.neighbours import build_knn, build_knn_ivf, knn_recall, read_neighbours, write_neighbours


def clustered(n=3000, d=32, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)


def true_recall(idx, ref, k):
    return np.mean([len(set(a[:k]) & set(b[:k])) for a, b in zip(idx, ref)]) / k


def test_ivf_recall_against_exact():
    z = clustered()
    ref_idx, ref_sims = build_knn(z, 10, use_gpu=False)
    src = ArrayRows(z, chunk_rows=700)  # chunks not dividing N
    idx, sims, info = build_knn_ivf(src, 10, nlist=40, nprobe=40)  # every list scanned: exact
    assert info == {"nlist": 40, "nprobe": 40, "train_rows": 2560, "gpu": False}
    assert true_recall(idx, ref_idx, 10) >= 0.99
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert not (idx == np.arange(len(z))[:, None]).any() and (np.diff(sims, axis=1) <= 1e-6).all()

    few, _, _ = build_knn_ivf(src, 10, nlist=40, nprobe=4)
    exact = true_recall(few, ref_idx, 10)
    assert exact >= 0.9
    # the sampled estimate prepare reports tracks the recall over every sample
    assert abs(knn_recall(src, few, 10, queries=500, db_chunk=1000) - exact) < 0.05
    assert knn_recall(src, ref_idx, 10, queries=200) == 1.0


def test_ivf_rejects_bad_settings():
    src = ArrayRows(clustered(n=400))
    with pytest.raises(ValueError, match="k_max"):
        build_knn_ivf(src, 400)
    with pytest.raises(ValueError, match="nprobe"):
        build_knn_ivf(src, 5, nlist=4, nprobe=0)


def write_column(path, values, row_group_size, seed=0):
    """values [N, D] as Parquet (index, v: fixed-size list), rows stored out of index order."""
    order = np.random.default_rng(seed).permutation(len(values))
    table = pa.table({"index": order.astype(np.int64),
                      "v": pa.FixedSizeListArray.from_arrays(pa.array(values[order].ravel()), values.shape[1])})
    pq.write_table(table, path, row_group_size=row_group_size)


CFG = DensityVAEConfig(latent_dim=4, hidden_dim=32, epochs=60, batch_size=64, seed=3)



def test_streamed_density_ranks_rare_captions_low(tmp_path, cluster_and_outliers):
    path = tmp_path / "pooled.parquet"
    write_column(path, cluster_and_outliers, row_group_size=50)
    src = ParquetColumn(str(path), "v", chunk_rows=40)
    assert (src.n_rows, src.dim, len(src.pieces)) == (305, 8, 7)
    vae = fit_density_vae(src, CFG, buffer_rows=128)  # three buffers an epoch: truly streamed
    elbo = compute_elbo(vae, src, batch_size=30)
    assert elbo.shape == (305,) and np.isfinite(elbo).all()
    assert elbo[:300].mean() > elbo[300:].max() + 5.0  # outliers (rare captions): lower density
    np.testing.assert_allclose(elbo, compute_elbo(vae, cluster_and_outliers), rtol=1e-6)  # rows by index
    again = fit_density_vae(ParquetColumn(str(path), "v", chunk_rows=40), CFG, buffer_rows=128)
    np.testing.assert_array_equal(compute_elbo(again, src, batch_size=30), elbo)  # seeded


def test_streamed_density_fitting_in_one_buffer_matches_in_memory(tmp_path, cluster_and_outliers):
    path = tmp_path / "pooled.parquet"
    write_column(path, cluster_and_outliers, row_group_size=64, seed=1)
    streamed = fit_density_vae(ParquetColumn(str(path), "v", chunk_rows=40), CFG)
    in_memory = fit_density_vae(cluster_and_outliers, CFG)
    np.testing.assert_allclose(compute_elbo(streamed, cluster_and_outliers),
                               compute_elbo(in_memory, cluster_and_outliers), rtol=1e-4)


def test_streamed_density_names_the_bad_sample(tmp_path, cluster_and_outliers):
    bad = cluster_and_outliers.copy()
    bad[123, 2] = np.nan
    path = tmp_path / "pooled.parquet"
    write_column(path, bad, row_group_size=50)
    with pytest.raises(ValueError, match="row 123"):
        fit_density_vae(ParquetColumn(str(path), "v"), CFG)


def test_neighbours_parquet_round_trip_and_indexed_lookup(tmp_path):
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 1000, size=(500, 7))
    sims = rng.random((500, 7)).astype(np.float32)
    write_neighbours(tmp_path / "neighbours.parquet", idx, sims, row_group_rows=64)
    got_idx, got_sims = read_neighbours(tmp_path)
    np.testing.assert_array_equal(got_idx, idx)
    np.testing.assert_array_equal(got_sims, sims)
    look = IndexedParquet(str(tmp_path / "neighbours.parquet"), ["nbr_idx", "nbr_sim"], cache_groups=2)
    want = np.array([499, 0, 64, 63, 250, 250, 7])
    rows = look.rows(want)
    np.testing.assert_array_equal(rows["nbr_idx"], idx[want])
    np.testing.assert_array_equal(rows["nbr_sim"], sims[want])
    with pytest.raises(KeyError):
        look.rows(np.array([500]))


def test_join_block_functions_match_attach_neighbours():
    """The Ray Data join's per-block steps, run on whole tables, give attach_neighbours' rows."""
    from pogdiff_dist.data.shards import attach_neighbours, shard_rows
    from pogdiff_dist.prepare.join import _fold_neighbours, _join_tokens, _pair_rows, _token_rows

    rng = np.random.default_rng(4)
    n, k, length = 60, 5, 6
    nbr_idx, nbr_sim = build_knn(clustered(n=n, d=8, clusters=4), k, use_gpu=False)
    tokens = rng.integers(0, 99, size=(n, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, size=n).astype(np.int32)
    identity = rng.integers(0, 3, size=n).astype(np.int64)
    elbo = rng.normal(size=n)
    neighbours = pa.table({"index": np.arange(n), "nbr_idx": pa.FixedSizeListArray.from_arrays(pa.array(nbr_idx.ravel()), k),
                           "nbr_sim": pa.FixedSizeListArray.from_arrays(pa.array(nbr_sim.ravel()), k)})
    encoded = pa.table({"index": np.arange(n), "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), length),
                        "length": lengths, "identity_id": identity})
    union = pa.concat_tables([_pair_rows(neighbours), _token_rows(encoded)])
    folded = _fold_neighbours(_join_tokens(union.take(rng.permutation(len(union)))), k_max=k, length=length)
    order = np.argsort(folded.column("index").to_numpy())
    col = {c: np.stack(folded.column(c).to_numpy(zero_copy_only=False))[order] for c in folded.column_names[1:]}
    batch = {"index": np.arange(n), "key": np.array([f"{i:04d}" for i in range(n)]), "caption": np.array(["c"] * n),
             "latent": np.zeros((n, 1, 2, 2), np.float32), "y": np.zeros((n, 2, 3), np.float16)}
    want = attach_neighbours(batch, nbr_idx, nbr_sim, tokens, lengths, identity, elbo, "fp")
    got = shard_rows({**batch, "identity_id": identity}, nbr_index=col["nbr_index"], nbr_sim=col["nbr_sim"],
                     nbr_tokens=col["nbr_tokens"].reshape(n, k, length), nbr_len=col["nbr_len"],
                     nbr_identity=col["nbr_identity"], elbo=elbo, fingerprint="fp")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        if name == "meta.json":
            assert list(got[name]) == list(value)
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("override, match", [
    ({"knn_index": "hnsw"}, "prepare.knn_index"),
    ({"knn_nprobe": 0}, "prepare.knn_nprobe"),
    ({"knn_nlist": -1}, "prepare.knn_nlist"),
    ({"knn_nlist": 8, "knn_nprobe": 16}, "exceeds prepare.knn_nlist"),
    ({"knn_nlist": 100, "knn_train_rows": 50}, "knn_train_rows"),
    ({"density_buffer_rows": 0}, "prepare.density_buffer_rows"),
    ({"knn_recall_queries": 1.5}, "prepare.knn_recall_queries"),
])
def test_prepare_config_validates_the_new_fields(override, match):
    from pogdiff_dist.config import PrepareConfig

    with pytest.raises(ValueError, match=match):
        PrepareConfig(**override)
    assert PrepareConfig().knn_index == "flat"
