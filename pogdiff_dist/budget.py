"""Is the budget long enough? Exposures per image, and the advice a run prints at its end.

A fine-tune learns a new identity from how often it has seen that identity's images, not
from the step count: in the learning curves (benchmarks/curves.py, docs/LEARNING_CURVES.md)
vanilla's majority identities (30 images each) were at 0.73 identity accuracy, still rising,
after each of their images was seen ``MAJORITY_EXPOSURES`` (185) times. Under ``data.sampling`` an
image of identity c is seen

    e_c(steps) = steps * global_batch * lambda_c / sum_d(lambda_d * n_d)

times (``lambda_c`` from :func:`pogdiff_dist.data.sampling.expected_repeats`: balanced
sampling shows a 30-image identity's images ~1/3 as often as uniform sampling on
Digits-IT2I M), so the steps that reach a target exposure scale with the dataset's size
and fall with the batch. Pure functions; the trainer calls :func:`majority_advice` with its
last validation accuracy (``val/accuracy_majority``).
"""

from __future__ import annotations

import math

import numpy as np

from pogdiff_dist.data.sampling import expected_repeats

# Measured (docs/LEARNING_CURVES.md; benchmarks/results/reproduce-faces-it2i-cpu/curves-main.json):
# vanilla fine-tuning on Faces-IT2I M (3 identities of 30 images, 7 of 2; batch 16, lr 5e-4,
# uniform sampling), 3 seeds: majority accuracy 0.604 after 600 steps (92 exposures per image)
# and 0.729 after 1200 (185 exposures), still rising; it had not reached 0.8.
MAJORITY_EXPOSURES = 185.0
MAJORITY_REFERENCE_ACCURACY = 0.729
MAJORITY_THRESHOLD = 0.8


def exposures_per_image(steps: int, global_batch: int, counts, sampling: str = "uniform", alpha: float = 0.5,
                        repeats=None) -> np.ndarray:
    """[C]: how many times each training image of each identity has been seen after ``steps``
    optimiser steps of ``global_batch`` samples (micro-batch x workers x accumulation)."""
    n = np.asarray(counts, dtype=np.float64)
    lam = expected_repeats(n, sampling, alpha, repeats)
    rows_per_epoch = float((lam * n).sum())
    return lam * steps * global_batch / rows_per_epoch


def steps_for_exposures(target: float, global_batch: int, counts, sampling: str = "uniform", alpha: float = 0.5,
                        repeats=None, identities=None) -> int:
    """The steps after which every identity in ``identities`` (indices; default: all) has had
    ``target`` exposures per image."""
    per_step = exposures_per_image(1, global_batch, counts, sampling, alpha, repeats)
    idx = np.arange(len(per_step)) if identities is None else np.asarray(identities)
    return math.ceil(target / per_step[idx].min() - 1e-9)  # exact multiples are not rounded up


def majority_advice(accuracy_majority: float | None, step: int, global_batch: int, counts, sampling: str = "uniform",
                    alpha: float = 0.5, repeats=None, threshold: float = MAJORITY_THRESHOLD,
                    exposures: float = MAJORITY_EXPOSURES, few_fraction: float = 0.2) -> str | None:
    """What a run should print at its end when its validation says the majority identities are
    not learned yet (``accuracy_majority < threshold``), else None.

    Majority identities: more than ``few_fraction`` of the largest identity's images (the
    evaluation's own split). The advice names how often their images were seen, the steps at
    which they would have been seen ``exposures`` times under the run's sampling, and the
    command that continues the run."""
    if accuracy_majority is None or accuracy_majority >= threshold:
        return None
    n = np.asarray(counts, dtype=np.float64)
    majority = np.flatnonzero(n > few_fraction * n.max())
    seen = exposures_per_image(step, global_batch, n, sampling, alpha, repeats)[majority].min()
    target = steps_for_exposures(exposures, global_batch, n, sampling, alpha, repeats, majority)
    lines = [(f"[budget] the majority identities are not learned yet: validation identity accuracy "
              f"{accuracy_majority:.2f} < {threshold} at step {step}."),
             (f"  Each of their images was seen about {seen:.0f} times (data.sampling={sampling}); in the "
              f"project's learning curves (Faces-IT2I M) the majority was at {MAJORITY_REFERENCE_ACCURACY:.2f} "
              f"after {exposures:.0f} and still rising.")]
    if target > step:
        lines.append(f"  About {target} steps would give that here: continue this run with "
                     f"--resume --set optim.max_steps={target}.")
    else:
        lines.append("  That many exposures have been given: the learning rate, the base model or the "
                     "data (captions, identities that look alike) are the more likely limit.")
    if sampling != "uniform":
        lines.append(f"  data.sampling={sampling} shows the majority's images less often than uniform "
                     f"sampling does: it needs more steps for the same exposures.")
    return "\n".join(lines)
