"""Validation during training: grids logged to a real MLflow store as images at the expected
steps, with the judge's identity accuracy for a bundled dataset and the cost of it."""

import numpy as np
from conftest import REPO


def test_validation_images_and_accuracy_reach_mlflow_at_their_steps(tmp_path):
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.config import load_config
    from pogdiff_dist.data.bundled.digits import NAMES
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir
    from pogdiff_dist.tracking.runs import start_run
    from pogdiff_dist.train.local import train_local

    d = bundled_text_encoder_dir()
    # Digits-IT2I names (its judge), 16 x 16 pixels; the latents are synthetic, the judge is real
    build_synthetic_prepared(tmp_path / "prep", [10, 10, 2, 2], (1, 16, 16), d, d, max_length=16, k_max=2,
                             names=list(NAMES[:4]), dataset="digits-it2i:M")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "train.num_workers": 1, "loss.k": 2, "prepare.k_max": 2, "optim.max_steps": 6, "train.validate_every": 2,
        "train.validate_images": 3, "train.validate_steps": 2,
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "val-test"})
    uri = cfg.tracking.tracking_uri
    ref = start_run(cfg, uri, run_name="val")
    run_id = ref.run_id
    train_local(cfg, tmp_path / "prep", tmp_path / "run", tracker=ref.open())

    client = MlflowClient(uri)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
    assert steps == [2, 4], images  # every 2 steps, before the last (the final grid is the export's)
    for key, expect in (("val/accuracy_majority", 3), ("val/accuracy_few", 3)):
        hist = client.get_metric_history(run_id, key)
        assert [m.step for m in hist] == [2, 4], key
        assert all(m.value in {i / expect for i in range(expect + 1)} for m in hist)  # 3 images judged
    cost = client.get_metric_history(run_id, "val/fraction_of_run")
    spent = [m.value for m in client.get_metric_history(run_id, "val/seconds")]
    assert [m.step for m in cost] == [2, 4] and all(m.value > 0 for m in cost) and spent[1] > spent[0] > 0
    assert np.isclose(client.get_run(run_id).data.metrics["val_seconds"],
                      client.get_metric_history(run_id, "val/seconds")[-1].value)
