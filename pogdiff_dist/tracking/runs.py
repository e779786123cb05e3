"""MLflow runs: the only module (with :mod:`pogdiff_dist.tracking.compare`) that talks to MLflow.

The driver creates the run (params = the flattened config, less the values that change
between segments of a run) and hands its id to the workers; rank 0 logs per-step metrics
through :class:`MlflowTracker` (a :class:`NullTracker` elsewhere), the driver logs artifacts
at the end. The run's folders are tags (``pogdiff.run_dir``, ``pogdiff.prepared_dir``), so
``jobs/evaluate.py --mlflow-run`` finds them directly; a run folder points back to its
MLflow run through ``pogdiff_run.json`` (:func:`write_run_state`).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

SECRET_HINTS = ("password", "secret", "token", "key_id", "access_key", "credential")
RUN_STATE = "pogdiff_run.json"  # in a run folder: its MLflow run, tracking URI, prepared data
# Values that change between segments of one run (a --resume, a sweep's rungs): a tag and a
# metric at the step each segment starts, never a param (MLflow keeps a param's first value).
SEGMENT_KEYS = ("optim.max_steps",)
TAG_RUN_DIR, TAG_PREPARED, TAG_MODEL = "pogdiff.run_dir", "pogdiff.prepared_dir", "pogdiff.model_dir"
EXPERIMENT_KIND = "mlflow.experimentKind"


@dataclass(frozen=True)
class DatasetInfo:
    """The prepared dataset as an MLflow dataset input: named after ``data.dataset``, its
    digest the prepare fingerprint, its source the prepared folder, its schema the shard fields."""

    name: str
    source: str
    fingerprint: str
    fields: dict[str, str]  # shard field -> MLflow type

    def to_mlflow(self):
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.types import ColSpec, Schema

        with warnings.catch_warnings():  # a local folder matches two equivalent source types
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            source = resolve_dataset_source(self.source)
        return MetaDataset(source, name=self.name, digest=self.fingerprint[:16],
                           schema=Schema([ColSpec(t, k) for k, t in self.fields.items()]))


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(value: str) -> str:
    """Drop ``user:password@`` from any URL inside ``value`` (e.g. an MLflow or S3 URI)."""
    return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", value)


def safe_params(flat: dict) -> dict[str, str]:
    """Config params as logged: no secret-looking keys, no credentials inside URIs.
    Credentials belong in the environment (MLFLOW_TRACKING_PASSWORD, AWS_*), never the config."""
    return {k: redact(str(v))[:500] for k, v in flat.items() if not any(h in k.lower() for h in SECRET_HINTS)}


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (against ``cwd``, default this process's),
    so Ray workers (other cwd) hit the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path.cwd() if cwd is None else Path(cwd)) / uri[len(prefix):])
    return uri


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if new: tagged as model training (MLflow 3's UI then opens
    its training view, not the GenAI one) and, with a SQLite store, keeping its artifacts in
    ``mlruns/`` beside the database file rather than under whatever folder the process runs in."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").absolute().as_uri()
        exp_id = client.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND not in exp.tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
    return exp_id


def start_run(cfg, run_name: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, dataset: DatasetInfo | None = None) -> str:
    """Create (or reopen, for ``--resume``) the run; a new run logs the config as params and
    ``dataset`` as its training input. ``parent_run_id`` nests a new run under another (a
    sweep's trial under the sweep)."""
    uri = resolve_tracking_uri(cfg.tracking.resolved_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(uri, cfg.tracking.experiment))
    all_tags = {"pogdiff.method": cfg.loss.method, **(tags or {})}
    if parent_run_id and run_id is None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(run_id=run_id, run_name=run_name)
    mlflow.set_tags(all_tags)
    if run_id is None:
        mlflow.log_params({k: v for k, v in safe_params(cfg.flat()).items() if k not in SEGMENT_KEYS})
        if dataset is not None:
            mlflow.log_input(dataset.to_mlflow(), context="train")
    mlflow.end_run(status="RUNNING")
    return run.info.run_id


def log_segment(tracking_uri: str, run_id: str, cfg, start_step: int) -> None:
    """The values of this segment (:data:`SEGMENT_KEYS`): metric ``segment/<key>`` at the step
    it starts from, and tag ``pogdiff.<key>`` (the latest segment's)."""
    client = MlflowClient(tracking_uri)
    flat = cfg.flat()
    for key in SEGMENT_KEYS:
        client.log_metric(run_id, f"segment/{key}", float(flat[key]), step=start_step)
        client.set_tag(run_id, f"pogdiff.{key}", str(flat[key]))


def write_run_state(run_dir: Path, run_id: str, tracking_uri: str, prepared_dir: Path) -> None:
    (Path(run_dir) / RUN_STATE).write_text(json.dumps({
        "run_id": run_id, "tracking_uri": redact(tracking_uri), "prepared_dir": str(prepared_dir)}))


def read_run_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def run_folders(tracking_uri: str, run_id: str) -> dict[str, str]:
    """The folders a training run recorded as tags: ``run_dir``, ``prepared_dir``, ``model_dir``.
    A ValueError names the URI when the run is not there."""
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as e:
        raise ValueError(f"MLflow run {run_id!r} not found in {redact(tracking_uri)} ({type(e).__name__}: {e}); "
                         f"pass --tracking-uri") from e
    tags = run.data.tags
    return {k: tags[t] for k, t in (("run_dir", TAG_RUN_DIR), ("prepared_dir", TAG_PREPARED),
                                    ("model_dir", TAG_MODEL)) if t in tags}


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])


def set_status(tracking_uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """``RUNNING`` reopens a run; ``FINISHED``/``FAILED``/``KILLED`` end it (``error`` becomes a tag)."""
    client = MlflowClient(tracking_uri)
    if error is not None:
        client.set_tag(run_id, "pogdiff.error", error[:4000])
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def log_eval(tracking_uri: str, run_id: str, summary: dict, files: list[Path], step: int | None = None,
             folders: dict[str, Path] | None = None) -> list[str]:
    """``eval/<metric>`` metrics (finite ones, at ``step``) and ``files`` / ``folders`` as
    artifacts under ``eval/`` of an existing run; returns the metric keys logged."""
    client = MlflowClient(tracking_uri)
    client.get_run(run_id)  # fails early, with MLflow's message, for an unknown run
    keys = []
    for k, v in summary.items():
        if v is not None and math.isfinite(v):
            client.log_metric(run_id, f"eval/{k}", float(v), step=step or 0)
            keys.append(f"eval/{k}")
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="eval")
    for name, folder in (folders or {}).items():
        client.log_artifacts(run_id, str(folder), artifact_path=f"eval/{name}")
    return keys


def create_sweep_parent(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
                        params: dict[str, str]) -> str:
    """A sweep's parent run (its trials are children): tags and params, at most 100 per batch."""
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri)
    run = client.create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def log_artifacts(tracking_uri: str, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    for f in files:
        if Path(f).is_dir():
            client.log_artifacts(run_id, str(f), artifact_path=Path(f).name)
        elif Path(f).exists():
            client.log_artifact(run_id, str(f), artifact_path=artifact_path)


class MlflowTracker:
    """Rank 0's metrics and images; ``system_metrics``: MLflow's CPU/memory/disk/network (and,
    with ``nvidia-ml-py`` installed, GPU) monitor logs ``system/*`` every ``interval_s`` until
    :meth:`close`."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = False, interval_s: float = 10.0):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                                tracking_uri=tracking_uri)
            self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_image(self, step: int, key: str, image) -> None:
        """An image at ``step`` (MLflow's image view steps through a key's images)."""
        self.client.log_image(self.run_id, image, key=key, step=step)


class NullTracker:
    def close(self) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_image(self, step: int, key: str, image) -> None:
        pass


def finish_run(tracking_uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path],
               status: str = "FINISHED", step: int = 0) -> None:
    """The run's summary ``metrics`` at its last ``step`` (so every metric's steps increase),
    its artifacts, and its end status."""
    if metrics:
        log_metrics(tracking_uri, run_id, metrics, step=step)
    client = MlflowClient(tracking_uri)
    log_artifacts(tracking_uri, run_id, artifacts)
    client.set_terminated(run_id, status)


def run_url_hint(tracking_uri: str, run_id: str | None = None) -> str:
    """How to look at the run: the UI command for a SQLite store, and the run's page in MLflow
    3's "Model training" view (``workflowType=machine_learning``; the UI otherwise opens the
    GenAI view)."""
    page = ""
    if run_id is not None:
        run = MlflowClient(tracking_uri).get_run(run_id)
        page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{page}"
    return f"{redact(tracking_uri).rstrip('/')}/{page}"
