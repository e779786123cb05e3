#!/usr/bin/env bash
# Build, where pip reaches an index, the wheel folder that scripts/gpu_check.sh installs offline
# on a GPU machine: every package of scripts/gpu-lock.txt (what the Trainer without Ray needs
# beyond torch, transformers, accelerate, peft, numpy and pyarrow), at the locked version, as
# binary wheels for one CPython version on manylinux x86_64. DeepSpeed ships only an sdist: it
# is built here into a pure-Python wheel (DS_BUILD_OPS=0; its ops JIT-build where they run).
#
#   bash scripts/gpu_wheels.sh                          # CPython 3.12 (the GPU machine) into .whl/
#   bash scripts/gpu_wheels.sh --python 3.11 --out /tmp/whl
#
# PYTHON (default .venv/bin/python) runs pip and builds DeepSpeed, whose build imports torch.
# .whl/ is git-ignored: it reaches a GPU machine only when named explicitly (docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.12 out=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --python) version=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--python 3.12|3.11] [--out DIR]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
lock=scripts/gpu-lock.txt
mkdir -p "$out"
rm -f "$out"/*.whl  # only the lock's wheels travel
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" -r <(grep -v '^deepspeed==' "$lock")
# --no-build-isolation: the build imports torch, which must be this venv's CPU torch (an isolated
# build would fetch torch with its CUDA wheels); pip's wheel cache makes a rebuild take seconds
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$(grep '^deepspeed==' "$lock")"
# every locked name has its wheel (pip's names normalise - . _ alike)
wanted=$(grep -v '^#' "$lock" | sed 's/==.*//' | tr 'A-Z._' 'a-z--' | sort)
have=$(ls "$out" | sed 's/-[0-9].*//' | tr 'A-Z._' 'a-z--' | sort)
missing=$(comm -23 <(echo "$wanted") <(echo "$have"))
[ -z "$missing" ] || { echo "gpu_wheels: no wheel for: $missing" >&2; exit 1; }
echo "gpu_wheels: $(ls "$out" | wc -l) wheels for CPython $version in $out: $(du -sh "$out" | cut -f1)" \
     "($(du -sb "$out" | cut -f1) bytes)"
