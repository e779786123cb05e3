"""Fine-tune a diffusers UNet with PoGDiff on Ray (prepares the data first if needed).

    python jobs/train.py configs/default.yaml --evaluate   # the embedded default (scripts/run_default.sh)
    python jobs/train.py                               # the config defaults: Digits-IT2I M from scratch, 2 CPU workers
    python jobs/train.py configs/tiny.yaml             # seconds: Digits-IT2I S, tiny UNet
    python jobs/train.py configs/sd15.yaml --set data.dataset=/data/people --set loss.a1=2   # SD v1.5, one GPU node
    ray job submit --working-dir . -- python jobs/train.py configs/sd15_cluster.yaml     # SD v1.5, 4 GPU workers
"""

import argparse
import sys

from pogdiff_dist.config import load_config
from pogdiff_dist.runtime import absolute_paths, check_output_paths
from pogdiff_dist.storage import Store, check_storage
from pogdiff_dist.train.driver import run_train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (sections: data, model, prepare, loss, optim, train, tracking, ray)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set loss.neighbor_grad=stop (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="also Ray Data progress bars, library info logs and known-harmless warnings (ray.verbose)")
    p.add_argument("--resume", action="store_true", help="continue run train.name from its latest checkpoint")
    p.add_argument("--evaluate", action="store_true",
                   help="then evaluate the export (jobs/evaluate.py with the config's eval section) and log eval/* "
                        "into the run: identity accuracy for all, majority and few-shot identities, DINO, FID, gRecall")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.set, *(["ray.verbose=true"] if args.verbose else [])])
        check_output_paths(cfg)  # a submitted job's relative outputs would be deleted with Ray's copy
        absolute_paths(cfg)  # a missing relative input is a usage error here, before Ray starts
        check_storage(cfg)  # so is a missing bucket or one that refuses our credentials
    except ValueError as e:
        p.error(str(e))
    out = run_train(cfg, resume=args.resume, config_file=args.config)
    if args.evaluate:
        from pogdiff_dist.evaluation.evaluate import resolve_source, run_evaluate, run_settings_origin

        source = resolve_source(str(out.model_dir), None, out.run_id, out.tracking_uri, None)
        run_evaluate(source, out.run_dir / "eval", cfg.eval, ray_cfg=cfg.ray,
                     settings_from=run_settings_origin(out.run_dir))
        Store(out.location).upload("eval")  # next to the run when it lives in a bucket
    return 0


if __name__ == "__main__":
    sys.exit(main())
