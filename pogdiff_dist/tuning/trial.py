"""What runs in a trial: train to each rung (resuming the same run), evaluate, report.

Each trial is a full training run (Ray Train V2 pattern: the Tune trial function calls
:func:`pogdiff_dist.train.driver.run_train`, which builds and fits a ``TorchTrainer`` with
DeepSpeed workers). A trial that ASHA stops is simply not continued; its MLflow run and
model stay as they were at its last rung.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from pogdiff_dist.config import BUNDLED_TEXT_ENCODER, Config, from_dict
from pogdiff_dist.tracking.runs import (
    RUN_STATE,
    log_eval,
    read_run_state,
    resolve_tracking_uri,
    set_status,
    set_tags,
)
from pogdiff_dist.tuning.spec import SweepSpec


def _absolute(cfg: Config) -> Config:
    """Trials run in other processes and folders: every path becomes absolute."""
    def ab(p: str | None) -> str | None:
        return None if p is None or Path(p).is_absolute() else str(Path(p).absolute())

    o = {"prepare.out_dir": ab(cfg.prepare.out_dir), "train.storage_path": ab(cfg.train.storage_path),
         "tracking.tracking_uri": resolve_tracking_uri(cfg.tracking.resolved_uri())}
    if cfg.data.bundled is None:
        o["data.dataset"] = ab(cfg.data.dataset)
    for key, keep in (("model.pretrained", None), ("model.init_unet", None), ("model.image_encoder", "pixels"),
                      ("model.text_encoder", BUNDLED_TEXT_ENCODER)):
        value = cfg.flat()[key]
        if value is not None and value != keep and Path(value).exists():
            o[key] = ab(value)
    return cfg.with_overrides({k: v for k, v in o.items() if v is not None})


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


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


def trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _trial_dirname(trial) -> str:
    return trial_name(trial.trial_id)


def run_trial(config: dict, setup: TrialSetup) -> None:
    """One trial: for each rung, ``run_train`` to that many steps (resuming the same run
    after the first), evaluate, report. Resumable: a restored trial continues at the rung
    after its last report, and a run interrupted mid-rung resumes from its checkpoint."""

    from pogdiff_dist.evaluation.evaluate import evaluate_model
    from pogdiff_dist.train.driver import run_train

    spec = setup.spec
    ev = spec["eval"]
    trial_id = tune.get_context().get_trial_id()
    name = trial_name(trial_id)
    rungs_done = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "trial.json").read_text())
        rungs_done, name = state["rungs_done"], state["name"]
    base = from_dict(setup.base).with_overrides(
        {**{k: _py(v) for k, v in config.items()}, "train.name": name, "train.storage_path": setup.trials_dir})
    uri = setup.tracking_uri
    run_id = None
    try:
        for rung in range(rungs_done, len(spec["rungs"])):
            steps = spec["rungs"][rung]
            run_dir = Path(setup.trials_dir) / name
            resume = (run_dir / RUN_STATE).is_file()  # a later rung, or a restart of this one
            out = run_train(base.with_overrides({"optim.max_steps": steps}), resume=resume,
                            parent_run_id=setup.parent_run_id)
            run_id = out.run_id
            if out.run_dir.name != name:  # a fresh run was given another name; later rungs resume that one
                name = out.run_dir.name
                base = base.with_overrides({"train.name": name})
            ev = dataclasses.replace(base.eval, cache_dir=base.eval.cache_dir or str(Path(setup.prepared_dir) / "eval_cache"))
            results = evaluate_model(out.model_dir, setup.prepared_dir, ev, out_dir=out.run_dir / f"eval-step{steps}")
            summary = {f"eval/{k}": _nan(v) for k, v in results["summary"].items()}
            # the latest rung's metrics.json and plot: compare.py reads eval/metrics.json
            log_eval(uri, run_id, results["summary"], [Path(results["outputs"][k]) for k in ("metrics", "plot")],
                     step=steps)
            set_tags(uri, run_id, {"sweep.trial_id": trial_id, "sweep.rungs_done": rung + 1})
            m = out.metrics
            report = {"step": steps, "rung": rung + 1, "mlflow_run_id": run_id, **summary,
                      "loss": _nan(m.get("final_loss")), "loss_denoise": _nan(m.get("final_loss_denoise")),
                      "loss_pog": _nan(m.get("final_loss_pog"))}
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "trial.json").write_text(json.dumps({"rungs_done": rung + 1, "name": name}))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    except Exception as e:
        run_id = run_id or (read_run_state(Path(setup.trials_dir) / name) or {}).get("run_id")
        if run_id is not None:
            set_tags(uri, run_id, {"sweep.error": f"{type(e).__name__}: {e}"})
            set_status(uri, run_id, "FAILED")
        raise


def trial_resources(base: Config, spec: SweepSpec) -> dict[str, float]:
    """What one trial holds at once: its own process plus its run's train workers."""
    workers = base.train.num_workers
    out = {"CPU": spec.trial_cpus + workers * base.train.cpus_per_worker}
    if base.train.use_gpu:
        out["GPU"] = float(workers)
    return out
