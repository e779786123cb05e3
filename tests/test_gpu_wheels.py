"""The GPU machine's offline install, reproduced on CPU.

A fresh venv holds only what a GPU machine is assumed to have (torch, transformers,
accelerate, peft, numpy, pyarrow, each with its own dependencies, at this venv's versions).
``scripts/gpu_wheels.sh`` builds the wheel folder of ``scripts/gpu-lock.txt`` for this Python;
``scripts/gpu_check.sh`` installs it with ``--no-index`` and dependency resolution into its
scratch venv (its own install path, nothing copied here) and runs ``gpu_check --device cpu
--tiny`` there. A package missing from the folder fails the install with pip's message.
"""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration
PROVIDED = ("transformers", "accelerate", "peft", "numpy", "pyarrow")  # and torch==2.13.0 (the local CPU wheel)


def _run(cmd, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def _offline_env(machine_python: Path, venv: Path, wheels: Path) -> dict:
    """gpu_check.sh's environment on a machine without an index: no pip configuration (this
    machine's names extra wheel folders), nothing of this checkout's venv on the path, and
    DeepSpeed's JIT-built op in a folder of its own (built against another interpreter, it
    would make every run sharing ~/.cache/torch_extensions rebuild it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PYTHON": str(machine_python), "GPU_CHECK_VENV": str(venv),
            "GPU_CHECK_WHEELS": str(wheels), "TORCH_EXTENSIONS_DIR": str(venv.parent / "torch_extensions")}


def test_wheel_folder_installs_offline_and_runs_gpu_check(tmp_path):
    machine = tmp_path / "machine"
    assert _run([sys._base_executable, "-m", "venv", machine]).returncode == 0
    python = machine / "bin" / "python"
    pins = ["torch==2.13.0", *(f"{name}=={version(name)}" for name in PROVIDED)]
    proc = _run([python, "-m", "pip", "install", "-q", *pins])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _run([python, "-c", "import diffusers"]).returncode != 0  # the machine lacks what the folder brings

    wheels = tmp_path / "whl"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = _run(["bash", REPO / "scripts" / "gpu_wheels.sh", "--python", py, "--out", wheels],
                env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    locked = [ln for ln in (REPO / "scripts" / "gpu-lock.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert len(list(wheels.glob("*.whl"))) == len(locked)

    # a folder without one of deepspeed's dependencies: the install stops with pip's message
    short = tmp_path / "whl-short"
    shutil.copytree(wheels, short)
    for whl in short.glob("msgpack-*.whl"):
        whl.unlink()
    gpu_check_sh = REPO / "scripts" / "gpu_check.sh"
    proc = _run(["bash", gpu_check_sh, "--device", "cpu", "--tiny"],
                env=_offline_env(python, tmp_path / "venv-short", short))
    assert proc.returncode != 0 and "msgpack" in proc.stderr, proc.stderr[-3000:]

    out, venv = tmp_path / "gpu_check.json", tmp_path / "venv"
    proc = _run(["bash", gpu_check_sh, "--device", "cpu", "--tiny", "--precision", "fp32", "--steps", "2",
                 "--warmup", "1", "--window", "1", "--methods", "full_lora8", "--out", out, "--work", tmp_path / "work"],
                env=_offline_env(python, venv, wheels), timeout=3600)  # about 3 minutes on 2 idle cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["checks"]["passed"] is True and r["completed"][-1] == "resume_and_export"
    code = "import deepspeed, diffusers, torch; print(deepspeed.__file__, diffusers.__file__, torch.__file__)"
    where = _run([venv / "bin" / "python", "-c", code]).stdout.splitlines()[-1].split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv))  # installed from the folder
    assert where[2].startswith(str(machine))  # torch: the machine's own
