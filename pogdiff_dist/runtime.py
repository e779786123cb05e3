"""Starting or joining a Ray cluster: the one place that calls ``ray.init``."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import ray

from pogdiff_dist.config.sections import BUNDLED_TEXT_ENCODER, resolve_tracking_uri
from pogdiff_dist.output import PRINT_PATCH_ENV, QUIET_ENV, VERBOSE_ENV, quiet_libraries, resolve_verbose

log = logging.getLogger(__name__)


def init_ray(ray_cfg) -> None:
    """Join ``ray.address`` / ``$RAY_ADDRESS`` (a job submitted to a cluster), else start a
    local cluster with more logical CPUs than cores: with 2 cores and 2 one-CPU train
    workers, Ray Data's read tasks would otherwise get no CPU and the run hangs
    (ENVIRONMENT.md). ``address="local"`` starts a new cluster even when another one
    (e.g. a `ray start` head) runs on this machine, instead of silently joining it.

    Every process of the job gets :data:`~pogdiff_dist.output.QUIET_ENV` (without
    ``--verbose``) through the job's runtime env; a local cluster also gets
    :func:`_local_cluster_options`."""
    quiet_output(ray_cfg.verbose)  # also in a Tune trial, where Ray is already up
    if ray.is_initialized():
        return
    global _STARTED_HERE
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    ray_data_env = {k: os.environ.setdefault(k, v) for k, v in RAY_DATA_ENV.items()}  # the user's value wins
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                VERBOSE_ENV: "1" if ray_cfg.verbose else "0", PRINT_PATCH_ENV: "0", **ray_data_env,
                **({} if ray_cfg.verbose else QUIET_ENV)}
    level = logging.INFO if ray_cfg.verbose else logging.WARNING
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True, logging_level=level)
        _STARTED_HERE = False
        log.info("joined Ray cluster at %s", address)
    else:
        num_cpus = ray_cfg.num_cpus or 2 * (os.cpu_count() or 1)
        with _own_address() as own:
            options = _local_cluster_options()
            env_vars.update(RAY_ADDRESS=own, **options.pop("env_vars"))
            ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, logging_level=level,
                     **options)
        _STARTED_HERE = True
        log.info("started a local Ray cluster at %s with %d logical CPUs", own, num_cpus)


_STARTED_HERE = False  # init_ray started the cluster this process is connected to
# Ray Data settings for every process of the job. Each read_parquet's file listing (a Ray task)
# starts RAY_DATA_PARQUET_FOOTER_NUM_ACTORS actors to read the Parquet footers, 32 by default,
# sized for many files in a remote bucket: on 2 cores every read of the prepared tables
# started up to 32 Python processes (the raylet's "N PYTHON worker processes have been
# started" warnings, and minutes of the shards stage). Our tables have a few hundred files at
# most, and one actor reads their footers with 128 concurrent requests (its io_concurrency).
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def local_cluster() -> bool:
    """Whether this process started the Ray cluster it uses (one node, gone with the process)."""
    return _STARTED_HERE and ray.is_initialized()


def map_on_actors(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)`` for our Ray Data actor pools (the prepare encoders, the
    shard writer), without Ray Data's actor restarts on a cluster this process started.

    Ray Data restarts a dead map actor by default, and Ray then reports once per process, as
    an error, that the actor's constructor arguments are in the object store: Ray Data puts the
    UDF and its DataContext there for every pool, whatever the UDF's arguments
    (ray-project/ray#57733), and the driver holds them, so a restart would find them. On a
    local cluster, one node that goes with this process, a restart buys little a rerun does
    not (the stage resumes), and none is made. A joined cluster keeps Ray Data's restarts (a
    lost node), and its error line. Ray 2.60 takes ``max_restarts`` only through
    ``map_batches``' ``**ray_remote_args``, deprecated without a named replacement yet: that
    deprecation warning is silenced for this call alone."""
    if not local_cluster():
        return ds.map_batches(fn, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, max_restarts=0, **kwargs)


def _local_cluster_options() -> dict:
    """``ray.init`` options of a local cluster, and env vars for its job.

    - The dashboard's API server, on 127.0.0.1 and a free port. Ray's state API lives there,
      and Ray Train's placement-group cleaner asks it every second whether the training
      controller is alive. Without a dashboard the head still advertises 127.0.0.1:8265
      in its GCS: the cleaner's queries failed for the whole run (one warning a second), or,
      with another cluster's dashboard on that port, were answered by that cluster, which
      knows no such controller, so the cleaner took ours for dead and would remove the
      placement group of the running training. The free port never reaches another cluster.
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: Ray Train's watcher polls the cluster's
      nodes for a pending preemption or drain, which one local node never gets.
    """
    with socket.socket() as s:  # freed here, bound by the dashboard a moment later
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
            "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}


def cluster_gpus() -> tuple[float, float | None]:
    """``(GPUs up now, GPUs the autoscaler could provide)`` of the joined cluster, the inputs of
    :func:`pogdiff_dist.devices.auto_gpus`. The second is ``None`` unless an autoscaler reported
    its node types to Ray (its cluster config, read through the same private accessor Ray Train
    uses to reject a worker group no node type can hold); Ray 2.60's own ``ray up`` and KubeRay
    autoscalers do not report it, so there the run's declaration decides."""
    up = float(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except (ImportError, AttributeError, RuntimeError, ConnectionError) as e:  # a private API: never fatal
        log.debug("no autoscaler cluster config (%s)", e)
        most = None
    return up, (None if most is None else float(most.get("GPU", 0)))


@contextmanager
def _own_address():
    """A free GCS port for the local cluster about to start, and its address in ``RAY_ADDRESS``
    for every process the head starts. Ray's own helpers (Ray Train's placement-group cleaner,
    the state API) otherwise find a cluster by scanning this machine's processes, and with two
    clusters on one machine (a training next to the test suite) they joined the newest one,
    failing with ``InvalidAuthToken``. The driver's environment is restored afterwards, so a
    later ``init_ray`` in this process starts a new cluster instead of joining a stopped one."""
    from ray._private.services import get_node_ip_address

    keys = ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    with socket.socket() as s:  # freed here, bound by the GCS a moment later
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{get_node_ip_address()}:{port}"
    os.environ.update({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": address})
    try:
        yield address
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Ray unpacks a submitted job's --working-dir into <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>
# and deletes it with the session: nothing a job writes should resolve in there.
RAY_WORKING_DIR_COPY = "working_dir_files"


def absolute_paths(cfg, cwd: Path | None = None):
    """The config with every local path absolute, read against the driver's working directory:
    Ray workers, prepare tasks and Tune trials run in other folders, where a relative
    ``model.init_unet=assets/digits-base/unet`` would name nothing. A relative input that does
    not exist here is an error naming the setting, before any work; URIs and absolute paths
    are kept as they are (a missing absolute input is reported where it is loaded)."""
    cwd = Path.cwd() if cwd is None else Path(cwd)

    def local(p: str | None) -> bool:
        return p is not None and "://" not in p and not Path(p).is_absolute()

    o = {key: str(cwd / value) for key, value in (("prepare.out_dir", cfg.prepare.out_dir),
                                                  ("train.storage_path", cfg.train.storage_path)) if local(value)}
    o["tracking.tracking_uri"] = resolve_tracking_uri(cfg.tracking.resolved_uri(), cwd)
    inputs = [("model.pretrained", None), ("model.init_unet", None), ("model.image_encoder", "pixels"),
              ("model.text_encoder", BUNDLED_TEXT_ENCODER), ("eval.encoder", "pixels")]
    if cfg.data.bundled is None:
        inputs.append(("data.dataset", None))
    flat = cfg.flat()
    missing = []
    for key, keep in inputs:
        value = flat[key]
        if value == keep or not local(value):
            continue
        if (cwd / value).exists():
            o[key] = str(cwd / value)
        else:
            missing.append(f"{key}={value!r}")
    if missing:
        raise ValueError(f"{', '.join(missing)}: no such file or directory (a relative path is read from the "
                         f"working directory, {cwd})")
    return cfg.with_overrides(o)


def check_output_paths(cfg, cwd: Path | None = None) -> None:
    """Inside a submitted Ray job (the working directory is Ray's temporary copy), refuse
    relative output paths before any work: ``prepare.out_dir``, ``train.storage_path`` and a
    relative SQLite tracking store would land in the copy, and Ray deletes it (the model, the
    checkpoints and the MLflow run with it). Absolute paths and URIs are kept as they are."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if RAY_WORKING_DIR_COPY not in cwd.parts:
        return
    relative = [(key, value) for key, value in (("prepare.out_dir", cfg.prepare.out_dir),
                                                ("train.storage_path", cfg.train.storage_path))
                if "://" not in str(value) and not Path(value).is_absolute()]
    uri = cfg.tracking.resolved_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative.append(("tracking.tracking_uri", uri))
    if relative:
        listed = ", ".join(f"{k}={v!r}" for k, v in relative)
        raise ValueError(
            f"this job runs in Ray's temporary copy of its working directory ({cwd}), which Ray deletes after the "
            f"job: {listed} would resolve inside it and be lost. Pass shared absolute paths or URIs, e.g. "
            f"--set train.storage_path=/shared/runs --set prepare.out_dir=/shared/prepared "
            f"--set tracking.tracking_uri=sqlite:////shared/mlflow.db (or $MLFLOW_TRACKING_URI / an mlflow server)")


def quiet_output(verbose: bool | None = None) -> None:
    """:func:`pogdiff_dist.output.quiet_libraries` plus Ray's own: Ray Data's progress bars
    and per-dataset logs, and Ray Train's print patch (each worker line printed twice). Called
    by :func:`init_ray` on the driver and by each Ray worker that runs a Dataset or the Trainer."""
    verbose = resolve_verbose(verbose)
    os.environ[PRINT_PATCH_ENV] = "0"  # propagated by Ray Train to its controller and workers
    quiet_libraries(verbose)
    if verbose:
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"


def train_logging_config(verbose: bool):
    """Ray Train's own console logs ("Reporting training result ...") only with ``verbose``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose else "WARNING")
