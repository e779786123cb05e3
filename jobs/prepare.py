"""Prepare a dataset for PoGDiff: encode (Ray Data), WebDataset shards, FAISS k-NN, text density.

    python jobs/prepare.py                              # bundled Digits-IT2I M
    python jobs/prepare.py --set data.dataset=/data/my_faces --set data.channels=3
    python jobs/prepare.py --set data.dataset=/data/my_faces/metadata.csv --set data.channels=3

data.dataset is a bundled dataset, a folder or its metadata.csv. Folder layouts: metadata.csv
(image,identity[,caption][,split]); or a folder per identity, <root>/<identity>/ or kohya-style
<root>/<repeats>_<identity>/ (15_Leila: identity Leila, each image seen 15 times per epoch with
data.sampling=uniform), captions in <identity>/captions.csv or <image stem>.txt next to each
image (default "An image of <identity>."). Files left unused are listed in the warnings.
Stages that are up to date (same inputs and config) are skipped.
"""

import argparse
import sys

from pogdiff_dist.config import load_config
from pogdiff_dist.prepare.pipeline import run_prepare
from pogdiff_dist.runtime import absolute_paths, check_output_paths, init_ray
from pogdiff_dist.storage import check_storage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--verbose", action="store_true",
                   help="also Ray Data progress bars, library info logs and known-harmless warnings (ray.verbose)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.set, *(["ray.verbose=true"] if args.verbose else [])])
        check_output_paths(cfg)  # a submitted job's relative outputs would be deleted with Ray's copy
        cfg = absolute_paths(cfg)  # the encoder actors and k-NN / density tasks run in other folders
        check_storage(cfg)  # a missing bucket or refused credentials: a usage error before any work
    except ValueError as e:
        p.error(str(e))
    init_ray(cfg.ray)
    run_prepare(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
