"""Starting or joining a Ray cluster: the one place that calls ``ray.init``."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(ray_cfg) -> None:
    """Join ``ray.address`` / ``$RAY_ADDRESS`` (a job submitted to a cluster), else start a
    local cluster with more logical CPUs than cores: with 2 cores and 2 one-CPU train
    workers, Ray Data's read tasks would otherwise get no CPU and the run hangs
    (ENVIRONMENT.md). ``address="local"`` starts a new cluster even when another one
    (e.g. a `ray start` head) runs on this machine, instead of silently joining it."""
    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
    else:
        num_cpus = ray_cfg.num_cpus or 2 * (os.cpu_count() or 1)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env)
        log.info("started a local Ray cluster with %d logical CPUs", num_cpus)
