#!/usr/bin/env bash
# Install everything, then run the embedded default: build Digits-IT2I M, prepare it on
# Ray Data, fine-tune with PoGDiff on 2 Ray Train CPU workers (DeepSpeed ZeRO-2), export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python jobs/train.py "$@"
