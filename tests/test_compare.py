"""jobs/compare.py against a real `mlflow server` on localhost and against a SQLite store:
runs logged through MlflowClient like a sweep logs them, then the table and the plots."""

import importlib.util
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pogdiff_dist.tracking.compare import compare, default_uri

REPO = Path(__file__).resolve().parents[1]

# (name, a1, neighbor_grad, accuracy_few, accuracy_all, dino_few, sweep status)
TRIALS = [
    ("trial-a", 0.5, "full", 0.25, 0.60, 0.31, "completed"),
    ("trial-b", 2.0, "stop", 0.75, 0.80, 0.42, "completed"),
    ("trial-c", 1.0, "full", 0.50, 0.70, 0.12, "stopped_early"),
]


def _eval_json(tmp: Path, name: str, acc_few: float) -> Path:
    """An evaluation's metrics.json (pogdiff_dist.evaluation.report layout), two identities."""
    per = {"Alice Moreau": {"train_count": 30, "few_shot": False, "accuracy": 1.0, "dino": 0.5, "grecall": 0.4,
                            "fid": 0.3},
           "Bruno Silva": {"train_count": 2, "few_shot": True, "accuracy": acc_few, "dino": 0.2, "grecall": 0.5,
                           "fid": 0.9}}
    path = tmp / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": {"accuracy_few": acc_few}, "per_identity": per}))
    return path


def log_sweep(uri: str, tmp: Path, experiment: str) -> dict:
    """A sweep parent with three trial children (two evaluated), plus one standalone run."""
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp, run_name="sweep-psi", tags={
        "pogdiff.kind": "sweep", "sweep.metric": "eval/accuracy_few", "sweep.mode": "max"})
    client.log_param(parent.info.run_id, "sweep.space_keys", "loss.a1,loss.neighbor_grad")
    ids = {}
    for name, a1, grad, few, all_, dino, status in TRIALS:
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id,
                                                          "sweep.status": status})
        rid = run.info.run_id
        for k, v in {"loss.method": "pogdiff", "loss.a1": a1, "loss.neighbor_grad": grad, "loss.k": 5,
                     "optim.lr": 5e-4, "train.name": name}.items():
            client.log_param(rid, k, v)
        for step in (100, 200):
            client.log_metric(rid, "eval/accuracy_few", few * step / 200, step=step)
        client.log_metric(rid, "eval/accuracy_all", all_, step=200)
        client.log_metric(rid, "eval/dino_few", dino, step=200)
        client.log_metric(rid, "final_step", 200 if status == "completed" else 100)
        if name != "trial-c":
            client.log_artifact(rid, str(_eval_json(tmp, name, few)), artifact_path="eval")
        client.set_terminated(rid)
        ids[name] = rid
    solo = client.create_run(exp, run_name="vanilla-baseline")
    client.log_param(solo.info.run_id, "loss.method", "vanilla")
    client.log_param(solo.info.run_id, "optim.lr", 1e-3)
    client.log_metric(solo.info.run_id, "eval/accuracy_few", 0.1)
    client.set_terminated(solo.info.run_id)
    client.set_terminated(parent.info.run_id)
    return {"parent": parent.info.run_id, "solo": solo.info.run_id, **ids}


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()[2:]]


def _check_sweep_comparison(uri: str, ids: dict, out: Path):
    res = compare(uri, parent_run_id=ids["parent"], out_dir=out)
    assert res.metric == "eval/accuracy_few" and res.mode == "max"
    assert res.keys == ["loss.a1", "loss.neighbor_grad"]
    head = res.table.splitlines()[0].split()
    assert head[:4] == ["run", "id", "status", "method"]
    rows = _rows(res.table)
    assert [r[0] for r in rows] == ["trial-b", "trial-c", "trial-a"]  # best first by accuracy_few (last value)
    col = {h: i for i, h in enumerate(head)}
    b = rows[0]
    assert b[col["id"]] == ids["trial-b"][:8] and b[col["status"]] == "completed" and b[col["method"]] == "pogdiff"
    assert (b[col["loss.a1"]], b[col["loss.neighbor_grad"]], b[col["loss.k"]]) == ("2", "stop", "5")
    assert (b[col["accuracy_few"]], b[col["accuracy_all"]], b[col["dino_few"]]) == ("0.75", "0.8", "0.42")
    assert rows[1][col["status"]] == "stopped_early" and rows[1][col["final_step"]] == "100"
    assert "grecall_few" not in col  # only metrics some run has
    csv_rows = res.csv.read_text().strip().splitlines()
    assert len(csv_rows) == 4 and csv_rows[1].startswith(ids["trial-b"])
    for name in ("metric_vs_params", "identity_frequency"):
        png = res.plots[name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    return res


def test_compare_against_mlflow_server(mlflow_server, tmp_path, capsys):
    url, server_tmp = mlflow_server
    ids = log_sweep(url, tmp_path, "cmp-server")
    assert (server_tmp / "artifacts").is_dir()  # artifacts went through the server, not to a local path
    _check_sweep_comparison(url, ids, tmp_path / "out")

    everything = compare(url, experiment="cmp-server", out_dir=None)
    names = [r.name for r in everything.runs]
    assert names == ["trial-b", "trial-c", "trial-a", "vanilla-baseline"]  # the sweep parent is left out
    assert "loss.method" in everything.keys and "loss.a1" in everything.keys and "train.name" not in everything.keys
    assert _rows(everything.table)[-1][3] == "vanilla"

    picked = compare(url, run_ids=[ids["trial-a"], ids["solo"]], metric="eval/dino_few", out_dir=None)
    assert [r.name for r in picked.runs] == ["trial-a", "vanilla-baseline"]  # a run without the metric goes last

    spec = importlib.util.spec_from_file_location("jobs_compare", REPO / "jobs" / "compare.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    capsys.readouterr()  # drop MLflow's run links printed while logging
    assert job.main(["--parent", ids["parent"], "--tracking-uri", url, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "3 run(s), best first by eval/accuracy_few (max); hyperparameters: loss.a1, loss.neighbor_grad" in printed
    assert printed.splitlines()[2].split()[0] == "trial-b"
    assert (tmp_path / "cli" / "identity_frequency.png").is_file()

    with pytest.raises(ValueError, match="no experiment named 'nope'"):
        compare(url, experiment="nope", out_dir=None)


def test_compare_against_sqlite_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = log_sweep(uri, tmp_path, "cmp-sqlite")
    _check_sweep_comparison(uri, ids, tmp_path / "out")
    # the default URI is the project's: $MLFLOW_TRACKING_URI, else ./mlflow.db made absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert default_uri() == uri and next(r.name for r in compare(parent_run_id=ids["parent"], out_dir=None).runs) == "trial-b"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert default_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
