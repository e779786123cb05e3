"""The evaluation job end to end on a local Ray cluster: a tiny exported model (untrained,
so the numbers are those of noise, but every code path is real), the bundled Digits-IT2I
(digit CNN) and a user folder dataset (nearest centroid)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

METRICS = ("fid", "dino", "grecall", "accuracy")
RANGES = {"fid": (0, math.inf), "dino": (-1, 1), "grecall": (0, 1), "accuracy": (0, 1)}


def export_tiny_model(out, model_cfg, manifest):
    """What run_train exports, with a fresh tiny UNet instead of a trained one."""
    import torch

    from pogdiff_dist.models import ModelSpec, TextEncoder, build_noise_scheduler, build_unet
    from pogdiff_dist.pipeline import export_pipeline

    torch.manual_seed(0)
    c, size = manifest.latent_shape[0], manifest.latent_shape[1]
    unet = build_unet(model_cfg, ModelSpec(c, size, manifest.text_shape[1]))
    text = TextEncoder(manifest.text_encoder_dir, manifest.tokenizer_dir, model_cfg.max_length)
    return export_pipeline(out, unet, build_noise_scheduler(model_cfg), text)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_cfg, prepared):
    return export_tiny_model(tmp_path_factory.mktemp("model") / "model", tiny_cfg.model, prepared)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared with tests/test_metrics.py within a session: the 16-px digit CNN is trained once."""
    return tmp_path_factory.getbasetemp() / "eval_cache"


def load_saved_images(images_dir, names):
    """Read back the PNGs the evaluation wrote (``uint8 [n, H, W, C]`` per identity)."""
    from PIL import Image

    from pogdiff_dist.data.records import slugify

    out = {}
    for name in names:
        arrays = [np.asarray(Image.open(f)) for f in sorted((Path(images_dir) / slugify(name)).glob("*.png"))]
        out[name] = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    return out


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_complete(results):
    s = results["summary"]
    for m in METRICS:
        lo, hi = RANGES[m]
        for part in ("all", "few"):
            v = s[f"{m}_{part}"]
            assert v is not None and lo - 1e-9 <= v <= hi + 1e-9, (m, part, v)
        for name, row in results["per_identity"].items():
            assert lo - 1e-9 <= row[m] <= hi + 1e-9, (name, m, row[m])
        # the averages are the means over identities of the per-identity numbers
        assert s[f"{m}_all"] == pytest.approx(np.mean([r[m] for r in results["per_identity"].values()]))
        few = results["few_shot_identities"]
        assert s[f"{m}_few"] == pytest.approx(np.mean([results["per_identity"][n][m] for n in few]))


def test_evaluate_job_digits_with_mlflow(ray_local, tiny_cfg, prepared, tiny_model, cache_dir, tmp_path, capsys,
                                         monkeypatch):
    import importlib.util

    from mlflow.tracking import MlflowClient

    from pogdiff_dist.config import EvalConfig
    from pogdiff_dist.data.bundled.digits import judge_spec
    from pogdiff_dist.evaluation import features
    from pogdiff_dist.evaluation.features import ImageEncoder, load_real_images
    from pogdiff_dist.evaluation.generate import generate_identity, load_pipeline
    from pogdiff_dist.evaluation.judges import CNNJudge
    from pogdiff_dist.evaluation.scoring import compute_metrics

    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("jobs_evaluate", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    uri = tiny_cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval-test")).info.run_id
    out = tmp_path / "eval"
    prepared_dir = Path(tiny_cfg.prepare.out_dir)
    decoded_here = []  # training images decoded in this process, the job's driver
    pixels = features.TrainingImages._pixels
    monkeypatch.setattr(features.TrainingImages, "_pixels", lambda self, *a: decoded_here.append(1) or pixels(self, *a))
    assert job.main(["--model", str(tiny_model), "--prepared", str(prepared_dir), "--mlflow-run", run_id,
                     "--tracking-uri", uri, "--set", "eval.steps=2", "--set", "eval.num_images=3",
                     "--out", str(out), "--set", f"eval.cache_dir={cache_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "generated 2/2" in printed and str(out / "metrics.json") in printed
    assert not decoded_here  # the references were decoded and encoded on the scoring actor
    monkeypatch.setattr(features.TrainingImages, "_pixels", pixels)

    results = json.loads((out / "metrics.json").read_text())
    _check_complete(results)
    assert results["identities"] == ["Alice Moreau", "Bruno Silva"]
    assert results["few_shot_identities"] == ["Bruno Silva"]  # 2 training images vs 30
    assert results["classifier"]["classifier"] == "digits-cnn"
    assert results["classifier"]["accuracy_on_real_heldout"] >= 0.75  # 4 held-out digits, 0 and 1
    assert results["reference_sets"]["grecall"] == "training images"
    for row in results["per_identity"].values():
        assert row["reference"] == "heldout" and row["num_reference"] == 2  # tiny.yaml: 2 held out
        assert row["num_train"] == row["train_count"] and row["num_generated"] == 3
    assert results["per_identity"]["Alice Moreau"]["train_count"] == 30

    # Every per-identity number is recomputed from the saved PNGs.
    names = results["identities"]
    saved = load_saved_images(out / "images", names)
    assert all(saved[n].shape == (3, 16, 16, 1) for n in names)
    manifest = prepared
    real = load_real_images(prepared_dir, manifest, 16, 1)
    cfg = EvalConfig(num_images=3, steps=2)  # what the job ran with
    again = compute_metrics(saved, real, manifest, cfg, cache_dir=cache_dir)
    enc = ImageEncoder("pixels")
    clf = CNNJudge.load_or_train(cache_dir, judge_spec(names, 16))
    for n in names:
        row = results["per_identity"][n]
        for m in METRICS:
            assert again["per_identity"][n][m] == pytest.approx(row[m], rel=1e-9, abs=1e-12), (n, m)
        g, held, train = enc(saved[n]), enc(real.heldout[n]), enc(real.train[n])
        assert row["dino"] == pytest.approx(np.mean([[_cos(a, b) for b in held] for a in g]), rel=1e-5)
        covered = sum(any(_cos(g[i], train[j]) >= 0.7 for i in range(len(g))) for j in range(len(train)))
        assert row["covered"] == covered and row["grecall"] == pytest.approx(covered / len(train))
        digit = {"Alice Moreau": 0, "Bruno Silva": 1}[n]
        assert row["accuracy"] == pytest.approx(np.mean(clf.predict_classes(saved[n]) == digit))

    # Known cases through the same code: "generating" the training images themselves covers
    # every training image and is read as the right digit; the held-out images themselves
    # give FID 0 against themselves.
    copies = compute_metrics({n: real.train[n] for n in names}, real, manifest, cfg, cache_dir=cache_dir)
    assert copies["summary"]["grecall_all"] == 1.0 and copies["summary"]["grecall_few"] == 1.0
    assert copies["summary"]["accuracy_all"] >= 0.95
    assert copies["summary"]["dino_all"] > results["summary"]["dino_all"]
    held = compute_metrics({n: real.heldout[n] for n in names}, real, manifest, cfg, cache_dir=cache_dir)
    assert held["summary"]["fid_all"] == pytest.approx(0.0, abs=1e-6)

    # The job spread the identities over 2 Ray actors; one identity made alone, in this
    # process (what a Tune trial runs), gives the same images: seeds are per identity.
    alone = generate_identity(load_pipeline(tiny_model), "Bruno Silva", cfg)
    np.testing.assert_array_equal(alone, saved["Bruno Silva"])
    assert not np.array_equal(saved["Alice Moreau"], saved["Bruno Silva"])

    for n in ("alice_moreau", "bruno_silva"):
        assert (out / "grids" / f"{n}.png").stat().st_size > 0
    assert (out / "metrics_vs_frequency.png").stat().st_size > 1000

    run = client.get_run(run_id)
    for m in METRICS:
        for part in ("all", "few"):
            assert run.data.metrics[f"eval/{m}_{part}"] == pytest.approx(results["summary"][f"{m}_{part}"])
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/metrics.json", "eval/metrics_vs_frequency.png", "eval/identity_confusion.png", "eval/grids"} <= logged

    # Identity bleed: each identity's top wrong judged identity, from the same predictions
    for n in names:
        row = results["per_identity"][n]
        wrong = {k: v for k, v in row["predicted"].items() if k != n and not k.startswith("<")}
        assert row["bleed_count"] == max(wrong.values(), default=0)
        assert row["bleed_share"] == pytest.approx(row["bleed_count"] / 3)
    conf = results["bleed"]["confusion"]
    assert conf["rows"] == names and [sum(r) for r in conf["counts"]] == [3, 3]
    assert run.data.metrics["eval/bleed_share_all"] == pytest.approx(results["bleed"]["share_all"])
    assert "identity bleed" in printed and "judge digits-cnn" in printed


def test_resolve_source_from_mlflow_run(tiny_cfg, prepared, tiny_model, tmp_path):
    """--mlflow-run alone: the model and prepared folders from the run's tags; --model inside a
    run folder: the prepared folder from its pogdiff_run.json."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pogdiff_dist.evaluation.evaluate import resolve_source
    from pogdiff_dist.tracking.runs import TAG_MODEL, TAG_PREPARED, TAG_RUN_DIR, TrackingRef, write_run_state

    uri = tiny_cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    exp = client.create_experiment("resolve-test")
    run_dir = tmp_path / "runs" / "evrun"
    shutil.copytree(tiny_model, run_dir / "model")
    prepared_dir = Path(tiny_cfg.prepare.out_dir).absolute()
    run_id = client.create_run(exp, run_name="evrun", tags={
        TAG_RUN_DIR: str(run_dir), TAG_MODEL: str(run_dir / "model"), TAG_PREPARED: str(prepared_dir)}).info.run_id
    write_run_state(run_dir, TrackingRef(uri, run_id), prepared_dir)

    src = resolve_source(mlflow_run=run_id, tracking_uri=uri)
    assert src.model_dir == run_dir / "model" and src.run_id == run_id and src.run_dir == run_dir
    assert src.prepared_dir == prepared_dir
    # --model inside a run folder finds the prepared dir too, and logs nowhere
    src2 = resolve_source(model=str(run_dir / "model"))
    assert src2.prepared_dir == prepared_dir and src2.run_id is None
    with pytest.raises(ValueError, match="--prepared"):
        resolve_source(model=str(tiny_model))
    other = client.create_run(exp, run_name="elsewhere").info.run_id
    with pytest.raises(ValueError, match="records no model folder"):
        resolve_source(mlflow_run=other, tracking_uri=uri)
    with pytest.raises(ValueError, match="not found in"):
        resolve_source(mlflow_run="0" * 32, tracking_uri=uri)


def test_user_folder_dataset_nearest_centroid(ray_local, tiny_cfg, tmp_path):
    """A folder-per-identity dataset (no held-out split): nearest-centroid classifier, FID and
    DINO against training images, through evaluate_model (the Tune-trial API)."""
    from PIL import Image

    from pogdiff_dist.config import EvalConfig
    from pogdiff_dist.data.bundled.digits import render_digits
    from pogdiff_dist.evaluation.evaluate import evaluate_model
    from pogdiff_dist.prepare.pipeline import run_prepare

    images, labels = render_digits(16)
    root = tmp_path / "folders"
    for name, digit, n in (("Vera Stone", 0, 10), ("Omar Field", 7, 8), ("Lea Brook", 4, 2)):
        (root / name).mkdir(parents=True)
        for j, im in enumerate(images[labels == digit][:n]):
            Image.fromarray(im[..., 0]).save(root / name / f"{j}.png")
    cfg = tiny_cfg.with_overrides({"data.dataset": str(root), "prepare.out_dir": str(tmp_path / "prepared"),
                                   "prepare.k_max": 3, "loss.k": 3, "prepare.density_epochs": 2,
                                   "prepare.num_encoders": 1})
    manifest = run_prepare(cfg)
    model = export_tiny_model(tmp_path / "model", cfg.model, manifest)
    results = evaluate_model(model, cfg.prepare.out_dir, EvalConfig(num_images=2, steps=2), out_dir=tmp_path / "eval")
    _check_complete(results)
    assert results["classifier"]["classifier"] == "nearest-centroid"
    assert results["few_shot_identities"] == ["Lea Brook"]
    assert all(r["reference"] == "train" for r in results["per_identity"].values())
    assert results["per_identity"]["Vera Stone"]["num_train"] == 10
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"] == pytest.approx(results["summary"])
    assert (tmp_path / "eval" / "grids" / "lea_brook.png").is_file()


def test_a_runs_model_is_reevaluated_with_the_runs_settings(ray_local, tiny_cfg, prepared, tiny_model, cache_dir,
                                                            tmp_path, capsys, monkeypatch):
    """``jobs/evaluate.py --model runs/<name>/model`` evaluates with the run's own eval section
    (not the defaults), so it prints the figures the run's ``--evaluate`` printed; a --set
    changes them and says so on every figure line."""
    import importlib.util
    import shutil

    from mlflow.tracking import MlflowClient

    from pogdiff_dist.config import save_config
    from pogdiff_dist.tracking.runs import TrackingRef, write_run_state
    from pogdiff_dist.train.driver import TrainOutcome

    def load(name):
        path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"jobs_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    train, evaluate = load("train"), load("evaluate")
    uri = tiny_cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    prepared_dir = Path(tiny_cfg.prepare.out_dir).absolute()

    def run_train(cfg, resume=False, config_file=None):
        """What run_train leaves behind (run folder, config.yaml, model, MLflow run), for the tiny model."""
        run_dir = Path(cfg.train.storage_path) / cfg.train.name
        shutil.copytree(tiny_model, run_dir / "model")
        save_config(cfg, run_dir / "config.yaml")
        run_id = client.create_run(client.create_experiment("rerun-test"), run_name=cfg.train.name).info.run_id
        write_run_state(run_dir, TrackingRef(uri, run_id), prepared_dir)
        return TrainOutcome(run_dir, run_dir / "model", run_dir / "samples.png", {}, run_id, uri, str(run_dir))

    monkeypatch.setattr(train, "run_train", run_train)
    config = tmp_path / "run.yaml"
    # the run's eval section: not the defaults (10 images, 50 steps, seed 0)
    save_config(tiny_cfg.with_overrides({"train.storage_path": str(tmp_path / "runs"), "train.name": "rerun",
                                         "eval.num_images": 3, "eval.steps": 2, "eval.seed": 5,
                                         "eval.cache_dir": str(cache_dir)}), config)
    assert train.main([str(config), "--evaluate"]) == 0
    run_dir = tmp_path / "runs" / "rerun"
    own = json.loads((run_dir / "eval" / "metrics.json").read_text())
    printed_own = capsys.readouterr().out

    assert evaluate.main(["--model", str(run_dir / "model"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    printed_again = capsys.readouterr().out
    assert again["config"] == own["config"] and again["config"]["num_images"] == 3
    assert again["summary"] == own["summary"]  # the same numbers, not merely close
    for n in own["identities"]:
        assert {k: again["per_identity"][n][k] for k in (*METRICS, "predicted")} == \
               {k: own["per_identity"][n][k] for k in (*METRICS, "predicted")}
    origin = f"{run_dir / 'config.yaml'} (the run's eval section)"
    assert again["settings_from"] == own["settings_from"] == origin

    def figure_lines(text):
        start = text.index("[evaluate] done")
        return [line for line in text[start:].splitlines() if line.split()[:1] in
                (["fid"], ["dino"], ["grecall"], ["accuracy"], ["bleed"])]

    # the printed figures are the run's, each line with its settings
    assert figure_lines(printed_again) == figure_lines(printed_own) and len(figure_lines(printed_own)) == 5
    assert all("3 images/identity, DDIM 2, guidance 3, seed 5" in line for line in figure_lines(printed_again))
    assert f"; from {origin}" in printed_again

    # an override changes the images and says so
    assert evaluate.main(["--model", str(run_dir / "model"), "--out", str(tmp_path / "steps3"),
                          "--set", "eval.steps=3"]) == 0
    printed = capsys.readouterr().out
    other = json.loads((tmp_path / "steps3" / "metrics.json").read_text())
    assert other["config"]["steps"] == 3 and other["config"]["num_images"] == 3  # the rest still the run's
    assert other["settings_from"] == f"{origin}; --set eval.steps=3" and f"; from {origin}; --set eval.steps=3" in printed
    assert all("3 images/identity, DDIM 3, guidance 3, seed 5" in line for line in figure_lines(printed))
    assert other["summary"]["dino_all"] != own["summary"]["dino_all"]
