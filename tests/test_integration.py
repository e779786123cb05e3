"""End to end on a local Ray cluster: prepare -> shards -> 2 DeepSpeed workers -> checkpoint
-> resume -> diffusers export -> generation -> MLflow. Real parts, tiny sizes."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def test_shards_round_trip(ray_local, tiny_cfg, prepared):
    """What prepare writes is what the training stream yields, sample for sample."""
    from pogdiff_dist.data.records import load_image
    from pogdiff_dist.data.shards import collate
    from pogdiff_dist.prepare.pipeline import load_records

    out = Path(tiny_cfg.prepare.out_dir)
    ds = ray_local.data.read_webdataset([str(out / "shards" / s) for s in prepared.shards])
    batch = collate(next(iter(ds.iter_batches(batch_size=10_000, batch_format="numpy"))))
    n = prepared.num_samples
    assert n == 32 and sorted(batch.index.tolist()) == list(range(n))  # every sample exactly once (host arrays)
    # one shard per samples_per_shard rows, so workers can read disjoint files in parallel
    def samples_in(shard):
        with tarfile.open(shard) as tar:
            return len({Path(m).name.split(".")[0] for m in tar.getnames()})

    per_shard = [samples_in(out / "shards" / s) for s in prepared.shards]
    assert per_shard == [tiny_cfg.prepare.samples_per_shard] * 2, per_shard

    order = np.argsort(batch.index)
    train = load_records(tiny_cfg).train()
    pixels = np.stack([load_image(r.image, 16, 1) for r in train])
    np.testing.assert_allclose(batch.x0[order], pixels, atol=1e-6)

    from pogdiff_dist.data.neighbours import read_neighbours

    nbr_idx, nbr_sims = read_neighbours(out)
    streamed = ray_local.data.read_webdataset([str(out / "shards" / s) for s in prepared.shards])
    rows = {int(r["meta.json"]["index"]): r for r in streamed.take_all()}
    for i in range(n):
        np.testing.assert_array_equal(rows[i]["nbr_index.npy"], nbr_idx[i])
        np.testing.assert_allclose(rows[i]["nbr_sim.npy"], nbr_sims[i])
        assert i not in rows[i]["nbr_index.npy"]  # itself excluded
        # the neighbour's caption tokens are that neighbour's own tokens
        j = int(rows[i]["nbr_index.npy"][0])
        np.testing.assert_array_equal(rows[i]["nbr_tokens.npy"][0], rows[j]["nbr_tokens.npy"][0] * 0 + _tokens(rows, j))
    identity = {i: rows[i]["meta.json"]["identity_id"] for i in rows}
    for i in range(n):
        same = [identity[int(j)] == identity[i] for j in rows[i]["nbr_index.npy"]]
        assert list(rows[i]["nbr_same.npy"].astype(bool)) == same
    elbo = np.load(out / "elbo.npy")
    assert np.isfinite(elbo).all()
    np.testing.assert_allclose([rows[i]["meta.json"]["elbo"] for i in range(n)], elbo, rtol=1e-6)


def test_a_train_time_change_prepares_nothing_again(ray_local, tiny_cfg, prepared, capsys):
    """LoRA, the prediction type, the objective, the sampling plan, the optimiser: training
    keys only. Prepare with them changed finds every stage up to date and rewrites no marker."""
    from pogdiff_dist.prepare.pipeline import run_prepare

    markers = sorted((Path(tiny_cfg.prepare.out_dir) / "stages").glob("*.json"))
    before = {m.name: m.stat().st_mtime_ns for m in markers}
    capsys.readouterr()
    run_prepare(tiny_cfg.with_overrides({"model.lora_rank": 4, "model.prediction_type": "v_prediction",
                                         "loss.method": "vanilla", "data.sampling": "balanced", "optim.lr": 1e-3}))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "up to date" in ln]
    assert len(lines) == 4 and len(before) == 4, lines
    assert {m.name: m.stat().st_mtime_ns for m in markers} == before


def _tokens(rows, j):
    """Sample j's own caption tokens, recovered from any row that lists j as a neighbour."""
    for r in rows.values():
        hits = np.where(r["nbr_index.npy"] == j)[0]
        if len(hits):
            return r["nbr_tokens.npy"][hits[0]]
    raise AssertionError(f"no row lists {j} as neighbour")


def test_prepare_stages_record_where_they_ran_and_the_driver_never_loads_embeddings(ray_local, tiny_cfg, prepared):
    """Encode runs in Ray actors, k-NN and density in Ray tasks that read the encoded Parquet
    themselves: none in this (driver) process, which never reads an embedding column."""
    import json
    import os

    from pogdiff_dist.prepare.pipeline import EMBEDDING_COLUMNS, LOADED_COLUMNS

    stages = Path(tiny_cfg.prepare.out_dir) / "stages"
    encode = json.loads((stages / "encode.json").read_text())
    assert encode["gpus_per_encoder"] == 0  # "auto" on a cluster without GPUs
    assert encode["ran_on"] and all(int(w["pid"]) != os.getpid() and w["device"] == "cpu" for w in encode["ran_on"])
    for name in ("neighbours", "density"):
        ran_on = json.loads((stages / f"{name}.json").read_text())["ran_on"]
        assert ran_on["pid"] != os.getpid() and ran_on["device"] == "cpu" and ran_on["node"], (name, ran_on)
    assert json.loads((stages / "neighbours.json").read_text())["ran_on"]["backend"] == "faiss"
    loaded_here = {c for cols in LOADED_COLUMNS for c in cols}
    assert not loaded_here & set(EMBEDDING_COLUMNS), loaded_here


def test_prepare_resumes_and_redoes_only_affected_stages(ray_local, tiny_cfg, prepared):
    from pogdiff_dist.prepare.pipeline import run_prepare

    stages = Path(tiny_cfg.prepare.out_dir) / "stages"
    before = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    run_prepare(tiny_cfg)
    assert {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")} == before

    cfg2 = tiny_cfg.with_overrides({"prepare.k_max": 6})
    m2 = run_prepare(cfg2)
    after = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    assert after["encode.json"] == before["encode.json"] and after["density.json"] == before["density.json"]
    assert after["neighbours.json"] != before["neighbours.json"] and after["shards.json"] != before["shards.json"]
    assert m2.k_max == 6

    # psi_den from the identity prompt: only the density stage (and the shards) are redone, and
    # the ELBO is a function of the identity whose rarest names get the largest weight
    import numpy as np

    from pogdiff_dist.losses import log_density_normaliser, psi_den
    from pogdiff_dist.prepare.pipeline import read_encoded_columns

    out = Path(tiny_cfg.prepare.out_dir)
    caption_elbo = np.load(out / "elbo.npy")
    m3 = run_prepare(cfg2.with_overrides({"prepare.density_text": "identity"}))
    third = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    assert third["encode.json"] == after["encode.json"] and third["neighbours.json"] == after["neighbours.json"]
    assert third["density.json"] != after["density.json"] and third["shards.json"] != after["shards.json"]
    elbo = np.load(out / "elbo.npy")
    ident = read_encoded_columns(out / "encoded", ["identity_id"])["identity_id"]
    per_id = {i: elbo[ident == i] for i in np.unique(ident)}
    assert all(np.ptp(v) < 1e-6 for v in per_id.values())  # one prompt per identity
    assert not np.allclose(elbo, caption_elbo)
    counts = dict(zip(range(len(m3.identities)), m3.train_counts))
    e = torch.from_numpy(elbo)
    log_w = psi_den(e, log_density_normaliser(e, 1.0), a3=1.0).log().numpy()  # log(a3 psi_den), Eq. 11
    few = [i for i in per_id if counts[i] <= 2]
    many = [i for i in per_id if counts[i] >= 10]
    assert few and many
    w_few = np.mean([np.exp(log_w[ident == i]).mean() for i in few])
    w_many = np.mean([np.exp(log_w[ident == i]).mean() for i in many])
    assert w_few > 2 * w_many, (w_few, w_many)
    run_prepare(tiny_cfg)  # back to k_max 5 and caption density for the tests that follow


def test_train_checkpoint_resume_export_mlflow(ray_local, tiny_cfg, prepared):
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.pipeline import PoGDiffPipeline
    from pogdiff_dist.train.driver import run_train

    cfg = tiny_cfg.with_overrides({"optim.max_steps": 2, "train.name": "it"})
    first = run_train(cfg)
    assert first.metrics["final_step"] == 2

    # Resume the same run to step 4: continues from the step-2 checkpoint.
    second = run_train(cfg.with_overrides({"optim.max_steps": 4}), resume=True)
    assert second.run_id == first.run_id and second.metrics["final_step"] == 4

    client = MlflowClient(first.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.method"] == "pogdiff" and run.data.params["train.zero_stage"] == "2"
    loss_steps = [m.step for m in client.get_metric_history(first.run_id, "loss")]
    assert sorted(loss_steps) == [1, 2, 3, 4]  # the resumed run did not restart at step 0
    for key in ("loss_denoise", "loss_pog", "psi_mean", "psi_max", "psi_zero_frac", "samples_per_s"):
        assert len(client.get_metric_history(first.run_id, key)) == 4, key
    # WarmupLR (linear, 20 steps) reports lr_max * (step - 1) / 20: if the schedule state were
    # not restored, step 3 would show the step-1 value again.
    lr = {m.step: m.value for m in client.get_metric_history(first.run_id, "lr")}
    lr_max = cfg.optim.lr
    for s in (1, 2, 3, 4):
        assert lr[s] == pytest.approx(lr_max * (s - 1) / 20, rel=1e-6), (s, lr)
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert "samples.png" in artifacts
    _check_run_reads_back(client, first.run_id, prepared)

    # The export is a diffusers pipeline with safetensors weights that generates an image.
    model = second.model_dir
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(model.rglob("*.bin")) and not list(model.rglob("*.pt"))
    pipe = PoGDiffPipeline.from_pretrained(str(model))
    img = pipe(["An image of Alice Moreau."], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 16, 16, 1) and img.dtype == np.uint8 and img.std() > 0
    # the exported weights are the trained ones, not a fresh init
    from pogdiff_dist.models import ModelSpec, build_unet

    torch.manual_seed(cfg.train.seed)
    fresh = build_unet(cfg.model, ModelSpec(1, 16, 384))
    diff = sum((a - b).abs().sum().item() for a, b in zip(fresh.parameters(), pipe.unet.parameters()))
    assert diff > 0

    # A fresh run of a name that exists gets a new name, and its saved config and MLflow params
    # name the run it wrote: resuming from that config resumes that run, not the first one.
    from pogdiff_dist.config import load_config

    third = run_train(cfg.with_overrides({"optim.max_steps": 1}))
    assert third.config.train.name.startswith("it-") and third.run_dir.name == third.config.train.name
    saved = load_config(third.run_dir / "config.yaml")
    assert saved.train.name == third.config.train.name
    assert client.get_run(third.run_id).data.params["train.name"] == saved.train.name
    again = run_train(saved.with_overrides({"optim.max_steps": 2}), resume=True)
    assert (again.run_id, again.run_dir, again.metrics["final_step"]) == (third.run_id, third.run_dir, 2)


def _check_run_reads_back(client, run_id, manifest):
    """What the MLflow UI shows, read back through the client: tags, the dataset input, every
    metric's steps in order (summaries at the last step), the plots, the logged model."""
    import mlflow

    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags["pogdiff.method"] == "pogdiff" and tags["pogdiff.dataset_fingerprint"] == manifest.fingerprint
    assert tags["pogdiff.dataset"] == manifest.dataset and tags["pogdiff.config_file"] == "(defaults)"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (inp,) = run.inputs.dataset_inputs  # logged once, though the run was resumed
    assert inp.dataset.name == manifest.dataset and inp.dataset.digest == manifest.fingerprint[:16]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == sorted(steps), (key, steps)  # no chart runs backwards
    for key in ("final_loss", "fit_seconds", "nonfinite_skipped"):
        assert client.get_metric_history(run_id, key)[-1].step == 4, key
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/identity_counts.png", "plots/psi_histogram.png"}
    # the exported pipeline logged as an MLflow model of this run (tests/test_mlflow_model.py loads one)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["model"]


def test_prepare_with_an_ivf_index_reports_its_recall(ray_local, tiny_cfg, prepared, tmp_path):
    """``prepare.knn_index=ivf`` through run_prepare: with every list probed the IVF search is
    exact, so its neighbours are the flat index's and the recall prepare measured and recorded
    is 1; probing one list of four leaves samples short of k_max neighbours on 32 samples, which
    is an error naming the settings to change, not a table padded with wrong neighbours."""
    import json

    from pogdiff_dist.data.neighbours import read_neighbours
    from pogdiff_dist.prepare.pipeline import run_prepare

    flat_idx, flat_sims = read_neighbours(tiny_cfg.prepare.out_dir)
    ivf = {"prepare.knn_index": "ivf", "prepare.knn_nlist": 4, "prepare.knn_train_rows": 32}
    out = tmp_path / "ivf"
    manifest = run_prepare(tiny_cfg.with_overrides({**ivf, "prepare.out_dir": str(out), "prepare.knn_nprobe": 4}))
    marker = json.loads((out / "stages" / "neighbours.json").read_text())
    assert marker["ran_on"]["index"] == "ivf" and marker["recall"][str(manifest.k_max)] == 1.0
    idx, sims = read_neighbours(out)
    np.testing.assert_allclose(sims, flat_sims, atol=1e-5)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(idx, flat_idx)]) >= manifest.k_max - 0.2  # ties may swap

    with pytest.raises(ValueError, match=r"fewer than k_max=5 neighbours .* raise prepare.knn_nprobe \(now 1\)"):
        run_prepare(tiny_cfg.with_overrides({**ivf, "prepare.out_dir": str(tmp_path / "ivf1"), "prepare.knn_nprobe": 1}))
