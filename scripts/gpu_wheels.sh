#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the packages the GPU test machine lacks, as Python 3.12
# x86_64 wheels: it has torch, transformers, accelerate, numpy, pyarrow... but no
# diffusers, deepspeed, webdataset (nor Ray, whose 79 MB wheel cannot travel: the check
# runs the Trainer without it). DeepSpeed ships only an sdist; it is built into a pure-Python
# wheel here (its ops JIT-build where they run). scripts/gpu_check.sh installs .whl/ offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
# versions: constraints.txt and what this venv resolved, so both machines run the same code
pins="diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
annotated-types==0.8.0 typing-inspection==0.4.5 importlib-metadata==9.1.0"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || \
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -sh .whl && ls .whl
