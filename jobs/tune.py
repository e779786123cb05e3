"""Search PoGDiff hyperparameters with Ray Tune; every trial is a full Ray Train + DeepSpeed run.

    python jobs/tune.py configs/sweeps/psi.yaml                      # the sweep file's base config
    python jobs/tune.py configs/sweeps/psi.yaml --config configs/tiny.yaml --num-samples 4
    python jobs/tune.py configs/sweeps/psi.yaml --set optim.batch_size=16   # fixed for every trial
    python jobs/tune.py configs/sweeps/psi.yaml --resume             # continue sweep "psi" after the driver died

The sweep file names the search space (dotted config keys, as --set), the objective
(default eval/accuracy_few, max), rungs (steps at which each trial is evaluated and may be
stopped by ASHA), the search algorithm (optuna or random) and concurrency; see
configs/sweeps/psi.yaml. The data is prepared once before the sweep; all trials share it.

Writes runs/sweeps/<name>/: best_config.yaml (train it: python jobs/train.py <that file>),
trials.csv, and trials/trial-<id>/ (each trial's run: model, samples, eval at each rung).
MLflow: a parent run for the sweep, one child run per trial (python jobs/compare.py --sweep ...).
"""

import argparse
import sys

from pogdiff_dist.runtime import check_output_paths
from pogdiff_dist.tuning.driver import run_sweep
from pogdiff_dist.tuning.spec import load_sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML file (e.g. configs/sweeps/psi.yaml)")
    p.add_argument("--config", help="base config YAML (replaces the sweep file's base_config)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one base config value for every trial, e.g. --set optim.batch_size=16 (repeatable)")
    p.add_argument("--name", help="sweep name (default: the sweep file's name, e.g. psi)")
    p.add_argument("--num-samples", type=int, help="number of trials (replaces the file's num_samples)")
    p.add_argument("--max-concurrent-trials", type=int, help="replaces the file's max_concurrent_trials")
    p.add_argument("--verbose", action="store_true",
                   help="also Ray Data progress bars, library info logs and known-harmless warnings (ray.verbose)")
    p.add_argument("--resume", action="store_true",
                   help="continue sweep <name> (Tuner.restore): unfinished trials resume from their last rung")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: run failed trials again")
    args = p.parse_args(argv)
    try:
        overrides = args.set + (["ray.verbose=true"] if args.verbose else [])
        spec, base = load_sweep(args.sweep, base_config=args.config, overrides=overrides, name=args.name,
                                num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent_trials)
        check_output_paths(base)  # a submitted job's relative outputs would be deleted with Ray's copy
    except ValueError as e:
        p.error(str(e))
    out = run_sweep(spec, base, resume=args.resume, retry_failed=args.retry_failed)
    return 0 if out.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
