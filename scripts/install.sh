#!/usr/bin/env bash
# Create .venv (if missing) and install pogdiff_dist with every dependency, CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, exactly this spec: it resolves to the local CPU wheel (any other spec pulls CUDA).
.venv/bin/python -m pip install -q torch==2.13.0
# FAISS: the cpu extra (faiss-cpu) by default; FAISS_EXTRA=gpu on a GPU machine installs faiss-gpu-cu12
# instead. Never both: they install the same faiss package, so the other one is removed first.
FAISS_EXTRA=${FAISS_EXTRA:-cpu}
case "$FAISS_EXTRA" in
    cpu) keep=faiss-cpu other=faiss-gpu-cu12 ;;
    gpu) keep=faiss-gpu-cu12 other=faiss-cpu ;;
    *) echo "install.sh: FAISS_EXTRA must be cpu or gpu, got '$FAISS_EXTRA'" >&2; exit 2 ;;
esac
if .venv/bin/python -m pip show -q "$other" > /dev/null 2>&1; then
    # the two share the faiss folder: removing one breaks the other, so both go and one comes back
    .venv/bin/python -m pip uninstall -q -y "$other" "$keep"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$FAISS_EXTRA,test]"
# DeepSpeed's CPU backend JIT-builds its shared-memory op on first use; build it now, so a
# first run interrupted mid-build cannot leave a stale lock behind (see "When things go wrong").
# A lock left by an interrupted build elsewhere on the machine is reported (naming the file)
# instead of waited on forever.
.venv/bin/python -c "import torch; from pogdiff_dist.train.engine import check_op_build_lock; torch.cuda.is_available() or (check_op_build_lock(), __import__('deepspeed.ops.op_builder.cpu', fromlist=['x']).ShareMemCommBuilder().load(verbose=False))" > /dev/null
