"""Evaluation of an exported model (METHOD.md, "Evaluation"): generate "An image of
{name}." for every identity with DDIM and fixed per-identity seeds, then, per identity and
in the feature space of a pluggable image encoder, FID, DINO score, gRecall and identity
accuracy, each averaged over all and over few-shot identities.

Modules, in data-flow order (none imports ray; the Ray distribution is
:mod:`pogdiff_dist.evaluation.generate`):

- ``evaluate``: :class:`EvalConfig`, per-identity generation, :func:`compute_metrics`,
  :func:`evaluate_model` (one process: what a Ray Tune trial calls)
- ``features``: image encoders and the real (training, held-out) images
- ``classifiers``: the Digits-IT2I digit CNN, the Faces-IT2I CNN and the nearest-centroid
  classifier
- ``metrics``: the pure metric math (FID, DINO score, gRecall, accuracy, averaging)
- ``report``: metrics.json, images, grids, the metric-vs-frequency plot, MLflow
"""

from pogdiff_dist.evaluation.evaluate import (
    METRICS,
    PROMPT,
    EvalConfig,
    compute_metrics,
    evaluate_model,
    generate_identity,
    identity_seed,
    load_pipeline,
)

__all__ = ["METRICS", "PROMPT", "EvalConfig", "compute_metrics", "evaluate_model", "generate_identity",
           "identity_seed", "load_pipeline"]
