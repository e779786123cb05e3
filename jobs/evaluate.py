"""Evaluate an exported model: per-identity FID, DINO score, gRecall and identity accuracy,
for all and for few-shot identities (METHOD.md, "Evaluation"), generated on Ray.

    python jobs/evaluate.py --model runs/default/model                 # prepared dir from the run folder
    python jobs/evaluate.py --mlflow-run <run id>                      # the run's model; log eval/* into it
    python jobs/evaluate.py --model runs/default/model --set eval.steps=20 --set eval.num_images=16
    python jobs/evaluate.py --model m/ --prepared p/ --set eval.encoder=/models/dinov2-small
    python jobs/evaluate.py --lora runs/people-lora/lora                # the adapter on its base model

Evaluation settings are the config's ``eval`` section (``python jobs/train.py --help`` shows
the override syntax; the keys: num_images, steps, guidance_scale, seed, encoder, classifier,
fid_dims, fid_eps, grecall_threshold, few_threshold, identities, cache_dir). A training run's
model (its run folder, --mlflow-run, a run's --lora) is evaluated with that run's own eval
section (its config.yaml: what the run's --evaluate used), so the figures are comparable with
the run's; an ``eval:`` section in ``--config``, then ``--set eval.<key>=<value>``, override it.
Every printed figure says the settings it was computed with.

Writes <out>/metrics.json, metrics_vs_frequency.png, identity_confusion.png (identity bleed:
prompted x judged identity), grids/<identity>.png and images/<identity>/*.png (default out:
eval/ next to the model directory).
"""

import argparse
import sys
from pathlib import Path

from pogdiff_dist.evaluation.evaluate import eval_settings, resolve_source, run_evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", help="exported model directory (diffusers format, e.g. runs/<name>/model)")
    src.add_argument("--mlflow-run", metavar="RUN_ID",
                     help="MLflow run of a training: its model is found from the run, and eval/* metrics and "
                          "artifacts are logged into it (with --model: only the logging)")
    src.add_argument("--lora", metavar="DIR",
                     help="a LoRA adapter (runs/<name>/lora) loaded onto --model, or onto the base its run "
                          "trained from; runs/<name>/model is the same adapter merged")
    src.add_argument("--prepared", help="prepared dataset dir (default: the one the model's training run recorded)")
    src.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the run's own, "
                                            "else sqlite:///mlflow.db)")
    src.add_argument("--out", help="output directory (default: <model dir>/../eval)")
    cfg_ = p.add_argument_group("settings")
    cfg_.add_argument("--config", help="YAML config; its eval keys (over a run's own) and ray section are used")
    cfg_.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                      help="override one setting, e.g. --set eval.num_images=16 (repeatable; default: the "
                           "eval section of the model's training run, else the defaults)")
    ray_ = p.add_argument_group("Ray")
    ray_.add_argument("--workers", type=int, default=2, help="generation actors (default %(default)s)")
    ray_.add_argument("--cpus-per-worker", type=float, default=1.0, help="default %(default)s")
    ray_.add_argument("--gpus-per-worker", default="auto",
                      help="GPUs per generation actor; auto: 1 when the model's training used GPUs "
                           "(train.use_gpu), else 0 (default %(default)s)")
    p.add_argument("--verbose", action="store_true",
                   help="also Ray Data progress bars, library info logs and known-harmless warnings (ray.verbose)")
    args = p.parse_args(argv)
    try:
        source = resolve_source(args.model, args.prepared, args.mlflow_run, args.tracking_uri, args.lora)
        cfg, settings_from = eval_settings(source, args.config,
                                           [*args.set, *(["ray.verbose=true"] if args.verbose else [])])
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out) if args.out else source.model_dir.parent / "eval"
    gpus = args.gpus_per_worker if args.gpus_per_worker == "auto" else float(args.gpus_per_worker)
    run_evaluate(source, out, cfg.eval, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                 ray_cfg=cfg.ray, gpus_per_worker=gpus, settings_from=settings_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
