"""What limits the embedded default (configs/default.yaml), one change at a time.

Each variant is configs/default.yaml plus a few overrides, fine-tuning assets/digits-base on
Digits-IT2I M, trained once per seed in segments and evaluated at every budget on the way
(benchmarks/curves.py's Curve: the library's Trainer in one process, micro-batch 16 = the
default's 2 workers x 8), with the default's own evaluation (16 images per identity, 25 DDIM
steps, the digits CNN judge, eval seed 0) unless --num-images / --eval-seeds say otherwise.
The figures that go into the README come from the real command (jobs/train.py ... --evaluate),
this only ranks the changes.

    python benchmarks/default_study.py --variants recipe vanilla --budgets 150 300 600 --seeds 0
    python benchmarks/default_study.py --base-accuracy      # the base model's own accuracy on its own names
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import curves
from curves import Curve, aggregate

OUT = REPO / "benchmarks" / "results" / "default-study"
WORK = REPO / "benchmarks" / ".work" / "default-study"
BASE = REPO / "assets" / "digits-base" / "unet"
POG = {"loss.method": "pogdiff"}  # default.yaml's swept psi stays in place
VAN = {"loss.method": "vanilla"}
VARIANTS: dict[str, dict] = {
    "recipe (default.yaml)": {},
    "recipe, lr 5e-4": {"optim.lr": 5e-4},
    "recipe, lr 1e-3": {"optim.lr": 1e-3},
    "recipe, stop-gradient y'": {"loss.neighbor_grad": "stop"},
    "recipe, uniform sampling": {"data.sampling": "uniform"},
    "recipe, power sampling 0.5": {"data.sampling": "power", "data.sampling_alpha": 0.5},
    "recipe, EMA 0.99": {"train.ema": True, "train.ema_decay": 0.99},
    "recipe, no caption dropout": {"train.caption_dropout": 0.0},
    "recipe, cross-attention LoRA r16": {"model.lora_rank": 16, "model.lora_targets": ["attn2.to_k", "attn2.to_v"],
                                         "optim.lr": 1e-3},
    "vanilla, uniform": {**VAN, "data.sampling": "uniform"},
    "vanilla, balanced": {**VAN, "data.sampling": "balanced"},
    "vanilla, balanced, lr 5e-4": {**VAN, "data.sampling": "balanced", "optim.lr": 5e-4},
    "vanilla, balanced, lr 1e-3": {**VAN, "data.sampling": "balanced", "optim.lr": 1e-3},
    "vanilla, uniform, lr 1e-3": {**VAN, "data.sampling": "uniform", "optim.lr": 1e-3},
}


class DefaultStudy:
    """The Experiment interface Curve needs, on configs/default.yaml."""

    preset = "M"

    def __init__(self, out: Path = OUT, work: Path = WORK):
        import yaml

        d = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
        self.out, self.work = out, work
        self.b = {"eval_steps": d["eval"]["steps"], "eval_guidance": d["eval"].get("guidance_scale", 3.0)}
        self.base = {f"{sec}.{k}": v for sec, vals in d.items() for k, v in vals.items()}
        self.log = out / "log.jsonl"

    def settings(self, preset: str, name: str, overrides: dict) -> dict:
        return {**self.base, "model.init_unet": str(BASE), "prepare.out_dir": str(self.work / "prepared"),
                "train.name": name, "train.storage_path": str(self.work / "runs"),
                "tracking.tracking_uri": f"sqlite:///{self.work / 'mlflow.db'}", **overrides}

    def _log(self, record: dict) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


class StudyCurve(Curve):
    def __init__(self, study: DefaultStudy, label: str, overrides: dict, seed: int, threads: int):
        super().__init__(study, label, {"train.cpus_per_worker": float(threads), **overrides}, seed, BASE)
        self.dir = study.work / "curves" / f"{curves.slug(label)}-s{seed}"


def ensure_prepared(study: DefaultStudy) -> Path:
    from pogdiff_dist.config import load_config

    cfg = load_config(None, study.settings("M", "prepare", {}))
    prepared = Path(cfg.prepare.out_dir)
    if not (prepared / "manifest.json").is_file():
        import ray

        from pogdiff_dist.prepare.pipeline import run_prepare
        from pogdiff_dist.runtime import init_ray

        init_ray(cfg.ray)
        try:
            run_prepare(cfg)
        finally:
            ray.shutdown()
    return prepared


def _base_pipeline():
    """assets/digits-base/unet with the default's text encoder and a DDIM scheduler."""
    from diffusers import UNet2DConditionModel

    from pogdiff_dist.config import ModelConfig
    from pogdiff_dist.models import TextEncoder, build_noise_scheduler, bundled_text_encoder_dir
    from pogdiff_dist.pipeline import export_pipeline, load_pipeline

    out = WORK / "base-pipeline"
    if not (out / "model_index.json").is_file():
        import torch

        unet = UNet2DConditionModel.from_pretrained(str(BASE)).to(torch.float32)
        d = bundled_text_encoder_dir()
        export_pipeline(out, unet, build_noise_scheduler(ModelConfig(unet="small")), TextEncoder(d, d, 32))
    pipe = load_pipeline(out, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_accuracy(num_images: int, seed: int, steps: int = 25, guidance: float = 3.0) -> dict:
    """The base model's digits-judge accuracy on its own ten names (BASE_NAMES): how well the
    starting point draws each digit, the ceiling a short fine-tune inherits."""
    import torch

    from pogdiff_dist.data.bundled.digits import BASE_NAMES, judge_spec
    from pogdiff_dist.data.records import IDENTITY_PROMPT
    from pogdiff_dist.evaluation.judges import CNNJudge
    from pogdiff_dist.pipeline import image_grid

    pipe = _base_pipeline()
    judge = CNNJudge.load_or_train(WORK / "judge", judge_spec(list(BASE_NAMES), 32, 1))
    per, grids = {}, []
    for k, name in enumerate(BASE_NAMES):
        images = np.asarray(pipe([IDENTITY_PROMPT.format(name=name)], num_inference_steps=steps, guidance_scale=guidance,
                                 num_images_per_prompt=num_images,
                                 generator=torch.Generator().manual_seed(seed * 100 + k)))
        per[name] = float(np.mean([p == name for p in judge.predict(images, None, list(BASE_NAMES))]))
        grids.append(images[:8])
    suffix = "" if (steps, guidance) == (25, 3.0) else f"-ddim{steps}-g{guidance:g}"
    image_grid(np.concatenate(grids), rows=len(BASE_NAMES), labels=list(BASE_NAMES)).save(OUT / f"base-grid{suffix}.png")
    return {"per_identity": per, "mean": float(np.mean(list(per.values()))), "num_images": num_images,
            "steps": steps, "guidance": guidance, "seed": seed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["recipe (default.yaml)"], metavar="NAME")
    p.add_argument("--set", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE,...",
                   help="an extra variant: 'label=optim.lr=1e-3,data.sampling=uniform'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 300, 600])
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.0, help="--base-accuracy only: classifier-free guidance")
    p.add_argument("--ddim-steps", type=int, default=25, help="--base-accuracy only: DDIM steps")
    p.add_argument("--tag", default="study")
    p.add_argument("--base-accuracy", action="store_true", help="only: the base model on its own names")
    p.add_argument("--prepare-only", action="store_true", help="only: prepare Digits-IT2I M as the default does")
    args = p.parse_args(argv)

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    study = DefaultStudy()
    study.out.mkdir(parents=True, exist_ok=True)
    if args.base_accuracy:
        res = base_accuracy(args.num_images, args.eval_seeds[0], args.ddim_steps, args.guidance)
        suffix = "" if (args.ddim_steps, args.guidance) == (25, 3.0) else f"-ddim{args.ddim_steps}-g{args.guidance:g}"
        (study.out / f"base-accuracy{suffix}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    variants = dict(VARIANTS)
    for spec in args.set:
        label, _, rest = spec.partition("=")
        ov = {}
        for kv in rest.split(","):
            k, _, v = kv.partition("=")
            ov[k] = yaml.safe_load(v)
        variants[label] = ov
        args.variants.append(label)
    unknown = set(args.variants) - set(variants)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
    ensure_prepared(study)
    if args.prepare_only:
        return
    t0 = time.time()
    runs = {v: [StudyCurve(study, v, variants[v], s, args.threads) for s in args.seeds] for v in args.variants}
    for s_i in range(len(args.seeds)):
        for v in args.variants:
            c = runs[v][s_i]
            for b in sorted(args.budgets):
                c.train_to(b)
                for es in args.eval_seeds:
                    sm = c.evaluate(b, es, args.num_images)["summary"]
                    print(f"[study] {v} seed {c.seed} @ {b}: all {sm['accuracy_all']:.3f} majority "
                          f"{sm['accuracy_majority']:.3f} few {sm['accuracy_few']:.3f}", flush=True)
    agg = aggregate(runs, sorted(args.budgets), args.eval_seeds, args.num_images)
    budgets = sorted(args.budgets)
    lines = [(f"# Default study ({args.tag}): configs/default.yaml + one change, seeds {args.seeds}, "
              f"{args.num_images} images/identity, eval seeds {args.eval_seeds}"), "",
             "Cells: accuracy all / majority / few-shot, mean over seeds (std of few-shot).", "",
             "| variant | s/step | " + " | ".join(f"{b} steps" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for v, row in agg.items():
        cells = []
        for b in budgets:
            r = row["budgets"].get(str(b))
            cells.append("n/a" if not r else
                         f"{r['accuracy_all']['mean']:.2f} / {r['accuracy_majority']['mean']:.2f} / "
                         f"{r['accuracy_few']['mean']:.2f} (±{r['accuracy_few']['std']:.2f})")
        sps = row["seconds_per_step"]
        lines.append(f"| {v} | {sps:.2f} | " if sps else f"| {v} | n/a | ")
        lines[-1] += " | ".join(cells) + " |"
    lines += ["", "Variants: " + json.dumps({v: variants[v] for v in args.variants}), "",
              "Reproduce: `python benchmarks/default_study.py " + " ".join(sys.argv[1:]) + "`", ""]
    md = "\n".join(lines)
    (study.out / f"{args.tag}.md").write_text(md)
    (study.out / f"{args.tag}.json").write_text(json.dumps({"rows": agg, "variants": variants}, indent=1))
    print(md)
    print(f"[study] {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
