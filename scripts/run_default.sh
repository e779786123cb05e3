#!/usr/bin/env bash
# Install everything, then run the embedded default (configs/default.yaml): build Digits-IT2I M,
# prepare it on Ray Data, fine-tune the checked-in base model (assets/digits-base) on its unseen
# names with the recommended recipe on 2 Ray Train CPU workers (DeepSpeed ZeRO-2), export, and
# evaluate the export: few-shot and majority identity accuracy at the end. Extra arguments go
# to jobs/train.py (e.g. --set optim.max_steps=100, --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python jobs/train.py configs/default.yaml --evaluate "$@"
