"""MLflow tracking: a real tracker on rank 0, a null tracker everywhere else.

The driver creates the run (params = the full flattened config) and hands its id to
the workers; rank 0 logs per-step metrics into it, the driver logs artifacts at the end.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

SECRET_HINTS = ("password", "secret", "token", "key_id", "access_key", "credential")


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(value: str) -> str:
    """Drop ``user:password@`` from any URL inside ``value`` (e.g. an MLflow or S3 URI)."""
    return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", value)


def safe_params(flat: dict) -> dict[str, str]:
    """Config params as logged: no secret-looking keys, no credentials inside URIs.
    Credentials belong in the environment (MLFLOW_TRACKING_PASSWORD, AWS_*), never the config."""
    return {k: redact(str(v))[:500] for k, v in flat.items() if not any(h in k.lower() for h in SECRET_HINTS)}


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so Ray workers (other cwd) hit the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


def start_run(cfg, run_name: str | None = None, run_id: str | None = None, parent_run_id: str | None = None) -> str:
    """Create (or reopen, for ``--resume``) the run and log the config as params.
    ``parent_run_id`` nests a new run under another (a sweep's trial under the sweep)."""
    uri = resolve_tracking_uri(cfg.tracking.resolved_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id and run_id is None else None
    run = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags)
    if run_id is None:
        mlflow.log_params(safe_params(cfg.flat()))
    mlflow.end_run(status="RUNNING")
    return run.info.run_id


class MlflowTracker:
    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


class NullTracker:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def finish_run(tracking_uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path],
               status: str = "FINISHED") -> None:
    client = MlflowClient(tracking_uri)
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    for path in artifacts:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=Path(path).name)
        elif Path(path).exists():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status)


def run_url_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {redact(tracking_uri)}"

