#!/usr/bin/env bash
# GPU acceptance check (benchmarks/gpu_check.py): the Trainer without Ray on an SD v1.5 UNet,
# bf16, DeepSpeed ZeRO-2; writes benchmarks/results/gpu_check.json (or --out).
#
#   bash scripts/gpu_check.sh                                   # on a GPU machine
#   bash scripts/gpu_check.sh --device cpu --tiny --precision fp32 --out /tmp/gpu_check.json   # CPU code paths
#
# On a machine without this project's venv (the GPU test machine), the packages it lacks
# are installed offline from .whl/ (made by scripts/gpu_wheels.sh) into a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import diffusers, deepspeed, webdataset" 2>/dev/null; then
        [ -d .whl ] || { echo "gpu_check: diffusers/deepspeed/webdataset missing and no .whl/ (run scripts/gpu_wheels.sh where pip works)" >&2; exit 2; }
        site=${GPU_CHECK_SITE:-/tmp/pogdiff-site}
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
