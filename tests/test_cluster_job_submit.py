"""`ray job submit --working-dir . -- python jobs/train.py <config>` against a real local head."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_trains(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    # Token auth on purpose (a bare ray.init() elsewhere may have enabled it): an explicit
    # token shared by head and client, so the test does not depend on ~/.ray state.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           # The job's `python` entrypoint resolves on the head's PATH: put this venv first, as
           # an activated venv would (CI does not activate one).
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # --block keeps the head in this process group, so the test stops exactly this cluster
    # (a global `ray stop` would also kill other sessions' clusters).
    # Every port of its own: another local Ray cluster on this machine (a training next to the
    # suite) holds the fixed defaults, e.g. the dashboard agent's 52365, and a head whose agent
    # cannot bind never takes a job ("No available agent to submit job").
    agent_ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                           "metrics-export-port", "runtime-env-agent-port",
                                                           "node-manager-port", "object-manager-port",
                                                           "ray-client-server-port")]
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *agent_ports],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", dash)) == 0:
                break
        assert head.poll() is None, head.stdout.read().decode()[-3000:]
        time.sleep(1)
    else:
        raise AssertionError("Ray head's dashboard did not come up in 90 s")
    runs = tmp_path / "runs"
    submit = [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
              "python", "jobs/train.py", "configs/tiny.yaml", "--set", "optim.max_steps=2"]
    try:
        # The README's example with the defaults: relative outputs would land in Ray's temporary
        # copy of the working dir, so the job stops before any work, naming the settings. Its
        # submission also waits out the job agent's start: the dashboard port opens before the
        # agent registers (minutes on a loaded 2-core machine), so poll, bounded, until it takes a job.
        agent_deadline = time.time() + 600
        while True:
            refused = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, check=False)
            if "No available agent" not in refused.stdout + refused.stderr or time.time() > agent_deadline:
                break
            time.sleep(5)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "train.storage_path='runs'" in said and "Ray deletes" in said, said[-3000:]
        # then with shared absolute outputs, evaluating the export in the same job (--evaluate)
        out = subprocess.run(submit + ["--set", f"train.storage_path={runs}", "--set",
                                       f"prepare.out_dir={tmp_path / 'prepared'}", "--set",
                                       f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                       "--evaluate", "--set", "eval.num_images=2", "--set", "eval.steps=2"],
                             env=env, capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout + out.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
    # after the head (and its session's copy of the working dir) is gone, the results are where they were asked to be
    metrics = json.loads((runs / "tiny" / "metrics.json").read_text())
    assert metrics["final_step"] == 2
    assert (runs / "tiny" / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from mlflow.tracking import MlflowClient

    run_id = json.loads((runs / "tiny" / "pogdiff_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["final_step"] == 2
    evaluated = json.loads((runs / "tiny" / "eval" / "metrics.json").read_text())["summary"]
    assert 0.0 <= evaluated["accuracy_few"] <= 1.0 and run.data.metrics["eval/accuracy_few"] == evaluated["accuracy_few"]
    assert "[evaluate]" in out.stdout and "few-shot" in out.stdout
