"""Write scripts/gpu-lock.txt: the exact versions of every package the Trainer-without-Ray path
needs beyond what a GPU machine is assumed to have (torch, transformers, accelerate, peft,
numpy, pyarrow, each with its own dependencies).

The closure is read from the Requires-Dist of the packages installed in the running
interpreter (this project's venv, i.e. what pip resolved there), evaluated for CPython 3.11
and 3.12 on Linux x86_64, without walking into the packages the machine provides. The roots
are the packages the code imports itself (diffusers, deepspeed, webdataset, Pillow for images,
matplotlib for the export's plots, yaml, tqdm, safetensors). Whether the folder built from
the lock is complete is checked for real by ``tests/test_gpu_wheels.py`` (an install with
``--no-index`` and dependency resolution into a venv that has only the provided packages,
then ``gpu_check --device cpu --tiny``).

    .venv/bin/python scripts/gpu_lock.py          # rewrites scripts/gpu-lock.txt
"""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROVIDED = ("torch", "transformers", "accelerate", "peft", "numpy", "pyarrow")
ROOTS = ("diffusers", "deepspeed", "webdataset", "pillow", "matplotlib", "pyyaml", "tqdm", "safetensors",
         "scipy")  # scipy: the evaluation's FID (scipy.linalg.sqrtm), which validation imports
PYTHONS = ("3.11", "3.12")
LOCK = Path(__file__).resolve().parent / "gpu-lock.txt"


def closure(python: str) -> dict[str, str]:
    """name -> installed version for every package reachable from ROOTS, not through PROVIDED."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    found: dict[str, str] = {}
    todo = list(ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in PROVIDED or name in found:
            continue
        dist = distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return found


def main() -> None:
    by_python = {py: closure(py) for py in PYTHONS}
    names = sorted(set().union(*by_python.values()))
    lines = []
    for name in names:
        versions = {py: c[name] for py, c in by_python.items() if name in c}
        version = next(iter(versions.values()))
        only = "" if len(versions) == len(PYTHONS) else " ; " + " or ".join(
            f'python_version == "{py}"' for py in versions)
        lines.append(f"{name}=={version}{only}")
    header = ("# Made by scripts/gpu_lock.py from this project's venv: every package the Trainer without Ray\n"
              f"# (benchmarks/gpu_check.py, the diffusers export and its plots) needs beyond {', '.join(PROVIDED)}.\n"
              "# scripts/gpu_wheels.sh fetches these as wheels; scripts/gpu_check.sh installs them with --no-index.\n")
    LOCK.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(lines)} packages)")


if __name__ == "__main__":
    main()
