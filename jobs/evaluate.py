"""Evaluate an exported model: per-identity FID, DINO score, gRecall and identity accuracy,
for all and for few-shot identities (METHOD.md, "Evaluation"), generated on Ray.

    python jobs/evaluate.py --model runs/default/model                 # prepared dir from the run's config
    python jobs/evaluate.py --model runs/default/model --prepared runs/prepared --steps 20
    python jobs/evaluate.py --mlflow-run <run id>                      # find the run's model; log eval/* into it
    python jobs/evaluate.py --model m/ --prepared p/ --encoder /models/dinov2-small --num-images 20

Writes <out>/metrics.json, metrics_vs_frequency.png, grids/<identity>.png and
images/<identity>/*.png (default out: eval/ next to the model directory).
"""

import argparse
import sys
from pathlib import Path

from pogdiff_dist.config import RayConfig
from pogdiff_dist.evaluation import EvalConfig
from pogdiff_dist.evaluation.evaluate import CLASSIFIERS
from pogdiff_dist.evaluation.generate import resolve_source, run_evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", help="exported model directory (diffusers format, e.g. runs/<name>/model)")
    src.add_argument("--mlflow-run", metavar="RUN_ID",
                     help="MLflow run of a training: its model is found from the run, and eval/* metrics and "
                          "artifacts are logged into it (with --model: only the logging)")
    src.add_argument("--prepared", help="prepared dataset dir (default: prepare.out_dir of the model's training run)")
    src.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the run's own, "
                                            "else sqlite:///mlflow.db)")
    src.add_argument("--out", help="output directory (default: <model dir>/../eval)")
    d = EvalConfig()
    gen = p.add_argument_group("generation")
    gen.add_argument("--num-images", type=int, default=d.num_images, help="images per identity (default %(default)s)")
    gen.add_argument("--steps", type=int, default=d.steps, help="DDIM steps (default %(default)s)")
    gen.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help="default %(default)s")
    gen.add_argument("--seed", type=int, default=d.seed,
                     help="base seed; each identity's generator is seeded from (seed, name) (default %(default)s)")
    gen.add_argument("--identities", nargs="+", metavar="NAME", help="evaluate only these identities")
    met = p.add_argument_group("metrics")
    met.add_argument("--encoder", default=d.encoder,
                     help="'pixels' (offline default) or a local transformers vision model dir, e.g. DINOv2")
    met.add_argument("--classifier", default=d.classifier, choices=list(CLASSIFIERS),
                     help="identity classifier: the Digits-IT2I CNN, the Faces-IT2I CNN, nearest centroid of "
                          "encoder features, or auto (digits for Digits-IT2I, faces for Faces-IT2I, else centroid) "
                          "(default %(default)s)")
    met.add_argument("--fid-dims", type=int, default=d.fid_dims,
                     help="principal axes of the real features FID is computed on (default %(default)s)")
    met.add_argument("--few-threshold", type=int, help="few-shot = at most this many training images "
                                                       "(default: at most a fifth of the largest identity)")
    met.add_argument("--cache-dir", help="classifier cache (default: <prepared>/eval_cache)")
    ray_ = p.add_argument_group("Ray")
    ray_.add_argument("--workers", type=int, default=2, help="generation actors (default %(default)s)")
    ray_.add_argument("--cpus-per-worker", type=float, default=1.0, help="default %(default)s")
    ray_.add_argument("--gpus-per-worker", default="auto",
                      help="GPUs per generation actor; auto: 1 when the model's training used GPUs "
                           "(train.use_gpu), else 0 (default %(default)s)")
    ray_.add_argument("--ray-address", help="join this cluster (default: $RAY_ADDRESS, else a local cluster)")
    args = p.parse_args(argv)
    try:
        cfg = EvalConfig(num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                         seed=args.seed, encoder=args.encoder, classifier=args.classifier, fid_dims=args.fid_dims,
                         few_threshold=args.few_threshold, identities=args.identities, cache_dir=args.cache_dir)
        source = resolve_source(args.model, args.prepared, args.mlflow_run, args.tracking_uri)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out) if args.out else source.model_dir.parent / "eval"
    gpus = args.gpus_per_worker if args.gpus_per_worker == "auto" else float(args.gpus_per_worker)
    run_evaluate(source, out, cfg, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                 ray_cfg=RayConfig(address=args.ray_address), gpus_per_worker=gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
