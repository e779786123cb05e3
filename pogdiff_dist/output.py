"""What reaches the terminal: our own progress lines, not library chatter.

Without ``--verbose`` (``ray.verbose``, ``$POGDIFF_VERBOSE`` on every Ray worker) the
libraries' INFO logs, their progress bars, :data:`HARMLESS_WARNINGS` and
:data:`HARMLESS_LOGS` stay out of the output; :mod:`pogdiff_dist.runtime` adds Ray's own
and hands :data:`QUIET_ENV` to every worker. No Ray import here: Ray Data's map actors (the
prepare encoder) and the evaluation actors call :func:`quiet_libraries` too.

What stays out was each checked to say nothing about the user's run (NOTES.md, "Output
filtering"); the causes that were ours (Ray's state API unreachable from the local cluster,
DeepSpeed guessing its accelerator) are fixed where they arise, not filtered.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "POGDIFF_VERBOSE"  # set on every worker by init_ray's runtime env
# Ray Train V2 re-routes print() in workers to a logger and also tees it to the wrapped
# stdout, so each line a worker printed reached the driver twice: plain print, once.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# Read by the libraries when they are imported, so they act in every process, also in Ray
# tasks that never run our code before loading a model (the k-NN and density stages).
QUIET_ENV = {
    # transformers' "Loading weights" bar at every from_pretrained, and the hub's: the load is
    # the same, only its progress bar goes (transformers reads it through huggingface_hub).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # MLflow's artifact upload bars
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # its INFO lines ("Started monitoring system metrics")
    # with a tracking server MLflow prints the run's and experiment's links as each run ends;
    # our summaries print the run's page (pogdiff_dist.tracking.runs.run_url_hint)
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
# Warnings that say nothing about the user's run (each checked to be harmless, see NOTES.md).
HARMLESS_WARNINGS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # inside DeepSpeed's ZeRO
    r"The minimum number of concurrent actors",  # Ray Data on a dataset of one block
    r"Add type hints to the `predict` method",  # MLflow, for the pyfunc wrapper of the export
    r"An input example was not provided",
    r"`torch\.jit\.script_method` is deprecated",
    # diffusers renamed from_pretrained's torch_dtype to dtype; the old name, which older
    # diffusers (pyproject allows them) only know, loads in the same dtype
    r"`torch_dtype` is deprecated",
)
# Log records (logger, message) that say nothing about the user's run; each logger's other
# records still pass.
HARMLESS_LOGS = (
    # DeepSpeed's WarmupLR and WarmupCosineLR read their own rate once in their constructor,
    # before step 0, and warn about that read: the rate they then set is the warm-up's start.
    ("DeepSpeed", r"Attempting to get learning rate from scheduler before it has started"),
    # A new local cluster: Ray turns token authentication on (its default) and says so. Only
    # this notice goes; "Token authentication is disabled" (RAY_AUTH_MODE=disabled) still shows.
    ("ray._private.authentication.authentication_token_setup", r"^Token authentication is enabled for this Ray"),
)

# Lines that library code print()s, with no switch to turn them off. DeepSpeed's CPU backend
# loads its shared-memory collectives op (built once per machine, then cached) at every
# engine start, and prints that it did.
HARMLESS_PRINTS = (r"^DeepSpeed \S*deepspeed_shm_comm\S* built successfully$",)


def resolve_verbose(verbose: bool | None) -> bool:
    return os.environ.get(VERBOSE_ENV) == "1" if verbose is None else verbose


class _DropMessages(logging.Filter):
    """Drops the records whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]):
        super().__init__("pogdiff_dist.output")
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def drop_harmless_logs(logs=HARMLESS_LOGS) -> None:
    """A filter on each logger of ``logs`` for its harmless messages (once per logger). A
    logger's filters survive its library's own setup (DeepSpeed sets the level and handler of
    its logger at import, whenever that happens), so this can run before or after the import."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern in logs:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropMessages)]
        logger.addFilter(_DropMessages(patterns))


def quiet_logs(verbose: bool | None = None) -> None:
    """INFO logs of every library (Ray Train's "Reporting training result ...", MLflow's
    "Creating initial MLflow database tables", Ray Data's summaries), :data:`HARMLESS_WARNINGS`,
    :data:`HARMLESS_LOGS` and :data:`QUIET_ENV`'s progress bars and links, unless ``verbose``
    (default: ``$POGDIFF_VERBOSE``). Our own progress lines are prints, so they stay. Imports
    nothing (a job that loads no model calls this alone)."""
    if resolve_verbose(verbose):
        return
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")
    drop_harmless_logs()
    os.environ.update(QUIET_ENV)


def quiet_libraries(verbose: bool | None = None) -> None:
    """:func:`quiet_logs`, and the transformers / diffusers progress bars of this process
    (their libraries imported already read ``QUIET_ENV`` too late)."""
    if resolve_verbose(verbose):
        return
    quiet_logs(verbose)
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" at every from_pretrained
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components", "Writing model shards"


@contextlib.contextmanager
def without_harmless_prints(verbose: bool | None = None, prints=HARMLESS_PRINTS):
    """Around a library call that print()s one of ``prints``: inside, this process's stdout
    is held; afterwards (also after an exception) every held line but those is written, in its
    order. Log records are not held (a logging handler keeps the stream it was made with). A
    no-op with ``verbose`` (default: ``$POGDIFF_VERBOSE``)."""
    if resolve_verbose(verbose):
        yield
        return
    pattern = re.compile("|".join(f"(?:{p})" for p in prints))
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        sys.stdout.write("".join(line for line in held.getvalue().splitlines(keepends=True)
                                 if not pattern.search(line.rstrip("\n"))))
