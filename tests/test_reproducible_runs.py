"""Two runs of one seed, end to end on a local Ray cluster, agree exactly: prepare (into
separate folders: the bundled dataset's build, the encode actors' order, the k-NN table, the
density VAE, the shards), the per-step losses of 2 DeepSpeed workers over gloo, the validation
grid's accuracy, the export, and the evaluation's generation and judge (trained afresh in each
prepared folder). docs/REPRODUCIBILITY.md says what this covers and what it does not."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
HISTORY = ("loss", "loss_denoise", "loss_pog", "psi_mean", "psi_max", "lr", "val/accuracy_few", "val/accuracy_majority")


def _run(root: Path):
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.config import load_config
    from pogdiff_dist.evaluation.evaluate import resolve_source, run_evaluate
    from pogdiff_dist.train.driver import run_train

    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "prepare.out_dir": str(root / "prepared"), "train.storage_path": str(root / "runs"),
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "tracking.log_model": False,
        # 4 encode blocks over the 2 encoder actors: their finishing order must not matter
        "prepare.batch_size": 8, "optim.max_steps": 6, "train.checkpoint_every": 3, "data.sampling": "balanced",
        "train.validate_every": 3, "train.validate_images": 2, "train.validate_steps": 2,
        "eval.num_images": 2, "eval.steps": 3})
    out = run_train(cfg)
    evaluation = run_evaluate(resolve_source(str(out.model_dir), None, out.run_id, out.tracking_uri), out.run_dir / "eval",
                              cfg.eval, ray_cfg=cfg.ray)
    client = MlflowClient(out.tracking_uri)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(out.run_id, k)] for k in HISTORY}
    return out, evaluation.results, history


def _shard_rows(prepared: Path) -> list[list[tuple[str, str, bytes]]]:
    """Every shard's members in order, meta.json without its fingerprint (which hashes the
    raw files' paths and times, so it names the folder)."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    shards = []
    for name in manifest["shards"]:
        with tarfile.open(prepared / "shards" / name) as tar:
            rows = []
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".meta.json"):
                    data = json.dumps({k: v for k, v in json.loads(data).items() if k != "fingerprint"}).encode()
                rows.append((name, member.name, data))
        shards.append(rows)
    return shards


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(model_dir.glob("*/*.safetensors")) for k, v in load_file(p).items()}


def test_two_runs_of_one_seed_are_identical(ray_local, tmp_path):
    (a, eval_a, hist_a), (b, eval_b, hist_b) = _run(tmp_path / "a"), _run(tmp_path / "b")
    pa, pb = tmp_path / "a" / "prepared", tmp_path / "b" / "prepared"

    # prepare: the same rows in the same shards, in the same order, with the same neighbours and weights
    assert _shard_rows(pa) == _shard_rows(pb)
    np.testing.assert_array_equal(np.load(pa / "elbo.npy"), np.load(pb / "elbo.npy"))
    assert (pa / "neighbours.parquet").read_bytes() == (pb / "neighbours.parquet").read_bytes()

    # training: every logged step of every metric, and the exported weights, bit for bit
    assert len(hist_a["loss"]) == 6 and hist_a["val/accuracy_few"], hist_a
    assert hist_a == hist_b
    assert a.metrics["final_loss"] == b.metrics["final_loss"]
    wa, wb = _weights(a.model_dir), _weights(b.model_dir)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)

    # evaluation: the same images, so the same metrics and the same judge's verdicts
    assert json.dumps(eval_a["summary"], sort_keys=True) == json.dumps(eval_b["summary"], sort_keys=True)  # NaN-safe
    assert {n: r["predicted"] for n, r in eval_a["per_identity"].items()} == \
        {n: r["predicted"] for n, r in eval_b["per_identity"].items()}
    images = sorted(p.relative_to(a.run_dir / "eval") for p in (a.run_dir / "eval" / "images").rglob("*.png"))
    assert images and all((a.run_dir / "eval" / p).read_bytes() == (b.run_dir / "eval" / p).read_bytes() for p in images)
