"""Does a run fit its cluster? Every stage's Ray resource requests, placed on the node shapes a
cluster spec declares, by first-fit bin packing, before any node is started.

A request Ray cannot place does not fail: it waits, and an autoscaler with no node type that
could hold it waits with it. So a worker of ``train.cpus_per_worker: 8`` on 8-CPU GPU pods
starts, and its Ray Data read tasks, which need CPUs outside the worker's reservation, wait
forever. The stages run one after another, each on the whole cluster:

- ``prepare: encode``: ``prepare.num_encoders`` actors of {CPU ENCODER_CPUS, GPU g}, a
  fixed-size actor pool (every actor must be up), g = ``prepare.gpus_per_encoder`` (``auto``
  resolved by :func:`pogdiff_dist.devices.auto_gpus` from what the spec starts with);
- ``prepare: k-NN``, ``prepare: density``: one task of {CPU TASK_CPUS, GPU g} each;
- ``train``: ``train.num_workers`` placement-group bundles (:func:`~pogdiff_dist.train.driver.worker_bundles`),
  each with READ_TASK_CPUS x READ_TASKS_PER_WORKER CPUs left free on its node for the read
  tasks that stream its shards (pogdiff_dist/train/worker.py says why two).

Node shapes come from KubeRay worker groups (the container's cpu / memory / nvidia.com/gpu
limits, as KubeRay passes them to ``ray start``; ``rayStartParams`` override) and from ``ray up``
node types (``resources``, else the instance type's vCPUs / GPUs / memory from INSTANCE_TYPES).
A head started with ``num-cpus: 0`` holds nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pogdiff_dist.config import Config
from pogdiff_dist.devices import auto_gpus

# `ray up` instance types -> (vCPUs, GPUs, memory GiB), from AWS's instance type pages. Ray on
# the node (in a container without CPU limits) detects exactly these.
INSTANCE_TYPES: dict[str, tuple[float, float, float]] = {
    "m6i.2xlarge": (8, 0, 32),
    "g5.2xlarge": (8, 1, 32),     # 1 x A10G 24 GB
    "p5.4xlarge": (16, 1, 256),   # 1 x H100 80 GB
}


class PlanError(ValueError):
    """A stage whose requests the declared nodes cannot hold; the message says which and why."""


@dataclass(frozen=True)
class NodeShape:
    """One node type: what Ray on such a node offers, and how many of them the spec allows."""

    group: str
    cpus: float
    gpus: float
    memory_gib: float
    max_count: int  # the most the spec can run (an autoscaler's maximum)
    min_count: int  # what it starts with (an autoscaler may scale down to this)

    def __str__(self) -> str:
        return f"{self.group} x{self.max_count} {{CPU {self.cpus:g}, GPU {self.gpus:g}, {self.memory_gib:g} GiB}}"


@dataclass(frozen=True)
class Request:
    """One actor, task or bundle: ``cpus`` it reserves plus ``free_cpus`` that must stay free
    beside it on the same node (read tasks outside its reservation)."""

    what: str
    cpus: float
    gpus: float
    free_cpus: float = 0.0

    def __str__(self) -> str:
        beside = f" + {self.free_cpus:g} free beside it" if self.free_cpus else ""
        return f"{self.what} {{CPU {self.cpus:g}{beside}, GPU {self.gpus:g}}}"


@dataclass(frozen=True)
class Stage:
    name: str
    requests: list[Request]
    hint: str  # which settings move it


def _quantity(value, unit: str) -> float:
    """A Kubernetes quantity: cpu ("8", "500m", 8) in cores, memory ("64Gi", "16G") in GiB."""
    text = str(value).strip()
    if unit == "cpu":
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    m = re.fullmatch(r"([0-9.]+)\s*([KMGT]i?)?", text)
    if not m:
        raise ValueError(f"not a memory quantity: {value!r}")
    scale = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * scale[m.group(2)] / 2**30


def _kuberay_shape(group: str, start_params: dict, template: dict, max_count: int, min_count: int) -> NodeShape:
    (container,) = [c for c in template["spec"]["containers"] if c["name"].startswith("ray-")]
    res = container.get("resources", {})
    limits = {**res.get("requests", {}), **res.get("limits", {})}
    cpus = float(start_params.get("num-cpus", _quantity(limits.get("cpu", 0), "cpu")))
    gpus = float(start_params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return NodeShape(group, cpus, gpus, _quantity(limits.get("memory", 0), "memory"), max_count, min_count)


def kuberay_nodes(cluster_spec: dict) -> list[NodeShape]:
    """A RayCluster spec (or a RayJob's ``rayClusterSpec``) -> its node shapes. With in-tree
    autoscaling a worker group ranges over [minReplicas, maxReplicas]; without, it is ``replicas``."""
    head = cluster_spec["headGroupSpec"]
    nodes = [_kuberay_shape("head", head.get("rayStartParams", {}), head["template"], 1, 1)]
    autoscaling = cluster_spec.get("enableInTreeAutoscaling", False)
    for g in cluster_spec.get("workerGroupSpecs", []):
        n = int(g.get("replicas", 1))
        lo, hi = (int(g.get("minReplicas", 0)), int(g.get("maxReplicas", n))) if autoscaling else (n, n)
        nodes.append(_kuberay_shape(g["groupName"], g.get("rayStartParams", {}), g["template"], hi, lo))
    return nodes


def ray_up_nodes(cluster: dict) -> list[NodeShape]:
    """A ``ray up`` cluster config -> its node shapes: each type's ``resources`` where given,
    else its instance type's from INSTANCE_TYPES."""
    nodes = []
    for name, t in cluster["available_node_types"].items():
        itype = t["node_config"]["InstanceType"]
        if itype not in INSTANCE_TYPES:
            raise ValueError(f"node type {name}: instance type {itype} is not in cluster_plan.INSTANCE_TYPES")
        cpus, gpus, mem = INSTANCE_TYPES[itype]
        res = t.get("resources", {})
        head = name == cluster["head_node_type"]
        hi = 1 if head else min(int(t.get("max_workers", 0)), int(cluster.get("max_workers", 10**6)))
        lo = 1 if head else int(t.get("min_workers", 0))
        nodes.append(NodeShape(name, float(res.get("CPU", cpus)), float(res.get("GPU", gpus)), mem, hi, lo))
    return nodes


def stages(cfg: Config, nodes: list[NodeShape]) -> list[Stage]:
    """What each stage of ``jobs/train.py`` asks Ray for on a cluster of ``nodes`` (prepare, then training)."""
    from pogdiff_dist.prepare.pipeline import ENCODER_CPUS, TASK_CPUS
    from pogdiff_dist.train.driver import worker_bundles
    from pogdiff_dist.train.worker import READ_TASK_CPUS, READ_TASKS_PER_WORKER

    p = cfg.prepare
    if p.gpus_per_encoder == "auto":
        # what the run sees in its first second: the nodes the spec starts with (an autoscaler may
        # be at its minimum), no node types reported (Ray 2.60's autoscalers report none), the run's word
        gpus = auto_gpus(sum(n.gpus * n.min_count for n in nodes), None, cfg.train.use_gpu)
    else:
        gpus = float(p.gpus_per_encoder)
    bundles, strategy = worker_bundles(cfg)
    assert strategy == "PACK", strategy  # one node may hold several workers; the check packs the same way
    reads = READ_TASK_CPUS * READ_TASKS_PER_WORKER
    return [
        Stage("prepare: encode", [Request("encoder actor", ENCODER_CPUS, gpus)] * p.num_encoders,
              "lower prepare.num_encoders (or prepare.gpus_per_encoder), or allow more GPU nodes"),
        Stage("prepare: k-NN", [Request("k-NN task", TASK_CPUS, gpus)], "set prepare.gpus_per_encoder"),
        Stage("prepare: density", [Request("density task", TASK_CPUS, gpus)], "set prepare.gpus_per_encoder"),
        Stage("train", [Request("train worker", b.get("CPU", 0), b.get("GPU", 0), reads) for b in bundles],
              f"each worker needs train.cpus_per_worker + {reads:g} CPUs (its Ray Data read tasks) on a node "
              "with a GPU: lower train.cpus_per_worker or train.num_workers, or use larger nodes"),
    ]


def pack(requests: list[Request], nodes: list[NodeShape]) -> list[str]:
    """First-fit decreasing: the node (``group#i``) each request lands on, in request order;
    raises :class:`PlanError` naming the first request no node can hold."""
    free = [[f"{n.group}#{i}", n.cpus, n.gpus] for n in nodes for i in range(min(n.max_count, len(requests)))]
    order = sorted(range(len(requests)), key=lambda i: (-requests[i].gpus, -requests[i].cpus - requests[i].free_cpus))
    where: dict[int, str] = {}
    for i in order:
        r = requests[i]
        slot = next((s for s in free if s[1] + 1e-9 >= r.cpus + r.free_cpus and s[2] + 1e-9 >= r.gpus), None)
        if slot is None:
            raise PlanError(f"{len(where)} of {len(requests)} placed, then no node had room for another")
        slot[1] -= r.cpus + r.free_cpus  # the CPUs kept free beside it are not for later requests either
        slot[2] -= r.gpus
        where[i] = slot[0]
    return [where[i] for i in range(len(requests))]


def check(cfg: Config, nodes: list[NodeShape], what: str = "the run") -> dict[str, list[str]]:
    """Every stage of ``cfg`` placed on ``nodes``: stage -> the node of each request. Raises
    :class:`PlanError` listing every stage that does not fit, with its requests and the nodes."""
    placed, errors = {}, []
    for stage in stages(cfg, nodes):
        try:
            placed[stage.name] = pack(stage.requests, nodes)
        except PlanError as e:
            n = len(stage.requests)
            errors.append(f"  {stage.name}: {n} x {stage.requests[0]}: {e}; {stage.hint}")
    if errors:
        shapes = "; ".join(str(n) for n in nodes)
        raise PlanError(f"{what} does not fit its nodes ({shapes}):\n" + "\n".join(errors))
    return placed
