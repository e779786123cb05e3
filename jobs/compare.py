"""Compare training runs and sweep trials tracked in MLflow: a table and plots.

    python jobs/compare.py --sweep runs/sweeps/psi               # a sweep's trials (its parent run)
    python jobs/compare.py --parent <sweep parent run id>
    python jobs/compare.py --experiment pogdiff                  # every run of an experiment
    python jobs/compare.py --runs <id> <id> ... --metric eval/dino_few
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python jobs/compare.py --experiment pogdiff

Prints one row per run (method, key params, all/few-shot metrics, best first by --metric,
default eval/accuracy_few) and writes to --out: comparison.csv, metric_vs_params.png (the
metric against each searched or differing hyperparameter) and identity_frequency.png
(per-identity metrics vs training images for the --top best runs that were evaluated).
"""

import argparse
import json
import sys
from pathlib import Path

from pogdiff_dist.output import quiet_logs
from pogdiff_dist.tracking.compare import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="DIR", help="a sweep folder (runs/sweeps/<name>): its parent run's trials")
    which.add_argument("--parent", metavar="RUN_ID", help="a sweep's parent run id: its child runs")
    which.add_argument("--experiment", metavar="NAME", help="every run of this experiment (sweep parents left out)")
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; "
                                          "with --sweep: the sweep's own)")
    p.add_argument("--metric", help="sort and plot by this metric (default: a sweep's objective, else "
                                    "eval/accuracy_few if logged)")
    p.add_argument("--mode", choices=["max", "min"], help="which end of --metric is best (default: the sweep's; "
                                                          "else min for fid and losses)")
    p.add_argument("--top", type=int, default=3, help="runs in the per-identity frequency plot (default %(default)s)")
    p.add_argument("--out", default="comparison", help="output folder (default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="also MLflow's info logs and progress bars")
    args = p.parse_args(argv)
    quiet_logs(args.verbose)
    parent, uri = args.parent, args.tracking_uri
    if args.sweep:
        state = Path(args.sweep) / "sweep.json"
        if not state.is_file():
            p.error(f"{state} not found: --sweep takes a folder written by jobs/tune.py (runs/sweeps/<name>)")
        s = json.loads(state.read_text())
        parent = s["parent_run_id"]
        if uri is None and "***" not in s["tracking_uri"]:  # a URI with credentials was stored redacted
            uri = s["tracking_uri"]
    try:
        result = compare(uri, experiment=args.experiment, parent_run_id=parent, run_ids=args.runs,
                         metric=args.metric, mode=args.mode, top=args.top, out_dir=args.out)
    except ValueError as e:
        p.error(str(e))
    print(result.table)
    print(f"\n{len(result.runs)} run(s), best first by {result.metric} ({result.mode}); hyperparameters: {', '.join(result.keys) or '-'}")
    for path in [result.csv, *result.plots.values()]:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
