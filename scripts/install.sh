#!/usr/bin/env bash
# Create .venv (if missing) and install pogdiff_dist with every dependency, CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, exactly this spec: it resolves to the local CPU wheel (any other spec pulls CUDA).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# DeepSpeed's CPU backend JIT-builds its shared-memory op on first use; build it now, so a
# first run interrupted mid-build cannot leave a stale lock behind (see "When things go wrong").
.venv/bin/python -c "import torch; torch.cuda.is_available() or __import__('deepspeed.ops.op_builder.cpu', fromlist=['x']).ShareMemCommBuilder().load(verbose=False)" > /dev/null
