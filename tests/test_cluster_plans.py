"""Every config meant for a cluster fits the nodes its cluster spec declares: prepare's encoder
actors and k-NN / density tasks, the training workers one per GPU node with CPUs left beside
them for their Ray Data read tasks, nothing on a num-cpus 0 head (pogdiff_dist/cluster_plan.py).
The fast tier packs the declared shapes; the integration tier starts Ray with nodes of those
shapes and shows that it schedules what the check passes and starves what it rejects."""

import shlex
import tarfile

import pytest
import yaml
from conftest import REPO

from pogdiff_dist.cluster_plan import PlanError, _quantity, check, kuberay_nodes, ray_up_nodes, stages
from pogdiff_dist.config import load_config
from pogdiff_dist.train.worker import READ_TASK_CPUS, READ_TASKS_PER_WORKER

CLUSTER = REPO / "cluster"
READ_CPUS = READ_TASK_CPUS * READ_TASKS_PER_WORKER


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def spec_nodes() -> dict:
    """Each cluster spec -> its node shapes."""
    return {"kuberay/raycluster.yaml": kuberay_nodes(_load("kuberay/raycluster.yaml")["spec"]),
            "kuberay/rayjob.yaml": kuberay_nodes(_load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]),
            "ray-up-aws.yaml": ray_up_nodes(_load("ray-up-aws.yaml"))}


# "One GPU node" (configs/sd15.yaml): the smallest GPU node the specs use, as `ray start` sees a g5.2xlarge.
ONE_GPU_NODE = next(n for n in ray_up_nodes(_load("ray-up-aws.yaml")) if n.gpus)


def _paths(cfg) -> list[str]:
    return [p for p in (cfg.data.dataset, cfg.model.pretrained, cfg.model.image_encoder, cfg.prepare.out_dir,
                        cfg.train.storage_path) if p]


def cluster_plans() -> list[tuple[str, str, list]]:
    """(config, spec, nodes) for every config under configs/ that targets a cluster: the config a
    spec's entrypoint names runs on that spec's own cluster; a config with paths on /shared runs on
    the long-lived clusters (raycluster, ray up) by `ray job submit`; a GPU config without them
    (use_gpu) on one GPU node."""
    job = _load("kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    named = {argv[2]: argv[3:]}
    nodes = spec_nodes()
    out = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        rel = str(path.relative_to(REPO))
        cfg = load_config(path)
        shared = any(p.startswith("/shared/") for p in _paths(cfg))
        if rel in named:
            out.append((rel, "kuberay/rayjob.yaml", nodes["kuberay/rayjob.yaml"]))
        if shared:
            out += [(rel, spec, nodes[spec]) for spec in ("kuberay/raycluster.yaml", "ray-up-aws.yaml")]
        elif cfg.train.use_gpu and rel not in named:
            out.append((rel, "one GPU node", [ONE_GPU_NODE]))
    return out


PLANS = cluster_plans()


def test_the_cluster_configs_are_all_selected():
    families = {f"configs/{f}{v}.yaml" for f in ("sd15", "sdxl", "sd3", "flux") for v in ("", "_cluster")}
    assert {c for c, _, _ in PLANS} == {"configs/cluster.yaml", *families}
    assert {s for _, s, _ in PLANS} == {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "ray-up-aws.yaml",
                                         "one GPU node"}


def test_node_shapes_read_from_the_specs():
    nodes = {spec: {n.group: (n.cpus, n.gpus, n.memory_gib, n.min_count, n.max_count) for n in shapes}
             for spec, shapes in spec_nodes().items()}
    assert nodes == {
        "kuberay/raycluster.yaml": {"head": (0, 0, 16, 1, 1), "gpu": (8, 1, 64, 0, 8)},  # autoscaling 0..8
        "kuberay/rayjob.yaml": {"head": (0, 0, 16, 1, 1), "gpu": (8, 1, 64, 2, 2)},
        "ray-up-aws.yaml": {"head": (0, 0, 32, 1, 1), "gpu_worker": (8, 1, 32, 0, 8)},  # m6i / g5.2xlarge
    }
    assert _quantity("500m", "cpu") == 0.5 and _quantity(8, "cpu") == 8 and _quantity("16G", "memory") == 16e9 / 2**30


@pytest.mark.parametrize("config,spec,nodes", PLANS, ids=[f"{c}@{s}" for c, s, _ in PLANS])
def test_every_stage_fits_the_nodes_it_is_meant_for(config, spec, nodes):
    cfg = load_config(REPO / config)
    placed = check(cfg, nodes, f"{config} on {spec}")
    shape = {f"{n.group}#{i}": n for n in nodes for i in range(n.max_count)}
    assert not any(node.startswith("head#") for where in placed.values() for node in where)  # num-cpus 0
    t = cfg.train
    # the training workers: one per single-GPU node, each leaving its read tasks' CPUs free beside it
    assert len(placed["train"]) == t.num_workers and len(set(placed["train"])) == t.num_workers
    for node in placed["train"]:
        assert shape[node].gpus >= 1 and shape[node].cpus - t.cpus_per_worker >= READ_CPUS
    # prepare's encoder actors, each on a GPU of its own (gpus_per_encoder auto: the run trains on GPUs)
    assert len(placed["prepare: encode"]) == cfg.prepare.num_encoders
    assert len(set(placed["prepare: encode"])) == cfg.prepare.num_encoders
    assert {r.gpus for s in stages(cfg, nodes) if s.name.startswith("prepare") for r in s.requests} == {1.0}


def test_auto_encoder_gpus_on_an_autoscaler_that_starts_with_no_gpu_node():
    """ray-up-aws.yaml starts with no GPU worker (min_workers 0): auto follows train.use_gpu."""
    nodes = spec_nodes()["ray-up-aws.yaml"]
    assert sum(n.gpus * n.min_count for n in nodes) == 0
    gpu_run = load_config(REPO / "configs/cluster.yaml")
    cpu_run = load_config(REPO / "configs/cluster.yaml", {"train.use_gpu": False})
    assert stages(gpu_run, nodes)[0].requests[0].gpus == 1.0
    assert stages(cpu_run, nodes)[0].requests[0].gpus == 0.0


def test_an_oversubscribed_spec_fails_with_a_clear_message():
    nodes = spec_nodes()
    # what configs/sd15_cluster.yaml asked for before: every CPU of the 8-CPU pods for the worker
    sd15 = load_config(REPO / "configs/sd15_cluster.yaml", {"train.cpus_per_worker": 8})
    with pytest.raises(PlanError) as e:
        check(sd15, nodes["kuberay/raycluster.yaml"], "configs/sd15_cluster.yaml on raycluster.yaml")
    msg = str(e.value)
    assert msg.startswith("configs/sd15_cluster.yaml on raycluster.yaml does not fit its nodes "
                          "(head x1 {CPU 0, GPU 0, 16 GiB}; gpu x8 {CPU 8, GPU 1, 64 GiB}):")
    assert "train: 4 x train worker {CPU 8 + 2 free beside it, GPU 1}: 0 of 4 placed" in msg
    assert "train.cpus_per_worker + 2 CPUs (its Ray Data read tasks)" in msg and "prepare" not in msg
    # and what configs/cluster.yaml asked of rayjob.yaml's 2 GPU pods: 4 GPU encoders
    digits = load_config(REPO / "configs/cluster.yaml", {"prepare.num_encoders": 4})
    with pytest.raises(PlanError, match=r"prepare: encode: 4 x encoder actor \{CPU 1, GPU 1\}: 2 of 4 placed"):
        check(digits, nodes["kuberay/rayjob.yaml"])


# ---------------------------------------------------------------------------------------------
# Integration: Ray itself, with nodes shaped like rayjob.yaml's pods


@pytest.fixture(scope="module")
def pod_shaped_cluster():
    """A local Ray cluster shaped like cluster/kuberay/rayjob.yaml: a num-cpus 0 head and its GPU
    pods (logical GPUs: Ray schedules them like real ones, nothing touches CUDA)."""
    import ray
    from ray.cluster_utils import Cluster

    nodes = spec_nodes()["kuberay/rayjob.yaml"]
    (head,) = [n for n in nodes if n.group == "head"]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": int(head.cpus), "num_gpus": int(head.gpus), "object_store_memory": 100 * 2**20})
    try:
        for n in nodes:
            for _ in range(n.max_count if n.group != "head" else 0):
                cluster.add_node(num_cpus=int(n.cpus), num_gpus=int(n.gpus), object_store_memory=100 * 2**20)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield ray, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def _stream_in_worker_group(ray, cfg, shard: str, timeout_s: float):
    """Reserve the worker group exactly as Ray Train does (train.driver.worker_bundles), start one
    actor per bundle holding the bundle's resources, and have each stream ``shard`` with Ray Data
    the way train/worker.py does. Returns the rows each worker read, or None when the reads did
    not finish within ``timeout_s``."""
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pogdiff_dist.train.driver import worker_bundles

    bundles, strategy = worker_bundles(cfg)
    pg = placement_group(bundles, strategy=strategy)
    ray.get(pg.ready(), timeout=60)  # the workers themselves are placed either way

    @ray.remote
    class Worker:
        def read(self, paths):
            import ray.data

            ds = ray.data.read_webdataset(paths, override_num_blocks=len(paths), num_cpus=READ_TASK_CPUS,
                                          concurrency=READ_TASKS_PER_WORKER)
            return len(ds.take_all())

    workers = [Worker.options(num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
               for i, b in enumerate(bundles)]
    try:
        return ray.get([w.read.remote([shard]) for w in workers], timeout=timeout_s)
    except GetTimeoutError:
        return None
    finally:
        for w in workers:
            ray.kill(w)
        remove_placement_group(pg)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "shard-000000.tar"
    src = path.parent / "s0.txt"
    with tarfile.open(path, "w") as tar:
        for key in ("s0", "s1", "s2"):
            src.write_text(f"caption of {key}")
            tar.add(src, arcname=f"{key}.txt")
    return str(path)


@pytest.mark.integration
def test_ray_schedules_the_worker_group_and_its_read_tasks_where_the_plan_says(pod_shaped_cluster, shard):
    ray, nodes = pod_shaped_cluster
    from pogdiff_dist.prepare.pipeline import resolve_gpus
    from pogdiff_dist.runtime import cluster_gpus

    assert cluster_gpus() == (2.0, None)  # GPU pods up, no autoscaler config reported
    assert resolve_gpus("auto", use_gpu=False) == 1.0
    cfg = load_config(REPO / "configs/cluster.yaml")  # rayjob.yaml's entrypoint config
    check(cfg, nodes)  # fits: 2 workers of {CPU 4, GPU 1} with 2 CPUs free beside each
    assert _stream_in_worker_group(ray, cfg, shard, timeout_s=180) == [3, 3]


@pytest.mark.integration
def test_ray_starves_the_read_tasks_of_a_plan_the_check_rejects(pod_shaped_cluster, shard):
    ray, nodes = pod_shaped_cluster
    cfg = load_config(REPO / "configs/cluster.yaml", {"train.cpus_per_worker": 8})
    with pytest.raises(PlanError, match=r"train: 2 x train worker \{CPU 8 \+ 2 free beside it, GPU 1\}"):
        check(cfg, nodes)
    # Ray places the workers (the pods have 8 CPUs each), and their read tasks wait: the run would hang
    assert _stream_in_worker_group(ray, cfg, shard, timeout_s=20) is None
