"""What reaches the terminal: our own progress lines, not library chatter.

Without ``--verbose`` (``ray.verbose``, ``$POGDIFF_VERBOSE`` on every Ray worker) the
libraries' INFO logs, their progress bars and :data:`HARMLESS_WARNINGS` stay out of the
output; :mod:`pogdiff_dist.runtime` adds Ray's own. No Ray import here: Ray Data's map
actors (the prepare encoder, the evaluation generators) call :func:`quiet_libraries` too.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "POGDIFF_VERBOSE"  # set on every worker by init_ray's runtime env
# Ray Train V2 re-routes print() in workers to a logger and also tees it to the wrapped
# stdout, so each line a worker printed reached the driver twice: plain print, once.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# Warnings that say nothing about the user's run (each checked to be harmless, see NOTES.md).
HARMLESS_WARNINGS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # inside DeepSpeed's ZeRO
    r"The minimum number of concurrent actors",  # Ray Data on a dataset of one block
    r"Add type hints to the `predict` method",  # MLflow, for the pyfunc wrapper of the export
    r"An input example was not provided",
    r"`torch\.jit\.script_method` is deprecated",
)


def resolve_verbose(verbose: bool | None) -> bool:
    return os.environ.get(VERBOSE_ENV) == "1" if verbose is None else verbose


def quiet_libraries(verbose: bool | None = None) -> None:
    """INFO logs of every library (Ray Train's "Reporting training result ...", MLflow's
    "Creating initial MLflow database tables", Ray Data's summaries), the transformers /
    diffusers / MLflow progress bars and :data:`HARMLESS_WARNINGS`, unless ``verbose``
    (default: ``$POGDIFF_VERBOSE``). Our own progress lines are prints, so they stay."""
    if resolve_verbose(verbose):
        return
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" at every from_pretrained
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components", "Writing model shards"
