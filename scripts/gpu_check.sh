#!/usr/bin/env bash
# GPU acceptance check (benchmarks/gpu_check.py): the Trainer without Ray on an SD v1.5 UNet,
# bf16, DeepSpeed ZeRO-2; writes benchmarks/results/gpu_check.json (or --out).
#
#   bash scripts/gpu_check.sh                                   # on a GPU machine
#   bash scripts/gpu_check.sh --device cpu --tiny --precision fp32 --out /tmp/gpu_check.json   # CPU code paths
#
# When the interpreter ($PYTHON, else .venv/bin/python, else python3) lacks the packages (a GPU
# machine that has torch, transformers, accelerate, peft, numpy and pyarrow only), those of
# scripts/gpu-lock.txt are installed offline from the wheel folder (.whl/, made by
# scripts/gpu_wheels.sh; GPU_CHECK_WHEELS names another) into a scratch venv (GPU_CHECK_VENV,
# default /tmp/pogdiff-gpu-venv) that sees the interpreter's own packages. pip resolves
# dependencies there, so a missing or too-old one stops the install with pip's message rather
# than an ImportError mid-run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
NEEDED="import deepspeed, diffusers, matplotlib, PIL, webdataset"

# A venv whose interpreter also sees every site directory of "$1" (what --system-site-packages
# gives for a system interpreter, and also right when "$1" is itself a venv or conda env, whose
# packages --system-site-packages would miss), then the lock installed into it from the folder.
install_scratch_venv() {
    local base=$1 venv=$2 wheels=$3 lock=scripts/gpu-lock.txt
    [ -d "$wheels" ] || { echo "gpu_check: the packages of $lock are missing and there is no $wheels/" \
        "(make it with scripts/gpu_wheels.sh where pip reaches an index, and bring it along)" >&2; exit 2; }
    local sites
    sites=$("$base" -c "import site, sys; print(repr([p for p in [*site.getsitepackages(),
        site.getusersitepackages()] if p in sys.path]))")
    "$base" -m venv --clear "$venv"
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
    # the venv keeps only its pip: a setuptools of its own (Python < 3.12) would hide the interpreter's
    "${pip[@]}" uninstall -q -y setuptools 2>/dev/null || true
    local purelib
    purelib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    echo "import site; list(map(site.addsitedir, $sites))" > "$purelib/_pogdiff_base_site.pth"
    local before after
    before=$("${pip[@]}" check 2>&1 || true)
    "${pip[@]}" install -q --no-index --only-binary=:all: --find-links "$wheels" -r "$lock"
    # conflicts the install created with what the interpreter already had (a locked version that
    # the machine's transformers does not accept, say); conflicts that were there before are not ours
    after=$("${pip[@]}" check 2>&1 || true)
    local new
    new=$(comm -13 <(sort <<<"$before") <(sort <<<"$after") | grep -v "^No broken requirements" || true)
    [ -z "$new" ] || { echo "gpu_check: the install from $wheels/ broke installed packages:" >&2; echo "$new" >&2; exit 2; }
}

# the interpreter: $PYTHON, else this checkout's .venv, else python3
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
    venv=${GPU_CHECK_VENV:-/tmp/pogdiff-gpu-venv}
    if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$NEEDED" 2>/dev/null; }; then
        install_scratch_venv "$PY" "$venv" "${GPU_CHECK_WHEELS:-.whl}"
    fi
    PY=$venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever else is installed
exec "$PY" benchmarks/gpu_check.py "$@"
