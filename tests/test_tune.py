"""Sweeps: the sweep file's validation (fast, no Ray) and a real two-trial sweep on a local
Ray cluster in which ASHA stops one trial after its first rung."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from pogdiff_dist.config import load_config
from pogdiff_dist.tuning.driver import build_search_alg, fit_concurrency, prefer_longer, to_tune
from pogdiff_dist.tuning.spec import EVAL_KEYS, Param, check_space, load_sweep, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path, **changes):
    d = yaml.safe_load((REPO / "configs" / "sweeps" / "psi.yaml").read_text())
    for k, v in changes.items():
        if k.startswith("space."):
            key = k.removeprefix("space.")
            if v is None:
                d["space"].pop(key)
            else:
                d["space"][key] = v
        else:
            d[k] = v
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_bundled_sweep_file_loads():
    spec, base = load_sweep(REPO / "configs" / "sweeps" / "psi.yaml")
    assert spec.name == "psi" and spec.metric == "eval/accuracy_few" and spec.mode == "max"
    assert spec.keys == ["loss.a1", "loss.a2", "loss.a3", "loss.k", "optim.lr", "loss.neighbor_grad"]
    assert spec.rungs == (100, 200, 300) and spec.search_alg == "optuna" and spec.scheduler.type == "asha"
    k = next(p for p in spec.space if p.key == "loss.k")
    assert (k.low, k.high) == (1, 20) and base.prepare.k_max == 20


@pytest.mark.parametrize("change, message", [
    ({"space.loss.alpha": {"type": "uniform", "low": 0, "high": 1}}, "space key 'loss.alpha' is not a config key"),
    ({"space.data.resolution": {"type": "choice", "values": [16, 32]}}, "changes the prepared data"),
    ({"space.model.max_length": {"type": "choice", "values": [16, 32]}}, "changes the prepared data"),
    ({"space.optim.max_steps": {"type": "randint", "low": 1, "high": 9}}, "set per rung"),
    ({"space.loss.k": {"type": "randint", "low": 1, "high": 21}}, "loss.k=21 is larger than prepare.k_max=20"),
    ({"space.loss.neighbor_grad": {"type": "choice", "values": ["full", "half"]}},
     "space key 'loss.neighbor_grad': value 'half'"),
    ({"space.loss.a1": {"type": "loguniform", "low": 0, "high": 2}}, "loguniform needs low > 0"),
    ({"space.loss.a1": {"type": "normal", "low": 0, "high": 2}}, "space.loss.a1.type must be one of"),
    ({"space.loss.a1": {"type": "grid", "values": [1, 2]}}, "type grid needs search_alg: random"),
    ({"metric": "eval/accuracy_rare"}, "metric must be one of"),
    ({"rungs": [200, 100]}, "rungs must be increasing"),
    ({"scheduler": {"type": "asha", "grace_period": 4}}, "grace_period (4) is more rungs"),
    ({"scheduler": {"type": "asha", "patience": 4}}, "scheduler: unknown field(s) ['patience']"),
    ({"overrides": {"optim.schedule": "cosine"}}, "optim.schedule=cosine"),
    ({"eval": {"num_images": 0}}, "eval.num_images must be >= 1"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"space.eval.steps": {"type": "randint", "low": 1, "high": 9}}, "how every trial is measured"),
])
def test_sweep_file_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ValueError) as e:
        load_sweep(_sweep_file(tmp_path, **change))
    assert message in str(e.value)


def test_train_time_model_keys_can_be_searched(tmp_path):
    """model.lora_rank, model.init_unet... are read by training only: a sweep may vary them."""
    spec, base = load_sweep(_sweep_file(tmp_path, **{"space.model.lora_rank": {"type": "choice", "values": [0, 4]},
                                                     "space.data.sampling": {"type": "choice",
                                                                             "values": ["uniform", "balanced"]}}))
    assert {"model.lora_rank", "data.sampling"} <= set(spec.keys)
    check_space(spec, base, k_max=20)


def test_k_range_checked_against_the_prepared_k_max():
    spec, base = load_sweep(REPO / "configs" / "sweeps" / "psi.yaml")
    check_space(spec, base, k_max=20)
    with pytest.raises(ValueError, match="goes up to 20 but the prepared data stores k_max=12"):
        check_space(spec, base, k_max=12)


def test_search_space_conversion():
    p = Param.parse("loss.k", {"type": "randint", "low": 1, "high": 5})
    dist = to_tune(p)  # both ends included: Tune's randint excludes its upper end
    assert (dist.lower, dist.upper) == (1, 6)
    assert sorted({dist.sample() for _ in range(400)}) == [1, 2, 3, 4, 5]
    lr = Param.parse("optim.lr", {"type": "loguniform", "low": "1e-5", "high": 1e-3})  # YAML's 1e-5 is a string
    assert (lr.low, lr.high) == (1e-5, 1e-3)

    spec, _ = load_sweep(REPO / "configs" / "sweeps" / "psi.yaml")
    searcher = build_search_alg(spec, max_concurrent=1)
    # Optuna accepts every distribution of the bundled space (raises otherwise)
    assert searcher.set_search_properties(spec.metric, spec.mode, {p.key: to_tune(p) for p in spec.space})
    suggestion = searcher.suggest("t0")
    assert set(suggestion) == set(spec.keys) and 1 <= suggestion["loss.k"] <= 20
    assert 0.25 <= suggestion["loss.a1"] <= 4 and suggestion["loss.neighbor_grad"] in ("full", "stop")


def test_concurrency_fits_the_cluster():
    spec, base = load_sweep(REPO / "configs" / "sweeps" / "psi.yaml")  # 2 workers x 1 CPU, trial 0.5 CPU
    assert fit_concurrency(base, spec, {"CPU": 4.0}) == 1  # this machine: 4 logical CPUs, 1 kept for Ray Data
    assert fit_concurrency(base, spec, {"CPU": 32.0}) == 12  # floor(31 / 2.5)
    gpu = base.with_overrides({"train.use_gpu": True})
    assert fit_concurrency(gpu, spec, {"CPU": 32.0, "GPU": 4.0}) == 2  # 2 GPUs per trial


def test_a_trials_objective_is_the_mean_over_its_seeds(tmp_path):
    from pogdiff_dist.tuning.trial import _mean

    spec, _ = load_sweep(_sweep_file(tmp_path, seeds=[0, 1]))
    assert spec.seeds == (0, 1) and spec.to_dict()["seeds"] == [0, 1]
    assert _mean([0.25, 0.5]) == 0.375 and _mean([0.5, None, float("nan")]) == 0.5
    assert math.isnan(_mean([None]))


def test_rung_evaluation_is_the_base_configs_eval_section(tmp_path):
    """The sweep file's eval: mapping becomes eval.* overrides of the base config (one builder)."""
    spec, base = load_sweep(REPO / "configs" / "sweeps" / "psi.yaml")
    assert spec.overrides["eval.num_images"] == 4 and base.eval.num_images == 4 and base.eval.steps == 10
    spec, base = load_sweep(_sweep_file(tmp_path, overrides={"eval.num_images": 16}))
    assert base.eval.num_images == 16 and base.eval.steps == 10  # overrides win over the eval: mapping


def test_best_is_the_last_rung_value_ties_to_the_longer_trial():
    """prefer_longer, on Ray Train's own Result objects: among trials with the best value
    (what ResultGrid.get_best_result returned), the one that reported more steps."""
    from ray.train import Result

    def result(step, value):
        return Result(metrics={"step": step, "eval/accuracy_few": value}, checkpoint=None, error=None, path=f"t{step}")

    a, b, c = result(100, 0.5), result(300, 0.5), result(200, 0.4)
    assert prefer_longer(a, [a, b, c], "eval/accuracy_few") is b
    assert prefer_longer(c, [a, b, c], "eval/accuracy_few") is c  # no tie
    nan = Result(metrics={"step": 1}, checkpoint=None, error=None, path="t")
    assert prefer_longer(nan, [nan], "eval/accuracy_few") is None  # no value: no best


@pytest.mark.integration
def test_sweep_stops_a_trial_records_mlflow_and_writes_best_config(ray_local, tiny_cfg, prepared, monkeypatch):
    """Two grid trials over loss.a3 with rungs at steps 1 and 2, objective loss_pog (min),
    ASHA(grace 1, reduction 2, max 2 rungs), one trial at a time.

    Why the stop is deterministic: both trials start from the same seed, so at step 1
    their weights, batches, noise and neighbour draws are identical; psi is proportional
    to 1/a3 (Eq. 11), so the step-1 loss_pog of a3=0.001 is exactly 10^6 times that of
    a3=1000. ASHA lets the first trial to reach a rung continue (nothing to compare
    with); the second is below the rung's cutoff and stopped. A real sweep uses
    eval/accuracy_few; the evaluation still runs and is logged here at every rung."""
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.tuning.driver import run_sweep

    base = tiny_cfg.with_overrides({"train.caption_dropout": 0.0})  # every sample has its y' term
    spec = spec_from_dict({
        "metric": "loss_pog", "mode": "min", "num_samples": 1, "rungs": [1, 2], "search_alg": "random",
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "eval": {"num_images": 2, "steps": 2},
        "space": {"loss.a3": {"type": "grid", "values": [1000.0, 0.001]}},
    }, name="grid-a3")
    base = base.with_overrides(spec.overrides)  # the eval: mapping, as load_sweep applies it
    out = run_sweep(spec, base)

    by_a3 = {r.params["loss.a3"]: r for r in out.rows}
    good, bad = by_a3[1000.0], by_a3[0.001]
    assert (good.status, good.steps, good.rungs_done) == ("completed", 2, 2)
    assert (bad.status, bad.steps, bad.rungs_done) == ("stopped_early", 1, 1)
    assert out.best is good and good.value == pytest.approx(good.metrics["loss_pog"])

    client = MlflowClient(out.tracking_uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pogdiff.kind"] == "sweep"
    assert parent.data.params["sweep.space_keys"] == "loss.a3" and parent.data.params["sweep.metric"] == "loss_pog"
    assert parent.data.metrics["sweep/num_trials"] == 2 and parent.data.metrics["sweep/num_stopped_early"] == 1
    assert parent.data.metrics["sweep/num_completed"] == 1 and parent.data.metrics["sweep/num_failed"] == 0
    assert parent.data.metrics["best/loss_pog"] == pytest.approx(good.value)
    assert parent.data.tags["sweep.best_run_id"] == good.run_id and parent.data.tags["sweep.failed_trials"] == "none"
    assert {a.path for a in client.list_artifacts(out.parent_run_id)} >= {"best_config.yaml", "trials.csv"}

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted([good.run_id, bad.run_id])
    for row in (good, bad):
        child = client.get_run(row.run_id)
        assert child.info.run_name == f"trial-{row.trial_id}" and child.info.status == "FINISHED"
        assert float(child.data.params["loss.a3"]) == row.params["loss.a3"]
        # max_steps changes per rung: a metric at the step each segment starts and a tag, never a param
        assert child.data.params["loss.method"] == "pogdiff" and "optim.max_steps" not in child.data.params
        segments = [(m.step, m.value) for m in client.get_metric_history(row.run_id, "segment/optim.max_steps")]
        assert segments == [(0, 1.0), (1, 2.0)][:row.rungs_done], segments
        assert child.data.tags["pogdiff.optim.max_steps"] == str(row.steps)
        assert child.data.tags["sweep.status"] == row.status and child.data.tags["sweep.trial_id"] == row.trial_id
        assert child.data.metrics["final_step"] == row.steps
        assert {a.path for a in client.list_artifacts(row.run_id)} >= {"samples.png", "eval"}
        assert {a.path for a in client.list_artifacts(row.run_id, "eval")} >= {"eval/metrics.json"}
        # the rung evaluation: one value per rung reached, at that rung's step
        for key in EVAL_KEYS:
            if key.startswith(("eval/accuracy", "eval/grecall", "eval/dino")):
                hist = client.get_metric_history(row.run_id, key)
                assert [m.step for m in hist] == list(range(1, row.steps + 1)), key
                assert all(-1 <= m.value <= 1 for m in hist)
    curve = {r.params["loss.a3"]: {m.step: m.value for m in client.get_metric_history(r.run_id, "loss_pog")}
             for r in out.rows}
    assert sorted(curve[1000.0]) == [1, 2] and sorted(curve[0.001]) == [1]  # the stopped trial was not continued
    assert curve[1000.0][1] > 0 and curve[0.001][1] / curve[1000.0][1] == pytest.approx(1e6, rel=1e-4)
    denoise = {r.params["loss.a3"]: client.get_metric_history(r.run_id, "loss_denoise")[0].value for r in out.rows}
    assert denoise[1000.0] == pytest.approx(denoise[0.001], rel=1e-6)  # same start, same batch: only psi differs

    # The best config: what the best trial ran, accepted as-is by jobs/train.py.
    cfg = load_config(out.best_config)
    assert cfg.loss.a3 == 1000.0 and cfg.optim.max_steps == 2 and cfg.train.name == "grid-a3-best"
    assert cfg.with_overrides({"loss.a3": base.loss.a3, "optim.max_steps": base.optim.max_steps,
                               "train.name": base.train.name}) == base
    spec_train = importlib.util.spec_from_file_location("jobs_train", REPO / "jobs" / "train.py")
    jobs_train = importlib.util.module_from_spec(spec_train)
    spec_train.loader.exec_module(jobs_train)
    seen = []
    monkeypatch.setattr(jobs_train, "run_train", lambda c, resume=False, config_file=None: seen.append(c))
    assert jobs_train.main([str(out.best_config)]) == 0 and seen == [cfg]
    trials = out.trials  # Ray Tune's get_dataframe(), with status and MLflow run: also trials.csv
    assert len(trials) == 2 and set(trials["status"]) == {"completed", "stopped_early"}
    assert {"config/loss.a3", "training_iteration", "mlflow_run_id"} <= set(trials.columns)
    import pandas as pd

    assert len(pd.read_csv(out.sweep_dir / "trials.csv")) == 2

    # --resume (Tuner.restore) of the finished sweep: same parent run, no trial runs again.
    again = run_sweep(spec, base, resume=True)
    assert again.parent_run_id == out.parent_run_id and again.sweep_dir == out.sweep_dir
    assert [(r.trial_id, r.status, r.steps) for r in again.rows] == [(r.trial_id, r.status, r.steps) for r in out.rows]
    assert len(client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{out.parent_run_id}'")) == 2
    assert math.isclose(load_config(again.best_config).loss.a3, 1000.0)
    assert client.get_run(out.parent_run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_concurrent_trials_log_to_an_mlflow_server(ray_local, tiny_cfg, prepared, mlflow_server):
    """What the cluster specs run: trials logging at the same time to a real `mlflow server`
    (SQLite on the server's local disk, artifacts proxied), not to SQLite on a shared volume.
    Two one-worker trials run side by side; every trial's metrics and artifacts are found."""
    from mlflow.tracking import MlflowClient

    from pogdiff_dist.tuning.driver import run_sweep

    url, _ = mlflow_server
    base = tiny_cfg.with_overrides({"tracking.tracking_uri": url, "tracking.experiment": "server-sweep",
                                    "train.num_workers": 1})
    spec = spec_from_dict({
        "metric": "loss", "mode": "min", "num_samples": 1, "rungs": [2], "search_alg": "random",
        "max_concurrent_trials": 2, "eval": {"num_images": 2, "steps": 2},
        "space": {"loss.a1": {"type": "grid", "values": [0.5, 2.0]}}}, name="server-sweep")
    out = run_sweep(spec, base.with_overrides(spec.overrides))
    assert sorted(r.status for r in out.rows) == ["completed", "completed"]
    client = MlflowClient(url)
    runs = [client.get_run(r.run_id) for r in out.rows]
    a, b = sorted(runs, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time  # the two trials ran, and logged, at the same time
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == out.parent_run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert run.data.metrics["final_step"] == 2 and "eval/accuracy_few" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"samples.png", "plots", "eval"}
    assert client.get_run(out.parent_run_id).data.metrics["sweep/num_completed"] == 2


def test_failed_trials_are_reported_in_the_table_and_the_parent_run(tmp_path):
    """A trial that raised shows as `error` with its message, in the printed table and in
    the sweep's parent run (tag, metric, status); it never becomes the best trial. The
    trials are Ray Tune's own Result objects."""
    from mlflow.tracking import MlflowClient
    from ray.tune import Result

    from pogdiff_dist.tuning.driver import _row, create_parent, finish_parent, format_table

    spec, base = load_sweep(REPO / "configs" / "sweeps" / "psi.yaml")
    base = base.with_overrides({"tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    uri = base.tracking.tracking_uri
    parent = create_parent(uri, base, spec, "psi")
    cfg = {"loss.a1": 1.5, "loss.a2": 1.0, "loss.a3": 2.0, "loss.k": 7, "optim.lr": 1e-3, "loss.neighbor_grad": "stop"}

    def result(i, metrics, error=None):  # Tune keeps a trial's config in its metrics
        return Result(metrics={**metrics, "config": cfg}, checkpoint=None, error=error,
                      path=str(tmp_path / f"trial-t_0000{i}"))

    results = [
        result(0, {"rung": 3, "step": 300, "eval/accuracy_few": 0.5, "mlflow_run_id": None}),
        result(1, {"rung": 1, "step": 100, "eval": {"accuracy_few": 0.25}}),  # Tune's nested form
        result(2, {}, RuntimeError("Training failed\nFloatingPointError: non-finite loss at step 3")),
        Result(metrics={}, checkpoint=None, error=RuntimeError("died before reporting"),
               path=str(tmp_path / "trial-t_00003")),  # no report, no config
    ]
    rows = [_row(r, spec, tmp_path) for r in results]
    assert [(r.trial_id, r.status, r.value) for r in rows] == [
        ("t_00000", "completed", 0.5), ("t_00001", "stopped_early", 0.25), ("t_00002", "error", None),
        ("t_00003", "error", None)]
    rows = rows[:3]
    best = rows[0]
    table = format_table(rows, spec, best)
    assert "t_00000 *" in table and "trial t_00002 failed: FloatingPointError: non-finite loss at step 3" in table
    finish_parent(parent, spec, rows, best, [], wall=12.5)

    run = MlflowClient(uri).get_run(parent.run_id)
    assert run.info.status == "FINISHED"  # some trials succeeded
    assert run.data.metrics["sweep/num_failed"] == 1 and run.data.metrics["sweep/num_completed"] == 1
    assert run.data.metrics["best/eval/accuracy_few"] == 0.5 and run.data.metrics["sweep/wall_seconds"] == 12.5
    assert run.data.tags["sweep.failed_trials"] == "t_00002: FloatingPointError: non-finite loss at step 3"
    assert json.loads(run.data.tags["sweep.best_params"]) == cfg
    assert run.data.params["sweep.space_keys"] == ",".join(spec.keys) and "loss.a1" not in run.data.params
    assert run.data.params["loss.method"] == "pogdiff"  # the base config's fixed values

    all_failed = [r for r in rows if r.status == "error"]
    parent2 = create_parent(uri, base, spec, "psi-2")
    finish_parent(parent2, spec, all_failed, None, [], wall=1.0)
    assert MlflowClient(uri).get_run(parent2.run_id).info.status == "FAILED"


def test_loss_options_are_searchable(tmp_path):
    """min-SNR and noise offset in a sweep file: min-SNR on or off (null) and a noise offset
    range, checked against the config like any key, and sampled by Optuna."""
    sweep = {"name": "snr", "base_config": str(REPO / "configs" / "tiny.yaml"), "rungs": [2],
             "space": {"loss.snr_gamma": {"type": "choice", "values": [None, 1.0, 5.0]},
                              "loss.noise_offset": {"type": "uniform", "low": 0.0, "high": 0.1}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    spec, base = load_sweep(tmp_path / "s.yaml")
    check_space(spec, base)
    searcher = build_search_alg(spec, max_concurrent=1)
    assert searcher.set_search_properties(spec.metric, spec.mode, {p.key: to_tune(p) for p in spec.space})
    seen = [searcher.suggest(f"t{i}") for i in range(12)]
    assert {s["loss.snr_gamma"] for s in seen} <= {None, 1.0, 5.0} and len({s["loss.snr_gamma"] for s in seen}) > 1
    assert all(0.0 <= s["loss.noise_offset"] <= 0.1 for s in seen)
    bad = {**sweep, "space": {"loss.snr_gamma": {"type": "choice", "values": [0.0, 5.0]}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="snr_gamma"):
        check_space(*load_sweep(tmp_path / "bad.yaml"))
