"""The cluster specs parse and agree with the code: image, Ray version, entrypoint, config,
shared volume, GPU workers, localhost-only dashboards."""

import re
import shlex
from importlib.metadata import version

import pytest
import yaml
from conftest import REPO

CLUSTER = REPO / "cluster"
IMAGE = "pogdiff-dist:0.1.0"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _constraint(pkg: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == pkg:
            return line.split("==")[1].strip()
    raise AssertionError(f"{pkg} not pinned in constraints.txt")


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _cluster_specs():
    raycluster = _load("kuberay/raycluster.yaml")
    rayjob = _load("kuberay/rayjob.yaml")
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    return [raycluster["spec"], rayjob["spec"]["rayClusterSpec"]]


def test_dockerfile_base_matches_pinned_ray_and_installs_package():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base.startswith(_constraint("ray") + "-py311")
    assert _constraint("ray") == version("ray")
    assert 'pip install --no-cache-dir -c constraints.txt -e ".[gpu]"' in dockerfile
    for path in re.findall(r"^COPY --chown=\S+ (.+) \./", dockerfile, re.MULTILINE):
        for part in path.split():
            assert (REPO / part).exists(), part


@pytest.mark.parametrize("spec_index", [0, 1])
def test_kuberay_clusters(spec_index):
    spec = _cluster_specs()[spec_index]
    assert spec["rayVersion"] == version("ray")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["rayStartParams"]["num-cpus"] == "0"
    claim = _load("kuberay/storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    groups = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in groups:
        (container,) = _containers(template)
        assert container["image"] == IMAGE
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for group in spec["workerGroupSpecs"]:
        (container,) = _containers(group["template"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_entrypoint_runs_train_with_a_valid_cluster_config():
    from pogdiff_dist.config import load_config

    job = _load("kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and (REPO / argv[1]).is_file()
    cfg = load_config(REPO / argv[2])  # validates every field
    assert cfg.train.use_gpu and cfg.train.max_failures >= 1
    for path in (cfg.prepare.out_dir, cfg.train.storage_path):
        assert path.startswith("/shared/"), path  # on the volume every pod mounts
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1"
    # MLflow: the tracking server of mlflow.yaml, never SQLite on the shared volume
    assert cfg.tracking.tracking_uri is None and env["MLFLOW_TRACKING_URI"] == f"http://{_mlflow_service()}:5000"


def _mlflow_service() -> str:
    """cluster/kuberay/mlflow.yaml: one server (one SQLite writer) on its own ReadWriteOnce
    volume, artifacts on the shared claim; returns its Service name."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "mlflow.yaml").read_text())}
    deploy, service, claim = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    assert deploy["spec"]["replicas"] == 1 and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    argv = container["command"]
    assert argv[:2] == ["mlflow", "server"] and container["image"] == IMAGE
    store = argv[argv.index("--backend-store-uri") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert store == "sqlite:////mlflow/mlflow.db" and volumes[mounts["/mlflow"]] == claim["metadata"]["name"]
    assert argv[argv.index("--artifacts-destination") + 1].startswith("/shared/")
    assert volumes[mounts["/shared"]] == _load("kuberay/storage.yaml")["metadata"]["name"]
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    return service["metadata"]["name"]


def test_raycluster_pods_log_to_the_mlflow_server():
    head = _cluster_specs()[0]["headGroupSpec"]["template"]
    (container,) = _containers(head)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == f"http://{_mlflow_service()}:5000"


def test_ray_up_config():
    cfg = _load("ray-up-aws.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["docker"]["image"] == IMAGE
    assert cfg["head_node_type"] in cfg["available_node_types"]
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert any("/shared" in opt for opt in cfg["docker"]["run_options"])
    # the head runs the tracking server with its store on local disk; everything ray start launches inherits the URI
    assert "mlflow server" in head_cmd and "sqlite:////mlflow/mlflow.db" in head_cmd and "/shared/" not in \
        head_cmd.split("--backend-store-uri")[1].split()[0]
    assert "MLFLOW_TRACKING_URI=http://" in head_cmd
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(cfg["worker_start_ray_commands"])
    text = (CLUSTER / "ray-up-aws.yaml").read_text()
    assert not re.search(r"(aws_secret|AKIA[0-9A-Z]{12})", text)  # no credentials in the spec


def test_runtime_env_excludes_local_state():
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {".venv", "runs", "mlflow.db"} <= set(env["excludes"])


@pytest.mark.parametrize("name", ["sd15.yaml", "sd15_cluster.yaml"])
def test_sd15_configs_validate_with_the_papers_schedule(name):
    from pogdiff_dist.config import load_config

    cfg = load_config(REPO / "configs" / name)
    o, t, m = cfg.optim, cfg.train, cfg.model
    assert (o.lr, o.max_steps, o.batch_size) == (1e-5, 12000, 8)
    assert o.batch_size * o.grad_accum * t.num_workers == 32  # the paper's 8 x grad-accum 4
    assert (t.use_gpu, t.precision, t.zero_stage, t.ema) == (True, "bf16", 2, True)
    assert (cfg.data.resolution, cfg.data.channels, m.max_length) == (512, 3, 77)
    assert m.pretrained and m.image_encoder != "pixels" and cfg.prepare.gpus_per_encoder == "auto"
    if name == "sd15_cluster.yaml":
        paths = [cfg.data.dataset, m.pretrained, m.image_encoder, cfg.prepare.out_dir, t.storage_path]
        assert cfg.tracking.tracking_uri is None  # $MLFLOW_TRACKING_URI: the specs' tracking server
        assert all(p.startswith("/shared/") for p in paths), paths  # on the volume every pod mounts
        assert t.max_failures >= 1
