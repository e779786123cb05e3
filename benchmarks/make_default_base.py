"""Make the embedded default's pretrained base model: the checked-in ``assets/digits-base``.

The protocol of the reproduction, at the default's size: a ``small`` pixel-space UNet
(1.97M parameters, 32 x 32) trained with the vanilla loss on ``digits-it2i:base`` (the ten
digit classes under ten other names, 20 training images each: balanced), so it draws every
digit but has never seen the names of ``digits-it2i:M`` that ``configs/default.yaml``
fine-tunes it on. The exported UNet is written in fp16 safetensors (about 4 MB).

    .venv/bin/python benchmarks/make_default_base.py            # about 15 min on the 2-core CPU machine
    .venv/bin/python benchmarks/make_default_base.py --steps 50 --out /tmp/base   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {  # on top of configs/digits_base.yaml; the default's data and model sections must match
    "data.resolution": 32, "data.channels": 1, "model.unet": "small", "model.max_length": 32,
    "optim.lr": 5e-4, "optim.batch_size": 8, "optim.warmup_steps": 100, "optim.schedule": "cosine",
    "train.num_workers": 2, "train.ema": True, "train.ema_decay": 0.999, "train.checkpoint_every": 500,
    "train.log_every": 50, "train.sample_steps": 25, "train.samples_per_prompt": 4, "train.caption_dropout": 0.1,
}


def write_grid(model_dir: Path, out: Path, per_name: int = 6) -> Path:
    """Every base name, ``per_name`` images (50 DDIM steps, guidance 3, seed 0): the
    training run's own grid shows only its largest identity, and base has ten of equal size."""
    import numpy as np
    import torch

    from pogdiff_dist.data.bundled.digits import BASE_NAMES
    from pogdiff_dist.data.records import IDENTITY_PROMPT
    from pogdiff_dist.pipeline import image_grid, load_pipeline

    pipe = load_pipeline(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    images = pipe([IDENTITY_PROMPT.format(name=n) for n in BASE_NAMES], num_images_per_prompt=per_name,
                  generator=torch.Generator().manual_seed(0))
    image_grid(np.asarray(images), rows=len(BASE_NAMES), labels=list(BASE_NAMES)).save(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "default-base")
    p.add_argument("--out", type=Path, default=REPO / "assets" / "digits-base")
    args = p.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from pogdiff_dist.config import load_config
    from pogdiff_dist.train.driver import run_train

    t0 = time.time()
    settings = {**SETTINGS, "optim.max_steps": args.steps, "prepare.out_dir": str(args.work / "prepared"),
                "train.storage_path": str(args.work / "runs"), "train.name": "digits-base",
                "tracking.tracking_uri": f"sqlite:///{args.work / 'mlflow.db'}"}
    cfg = load_config(REPO / "configs" / "digits_base.yaml", settings)
    out = run_train(cfg)
    unet = UNet2DConditionModel.from_pretrained(str(out.model_dir / "unet")).to(torch.float16)
    args.out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(args.out / "unet"), safe_serialization=True)
    (args.out / "made_by.json").write_text(json.dumps({
        "script": "benchmarks/make_default_base.py", "config": "configs/digits_base.yaml", "settings": settings,
        "final_loss": out.metrics.get("final_loss"), "minutes": (time.time() - t0) / 60,
        "parameters": sum(p.numel() for p in unet.parameters())}, indent=1))
    write_grid(out.model_dir, args.out / "samples.png")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    print(f"[base] {args.out}: {size:.1f} MiB in {(time.time() - t0) / 60:.1f} min (samples: {args.out / 'samples.png'})")


if __name__ == "__main__":
    main()
