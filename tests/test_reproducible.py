"""Run-to-run reproducibility, the pure pieces (docs/REPRODUCIBILITY.md): what prepare and the
stream compute depends on the data and the seed, never on file names, listing order or the
backend's way of breaking ties."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pogdiff_dist.data.columns import ParquetColumn, files_in_index_order
from pogdiff_dist.data.density import DensityVAEConfig, compute_elbo, fit_density_vae
from pogdiff_dist.data.neighbours import build_knn, ties_by_index


def _write_parts(folder, values: np.ndarray, parts: list[tuple[str, int, int]]) -> str:
    """``values`` rows written as one Parquet file per (name, start, stop): an ``index`` column
    and the rows as a fixed-size list column ``v``."""
    folder.mkdir()
    d = values.shape[1]
    for name, lo, hi in parts:
        pq.write_table(pa.table({"index": np.arange(lo, hi, dtype=np.int64),
                                 "v": pa.FixedSizeListArray.from_arrays(pa.array(values[lo:hi].ravel()), d)}),
                       folder / name, row_group_size=40)
    return str(folder)


def test_parquet_pieces_follow_the_sample_index_not_the_file_names(tmp_path, cluster_and_outliers):
    """Ray Data names files after a random write id and its tasks' order: the same rows under
    names that sort the other way give the same pieces, chunks and density fit, bit for bit."""
    x = cluster_and_outliers
    a = _write_parts(tmp_path / "a", x, [("a0.parquet", 0, 150), ("a1.parquet", 150, len(x))])
    b = _write_parts(tmp_path / "b", x, [("b1.parquet", 0, 150), ("b0.parquet", 150, len(x))])
    assert [p.rsplit("/", 1)[1] for p in files_in_index_order(b)] == ["b1.parquet", "b0.parquet"]
    src_a, src_b = ParquetColumn(a, "v"), ParquetColumn(b, "v")
    first = [[int(i[0]) for i, _ in src.chunks()] for src in (src_a, src_b)]
    assert first[0] == first[1] == sorted(first[0])
    cfg = DensityVAEConfig(hidden_dim=32, latent_dim=4, epochs=3, batch_size=64)
    elbo_a = compute_elbo(fit_density_vae(src_a, cfg, buffer_rows=128), src_a, batch_size=50)
    elbo_b = compute_elbo(fit_density_vae(src_b, cfg, buffer_rows=128), src_b, batch_size=50)
    np.testing.assert_array_equal(elbo_a, elbo_b)


def test_knn_ties_are_ordered_by_index_on_every_backend():
    """Exact ties (duplicate images) come back by sample index, from FAISS and torch alike."""
    z = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    z[[30, 4, 17, 9]] = z[30]  # four identical vectors
    z[[21, 33]] = z[21] * 2.0  # same direction: cosine ties too
    for backend in ("faiss", "torch"):
        idx, sims = build_knn(z, 3, use_gpu=False, backend=backend, device="cpu")
        assert idx[30].tolist() == [4, 9, 17] and idx[4].tolist() == [9, 17, 30], backend
        assert idx[21, 0] == 33 and idx[33, 0] == 21
        np.testing.assert_allclose(sims[30], 1.0, atol=1e-6)
    s = np.array([[0.9, 0.5, 0.9, 0.5, 0.1]], np.float32)
    i = np.array([[8, 7, 2, 3, 1]])
    ts, ti = ties_by_index(s, i)
    assert ti.tolist() == [[2, 8, 3, 7, 1]] and ts.tolist() == [[s[0, 0], s[0, 0], 0.5, 0.5, s[0, 4]]]


def test_judge_training_is_seeded_and_leaves_the_global_generator_alone():
    """Rank 0 may train the CNN judge inside a training worker (its first validation): the
    judge is the same whatever the process's global RNG state, and that state is kept."""
    import torch

    from pogdiff_dist.data.bundled import JudgeSpec
    from pogdiff_dist.evaluation.judges import CNNJudge

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 8, 8, 1), dtype=np.uint8)
    spec = JudgeSpec(name="toy-cnn", version="t", classes=("a", "b"), class_of={"A": "a", "B": "b"}, resolution=8,
                     channels=1, input_size=8, width=4, epochs=2, augment={"shift": 0.1, "scale": 0.1},
                     trained_on="noise", training_set=lambda: (images, np.arange(24) % 2))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = CNNJudge.train(spec)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(456)  # another global state: the same judge
    second = CNNJudge.train(spec)
    for k, v in first.net.state_dict().items():
        assert torch.equal(v, second.net.state_dict()[k]), k


def test_prepare_keeps_ray_data_order_and_names_shards_by_position():
    """Prepare's Ray Data runs with preserve_order (restored after), and its shards are named by
    their write task's position: two prepares list the same shard names in the same order."""
    import ray.data

    from pogdiff_dist.prepare.join import ShardNames
    from pogdiff_dist.prepare.pipeline import ordered_datasets

    options = ray.data.DataContext.get_current().execution_options
    options.preserve_order = False
    with ordered_datasets():
        assert ray.data.DataContext.get_current().execution_options.preserve_order
    assert not options.preserve_order
    names = [ShardNames().get_filename_for_task(uuid, i) for uuid, i in (("w1", 0), ("w2", 1), ("w3", 12))]
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000012.tar"]
