"""What a run keeps in a real MLflow store besides metrics: the exported pipeline as an MLflow
model that generates the pipeline's images, a registered version on request, the dataset
input, the plots, and system metrics on request. The driver's side (tags, summary steps) is
read back in tests/test_integration.py."""

import time

import numpy as np
import pandas as pd
import torch
from conftest import REPO

PROMPT = "An image of the digit 0."


def test_logged_model_generates_the_exports_images_and_registers(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.bundled.digits import NAMES
    from pogdiff_dist.data.shards import Manifest
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir
    from pogdiff_dist.pipeline import load_pipeline
    from pogdiff_dist.tracking.model import log_pipeline_model
    from pogdiff_dist.tracking.runs import DatasetInfo, start_run
    from pogdiff_dist.train.local import train_local

    d = bundled_text_encoder_dir()
    build_synthetic_prepared(tmp_path / "prep", [8, 8, 2], (1, 16, 16), d, d, max_length=16, k_max=2,
                             names=list(NAMES[:3]), dataset="digits-it2i:M")
    manifest = Manifest.load(tmp_path / "prep")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "train.num_workers": 1, "loss.k": 2, "prepare.k_max": 2, "optim.max_steps": 3,
        "tracking.tracking_uri": uri, "tracking.experiment": "model-test"})
    dataset = DatasetInfo("digits-it2i:M", str(tmp_path / "prep"), manifest.fingerprint, {"latent": "binary"})
    ref = start_run(cfg, uri, run_name="m", dataset=dataset)
    run_id = ref.run_id
    tracker = ref.open(system_metrics=True, interval_s=0.2)
    train_local(cfg, tmp_path / "prep", tmp_path / "run", tracker=tracker)
    time.sleep(1.0)
    tracker.close()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    # artifacts beside the SQLite file, not under the working directory
    assert client.get_experiment(run.info.experiment_id).artifact_location == (tmp_path / "mlruns").as_uri()
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("digits-it2i:M", manifest.fingerprint[:16])
    # the run's plots: the identity frequencies (8, 8, 2) and psi over the 3 steps' samples
    plots = tmp_path / "run" / "plots"
    assert {p.name for p in plots.iterdir()} == {"identity_counts.png", "psi_histogram.png"}

    model_dir = tmp_path / "run" / "model"
    log_pipeline_model(uri, run_id, model_dir)
    log_pipeline_model(uri, run_id, model_dir, register_as="digits-pogdiff")  # a resumed segment, registered
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run_id]  # the first segment's model was replaced
    (version,) = client.search_model_versions("name = 'digits-pogdiff'")
    assert version.run_id == run_id and version.source == f"models:/{models[0].model_id}"

    model = mlflow.pyfunc.load_model("models:/digits-pogdiff/1")
    fields = {c.name for c in model.metadata.get_input_schema().inputs[0].type.properties}
    assert fields == {"prompt", "num_inference_steps", "guidance_scale", "seed", "num_images_per_prompt"}
    images = model.predict(pd.DataFrame({"prompt": [PROMPT, "An image of the digit 1."], "seed": [5, 6],
                                         "num_inference_steps": [3, 3]}))
    pipe = load_pipeline(model_dir)
    expected = [pipe([p], num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(s))
                for p, s in ((PROMPT, 5), ("An image of the digit 1.", 6))]
    assert images.shape == (2, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
    np.testing.assert_array_equal(images, np.concatenate(expected))  # each request its own seed and steps
