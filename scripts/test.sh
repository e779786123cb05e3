#!/usr/bin/env bash
# Install everything, lint with ruff, then run the whole test suite (unit + Ray/DeepSpeed
# integration). Arguments go to pytest: `bash scripts/test.sh -m "not integration"` is the
# fast tier (pure CPU, no Ray cluster) for development.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# As if the venv were activated: subprocesses (ray CLI, job entrypoints) find its python.
export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
