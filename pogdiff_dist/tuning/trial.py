"""What runs in a trial: train to each rung (resuming the same run), evaluate, report.

Each trial is a full training run (Ray Train V2 pattern: the Tune trial function calls
:func:`pogdiff_dist.train.driver.run_train`, which builds and fits a ``TorchTrainer`` with
DeepSpeed workers). A trial that ASHA stops is simply not continued; its MLflow run and
model stay as they were at its last rung.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from pogdiff_dist.config import Config, from_dict
from pogdiff_dist.evaluation.evaluate import evaluate_model
from pogdiff_dist.evaluation.report import LOGGED, mlflow_metrics
from pogdiff_dist.tracking.runs import RUN_STATE, TrackingRef, read_run_state
from pogdiff_dist.train.driver import RunContext
from pogdiff_dist.tuning.spec import SweepSpec


def _py(v):
    """Tune samples numpy scalars; configs, YAML and JSON want Python ones."""
    return v.item() if hasattr(v, "item") else v


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, passed explicitly (never read from the driver's globals)."""

    base: dict  # Config.to_dict() with absolute paths
    spec: dict  # SweepSpec.to_dict()
    prepared_dir: str
    trials_dir: str
    parent_run_id: str
    tracking_uri: str
    spec_file: str | None = None  # the sweep YAML (a run tag)


def trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _trial_dirname(trial) -> str:
    return trial_name(trial.trial_id)


def run_trial(config: dict, setup: TrialSetup) -> None:
    """One trial: for each rung, ``run_train`` to that many steps (resuming the same run
    after the first), evaluate, report. With the sweep's ``seeds`` the trial trains one run
    per seed (``<trial>-s<seed>``) and reports the mean over seeds, so one lucky image is not
    the difference. Resumable: a restored trial continues at the rung after its last report,
    and a run interrupted mid-rung resumes from its checkpoint."""
    spec = setup.spec
    trial_id = tune.get_context().get_trial_id()
    seeds = spec.get("seeds") or [None]
    names = {str(s): trial_name(trial_id) + ("" if s is None else f"-s{s}") for s in seeds}
    rungs_done = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "trial.json").read_text())
        rungs_done, names = state["rungs_done"], state["names"]
    # A trial's export stays in its run folder, not logged as an MLflow model: a sweep's rungs
    # and seeds would store one copy per rung (retrain the best config to log and register it).
    base = from_dict(setup.base).with_overrides(
        {**{k: _py(v) for k, v in config.items()}, "train.storage_path": setup.trials_dir,
         "tracking.log_model": False, "tracking.register_model": None})
    ev = dataclasses.replace(base.eval, cache_dir=base.eval.cache_dir or str(Path(setup.prepared_dir) / "eval_cache"))
    uri = setup.tracking_uri
    context = RunContext.attach(base, config_file=setup.spec_file)  # once per trial: every rung and seed trains in it
    run_ids: list[str] = []
    try:
        for rung in range(rungs_done, len(spec["rungs"])):
            steps = spec["rungs"][rung]
            summaries, losses, run_ids = [], [], []
            for seed in seeds:
                name = names[str(seed)]
                resume = (Path(setup.trials_dir) / name / RUN_STATE).is_file()  # a later rung, or a restart
                out = context.train({"train.name": name, "optim.max_steps": steps,
                                     **({} if seed is None else {"train.seed": seed})},
                                    resume=resume, parent_run_id=setup.parent_run_id)
                names[str(seed)] = out.config.train.name  # a fresh run given another name: later rungs resume it
                run_ids.append(out.run_id)
                results = evaluate_model(out.model_dir, setup.prepared_dir, ev,
                                         out_dir=out.run_dir / f"eval-step{steps}")
                mlflow_run = TrackingRef(uri, out.run_id).open()
                # the latest rung's metrics.json and plot: compare.py reads eval/metrics.json
                mlflow_run.log_eval(mlflow_metrics(results), [Path(results["outputs"][k]) for k in LOGGED],
                                    step=steps)
                mlflow_run.set_tags({"sweep.trial_id": trial_id, "sweep.rungs_done": rung + 1,
                                     **({} if seed is None else {"sweep.seed": seed})})
                summaries.append(results["summary"])
                losses.append(out.metrics)
            report = {"step": steps, "rung": rung + 1, "mlflow_run_id": run_ids[0], "seeds": len(seeds),
                      **{f"eval/{k}": _mean([s[k] for s in summaries]) for k in summaries[0]},
                      **{k: _mean([m.get(f"final_{k}") for m in losses]) for k in ("loss", "loss_denoise", "loss_pog")}}
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "trial.json").write_text(json.dumps({"rungs_done": rung + 1, "names": names}))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    except Exception as e:
        for name in names.values():
            run_id = (read_run_state(Path(setup.trials_dir) / name) or {}).get("run_id")
            if run_id is not None:
                failed = TrackingRef(uri, run_id).open()
                failed.set_tags({"sweep.error": f"{type(e).__name__}: {e}"})
                failed.set_status("FAILED")
        raise


def _mean(values) -> float:
    """Mean of the finite values (NaN when none): the objective over a trial's seeds."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def trial_resources(base: Config, spec: SweepSpec) -> dict[str, float]:
    """What one trial holds at once: its own process plus its run's train workers."""
    workers = base.train.num_workers
    out = {"CPU": spec.trial_cpus + workers * base.train.cpus_per_worker}
    if base.train.use_gpu:
        out["GPU"] = float(workers)
    return out
