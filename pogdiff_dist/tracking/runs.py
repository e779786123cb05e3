"""MLflow runs: the only module (with :mod:`pogdiff_dist.tracking.compare`) that talks to MLflow.

The driver creates the run (params = the flattened config, less the values that change
between segments of a run) and hands a :class:`TrackingRef` (store URI, run id) to the
workers; ``ref.open(rank)`` gives rank 0 a :class:`TrackedRun` and every other rank a
:class:`NullRun`. One MLflow client per store per process (:func:`client`). The run's folders are tags (``pogdiff.run_dir``, ``pogdiff.prepared_dir``), so
``jobs/evaluate.py --mlflow-run`` finds them directly; a run folder points back to its
MLflow run through ``pogdiff_run.json`` (:func:`write_run_state`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pogdiff_dist.config.sections import resolve_tracking_uri  # noqa: F401 - part of this module's API
from pogdiff_dist.tracking.null import NullRun

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


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if new: tagged as model training (MLflow 3's UI then opens
    its training view, not the GenAI one) and, with a SQLite store, keeping its artifacts in
    ``mlruns/`` beside the database file rather than under whatever folder the process runs in."""
    mlflow_client = client(tracking_uri)
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").absolute().as_uri()
        exp_id = mlflow_client.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND not in exp.tags:
        mlflow_client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
    return exp_id


@functools.cache
def client(tracking_uri: str) -> MlflowClient:
    """The process's one MLflow client per tracking store."""
    return MlflowClient(tracking_uri)


@dataclass(frozen=True)
class TrackingRef:
    """A run in a tracking store: small and picklable, handed to Ray workers and Tune trials,
    which :meth:`open` it. Rank 0 logs through the :class:`TrackedRun`; other ranks get a
    :class:`NullRun` (``open(rank)``), so the training loop never branches on rank."""

    uri: str
    run_id: str

    def open(self, rank: int = 0, system_metrics: bool = False, interval_s: float = 10.0) -> TrackedRun | NullRun:
        if rank != 0:
            return NullRun()
        return TrackedRun(self, system_metrics, interval_s)


class TrackedRun:
    """One MLflow run: per-step metrics and images, tags, artifacts, the evaluation's
    ``eval/*`` metrics, the end status. ``system_metrics``: MLflow's CPU/memory/disk/network
    (and, with ``nvidia-ml-py`` installed, GPU) monitor logs ``system/*`` every ``interval_s``
    until :meth:`close`."""

    def __init__(self, ref: TrackingRef, system_metrics: bool = False, interval_s: float = 10.0):
        self.ref, self.run_id = ref, ref.run_id
        self.client = client(ref.uri)
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(ref.run_id, sampling_interval=interval_s, resume_logging=True,
                                                tracking_uri=ref.uri)
            self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_image(self, step: int, key: str, image) -> None:
        """An image at ``step`` (MLflow's image view steps through a key's images)."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        """Files (under ``artifact_path``) and folders (under their own name) that exist."""
        for f in map(Path, paths):
            if f.is_dir():
                self.client.log_artifacts(self.run_id, str(f), artifact_path=f.name)
            elif f.exists():
                self.client.log_artifact(self.run_id, str(f), artifact_path=artifact_path)

    def log_segment(self, cfg, start_step: int) -> None:
        """The values of this segment (:data:`SEGMENT_KEYS`): metric ``segment/<key>`` at the step
        it starts from, and tag ``pogdiff.<key>`` (the latest segment's)."""
        flat = cfg.flat()
        self.log(start_step, {f"segment/{key}": float(flat[key]) for key in SEGMENT_KEYS})
        self.set_tags({f"pogdiff.{key}": flat[key] for key in SEGMENT_KEYS})

    def log_eval(self, summary: dict, files: list[Path], step: int | None = None,
                 folders: dict[str, Path] | None = None) -> list[str]:
        """``eval/<metric>`` metrics (finite ones, at ``step``) and ``files`` / ``folders`` as
        artifacts under ``eval/``; returns the metric keys logged."""
        metrics = {f"eval/{k}": float(v) for k, v in summary.items() if v is not None and math.isfinite(v)}
        self.log(step or 0, metrics)
        self.log_artifacts(files, artifact_path="eval")
        for name, folder in (folders or {}).items():
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=f"eval/{name}")
        return list(metrics)

    def set_status(self, status: str, error: str | None = None) -> None:
        """``RUNNING`` reopens the run; ``FINISHED``/``FAILED``/``KILLED`` end it (``error`` becomes a tag)."""
        if error is not None:
            self.set_tags({"pogdiff.error": error[:4000]})
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status)

    def finish(self, metrics: dict[str, float] | None = None, artifacts: list[Path] = (), status: str = "FINISHED",
               step: int = 0) -> None:
        """The run's summary ``metrics`` at its last ``step`` (so every metric's steps increase),
        its artifacts, and its end status."""
        if metrics:
            self.log(step, metrics)
        self.log_artifacts(list(artifacts))
        self.close()
        self.set_status(status)

    def folders(self) -> dict[str, str]:
        """The folders a training run recorded as tags: ``run_dir``, ``prepared_dir``, ``model_dir``.
        A ValueError names the store when the run is not there."""
        try:
            run = self.client.get_run(self.run_id)
        except Exception as e:
            raise ValueError(f"MLflow run {self.run_id!r} not found in {redact(self.ref.uri)} ({type(e).__name__}: "
                             f"{e}); pass --tracking-uri") from e
        tags = run.data.tags
        return {k: tags[t] for k, t in (("run_dir", TAG_RUN_DIR), ("prepared_dir", TAG_PREPARED),
                                        ("model_dir", TAG_MODEL)) if t in tags}

    def url_hint(self) -> str:
        return run_url_hint(self.ref.uri, self.run_id)


def start_run(cfg, tracking_uri: str, run_name: str | None = None, run_id: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None,
              dataset: DatasetInfo | None = None) -> TrackingRef:
    """Create (or reopen, for ``--resume``) the run; a new run logs the config as params and
    ``dataset`` as its training input. ``parent_run_id`` nests a new run under another (a
    sweep's trial under the sweep)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(tracking_uri, cfg.tracking.experiment))
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
    return TrackingRef(tracking_uri, run.info.run_id)


def write_run_state(run_dir: Path, ref: TrackingRef, prepared_dir) -> None:
    (Path(run_dir) / RUN_STATE).write_text(json.dumps({
        "run_id": ref.run_id, "tracking_uri": redact(ref.uri), "prepared_dir": str(prepared_dir)}))


def read_run_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def create_sweep_parent(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
                        params: dict[str, str]) -> TrackingRef:
    """A sweep's parent run (its trials are children): tags and params, at most 100 per batch."""
    from mlflow.entities import Param

    mlflow_client = client(tracking_uri)
    run = mlflow_client.create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run.info.run_id, params=items[i:i + 100])
    return TrackingRef(tracking_uri, run.info.run_id)


def run_url_hint(tracking_uri: str, run_id: str | None = None) -> str:
    """How to look at the run: the UI command for a SQLite store, and the run's page in MLflow
    3's "Model training" view (``workflowType=machine_learning``; the UI otherwise opens the
    GenAI view)."""
    page = ""
    if run_id is not None:
        run = client(tracking_uri).get_run(run_id)
        page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{page}"
    return f"{redact(tracking_uri).rstrip('/')}/{page}"
