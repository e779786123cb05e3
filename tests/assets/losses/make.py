"""Writes the reference loss curves tests/test_reference_losses.py checks against.

A fixed-seed tiny run per method (one plain process, the synthetic prepared dataset of
tests/conftest.py, 8 optimiser steps): its per-step loss, denoising and PoG terms. Regenerate
only when a change is *meant* to move the numerics, and say so in the commit:

    python tests/assets/losses/make.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[2])]  # tests/ (conftest), the repo

from conftest import synthetic_cfg

METHODS = {"vanilla": {}, "pogdiff": {"loss.neighbor_grad": "full"}, "pogdiff_stop": {"loss.neighbor_grad": "stop"},
           "cbdm": {}, "t2h": {}, "diffrop": {}}
STEPS = 8


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        if "loss" in metrics:
            self.rows.append({"step": step, **{k: metrics[k] for k in ("loss", "loss_denoise", "loss_pog")}})

    def log_image(self, step, key, image):
        pass


def method_overrides(name: str) -> dict:
    return {"loss.method": name.removesuffix("_stop"), **METHODS[name]}


def run_curve(name: str, prepared: Path, work: Path) -> list[dict]:
    """The run's per-step losses: the Trainer in this process, no export, no checkpoint."""
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import LocalCheckpoints, read_local
    from pogdiff_dist.train.trainer import Trainer

    cfg = synthetic_cfg(**{**method_overrides(name), "optim.max_steps": STEPS, "train.log_every": 1,
                           "train.checkpoint_every": 1000, "optim.lr": 2e-3, "optim.warmup_steps": 2})
    rec = Recorder()
    init_single_process("cpu")
    trainer = Trainer(cfg, prepared, "cpu", 0, 1, report=LocalCheckpoints(work / name), tracker=rec, run_dir=None)
    trainer.fit(read_local(), final_checkpoint=False)
    return rec.rows


def build_prepared(out: Path) -> Path:
    from pogdiff_dist.data.synthetic import build_synthetic_prepared
    from pogdiff_dist.models import bundled_text_encoder_dir

    d = bundled_text_encoder_dir()
    build_synthetic_prepared(out, [6, 6, 2, 2], (1, 16, 16), d, d, max_length=16, k_max=4, samples_per_shard=8)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prepared = build_prepared(Path(tmp) / "prepared")
        for name in METHODS:
            rows = run_curve(name, prepared, Path(tmp))
            (HERE / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
            print(name, [round(r["loss"], 5) for r in rows])


if __name__ == "__main__":
    main()
