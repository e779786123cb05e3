"""Compare MLflow runs: a table of method, key params and all/few-shot metrics, and plots.

Runs come from an experiment (every run but sweep parents), a sweep's parent run (its
trials), or a list of run ids, in the default SQLite store or on an ``mlflow server``.
Plots: the objective against each hyperparameter that differs between the runs (for a
sweep: the searched keys), and per-identity metrics against each identity's training-set
frequency for the best runs, read from the ``eval/metrics.json`` that the evaluation
logs into a run. Only MLflow and matplotlib here: no Ray, no torch.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from pogdiff_dist.config import TrackingConfig
from pogdiff_dist.config.sections import resolve_tracking_uri
from pogdiff_dist.evaluation.report import plot_vs_frequency

EVAL_METRICS = ("accuracy", "dino", "grecall", "fid")
LOWER_IS_BETTER = ("fid", "loss")
KEY_PARAMS = ("loss.a1", "loss.a2", "loss.a3", "loss.k", "loss.neighbor_grad", "optim.lr")
# never "hyperparameters", even when they differ between runs
NOT_HYPERPARAMS = ("train.name", "train.storage_path", "prepare.out_dir", "tracking.", "ray.", "sweep.")
SWEEP_KIND = "sweep"  # tag pogdiff.kind of a sweep's parent run


@dataclass
class RunInfo:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.params.get("loss.method", "-")


@dataclass
class Selection:
    runs: list[RunInfo]
    keys: list[str]  # a sweep's searched keys ([] otherwise)
    metric: str | None = None  # a sweep's objective
    mode: str | None = None  # its "min" / "max"


@dataclass
class Comparison:
    runs: list[RunInfo]  # sorted, best first
    keys: list[str]  # hyperparameters shown and plotted
    metric: str | None  # the sort / plot metric
    mode: str  # "max" or "min": which end of metric is best
    table: str
    csv: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)


def default_uri(uri: str | None = None) -> str:
    """As the project's configs resolve it: the argument, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db."""
    return resolve_tracking_uri(TrackingConfig(tracking_uri=uri).resolved_uri())


def _runs_from_frame(df) -> list[RunInfo]:
    """``mlflow.search_runs()``'s DataFrame (``params.*``, ``metrics.*``, ``tags.*`` columns) as RunInfo."""
    import pandas as pd

    runs = []
    def part(row, prefix):
        return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and not pd.isna(v)}

    for row in df.to_dict("records"):
        tags = part(row, "tags.")
        runs.append(RunInfo(row["run_id"], tags.get("mlflow.runName", row["run_id"][:8]), row["status"],
                            {k: str(v) for k, v in part(row, "params.").items()},
                            {k: float(v) for k, v in part(row, "metrics.").items()}, tags))
    return runs


def search(tracking_uri: str, filter_string: str = "", experiment_ids: list[str] | None = None) -> list[RunInfo]:
    """Runs from ``mlflow.search_runs`` (every experiment when ``experiment_ids`` is None)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    df = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string, max_results=5000,
                            search_all_experiments=experiment_ids is None, output_format="pandas")
    return _runs_from_frame(df) if len(df) else []


def load_runs(client: MlflowClient, experiment: str | None = None, parent_run_id: str | None = None,
              run_ids: list[str] | None = None) -> Selection:
    """The runs to compare and, for a sweep, its searched keys and objective."""
    given = sum(x is not None and x != [] for x in (experiment, parent_run_id, run_ids))
    if given != 1:
        raise ValueError("give exactly one of an experiment, a parent (sweep) run id, or run ids")
    uri = client.tracking_uri
    if run_ids:
        found = {r.run_id: r for r in search(uri, "attributes.run_id IN ({})".format(
            ", ".join(f"'{r}'" for r in run_ids)))}
        missing = [r for r in run_ids if r not in found]
        if missing:
            raise ValueError(f"run(s) {missing} not found at {uri}")
        return Selection([found[r] for r in run_ids], [])
    if parent_run_id is not None:
        parent = client.get_run(parent_run_id)
        runs = search(uri, f"tags.mlflow.parentRunId = '{parent_run_id}'", [parent.info.experiment_id])
        keys = [k for k in parent.data.params.get("sweep.space_keys", "").split(",") if k]
        if not runs:
            raise ValueError(f"run {parent_run_id} has no child runs (is it a sweep's parent run?)")
        tags = parent.data.tags
        return Selection(runs, keys, tags.get("sweep.metric"), tags.get("sweep.mode"))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment named {experiment!r} at this tracking URI; experiments: {names}")
    runs = [r for r in search(uri, "", [exp.experiment_id]) if r.tags.get("pogdiff.kind") != SWEEP_KIND]
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no runs")
    return Selection(runs, [])


def varying_keys(runs: list[RunInfo]) -> list[str]:
    """Config params whose value differs between the runs (what a plot against makes sense)."""
    keys = sorted({k for r in runs for k in r.params})
    out = []
    for k in keys:
        if any(k.startswith(p) for p in NOT_HYPERPARAMS):
            continue
        if len({r.params.get(k) for r in runs}) > 1:
            out.append(k)
    return out


def default_metric(runs: list[RunInfo]) -> str | None:
    """Few-shot identity accuracy when evaluated, else the first eval metric, else the loss."""
    have = {k for r in runs for k in r.metrics}
    for m in ("eval/accuracy_few", *[f"eval/{m}_{s}" for m in EVAL_METRICS for s in ("few", "all")],
              "final_loss", "loss"):
        if m in have:
            return m
    return None


def lower_is_better(metric: str) -> bool:
    return any(w in metric.split("/")[-1] for w in LOWER_IS_BETTER)


def sort_runs(runs: list[RunInfo], metric: str | None, mode: str = "max") -> list[RunInfo]:
    """Best first; runs without the metric last."""
    if metric is None:
        return list(runs)
    sign = 1 if mode == "min" else -1

    def key(r):
        v = r.metrics.get(metric)
        return (v is None or math.isnan(v), 0.0 if v is None or math.isnan(v) else sign * v, r.name)

    return sorted(runs, key=key)


def _num(v: str | None):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    f = _num(v)
    return f"{f:.4g}" if f is not None and not str(v).isdigit() and str(v) not in ("True", "False") else str(v)


def table_columns(runs: list[RunInfo], keys: list[str], metric: str | None = None) -> tuple[list[str], list[str]]:
    """(param columns, metric columns) present in at least one run."""
    params = [k for k in dict.fromkeys([*KEY_PARAMS, *keys]) if any(k in r.params for r in runs)]
    metrics = [f"eval/{m}_{s}" for m in EVAL_METRICS for s in ("all", "few")]
    metrics = list(dict.fromkeys([*metrics, *([metric] if metric else []), "final_step", "final_loss"]))
    return params, [m for m in metrics if any(m in r.metrics for r in runs)]


def text_table(rows: list[dict]) -> str:
    """Rows of display strings as an aligned text table: header, a rule, one line per row
    (the sweep's and the comparison's tables both print through here)."""
    import pandas as pd

    df = pd.DataFrame(rows).fillna("-")
    lines = [line.rstrip() for line in df.to_string(index=False, justify="left").splitlines()]
    widths = [len(c) for c in lines[0].split()]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(runs: list[RunInfo], keys: list[str], metric: str | None = None) -> tuple[str, list[str], list[list[str]]]:
    params, metrics = table_columns(runs, keys, metric)
    head = ["run", "id", "status", "method", *params, *[m.removeprefix("eval/") for m in metrics]]
    body = []
    for r in runs:
        status = r.tags.get("sweep.status", r.status.lower())
        body.append([r.name, r.run_id[:8], status, r.method, *[_fmt(r.params.get(k)) for k in params],
                     *[_fmt(r.metrics.get(m)) for m in metrics]])
    return text_table([dict(zip(head, row)) for row in body]), head, body


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(runs: list[RunInfo], keys: list[str], metric: str, path: Path) -> Path | None:
    """One panel per hyperparameter: the metric of each run against that run's value (log x
    for positive ranges over 20x; categories for non-numbers). Hollow: stopped early."""
    keys = [k for k in keys if any(k in r.params for r in runs)]
    pts = [r for r in runs if r.metrics.get(metric) is not None and not math.isnan(r.metrics[metric])]
    if not keys or not pts:
        return None
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        xs = [r.params.get(k) for r in pts]
        ys = [r.metrics[metric] for r in pts]
        nums = [_num(x) for x in xs]
        if all(n is not None for n in nums):
            x = nums
            if min(x) > 0 and max(x) / min(x) > 20:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in xs})
            x = [cats.index(str(v)) for v in xs]
            ax.set_xticks(range(len(cats)), cats)
        stopped = [r.tags.get("sweep.status") == "stopped_early" for r in pts]
        for flag, face, label in ((False, "tab:blue", "completed / run"), (True, "none", "stopped early")):
            sel = [i for i, s in enumerate(stopped) if s == flag]
            if sel:
                ax.scatter([x[i] for i in sel], [ys[i] for i in sel], facecolors=face, edgecolors="tab:blue",
                           label=label)
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if any(stopped):
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{metric} vs hyperparameters ({len(pts)} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_eval(client: MlflowClient, run_id: str) -> dict | None:
    """The evaluation's metrics.json logged into the run (``eval/metrics.json``), if any."""
    if not any(a.path == "eval/metrics.json" for a in client.list_artifacts(run_id, "eval")):
        return None
    with tempfile.TemporaryDirectory() as d:
        local = client.download_artifacts(run_id, "eval/metrics.json", d)
        return json.loads(Path(local).read_text())


def compare(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
            run_ids: list[str] | None = None, metric: str | None = None, mode: str | None = None, top: int = 3,
            out_dir: str | Path | None = "comparison") -> Comparison:
    """Load, sort (best first by ``metric``: default a sweep's objective, else
    :func:`default_metric`; ``mode`` default the sweep's, else min for FID and losses),
    tabulate; with ``out_dir`` write ``comparison.csv``, ``metric_vs_params.png`` and
    ``identity_frequency.png``."""
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    client = MlflowClient(default_uri(tracking_uri))
    sel = load_runs(client, experiment, parent_run_id, run_ids)
    keys = sel.keys or varying_keys(sel.runs)
    if metric is None and sel.metric is not None:
        metric, mode = sel.metric, mode or sel.mode
    metric = metric or default_metric(sel.runs)
    mode = mode or ("min" if metric is not None and lower_is_better(metric) else "max")
    runs = sort_runs(sel.runs, metric, mode)
    table, head, body = format_table(runs, keys, metric)
    result = Comparison(runs, keys, metric, mode, table)
    if out_dir is None:
        return result
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.csv = out / "comparison.csv"
    with open(result.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", *head])
        for r, row in zip(runs, body):
            w.writerow([r.run_id, *row])
    if metric is not None:
        p = plot_metric_vs_params(runs, keys, metric, out / "metric_vs_params.png")
        if p is not None:
            result.plots["metric_vs_params"] = p
    ranked = [r for r in runs if metric is None or r.metrics.get(metric) is not None]
    evals = {}
    for r in ranked:
        if len(evals) >= top:
            break
        e = load_eval(client, r.run_id)
        if e is not None:
            step = r.metrics.get("final_step")
            evals[f"{r.name} ({r.run_id[:8]}{'' if step is None else f', step {step:.0f}'})"] = e
    p = plot_vs_frequency(evals, out / "identity_frequency.png",
                          title="per-identity metrics vs training frequency (best runs; line = mean)")
    if p is not None:
        result.plots["identity_frequency"] = p
    return result
